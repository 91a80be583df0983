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
from typing import Annotated, Literal

import numpy as np
import ray
import torch
from fastapi import FastAPI, Header, HTTPException, Response
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from adrec.auction import FrequencyCap, Marketplace
from adrec.feedback.log import SegmentLog
from adrec.feedback.tokens import Impression, Signer, TokenError
from adrec.recommend import (
    AdUpdate,
    RankingSide,
    RetrievalSide,
    UserQuery,
    UserSide,
    ad_columns,
    auction_rounds,
    feature_builder,
    is_cold,
    user_key,
    verified,
)
from adrec.registry import ArtifactError, resolve_model_dir
from adrec.runtime import resolve
from serve.versions import STATE_NAMESPACE, Versions, state_actor

logger = logging.getLogger("ray.serve")

MAX_ID_LENGTH = 256
MAX_FIELDS = 16  # attributes, context entries and targeting keys per request
MAX_LIST = 64  # values per ad attribute list (tokens) or targeting key
ATTEMPTS = 3  # model chains sent per request at most: when a replica dies or stalls under one, within its deadline


def replica_lost(error: BaseException) -> bool:
    """A replica of the chain died: this one, or one upstream (Serve 2.60 wraps that in RayServeException)."""
    return isinstance(error, RayActorError) or isinstance(error.__cause__, RayActorError)

Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]


class Strict(BaseModel):
    """Unknown fields are errors, so a typo ("topk", "max_replica") is reported, not ignored."""

    model_config = ConfigDict(extra="forbid")


class Replicas(Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(4, gt=0)
    max_ongoing_requests: int = Field(32, ge=1)
    num_cpus: float = Field(0.25, ge=0, description="reserved per replica; fractional, so all four deployments fit a 2-core node")

    @model_validator(mode="after")
    def replicas_in_order(self) -> "Replicas":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self

    def options(self) -> dict:
        return {
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            },
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus},
            "health_check_period_s": 2,
        }


class EncoderArgs(Replicas):
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.002, ge=0)


class IndexArgs(Replicas):
    exact_max_ads: int = Field(50_000, ge=0, description="catalogs up to this size are searched exactly; larger ones by FAISS IVF")
    nprobe: int = Field(32, ge=1)
    nlist: int | None = Field(None, ge=1)


class CapArgs(Strict):
    max_impressions: int = Field(3, ge=1)
    window_s: float = Field(3600, gt=0)


class AppArgs(Strict):
    """Arguments of ``build_app``, from a Serve config's ``args`` or the ``serve run`` command line."""

    model_dir: str = Field(..., description="an exported model version directory, or a registry root with LATEST")
    max_k: int = Field(100, ge=1)
    max_history: int = Field(50, ge=0)
    max_body_bytes: int = Field(65_536, ge=1024)
    deadline_ms: float = Field(500, gt=0, description="a request with no answer by then gets 503")
    shortlist: int = Field(200, ge=1, description="ads retrieved by U . V and re-ranked")
    popular: int = Field(50, ge=0, description="popular ads added to a cold user's shortlist")
    frequency_cap: CapArgs = CapArgs()
    explore: float = Field(0.0, ge=0, le=1, description="share of slots given to a random eligible ad (epsilon-greedy), propensity logged")
    admin_token: SecretStr | None = Field(None, description="bearer token of PUT /ads and /admin; prefer admin_token_env")
    admin_token_env: str = "ADREC_ADMIN_TOKEN"
    reload_timeout_s: float = Field(120, gt=0)
    feedback_dir: str | None = Field(None, description="where POST /feedback appends its segments; None: feedback is off")
    feedback_secret: SecretStr | None = Field(None, description="HMAC key of impression tokens; prefer feedback_secret_env")
    feedback_secret_env: str = "ADREC_FEEDBACK_SECRET"
    token_ttl_s: float = Field(7 * 86_400, gt=0, description="how long after serving an impression its feedback is accepted")
    max_events: int = Field(100, ge=1, description="events per POST /feedback (the body limit applies too)")
    poll_s: float = Field(0.5, gt=0)
    ingress: Replicas = Replicas()
    user_encoder: EncoderArgs = EncoderArgs()
    ad_index: IndexArgs = IndexArgs()
    ranker: Replicas = Replicas()


class RecommendRequest(Strict):
    user_id: Id
    k: int = Field(10, ge=1)
    recent_ad_ids: list[Id] = Field(default_factory=list, description="ads the user clicked recently, most recent first")
    attributes: dict[Id, Id] = Field(
        default_factory=dict, max_length=MAX_FIELDS, description="profile attributes, for users the model has not seen"
    )
    context: dict[Id, Id] = Field(
        default_factory=dict, max_length=MAX_FIELDS, description="page-view context, e.g. {'slot': 'top', 'device': 'mobile'}"
    )
    tmax_ms: float | None = Field(None, gt=0, description="the ad server's own deadline (as OpenRTB's tmax); the app's deadline_ms caps it")


