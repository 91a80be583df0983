"""What the app's HTTP endpoints take and answer (pydantic), its settings (``AppArgs``), and the
OpenAPI document narrowed to what the serving model version accepts.

Request models are strict: an unknown field ("topk") is a 422 naming it, never ignored.
"""

from __future__ import annotations

import copy
import os
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, model_validator

from adrec.ads import MAX_BID, MAX_ID_LENGTH, MAX_LIST, ad_input_specs
from adrec.features import FeatureMap, FeatureSpec
from adrec.recommend import profile_specs

MAX_AD_FIELDS = 256  # attributes per ad at most: more than any model's ad inputs, under the body limit

MAX_FIELDS = 16  # attributes, context entries and targeting keys per request
MAX_TOKEN_LENGTH = 16_384  # base64 of a signed impression with MAX_FIELDS context entries of the longest ids

Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]


def json_number(value):
    """Refuse what JSON Schema calls no number (a string, a boolean), which pydantic's lax mode would convert."""
    if isinstance(value, (str, bool)):
        raise ValueError(f"must be a JSON number, not {type(value).__name__}")
    return value


def number(**bounds):
    """A finite JSON number within ``bounds`` (gt, ge, le). The bounds come before the validator,
    or pydantic leaves them out of the JSON schema of an optional field."""
    return Annotated[float, Field(allow_inf_nan=False, **bounds), BeforeValidator(json_number)]


def integer(**bounds):
    return Annotated[int, Field(**bounds), BeforeValidator(json_number)]


AdValue = Id | Annotated[list[Id], Field(max_length=MAX_LIST)] | number()


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
    def replicas_in_order(self) -> Replicas:
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

    def admin_token_value(self) -> str | None:
        """The admin token: from the args, else the environment (replicas read the shell's), else None (write endpoints off)."""
        return self.admin_token.get_secret_value() if self.admin_token else os.environ.get(self.admin_token_env) or None

    def feedback_secret_value(self) -> str | None:
        return self.feedback_secret.get_secret_value() if self.feedback_secret else os.environ.get(self.feedback_secret_env) or None


class RecommendRequest(Strict):
    user_id: Id
    k: integer(ge=1) = 10
    recent_ad_ids: list[Id] = Field(default_factory=list, description="ads the user clicked recently, most recent first")
    attributes: dict[Id, Id] = Field(default_factory=dict, max_length=MAX_FIELDS, description="profile attributes, for users the model has not seen")
    context: dict[Id, Id] = Field(
        default_factory=dict, max_length=MAX_FIELDS, description="page-view context, e.g. {'slot': 'top', 'device': 'mobile'}"
    )
    tmax_ms: number(gt=0) | None = Field(None, description="the ad server's own deadline (as OpenRTB's tmax); the app's deadline_ms caps it")


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
    removed: dict[str, int] = Field(description="candidates each auction rule removed, of those examined: best pCTR x bid first, until k were chosen")


class AdRequest(Strict):
    campaign_id: Id
    bid: number(gt=0, le=MAX_BID)
    attributes: dict[Id, AdValue] = Field(
        default_factory=dict, max_length=MAX_AD_FIELDS, description="every input of the model's ad tower and ranker; GET /openapi.json lists them"
    )
    budget: number(ge=0) | None = Field(None, description="the campaign's budget; spend at or above it stops serving")
    targeting: dict[Id, Annotated[list[Id], Field(min_length=1, max_length=MAX_LIST)]] | None = Field(None, max_length=MAX_FIELDS)


class FeedbackEvent(Strict):
    event_id: Id = Field(description="the client's id; a replayed event is stored once")
    event: Literal["impression", "click", "conversion"]
    user_id: Id
    # A token signs the request's context (up to MAX_FIELDS entries), so it may be long; the body limit still applies.
    token: Annotated[str, Field(min_length=1, max_length=MAX_TOKEN_LENGTH)] = Field(description="the token of the ad, from the /recommend answer")
    ts: number() | None = Field(None, description="when it happened, seconds since the epoch; default: when received")


class FeedbackRequest(Strict):
    events: list[FeedbackEvent] = Field(min_length=1)


class AdAnswer(BaseModel):
    ad_id: str
    ad_updates: int = Field(description="updates logged so far; this one is applied by every replica before it answers for this count")
    index_size: int
    model_version: str


class FeedbackAnswer(BaseModel):
    accepted: int = Field(description="events written to disk (fsync'd)")


class ReloadAnswer(BaseModel):
    version: str | None = Field(None, description="the version now serving")
    rolling_out: str | None = Field(None, description="the version still loading on some replica (202)")


class ReloadRequest(Strict):
    version: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")] | None = Field(
        None, description="a version folder of the registry; omitted: the one LATEST names"
    )


ID_SCHEMA = {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH}
LIST_SCHEMA = {"type": "array", "items": ID_SCHEMA, "maxItems": MAX_LIST}


def ad_value_schema(spec: FeatureSpec) -> dict:
    """What one ad input takes, by kind (adrec.ads.check_value is the check)."""
    if spec.kind == "sequence":
        return {"anyOf": [ID_SCHEMA, LIST_SCHEMA]} if spec.tokenize else LIST_SCHEMA
    if spec.kind in ("bucket", "dense"):
        return {"type": "number"}
    return ID_SCHEMA


def closed_object(schema: dict, properties: dict[str, dict], required: bool = False) -> None:
    """Turn a free ``{string: value}`` object schema into one with exactly ``properties``."""
    for key in ("additionalProperties", "propertyNames", "maxProperties"):
        schema.pop(key, None)
    schema.update(properties=properties, additionalProperties=False)
    if required:
        schema["required"] = sorted(properties)


def model_openapi(document: dict, args: AppArgs, feature_map: FeatureMap) -> dict:
    """The OpenAPI document with this version's names and the app's limits, so a generated
    client (or a schema-driven fuzzer) knows exactly which requests succeed: the user
    attributes and context fields the model knows, every ad input it needs, max_k, max_history
    and max_events."""
    document = copy.deepcopy(document)
    schemas = document["components"]["schemas"]
    recommend = schemas["RecommendRequest"]["properties"]
    recommend["k"]["maximum"] = args.max_k
    recommend["recent_ad_ids"]["maxItems"] = args.max_history
    for field, group in (("attributes", "user"), ("context", "context")):
        closed_object(recommend[field], {spec.column: ID_SCHEMA for spec in profile_specs(feature_map, group)})
    ad_inputs = {column: ad_value_schema(spec) for column, spec in ad_input_specs(feature_map).items()}
    closed_object(schemas["AdRequest"]["properties"]["attributes"], ad_inputs, required=True)
    if ad_inputs:
        schemas["AdRequest"]["required"] = sorted({*schemas["AdRequest"].get("required", []), "attributes"})
    schemas["FeedbackRequest"]["properties"]["events"]["maxItems"] = args.max_events
    return document
