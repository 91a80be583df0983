"""Ray Serve application: a user-encoder deployment behind a FastAPI ranking ingress.

    POST /recommend -> Recommender (ingress): validate, build user features
                    -> UserEncoder (autoscaling, @serve.batch): U = user tower(features)
                    -> Recommender: top-k ads by U . V over the exported ad embeddings
    GET /healthz

Start it with ``serve run serve/config.yaml`` or ``serve run serve.app:build_app model_dir=...``.
"""


from typing import Annotated

import numpy as np
import torch
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from adrec.recommend import ServingModel, UserQuery
from adrec.registry import load_tower, resolve_model_dir, verify_manifest
from adrec.runtime import resolve

MAX_ID_LENGTH = 256
MAX_FIELDS = 16  # attributes and context entries per request
MAX_RECENT = 1000  # hard cap on recent_ad_ids before parsing more; AppArgs.max_history is the served limit

Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]


class Strict(BaseModel):
    """Unknown fields are errors, so a typo ("topk", "max_replica") is reported, not ignored."""

    model_config = ConfigDict(extra="forbid")


class EncoderArgs(Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(4, gt=0)
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.002, ge=0)

    @model_validator(mode="after")
    def replicas_in_order(self) -> "EncoderArgs":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self


class AppArgs(Strict):
    """Arguments of ``build_app``, from a Serve config's ``args`` or the ``serve run`` command line."""

    model_dir: str = Field(..., description="an exported model version directory, or a registry root with LATEST")
    max_k: int = Field(100, ge=1)
    max_history: int = Field(50, ge=0)
    user_encoder: EncoderArgs = EncoderArgs()


class RecommendRequest(Strict):
    user_id: Id
    k: int = Field(10, ge=1)
    recent_ad_ids: list[Id] = Field(
        default_factory=list, max_length=MAX_RECENT, description="ads the user clicked recently, most recent first"
    )
    attributes: dict[Id, Id] = Field(
        default_factory=dict, max_length=MAX_FIELDS, description="profile attributes, for users the model has not seen"
    )
    context: dict[Id, Id] = Field(
        default_factory=dict, max_length=MAX_FIELDS, description="page-view context, e.g. {'slot': 'top', 'device': 'mobile'}"
    )


class RecommendedAd(BaseModel):
    ad_id: str
    score: float
    pctr: float
    bid: float


class RecommendResponse(BaseModel):
    user_id: str
    model_version: str
    ads: list[RecommendedAd]


@serve.deployment
class UserEncoder:
    """The user tower, batched across concurrent requests."""

    def __init__(self, model_dir: str, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        model_dir = resolve_model_dir(model_dir)
        verify_manifest(model_dir)
        self.tower = load_tower(model_dir, "user_encoder")
        self.encode.set_max_batch_size(max_batch_size)
        self.encode.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch
    async def encode(self, batches: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
        """Each call's features (b_i rows) are concatenated, encoded once, and split back: (b_i, D)."""
        sizes = [len(b["user_id"]) for b in batches]
        merged = {name: torch.from_numpy(np.concatenate([b[name] for b in batches])) for name in self.tower.feature_names}
        with torch.no_grad():
            user = self.tower(merged).numpy()
        return np.split(user, np.cumsum(sizes)[:-1])


app = FastAPI(title="adrec", description="Personalized ad recommendations from a two-tower model.")


@serve.deployment
@serve.ingress(app)
class Recommender:
    def __init__(self, encoder: DeploymentHandle, model_dir: str, max_k: int, max_history: int) -> None:
        self.encoder = encoder
        self.model = ServingModel.load(model_dir)
        self.max_k = max_k
        self.max_history = max_history

    @app.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "model_version": self.model.version}

    @app.post("/recommend", response_model=RecommendResponse)
    async def recommend(self, request: RecommendRequest) -> RecommendResponse:
        if request.k > self.max_k:
            raise HTTPException(422, detail=[{"loc": ["body", "k"], "msg": f"k must be at most {self.max_k}"}])
        if len(request.recent_ad_ids) > self.max_history:
            raise HTTPException(
                422, detail=[{"loc": ["body", "recent_ad_ids"], "msg": f"at most {self.max_history} recent ads"}]
            )
        known = {"attributes": self.model.features.attribute_columns, "context": self.model.features.context_columns}
        unknown = [
            {"loc": ["body", field, key], "msg": f"unknown {field} field; this model knows {known[field]}"}
            for field in ("attributes", "context")
            for key in getattr(request, field)
            if key not in known[field]
        ]
        if unknown:
            raise HTTPException(422, detail=unknown)
        query = UserQuery(request.user_id, request.recent_ad_ids, request.attributes, request.context)
        features = self.model.features.build([query])
        user = await self.encoder.encode.remote(features)
        ads = self.model.index.top_k(torch.from_numpy(user), request.k)[0]
        return RecommendResponse(
            user_id=request.user_id,
            model_version=self.model.version,
            ads=[RecommendedAd(**vars(ad)) for ad in ads],
        )


def build_app(args: AppArgs) -> serve.Application:
    """Typed app builder: Serve validates ``serve run`` arguments and config-file ``args`` against AppArgs."""
    parsed = args
    # Pin one version for every replica, and make the path independent of replica working dirs.
    model_dir = str(resolve_model_dir(resolve(parsed.model_dir)))
    enc = parsed.user_encoder
    encoder = UserEncoder.options(
        autoscaling_config={
            "min_replicas": enc.min_replicas,
            "max_replicas": enc.max_replicas,
            "target_ongoing_requests": enc.target_ongoing_requests,
        }
    ).bind(model_dir, enc.max_batch_size, enc.batch_wait_timeout_s)
    return Recommender.bind(encoder, model_dir, parsed.max_k, parsed.max_history)
