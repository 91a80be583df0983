"""Online recommendation logic, free of Serve: request -> user features -> U -> top-k ads.

Serve's deployments wrap these pieces; tests can call them directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from adrec.data.privacy import pseudonym_key, pseudonymize
from adrec.features import FeatureMap, FeatureSpec, add_history_attributes
from adrec.inference import catalog_lookups, column_to_numpy
from adrec.registry import load_ad_embeddings, resolve_model_dir, verify_manifest


@dataclass
class UserQuery:
    """One request's user side. ``recent_ad_ids`` are most recent first; ``attributes`` and
    ``context`` hold raw values (for example {"age_bucket": "25-34"}, {"slot": "top"})."""

    user_id: str
    recent_ad_ids: list[str] = field(default_factory=list)
    attributes: dict[str, str] = field(default_factory=dict)
    context: dict[str, str] = field(default_factory=dict)


def profile_specs(feature_map: FeatureMap, group: str) -> list[FeatureSpec]:
    """A group's features other than the ids and histories: what a request may state in raw form."""
    return [f for f in feature_map.features if f.group == group and f.name != "user_id" and not f.name.startswith("history")]


class UserStore:
    """Encoded profile features and latest click history of every known user."""

    def __init__(self, users: pa.Table, feature_map: FeatureMap) -> None:
        self.index = {uid: i for i, uid in enumerate(users["raw_user_id"].to_pylist())}
        self.attributes = {f.name: column_to_numpy(users[f.name]) for f in profile_specs(feature_map, "user") if f.name in users.column_names}
        self.history = users["history"].to_pylist()  # raw ad ids per user, most recent first

    def row(self, user_id: str) -> int | None:
        return self.index.get(user_id)


class FeatureBuilder:
    """Builds the user tower's inputs for a batch of queries with the training transforms.

    Raw values go through ``FeatureMap.encode``, as in preparation; known users' stored
    profile fills attributes the request left out, and their stored history follows the
    request's recent ads.
    """

    def __init__(
        self,
        feature_map: FeatureMap,
        store: UserStore,
        lookups: dict[str, tuple[pa.Array, pa.Array]] | None = None,
        pseudonym_key: bytes | None = None,
    ) -> None:
        self.feature_map = feature_map
        self.store = store
        self.lookups = lookups or {}
        self.pseudonym_key = pseudonym_key
        self.user_specs = profile_specs(feature_map, "user")
        self.attribute_columns = sorted({f.column for f in self.user_specs})
        self.context_columns = sorted({f.column for f in profile_specs(feature_map, "context")})
        self.history_length = feature_map.spec("history").max_len

    def user_ids(self, queries: list[UserQuery]) -> pa.Array:
        """Request user ids as the model knows them: pseudonymised when the training data was."""
        ids = pa.array([q.user_id for q in queries], pa.string())
        return pseudonymize(ids, self.pseudonym_key) if self.pseudonym_key else ids

    def build(self, queries: list[UserQuery]) -> dict[str, np.ndarray]:
        """(B,) int64 per categorical or bucket feature, (B,) float32 per dense one, (B, N) per history."""
        user_ids = self.user_ids(queries)
        rows = [self.store.row(uid) for uid in user_ids.to_pylist()]
        raw = {"user_id": user_ids}
        for name in self.attribute_columns:
            raw[name] = pa.array([q.attributes.get(name) for q in queries], pa.string())
        for name in self.context_columns:
            raw[name] = pa.array([q.context.get(name) for q in queries], pa.string())
        # The request's recent ads first, then what the log knew, as one most-recent-first history.
        histories = [q.recent_ad_ids + (self.store.history[r] if r is not None else []) for q, r in zip(queries, rows)]
        raw["history"] = pa.array([h[: self.history_length] for h in histories], pa.list_(pa.string()))
        encoded = self.feature_map.encode(add_history_attributes(pa.table(raw), self.lookups))
        for i, (query, row) in enumerate(zip(queries, rows)):
            if row is None:
                continue
            for spec in self.user_specs:
                if spec.column not in query.attributes and spec.name in self.store.attributes:
                    encoded[spec.name][i] = self.store.attributes[spec.name][row]
        return encoded


@dataclass
class Recommendation:
    ad_id: str
    score: float
    pctr: float
    bid: float


class AdIndex:
    """Exact top-k over the catalog's ad embeddings by U . V; pCTR = sigmoid(a * (U . V + bias) + b)."""

    def __init__(self, ad_ids: list[str], bids: np.ndarray, embeddings: torch.Tensor, logit_bias: float, calibration: dict | None = None) -> None:
        self.ad_ids = ad_ids
        self.bids = bids
        self.embeddings = embeddings  # (A, D)
        self.logit_bias = logit_bias
        self.calibration = calibration or {"a": 1.0, "b": 0.0}

    @torch.no_grad()
    def top_k(self, user: torch.Tensor, k: int) -> list[list[Recommendation]]:
        """user: (B, D) -> for each row, the k best ads, best first."""
        scores = user @ self.embeddings.T  # (B, A)
        best, index = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        pctr = torch.sigmoid(self.calibration["a"] * (best + self.logit_bias) + self.calibration["b"])
        return [
            [
                Recommendation(self.ad_ids[a], float(s), float(p), float(self.bids[a]))
                for a, s, p in zip(index[b].tolist(), best[b].tolist(), pctr[b].tolist())
            ]
            for b in range(len(user))
        ]


@dataclass
class ServingModel:
    """Everything the ranking side needs from one exported model directory."""

    version: str
    model_dir: Path
    features: FeatureBuilder
    index: AdIndex

    @classmethod
    def load(cls, model_dir: str | Path) -> "ServingModel":
        model_dir = resolve_model_dir(model_dir)
        manifest = verify_manifest(model_dir)
        feature_map = FeatureMap.load(model_dir / "feature_map.json")
        store = UserStore(pq.read_table(model_dir / "users.parquet"), feature_map)
        key = pseudonym_key(None) if feature_map.metadata.get("pseudonymized") else None
        catalog = pq.read_table(model_dir / "ads.parquet")
        lookups = catalog_lookups(catalog)
        meta = json.loads((model_dir / "model.json").read_text())
        index = AdIndex(
            catalog["raw_ad_id"].to_pylist(),
            catalog["bid"].to_numpy(),
            load_ad_embeddings(model_dir),
            float(meta["logit_bias"]),
            meta.get("calibration"),
        )
        return cls(manifest["version"], model_dir, FeatureBuilder(feature_map, store, lookups, key), index)