class RecommendedAd(BaseModel):
    ad_id: str
    campaign_id: str
    pctr: float
    bid: float
    ecpm: float
    propensity: float = Field(description="probability the auction gave this ad its slot (1 without exploration)")
    token: str | None = Field(None, description="signed proof of this impression; feedback events about it carry it")


class RecommendResponse(BaseModel):
    request_id: str
    user_id: str
    model_version: str
    cold_start: bool = Field(description="no history in the request or the log: ranked from features, context and popularity")
    ads: list[RecommendedAd]
    candidates: int
    removed: dict[str, int] = Field(
        description="candidates each auction rule removed, of those examined: best pCTR x bid first, until k were chosen"
    )


class AdRequest(Strict):
    campaign_id: Id
    bid: float = Field(gt=0, allow_inf_nan=False)
    attributes: dict[Id, Id | Annotated[list[Id], Field(max_length=MAX_LIST)]] = Field(default_factory=dict, max_length=MAX_FIELDS)
    budget: float | None = Field(None, ge=0, allow_inf_nan=False, description="the campaign's budget; spend at or above it stops serving")
    targeting: dict[Id, Annotated[list[Id], Field(min_length=1, max_length=MAX_LIST)]] | None = Field(None, max_length=MAX_FIELDS)


class FeedbackEvent(Strict):
    event_id: Id = Field(description="the client's id; a replayed event is stored once")
    event: Literal["impression", "click", "conversion"]
    user_id: Id
    token: Annotated[str, Field(min_length=1, max_length=2048)] = Field(description="the token of the ad, from the /recommend answer")
    ts: float | None = Field(None, description="when it happened, seconds since the epoch; default: when received")


class FeedbackRequest(Strict):
    events: list[FeedbackEvent] = Field(min_length=1)


class ReloadRequest(Strict):
    version: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")] | None = Field(
        None, description="a version folder of the registry; omitted: the one LATEST names"
    )


def too_large(field: str, message: str) -> HTTPException:
    return HTTPException(413, detail=[{"loc": ["body", field], "msg": message}])


