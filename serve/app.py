"""Ray Serve application: four deployments behind one FastAPI ingress.

    POST /recommend   Ingress: validate, build user features (adrec.recommend.FeatureBuilder)
                   -> UserEncoder (autoscaling, @serve.batch): U = user tower(features)
                   -> AdIndex: shortlist by U . V (exact, or FAISS IVF for big catalogs), + popular ads for cold users
                   -> Ranker: calibrated pCTR of each shortlisted ad (the DCN ranker)
                   -> Marketplace actor: targeting, budgets, frequency caps, eCPM = pCTR x bid
    PUT  /ads/{ad_id} (bearer token)   add or change an ad: embedded by the ad tower, inserted into the index
    POST /admin/reload (bearer token)  roll out another exported version; GET /model says which one serves
    GET  /healthz, /docs (OpenAPI)

The three model calls are chained as deployment responses, so intermediate results go from
replica to replica without a round trip through the ingress. Versions and ad updates are kept
in step across replicas by the app's ServingState actor (serve/versions.py).

Start it with ``serve run serve/config.yaml`` or ``serve run serve.app:build_app model_dir=...``.
"""


import asyncio
import hmac
import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import Annotated

import numpy as np
import ray
import torch
from fastapi import Depends, FastAPI, HTTPException, Path as PathParam, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from adrec.ads import AdUpdate, check_ad_update
from adrec.auction import FrequencyCap, Marketplace
from adrec.feedback.log import SegmentLog
from adrec.feedback.tokens import Impression, Signer, TokenError
from adrec.recommend import (
    RankingSide,
    RetrievalSide,
    UserQuery,
    UserSide,
    auction_rounds,
    feature_builder,
    is_cold,
    user_key,
    verified,
)
from adrec.registry import ArtifactError, resolve_model_dir
from adrec.runtime import resolve
from serve import errors
from serve.errors import error, responses
from serve.middleware import BodyLimit
from serve.schemas import (
    MAX_ID_LENGTH,
    AdAnswer,
    AdRequest,
    AppArgs,
    CapArgs,
    FeedbackAnswer,
    FeedbackRequest,
    RecommendedAd,
    RecommendRequest,
    RecommendResponse,
    ReloadAnswer,
    ReloadRequest,
    model_openapi,
)
from serve.versions import STATE_NAMESPACE, Versions, state_actor

logger = logging.getLogger("ray.serve")

ATTEMPTS = 3  # model chains sent per request at most: when a replica dies or stalls under one, within its deadline


def replica_lost(failure: BaseException) -> bool:
    """A replica of the chain died: this one, or one upstream (Serve 2.60 wraps that in RayServeException)."""
    return isinstance(failure, RayActorError) or isinstance(failure.__cause__, RayActorError)


api = FastAPI(title="adrec", description="Personalized ad recommendations: two-tower retrieval, DCN ranking, an eCPM auction.")
api.add_middleware(BodyLimit)
errors.install(api)
bearer = HTTPBearer(auto_error=False, description="the admin token (ADREC_ADMIN_TOKEN) of PUT /ads and /admin")


# Helpers the deployments call stand above them: Serve pickles a deployment's class when it is
# decorated, with the module globals that exist by then.
def feedback_secret(args: AppArgs) -> str | None:
    return args.feedback_secret.get_secret_value() if args.feedback_secret else os.environ.get(args.feedback_secret_env) or None


def one_thread() -> None:
    # Many replicas share two cores; intra-op threads per replica only fight each other.
    torch.set_num_threads(1)


