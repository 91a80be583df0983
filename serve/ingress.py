"""The FastAPI ingress: HTTP in, the model chain and the auction, HTTP out.

    POST /recommend    validate -> user features (adrec.recommend.FeatureBuilder)
                       -> UserEncoder -> AdIndex -> Ranker, chained replica to replica (serve/deployments.py)
                       -> the Marketplace actor: targeting, budgets, frequency caps, eCPM = pCTR x bid
    PUT  /ads/{ad_id}  (bearer token) add or change an ad, checked against the model, then logged
    POST /feedback     impressions, clicks, conversions with their tokens, fsync'd to the segment log
    POST /admin/reload (bearer token) roll out another exported version; GET /model says which one serves
    GET  /healthz, /openapi.json, /docs

Validation beyond pydantic, token signing and feedback records are adrec's (adrec.ads,
adrec.recommend, adrec.feedback.ingest); this module only routes and awaits.
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

import ray
from fastapi import Depends, FastAPI, HTTPException, Response
from fastapi import Path as PathParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from adrec.ads import AdUpdate, check_ad_update
from adrec.auction import FrequencyCap, Marketplace
from adrec.feedback import ingest
from adrec.feedback.log import SegmentLog
from adrec.feedback.tokens import Signer
from adrec.recommend import UserQuery, feature_builder, is_cold, user_key, verified
from adrec.registry import ArtifactError, resolve_model_dir
from adrec.runtime import resolve
from serve import errors
from serve.deployments import timed
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

api = FastAPI(title="adrec", description="Personalized ad recommendations: two-tower retrieval, DCN ranking, an eCPM auction.")
api.add_middleware(BodyLimit)
errors.install(api)
bearer = HTTPBearer(auto_error=False, description="the admin token (ADREC_ADMIN_TOKEN) of PUT /ads and /admin")


# Helpers the ingress calls stand above it: Serve pickles a deployment's class when it is
# decorated, with the module globals that exist by then.
def replica_lost(failure: BaseException) -> bool:
    """A replica of the chain died: this one, or one upstream (Serve 2.60 wraps that in RayServeException)."""
    return isinstance(failure, RayActorError) or isinstance(failure.__cause__, RayActorError)


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


def limit_problems(request: RecommendRequest, args: AppArgs) -> list[dict]:
    """What the app's limits refuse in a schema-valid request (the OpenAPI document states them)."""
    problems = []
    if request.k > args.max_k:
        problems.append({"loc": ["body", "k"], "msg": f"k is {request.k}; at most {args.max_k} (max_k)", "type": "less_than_equal"})
    if len(request.recent_ad_ids) > args.max_history:
        problems.append(
            {
                "loc": ["body", "recent_ad_ids"],
                "type": "too_long",
                "msg": f"{len(request.recent_ad_ids)} recent ads; at most {args.max_history} (max_history)",
            }
        )
    return problems


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
        self.admin_token = self.args.admin_token_value()
        secret = self.args.feedback_secret_value()
        self.signer = Signer(secret.encode(), self.args.token_ttl_s) if secret else None
        with_log = self.signer is not None and self.args.feedback_dir
        self.feedback_log = SegmentLog(resolve(self.args.feedback_dir), f"{self.versions.replica}-{os.getpid()}") if with_log else None

    async def reconfigure(self, user_config: dict) -> None:
        """``user_config: {version: ...}`` in a Serve config rolls out that version, as POST /admin/reload does."""
        if user_config.get("version"):
            await self.state.begin_rollout.remote(str(self.version_dir(user_config["version"])))

    # --- helpers ---------------------------------------------------------------------------

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
            raise error(
                401,
                "a valid 'Authorization: Bearer <token>' header is required",
                "unauthorized",
                ["header", "authorization"],
                headers={"WWW-Authenticate": "Bearer"},
            )

    def version_dir(self, version: str | None) -> Path:
        """A version folder of this app's registry (never an arbitrary path), verified."""
        target = self.registry / version if version else self.registry
        if version in (".", "..") or not target.is_dir():  # the pattern admits dots; never a folder outside the registry
            raise error(404, f"{self.registry.name} has no version {version!r}", "not_found", ["body", "version"])
        try:
            return verified(resolve_model_dir(target))[0]
        except (ArtifactError, OSError) as failure:
            raise error(422, f"not a loadable version of {self.registry.name}: {failure}", "not_loadable", ["body", "version"]) from None

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
                    failure = task.exception()
                    if failure is None:
                        return task.result()
                    if not replica_lost(failure) or (sent == ATTEMPTS and not running):
                        raise failure
                    logger.warning("adrec: a replica died during a request (%s); sending the chain again", type(failure).__name__)
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

    async def run_auction(self, query: UserQuery, k: int, features: dict, cold: bool, model_dir: str, updates: int, deadline: float):
        """(the auction's result, milliseconds per hop); ``hops`` is the chain's time outside the three model calls."""
        chain = time.perf_counter()
        ranked, timing = await self.retrieve_and_rank(features, cold, max(self.args.shortlist, k), model_dir, updates, deadline)
        chain_ms = timed(chain)
        auction = time.perf_counter()
        result = await self.market.run_shortlist.remote(user_key(query.user_id), {**query.attributes, **query.context}, ranked, k)
        hops = chain_ms - timing["encode"] - timing["index"] - timing["rank"]
        return result, {
            "encode": timing["encode"],
            "index": timing["index"],
            "rank": timing["rank"],
            "hops": round(hops, 3),
            "auction": timed(auction),
        }

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

    # --- endpoints -------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model_version": (await self.side())[2].version}

    @api.post("/recommend", response_model=RecommendResponse, responses=responses(400, 413, 422, 503))
    async def recommend(self, request: RecommendRequest, response: Response) -> RecommendResponse:
        started = time.perf_counter()
        model_dir, updates, side = await self.side()
        query = UserQuery(request.user_id, request.recent_ad_ids, request.attributes, request.context)
        problems = limit_problems(request, self.args) + [{**p, "loc": ["body", *p["loc"]]} for p in side.features.unknown_fields(query)]
        if problems:
            raise HTTPException(422, detail=problems)
        features = side.features.build([query])
        cold = is_cold(side.features, query)
        feature_ms = timed(started)
        budget_s = min(request.tmax_ms or math.inf, self.args.deadline_ms) / 1000
        try:
            result, timing = await asyncio.wait_for(
                self.run_auction(query, request.k, features, cold, model_dir, updates, started + budget_s), budget_s - (time.perf_counter() - started)
            )
        except asyncio.TimeoutError:
            raise error(
                503, f"no answer within {budget_s * 1000:.0f} ms (deadline_ms / tmax_ms); serve a fallback and retry later", "deadline"
            ) from None
        timing = {"features": feature_ms, **timing, "total": timed(started)}
        response.headers["Server-Timing"] = ", ".join(f"{name};dur={value:.2f}" for name, value in timing.items())
        request_id = uuid.uuid4().hex
        tokens = ingest.sign_answer(self.signer, request_id, request.user_id, side.version, request.context, result.ads, time.time())
        return RecommendResponse(
            request_id=request_id,
            user_id=request.user_id,
            model_version=side.version,
            cold_start=cold,
            ads=[RecommendedAd(**vars(ad), token=token) for ad, token in zip(result.ads, tokens)],
            candidates=result.candidates,
            removed=result.removed,
        )

    @api.put("/ads/{ad_id}", responses=responses(400, 401, 403, 413, 422))
    async def put_ad(
        self,
        ad_id: Annotated[str, PathParam(min_length=1, max_length=MAX_ID_LENGTH)],
        ad: AdRequest,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)] = None,
    ) -> AdAnswer:
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
        records, refused = ingest.events_to_records(self.signer, body.events, time.time())
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

    @api.post(
        "/admin/reload",
        response_model=ReloadAnswer,
        responses={
            202: {"model": ReloadAnswer, "description": "still rolling out after reload_timeout_s"},
            **responses(400, 401, 403, 404, 413, 422),
        },
    )
    async def reload(
        self, body: ReloadRequest, response: Response, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)] = None
    ) -> ReloadAnswer:
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