class BodyLimit:
    """ASGI middleware: 413 for bodies over ``app.state.max_body_bytes``, declared or streamed."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = getattr(api.state, "max_body_bytes", 65_536)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await reject_body(send, limit)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except BodyTooLarge:
            await reject_body(send, limit)


class BodyTooLarge(Exception):
    pass


async def reject_body(send, limit: int) -> None:
    body = f'{{"detail":[{{"loc":["body"],"msg":"request body over {limit} bytes"}}]}}'.encode()
    await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


api = FastAPI(title="adrec", description="Personalized ad recommendations: two-tower retrieval, DCN ranking, an eCPM auction.")
api.add_middleware(BodyLimit)


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
        info = {"kind": index.kind, "size": index.size, "recall": index.recall}
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


class IngressSide:
    """What the ingress needs of one version: the request -> features transform and the names it accepts."""

    def __init__(self, model_dir: str) -> None:
        self.model_dir, self.version = verified(model_dir)
        self.features = feature_builder(self.model_dir)
        self.ad_columns = [c for c in ad_columns(self.features.feature_map) if c != "campaign_id"]


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
        secret = args.feedback_secret.get_secret_value() if args.feedback_secret else os.environ.get(args.feedback_secret_env)
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

    def require_admin(self, authorization: str | None) -> None:
        if self.admin_token is None:
            raise HTTPException(403, detail=f"write and admin endpoints are off: set {self.args.admin_token_env} (or args.admin_token)")
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), self.admin_token.encode()):
            raise HTTPException(401, detail="a valid 'Authorization: Bearer <token>' header is required", headers={"WWW-Authenticate": "Bearer"})

    def version_dir(self, version: str | None) -> Path:
        """A version folder of this app's registry (never an arbitrary path), verified."""
        try:
            target = self.registry / version if version else resolve_model_dir(self.registry)
            return verified(target)[0]
        except (ArtifactError, OSError) as error:
            raise HTTPException(422, detail=[{"loc": ["body", "version"], "msg": f"not a loadable version of {self.registry.name}: {error}"}])

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

    @api.post("/recommend", response_model=RecommendResponse)
    async def recommend(self, request: RecommendRequest, response: Response) -> RecommendResponse:
        started = time.perf_counter()
        if request.k > self.args.max_k:
            raise too_large("k", f"k is {request.k}; at most {self.args.max_k}")
        if len(request.recent_ad_ids) > self.args.max_history:
            raise too_large("recent_ad_ids", f"{len(request.recent_ad_ids)} recent ads; at most {self.args.max_history}")
        model_dir, updates, side = await self.side()
        known = {"attributes": side.features.attribute_columns, "context": side.features.context_columns}
        unknown = [
            {"loc": ["body", field, key], "msg": f"unknown {field} field; this model knows {known[field]}"}
            for field in ("attributes", "context")
            for key in getattr(request, field)
            if key not in known[field]
        ]
        if unknown:
            raise HTTPException(422, detail=unknown)
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
            raise HTTPException(503, detail=f"no answer within {budget_s * 1000:.0f} ms (deadline_ms / tmax_ms); serve a fallback and retry later")
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

    @api.put("/ads/{ad_id}")
    async def put_ad(self, ad_id: Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)], ad: AdRequest,
                     authorization: Annotated[str | None, Header()] = None) -> dict:
        """Add or change an ad: embedded by the serving version's ad tower and inserted into the index, no restart."""
        self.require_admin(authorization)
        model_dir, _, side = await self.side()
        unknown = [{"loc": ["body", "attributes", k], "msg": f"unknown ad attribute; this model knows {side.ad_columns}"}
                   for k in ad.attributes if k not in side.ad_columns]
        if unknown:
            raise HTTPException(422, detail=unknown)
        if ad.budget is not None or ad.targeting is not None:
            await self.market.upsert_campaign.remote(ad.campaign_id, ad.budget, ad.targeting)
        updates = await self.state.add_ad.remote(AdUpdate(ad_id, ad.campaign_id, ad.bid, dict(ad.attributes)))
        self.versions.view["updates"] = max(self.versions.view["updates"], updates)  # this replica reads its own write
        indexed = await self.index.describe.remote(model_dir, updates, ad_id)
        return {"ad_id": ad_id, "ad_updates": updates, "index_size": indexed["size"], "model_version": side.version}

    @api.post("/feedback")
    async def feedback(self, body: FeedbackRequest) -> dict:
        """Impressions, clicks and conversions of served ads. Answered only once the events are on
        disk (fsync'd); every event needs its ad's valid, unexpired token, or the batch gets 403."""
        if self.feedback_log is None:
            raise HTTPException(503, detail="feedback is off: set args.feedback_dir and ADREC_FEEDBACK_SECRET (or args.feedback_secret)")
        if len(body.events) > self.args.max_events:
            raise too_large("events", f"{len(body.events)} events; at most {self.args.max_events} per request")
        now = time.time()
        records, refused = [], []
        for i, event in enumerate(body.events):
            try:
                impression = self.signer.verify(event.token, now)
                if impression.user != user_key(event.user_id):
                    raise TokenError("the token was issued for another user")
            except TokenError as error:
                refused.append({"loc": ["body", "events", i, "token"], "msg": str(error)})
                continue
            records.append({**vars(impression), "served_ts": impression.ts, "impression_id": impression.impression_id,
                            "event_id": event.event_id, "event": event.event, "user_id": event.user_id,
                            "ts": event.ts if event.ts is not None else now})
        if refused:
            raise HTTPException(403, detail=refused)
        await asyncio.to_thread(self.feedback_log.append, records)  # fsync off the event loop
        return {"accepted": len(records)}

    @api.get("/model")
    async def model(self) -> dict:
        model_dir, updates, side = await self.side()
        view = self.versions.view
        return {
            "version": side.version,
            "rolling_out": Path(view["target"]).name if view.get("target") else None,
            "previous": Path(view["previous"]).name if view.get("previous") else None,
            "ads_added": updates,
            "index": await self.index.describe.remote(model_dir, updates),
        }

    @api.post("/admin/reload")
    async def reload(self, body: ReloadRequest, authorization: Annotated[str | None, Header()] = None) -> Response:
        """Load another version on every replica while the current one serves; switch when all hold it."""
        self.require_admin(authorization)
        target = str(self.version_dir(body.version))
        view = await self.state.begin_rollout.remote(target)
        deadline = time.monotonic() + self.args.reload_timeout_s
        while view["serving"] != target and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            view = await self.state.view.remote()
        self.versions.view = {**self.versions.view, **view}
        if view["serving"] != target:
            return Response(status_code=202, content=f'{{"rolling_out": "{Path(target).name}"}}', media_type="application/json")
        return Response(content=f'{{"version": "{Path(target).name}"}}', media_type="application/json")


def build_app(args: AppArgs) -> serve.Application:
    """Typed app builder: Serve validates ``serve run`` arguments and config-file ``args`` against AppArgs."""
    # Pin one version for every replica, and make the path independent of replica working dirs.
    model_dir = str(resolve_model_dir(resolve(args.model_dir)))
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