def timed(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


@serve.deployment
class UserEncoder:
    """The user tower, batched across concurrent requests."""

    def __init__(self, model_dir: str, max_batch_size: int, batch_wait_timeout_s: float, poll_s: float) -> None:
        one_thread()
        self.versions = Versions("user_encoder", UserSide, state_actor(serve.get_replica_context().app_name, model_dir), poll_s)
        self.versions.start(model_dir)
        self.encode.set_max_batch_size(max_batch_size)
        self.encode.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch
    async def encode(self, features: list[dict[str, np.ndarray]], model_dirs: list[str]) -> list[tuple[np.ndarray, dict]]:
        """Each call's features (b_i rows) are encoded in one pass per version and split back: ((b_i, D), timing)."""
        started = time.perf_counter()
        out: list = [None] * len(features)
        for model_dir in set(model_dirs):
            calls = [i for i, d in enumerate(model_dirs) if d == model_dir]
            side = await self.versions.get(model_dir, 0)
            merged = {name: np.concatenate([features[i][name] for i in calls]) for name in side.tower.feature_names}
            users = np.split(side.encode(merged), np.cumsum([len(features[i]["user_id"]) for i in calls])[:-1])
            for i, user in zip(calls, users):
                out[i] = user
        timing = {"encode": timed(started), "batch": len(features)}
        return [(user, timing) for user in out]


@serve.deployment
class AdIndex:
    """The ad index of the serving version: the shortlist by U . V; new ads embedded on arrival."""

    def __init__(self, model_dir: str, index_options: dict, popular: int, poll_s: float) -> None:
        one_thread()
        state = state_actor(serve.get_replica_context().app_name, model_dir)
        self.versions = Versions("ad_index", lambda d: RetrievalSide(d, index_options, popular), state, poll_s)
        self.versions.start(model_dir)

    async def shortlist(self, encoded: tuple[np.ndarray, dict], n: int, cold: bool, model_dir: str, updates: int):
        """U (1, D) from the encoder -> (rows (n',), U . V (n',), timing)."""
        user, timing = encoded
        side = await self.versions.get(model_dir, updates)
        started = time.perf_counter()
        ((rows, scores),) = side.shortlist(user, n, [cold])
        return rows, scores, {**timing, "index": timed(started)}

    async def describe(self, model_dir: str, updates: int, ad_id: str | None = None) -> dict:
        side = await self.versions.get(model_dir, updates)
        index = side.index
        info = {"kind": index.kind, "size": index.size, "recall": index.recall, "updates": side.updates.report()}
        if ad_id is not None:
            info["ad_row"] = side.catalog.row_of.get(ad_id)
        return info


@serve.deployment
class Ranker:
    """Calibrated pCTR of every shortlisted ad, and the auction's view of them."""

    def __init__(self, model_dir: str, poll_s: float) -> None:
        one_thread()
        state = state_actor(serve.get_replica_context().app_name, model_dir)
        self.versions = Versions("ranker", RankingSide, state, poll_s)
        self.versions.start(model_dir)

    async def rank(self, features: dict[str, np.ndarray], shortlist, model_dir: str, updates: int):
        """The index's shortlist -> (Shortlist ranked by pCTR x bid, timing)."""
        rows, scores, timing = shortlist
        side = await self.versions.get(model_dir, updates)
        started = time.perf_counter()
        ranked = side.shortlist(features, rows, scores)
        return ranked, {**timing, "rank": timed(started)}

    async def describe(self, model_dir: str, updates: int) -> dict:
        return {"updates": (await self.versions.get(model_dir, updates)).updates.report()}


class IngressSide:
    """What the ingress needs of one version: the request -> features transform and the names it accepts."""

    def __init__(self, model_dir: str) -> None:
        self.model_dir, self.version = verified(model_dir)
        self.features = feature_builder(self.model_dir)
        self.openapi: dict | None = None  # the app's document narrowed to this version, built on first ask


def market_actor(app_name: str, cap: CapArgs, explore: float):
    """The app's one Marketplace: budgets and frequency caps stay exact however many replicas ask."""
    remote = ray.remote(num_cpus=0, max_restarts=-1)(Marketplace)
    return remote.options(name=f"{app_name}-market", namespace=STATE_NAMESPACE, lifetime="detached", get_if_exists=True).remote(
        FrequencyCap(cap.max_impressions, cap.window_s), explore=explore
    )


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, encoder: DeploymentHandle, index: DeploymentHandle, ranker: DeploymentHandle, args: dict) -> None:
        self.args = AppArgs(**args)
        self.encoder, self.index, self.ranker = encoder, index, ranker
        app_name = serve.get_replica_context().app_name
        self.state = state_actor(app_name, self.args.model_dir)
        self.market = market_actor(app_name, self.args.frequency_cap, self.args.explore)
        self.versions = Versions("ingress", IngressSide, self.state, self.args.poll_s)
        self.versions.start(self.args.model_dir)
        self.registry = Path(self.args.model_dir).parent
        api.state.max_body_bytes = self.args.max_body_bytes
        api.openapi = self.openapi  # FastAPI's documented hook: the document says what this version accepts
        token = self.args.admin_token.get_secret_value() if self.args.admin_token else os.environ.get(self.args.admin_token_env)
        self.admin_token = token or None
        self.signer, self.feedback_log = self.feedback_setup()

    async def reconfigure(self, user_config: dict) -> None:
        """``user_config: {version: ...}`` in a Serve config rolls out that version, as POST /admin/reload does."""
        if user_config.get("version"):
            await self.state.begin_rollout.remote(str(self.version_dir(user_config["version"])))

    # --- helpers ---------------------------------------------------------------------------

    def feedback_setup(self) -> tuple[Signer | None, SegmentLog | None]:
        """The token signer (when a secret is configured) and this replica's segment writer (when a feedback_dir is)."""
        args = self.args
        secret = feedback_secret(args)
        signer = Signer(secret.encode(), args.token_ttl_s) if secret else None
        log = None
        if signer is not None and args.feedback_dir:
            log = SegmentLog(resolve(args.feedback_dir), f"{self.versions.replica}-{os.getpid()}")
        return signer, log

    def sign(self, request: RecommendRequest, request_id: str, version: str, ad) -> str | None:
        if self.signer is None:
            return None
        impression = Impression(request_id, user_key(request.user_id), ad.ad_id, version, time.time(),
                                request.context.get("slot"), request.context.get("device"), ad.propensity)
        return self.signer.sign(impression)

    def openapi(self) -> dict:
        """The OpenAPI document of the serving version (GET /openapi.json, /docs)."""
        side = self.versions.sides.get(self.versions.view.get("serving"))
        if side is None:
            return FastAPI.openapi(api)
        if side.openapi is None:
            side.openapi = model_openapi(FastAPI.openapi(api), self.args, side.features.feature_map)
        return side.openapi

    def require_admin(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        if self.admin_token is None:
            raise error(403, f"write and admin endpoints are off: set {self.args.admin_token_env} (or args.admin_token)", "forbidden")
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), self.admin_token.encode()):
            raise error(401, "a valid 'Authorization: Bearer <token>' header is required", "unauthorized", ["header", "authorization"],
                        headers={"WWW-Authenticate": "Bearer"})

    def version_dir(self, version: str | None) -> Path:
        """A version folder of this app's registry (never an arbitrary path), verified."""
        target = self.registry / version if version else self.registry
        if version in (".", "..") or not target.is_dir():  # the pattern admits dots; never a folder outside the registry
            raise error(404, f"{self.registry.name} has no version {version!r}", "not_found", ["body", "version"])
        try:
            return verified(resolve_model_dir(target))[0]
        except (ArtifactError, OSError) as failure:
            raise error(422, f"not a loadable version of {self.registry.name}: {failure}", "not_loadable", ["body", "version"])

    async def side(self) -> tuple[str, int, IngressSide]:
        view = self.versions.view
        return view["serving"], view["updates"], await self.versions.get(view["serving"], 0)

    async def retrieve_and_rank(self, features: dict, cold: bool, n: int, model_dir: str, updates: int, deadline: float):
        """encoder -> index -> ranker, chained replica to replica, answered before ``deadline`` (a
        perf_counter time). Hedged: when the chain has not answered in half the time left, another
        is sent beside it, and the first answer wins; a chain whose replica died is replaced the
        same way; at most ``ATTEMPTS`` in all. Under Serve 2.60 a request caught by a replica's
        death sometimes never answered (one kill test in three); a slow but healthy chain keeps running."""
        running: set[asyncio.Task] = set()
        sent = 0
        try:
            while True:
                if sent < ATTEMPTS:
                    running.add(asyncio.ensure_future(self.chain(features, cold, n, model_dir, updates)))
                    sent += 1
                left = deadline - time.perf_counter()
                if left <= 0:
                    raise asyncio.TimeoutError
                done, running = await asyncio.wait(running, timeout=left / 2 if sent < ATTEMPTS else left, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    error = task.exception()
                    if error is None:
                        return task.result()
                    if not replica_lost(error) or (sent == ATTEMPTS and not running):
                        raise error
                    logger.warning("adrec: a replica died during a request (%s); sending the chain again", type(error).__name__)
                if not done and sent == ATTEMPTS:
                    raise asyncio.TimeoutError  # waited all the time that was left
        finally:
            for task in running:
                task.cancel()

    async def chain(self, features: dict, cold: bool, n: int, model_dir: str, updates: int):
        """One pass through the model deployments: (Shortlist ranked by pCTR x bid, timing)."""
        encoded = self.encoder.encode.remote(features, model_dir)
        shortlist = self.index.shortlist.remote(encoded, n, cold, model_dir, updates)
        return await self.ranker.rank.remote(features, shortlist, model_dir, updates)

    async def run_auction(self, request: RecommendRequest, features: dict, cold: bool, model_dir: str, updates: int, deadline: float):
        """(the auction's result, milliseconds per hop); ``hops`` is the chain's time outside the three model calls."""
        chain = time.perf_counter()
        ranked, timing = await self.retrieve_and_rank(features, cold, max(self.args.shortlist, request.k), model_dir, updates, deadline)
        chain_ms = timed(chain)
        auction = time.perf_counter()
        key, values = user_key(request.user_id), {**request.attributes, **request.context}
        rounds = auction_rounds(ranked, request.k)
        try:  # the same rounds as adrec.recommend.run_rounds, each one a call to the shared Marketplace actor
            chunk, wanted = next(rounds)
            while True:
                chunk, wanted = rounds.send(await self.market.run.remote(key, values, chunk, wanted))
        except StopIteration as done:
            result = done.value
        hops = chain_ms - timing["encode"] - timing["index"] - timing["rank"]
        return result, {"encode": timing["encode"], "index": timing["index"], "rank": timing["rank"], "hops": round(hops, 3), "auction": timed(auction)}

    # --- endpoints -------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model_version": (await self.side())[2].version}

    def request_problems(self, request: RecommendRequest, side: IngressSide) -> list[dict]:
        """What the model and the app's limits refuse in a schema-valid request (the OpenAPI document states them)."""
        problems = []
        if request.k > self.args.max_k:
            problems.append({"loc": ["body", "k"], "msg": f"k is {request.k}; at most {self.args.max_k} (max_k)", "type": "less_than_equal"})
        if len(request.recent_ad_ids) > self.args.max_history:
            problems.append({"loc": ["body", "recent_ad_ids"], "msg": f"{len(request.recent_ad_ids)} recent ads; at most {self.args.max_history} (max_history)",
                             "type": "too_long"})
        known = {"attributes": side.features.attribute_columns, "context": side.features.context_columns}
        problems += [
            {"loc": ["body", field, key], "msg": f"unknown {field} field; this model knows {known[field]}", "type": "extra_forbidden"}
            for field in ("attributes", "context")
            for key in getattr(request, field)
            if key not in known[field]
        ]
        return problems

    @api.post("/recommend", response_model=RecommendResponse, responses=responses(400, 413, 422, 503))
    async def recommend(self, request: RecommendRequest, response: Response) -> RecommendResponse:
        started = time.perf_counter()
        model_dir, updates, side = await self.side()
        problems = self.request_problems(request, side)
        if problems:
            raise HTTPException(422, detail=problems)
        query = UserQuery(request.user_id, request.recent_ad_ids, request.attributes, request.context)
        features = side.features.build([query])
        cold = is_cold(side.features, query)
        feature_ms = timed(started)
        budget_s = min(request.tmax_ms or math.inf, self.args.deadline_ms) / 1000
        try:
            result, timing = await asyncio.wait_for(
                self.run_auction(request, features, cold, model_dir, updates, started + budget_s), budget_s - (time.perf_counter() - started)
            )
        except asyncio.TimeoutError:
            raise error(503, f"no answer within {budget_s * 1000:.0f} ms (deadline_ms / tmax_ms); serve a fallback and retry later", "deadline")
        timing = {"features": feature_ms, **timing, "total": timed(started)}
        response.headers["Server-Timing"] = ", ".join(f"{name};dur={value:.2f}" for name, value in timing.items())
        request_id = uuid.uuid4().hex
        return RecommendResponse(
            request_id=request_id,
            user_id=request.user_id,
            model_version=side.version,
            cold_start=cold,
            ads=[RecommendedAd(**vars(ad), token=self.sign(request, request_id, side.version, ad)) for ad in result.ads],
            candidates=result.candidates,
            removed=result.removed,
        )

    def ad_problems(self, update: AdUpdate) -> list[dict]:
        """What stops the serving version, or the one rolling out, from encoding ``update``: checked
        before the update is logged, because every index and ranker replica replays the log."""
        view = self.versions.view
        sides = [self.versions.sides[d] for d in (view.get("serving"), view.get("target")) if d in self.versions.sides]
        problems = {}
        for side in sides:
            for found in check_ad_update(side.features.feature_map, update):
                where = ["path"] if found["loc"][0] == "ad_id" else ["body"]
                problems.setdefault(str(found["loc"]), {**found, "loc": where + found["loc"]})
        return list(problems.values())

    @api.put("/ads/{ad_id}", responses=responses(400, 401, 403, 413, 422))
    async def put_ad(self, ad_id: Annotated[str, PathParam(min_length=1, max_length=MAX_ID_LENGTH)], ad: AdRequest,
                     credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)] = None) -> AdAnswer:
        """Add or change an ad: embedded by the serving version's ad tower and inserted into the index, no restart.

        The ad states every input of the model's ad tower and ranker (GET /openapi.json lists them);
        an ad the model cannot encode gets 422 naming each field and is never logged."""
        self.require_admin(credentials)
        model_dir, _, side = await self.side()
        update = AdUpdate(ad_id, ad.campaign_id, ad.bid, dict(ad.attributes))
        problems = self.ad_problems(update)
        if problems:
            raise HTTPException(422, detail=problems)
        if ad.budget is not None or ad.targeting is not None:
            await self.market.upsert_campaign.remote(ad.campaign_id, ad.budget, ad.targeting)
        updates = await self.state.add_ad.remote(update)
        self.versions.view["updates"] = max(self.versions.view["updates"], updates)  # this replica reads its own write
        indexed = await self.index.describe.remote(model_dir, updates, ad_id)
        return AdAnswer(ad_id=ad_id, ad_updates=updates, index_size=indexed["size"], model_version=side.version)

    @api.post("/feedback", responses=responses(400, 403, 413, 422, 503))
    async def feedback(self, body: FeedbackRequest) -> FeedbackAnswer:
        """Impressions, clicks and conversions of served ads. Answered only once the events are on
        disk (fsync'd); every event needs its ad's valid, unexpired token, or the batch gets 403."""
        if self.feedback_log is None:
            raise error(503, "feedback is off: set args.feedback_dir and ADREC_FEEDBACK_SECRET (or args.feedback_secret)", "feedback_off")
        if len(body.events) > self.args.max_events:
            raise error(422, f"{len(body.events)} events; at most {self.args.max_events} per request (max_events)", "too_long", ["body", "events"])
        now = time.time()
        records, refused = [], []
        for i, event in enumerate(body.events):
            try:
                impression = self.signer.verify(event.token, now)
                if impression.user != user_key(event.user_id):
                    raise TokenError("the token was issued for another user")
            except TokenError as failure:
                refused.append({"loc": ["body", "events", i, "token"], "msg": str(failure), "type": "invalid_token"})
                continue
            records.append({**vars(impression), "served_ts": impression.ts, "impression_id": impression.impression_id,
                            "event_id": event.event_id, "event": event.event, "user_id": event.user_id,
                            "ts": event.ts if event.ts is not None else now})
        if refused:
            raise HTTPException(403, detail=refused)
        await asyncio.to_thread(self.feedback_log.append, records)  # fsync off the event loop
        return FeedbackAnswer(accepted=len(records))

    @api.get("/model")
    async def model(self) -> dict:
        """The serving version, a rollout under way, the index, and the ad updates logged, with any
        that the index or ranker had to skip (``rejected``, the latest with their reasons)."""
        model_dir, updates, side = await self.side()
        view = self.versions.view
        index, ranker = await asyncio.gather(self.index.describe.remote(model_dir, updates), self.ranker.describe.remote(model_dir, updates))
        return {
            "version": side.version,
            "rolling_out": Path(view["target"]).name if view.get("target") else None,
            "previous": Path(view["previous"]).name if view.get("previous") else None,
            "ads_added": updates,
            "index": {name: value for name, value in index.items() if name != "updates"},
            "ad_updates": {"logged": updates, "ad_index": index["updates"], "ranker": ranker["updates"]},
        }

    @api.post("/admin/reload", response_model=ReloadAnswer,
              responses={202: {"model": ReloadAnswer, "description": "still rolling out after reload_timeout_s"}, **responses(400, 401, 403, 404, 413, 422)})
    async def reload(self, body: ReloadRequest, response: Response,
                     credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)] = None) -> ReloadAnswer:
        """Load another version on every replica while the current one serves; switch when all hold it."""
        self.require_admin(credentials)
        target = str(self.version_dir(body.version))
        view = await self.state.begin_rollout.remote(target)
        deadline = time.monotonic() + self.args.reload_timeout_s
        while view["serving"] != target and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            view = await self.state.view.remote()
        self.versions.view = {**self.versions.view, **view}
        if view["serving"] != target:
            response.status_code = 202
            return ReloadAnswer(rolling_out=Path(target).name)
        return ReloadAnswer(version=Path(target).name)


def nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def checked_model_dir(args: AppArgs) -> str:
    """The version every replica will load, checked here, where ``serve run`` prints why it cannot
    start; a replica's own failure reaches the console only as "Failed to update the deployments".
    Replicas read the environment of the shell that started them, as this process does."""
    problems = []
    model_dir = None
    try:
        model_dir = str(verified(resolve(args.model_dir))[0])
    except (ArtifactError, OSError) as failure:
        problems.append(f"model_dir: {failure}")
    secret = feedback_secret(args)
    if secret is not None and len(secret.encode()) < 16:
        problems.append(f"the feedback secret (args.feedback_secret or ${args.feedback_secret_env}) is {len(secret.encode())} bytes; "
                        "it must be at least 16: set a long random one")
    if args.feedback_dir and not os.access(nearest_existing(Path(resolve(args.feedback_dir))), os.W_OK):
        problems.append(f"feedback_dir {resolve(args.feedback_dir)} cannot be written; choose a writable folder")
    if problems:
        raise ValueError("adrec cannot start the app:\n  " + "\n  ".join(problems))
    if args.feedback_dir and secret is None:
        logger.warning("adrec: feedback_dir is set but no feedback secret is: POST /feedback will answer 503 (set $%s)", args.feedback_secret_env)
    return model_dir


def build_app(args: AppArgs) -> serve.Application:
    """Typed app builder: Serve validates ``serve run`` arguments and config-file ``args`` against AppArgs."""
    # Pin one version for every replica, and make the path independent of replica working dirs.
    model_dir = checked_model_dir(args)
    index_options = {"exact_max_ads": args.ad_index.exact_max_ads, "nprobe": args.ad_index.nprobe, "nlist": args.ad_index.nlist, "threads": 1}
    encoder = UserEncoder.options(**args.user_encoder.options()).bind(
        model_dir, args.user_encoder.max_batch_size, args.user_encoder.batch_wait_timeout_s, args.poll_s
    )
    index = AdIndex.options(**args.ad_index.options()).bind(model_dir, index_options, args.popular, args.poll_s)
    ranker = Ranker.options(**args.ranker.options()).bind(model_dir, args.poll_s)
    settings = args.model_dump(mode="json")
    settings["model_dir"] = model_dir
    if args.feedback_dir:
        settings["feedback_dir"] = resolve(args.feedback_dir)  # replicas' working directories differ
    if args.feedback_secret is not None:
        settings["feedback_secret"] = args.feedback_secret.get_secret_value()
    if args.admin_token is not None:
        settings["admin_token"] = args.admin_token.get_secret_value()
    return Ingress.options(**args.ingress.options()).bind(encoder, index, ranker, settings)


def shutdown(app_name: str = "adrec") -> None:
    """Delete the app and its state actors (the serving version, ad log, budgets and caps)."""
    serve.delete(app_name)
    for suffix in ("state", "market"):
        try:
            ray.kill(ray.get_actor(f"{app_name}-{suffix}", namespace=STATE_NAMESPACE))
        except ValueError:
            pass
