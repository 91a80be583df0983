"""Online recommendation logic, free of Serve.

    request -> FeatureBuilder (user features) -> UserSide (U = user tower)
            -> RetrievalSide (shortlist by U . V over the ad index, + popular ads for cold users)
            -> RankingSide (calibrated pCTR of each shortlisted ad: the DCN ranker, or the towers)
            -> adrec.auction.Marketplace (targeting, budgets, frequency caps, eCPM = pCTR x bid)

Each side loads from one exported model directory. Serve runs each in its own deployment
(serve/app.py); ``LocalRecommender`` runs them in one process, for tests and the bare baseline
of benchmarks/serve_latency.py, so both execute exactly this code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from adrec.ads import AdUpdate, UpdateReader
from adrec.auction import AuctionResult, Marketplace, Shortlist
from adrec.data.privacy import pseudonym_key, pseudonymize
from adrec.eval.calibration import Platt
from adrec.features import FeatureMap, FeatureSpec
from adrec.index import build_index
from adrec.inference import catalog_lookups, column_to_numpy, to_features
from adrec.registry import load_ad_embeddings, load_ranker, load_tower, resolve_model_dir, verify_manifest


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
        # Per request a history has tens of ads; hashing the whole catalog per request (what
        # add_history_attributes does for a table) cost 170 ms at a million ads. Dicts, built once.
        self.history_maps = {name: dict(zip(ids.to_pylist(), values.to_pylist())) for name, (ids, values) in self.lookups.items()}
        self.pseudonym_key = pseudonym_key
        self.user_specs = profile_specs(feature_map, "user")
        self.attribute_columns = sorted({f.column for f in self.user_specs})
        self.context_columns = sorted({f.column for f in profile_specs(feature_map, "context")})
        self.history_length = feature_map.spec("history").max_len

    def unknown_fields(self, query: UserQuery) -> list[dict]:
        """Attribute and context keys this model has no feature for, as error items naming each:
        a typo would otherwise be encoded as nothing and answered as if it were not there."""
        known = {"attributes": self.attribute_columns, "context": self.context_columns}
        return [
            {"loc": [field, key], "msg": f"unknown {field} field; this model knows {known[field]}", "type": "extra_forbidden"}
            for field in known
            for key in getattr(query, field)
            if key not in known[field]
        ]

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
        histories = [h[: self.history_length] for h in histories]
        raw["history"] = pa.array(histories, pa.list_(pa.string()))
        for name, mapping in self.history_maps.items():  # as add_history_attributes: unknown ads map to null
            raw[f"history_{name}"] = pa.array([[mapping.get(ad) for ad in h] for h in histories], pa.list_(pa.string()))
        encoded = self.feature_map.encode(pa.table(raw))
        for i, (query, row) in enumerate(zip(queries, rows)):
            if row is None:
                continue
            for spec in self.user_specs:
                if spec.column not in query.attributes and spec.name in self.store.attributes:
                    encoded[spec.name][i] = self.store.attributes[spec.name][row]
        return encoded


def grow(array: np.ndarray, row: int, value: np.ndarray) -> np.ndarray:
    """``array`` with ``value`` at ``row``, appended when ``row == len(array)``. Admin writes are rare,
    so a copy per new ad (about 50 ms at a million ads) buys simple, read-optimised arrays."""
    if row == len(array):
        return np.concatenate([array, value.reshape(1, *array.shape[1:]).astype(array.dtype)])
    array[row] = value
    return array


class Catalog:
    """Every servable ad. Row i of each array is ad i; an update rewrites its row, a new ad appends,
    so the index and the ranker (which apply the same updates in order) agree on rows."""

    def __init__(self, table: pa.Table, feature_names: list[str]) -> None:
        self.ad_ids = table["raw_ad_id"].to_pylist()
        self.row_of = {ad: i for i, ad in enumerate(self.ad_ids)}
        self.bids = table["bid"].to_numpy().astype(np.float32)
        # Exports before campaigns were carried: every ad is its own campaign.
        self.campaigns = table["raw_campaign_id"].to_pylist() if "raw_campaign_id" in table.column_names else list(self.ad_ids)
        self.attributes = {
            name.removeprefix("raw_"): table[name].to_pylist()
            for name in table.column_names
            if name.startswith("raw_") and name not in ("raw_ad_id", "raw_campaign_id")
        }
        self.features = {name: column_to_numpy(table[name]) for name in feature_names if name in table.column_names}

    def __len__(self) -> int:
        return len(self.ad_ids)

    def row_for(self, ad_id: str) -> int:
        """The ad's row: its own when known, else the next one."""
        return self.row_of.get(ad_id, len(self.ad_ids))

    def upsert(self, update: AdUpdate, encoded: dict[str, np.ndarray]) -> int:
        """Write one ad (its encoded features: (1,) or (1, L) per name); return its row.

        Every value is taken before anything changes, so a missing feature leaves the catalog as it was.
        """
        missing = sorted(set(self.features) - set(encoded))
        if missing:
            raise KeyError(f"ad {update.ad_id!r} lacks encoded features {missing}")
        row = self.row_for(update.ad_id)
        if row == len(self.ad_ids):
            self.ad_ids.append(update.ad_id)
            self.campaigns.append(update.campaign_id)
            for values in self.attributes.values():
                values.append(None)
            self.row_of[update.ad_id] = row
        self.campaigns[row] = update.campaign_id
        for name, values in self.attributes.items():
            values[row] = update.attributes.get(name, values[row])
        self.bids = grow(self.bids, row, np.float32(update.bid))
        for name in self.features:
            self.features[name] = grow(self.features[name], row, encoded[name][0])
        return row

    def shortlist(self, rows: np.ndarray, pctr: np.ndarray) -> Shortlist:
        """``rows`` (N,) with their calibrated pCTR (N,), best expected revenue (pCTR x bid) first."""
        order = np.argsort(-(pctr * self.bids[rows]), kind="stable")
        rows, pctr = rows[order], pctr[order]
        return Shortlist(
            ad_ids=[self.ad_ids[r] for r in rows.tolist()],
            campaigns=[self.campaigns[r] for r in rows.tolist()],
            bids=self.bids[rows],
            pctr=pctr,
            attributes={name: [values[r] for r in rows.tolist()] for name, values in self.attributes.items()},
        )


def load_feature_map(model_dir: Path) -> FeatureMap:
    return FeatureMap.load(model_dir / "feature_map.json")


def feature_builder(model_dir: Path) -> FeatureBuilder:
    """The request -> user features transform of an exported (verified) model directory."""
    feature_map = load_feature_map(model_dir)
    store = UserStore(pq.read_table(model_dir / "users.parquet"), feature_map)
    key = pseudonym_key(None) if feature_map.metadata.get("pseudonymized") else None
    return FeatureBuilder(feature_map, store, catalog_lookups(pq.read_table(model_dir / "ads.parquet")), key)


def verified(model_dir: str | Path) -> tuple[Path, str]:
    """(version directory, version) after checking every file's checksum."""
    model_dir = resolve_model_dir(model_dir)
    return model_dir, verify_manifest(model_dir)["version"]


class UserSide:
    """The user tower of one model version: U = f(user features)."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir, self.version = verified(model_dir)
        self.tower = load_tower(self.model_dir, "user_encoder")

    @torch.no_grad()
    def encode(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """Features of B users -> U (B, D) float32."""
        return self.tower(to_features(features, self.tower.feature_names)).numpy()


class RetrievalSide:
    """The ad index of one model version: the shortlist by U . V, and new ads embedded by the ad tower."""

    def __init__(self, model_dir: str | Path, index_options: dict | None = None, popular: int = 50) -> None:
        self.model_dir, self.version = verified(model_dir)
        self.feature_map = load_feature_map(self.model_dir)
        self.ad_tower = load_tower(self.model_dir, "ad_encoder")
        self.catalog = Catalog(pq.read_table(self.model_dir / "ads.parquet"), self.ad_tower.feature_names)
        vectors = load_ad_embeddings(self.model_dir).numpy()
        self.index = build_index(vectors, recall_queries=sample_user_vectors(self.model_dir), **(index_options or {}))
        self.popular_rows = popular_rows(self.feature_map, self.catalog, popular)
        self.updates = UpdateReader(self.feature_map, "ad_index")

    @property
    def applied(self) -> int:
        """Entries of the serving state's ad log read so far, applied or skipped."""
        return self.updates.applied

    def shortlist(self, user: np.ndarray, n: int, cold: list[bool]) -> list[tuple[np.ndarray, np.ndarray]]:
        """U (B, D) -> per user (rows (n',), scores (n',)) best first; cold users also get the popular ads."""
        scores, rows = self.index.search(np.ascontiguousarray(user, np.float32), n)
        out = []
        for b in range(len(user)):
            keep = rows[b] >= 0
            found, found_scores = rows[b][keep], scores[b][keep]
            if cold[b]:
                extra = self.popular_rows[~np.isin(self.popular_rows, found)]
                found = np.concatenate([found, extra])
                found_scores = np.concatenate([found_scores, self.index.vectors[extra] @ user[b]])
            out.append((found, found_scores.astype(np.float32)))
        return out

    def apply(self, updates: list[AdUpdate]) -> None:
        """Embed each new or changed ad with this version's ad tower and write it into the index;
        an update the feature map rejects is skipped (``self.updates.report()``)."""
        self.updates.read(updates, self.write)

    @torch.no_grad()
    def write(self, update: AdUpdate, encoded: dict[str, np.ndarray]) -> None:
        # The vector first, then the index, then the catalog: a failure leaves both as they were.
        names = self.ad_tower.feature_names
        vector = self.ad_tower(to_features({n: encoded[n] for n in names}, names)).numpy()
        self.index.upsert(np.array([self.catalog.row_for(update.ad_id)]), vector)
        self.catalog.upsert(update, encoded)


class RankingSide:
    """Calibrated pCTR for a user's shortlist: the DCN ranker when the version ships one, else the towers'."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir, self.version = verified(model_dir)
        self.feature_map = load_feature_map(self.model_dir)
        meta = json.loads((self.model_dir / "model.json").read_text())
        self.ranker = load_ranker(self.model_dir)
        ad_names = self.feature_map.names("ad")
        self.catalog = Catalog(pq.read_table(self.model_dir / "ads.parquet"), ad_names)
        self.logit_bias = float(meta["logit_bias"])
        calibration = (meta.get("ranker") or {}).get("calibration") if self.ranker is not None else meta.get("calibration")
        self.calibration = Platt(calibration["a"], calibration["b"]) if calibration else Platt()
        self.updates = UpdateReader(self.feature_map, "ranker")

    @property
    def applied(self) -> int:
        return self.updates.applied

    @torch.no_grad()
    def pctr(self, user_features: dict[str, np.ndarray], rows: np.ndarray, tower_scores: np.ndarray) -> np.ndarray:
        """One user's features (1 row each), shortlist rows (N,) and U . V (N,) -> calibrated pCTR (N,)."""
        if self.ranker is None or len(rows) == 0:
            return self.calibration(tower_scores + self.logit_bias).astype(np.float32)
        inputs = {
            name: self.catalog.features[name][rows] if name in self.catalog.features else np.repeat(user_features[name], len(rows), axis=0)
            for name in self.ranker.feature_names
        }
        logits = self.ranker(to_features(inputs, self.ranker.feature_names)).numpy()
        return self.calibration(logits).astype(np.float32)

    def shortlist(self, user_features: dict[str, np.ndarray], rows: np.ndarray, tower_scores: np.ndarray) -> Shortlist:
        return self.catalog.shortlist(rows, self.pctr(user_features, rows, tower_scores))

    def apply(self, updates: list[AdUpdate]) -> None:
        """Write each update into the catalog; the same updates as the index's are skipped."""
        self.updates.read(updates, self.catalog.upsert)


def popular_rows(feature_map: FeatureMap, catalog: Catalog, count: int) -> np.ndarray:
    """Catalog rows of the ``count`` ads seen most in training (the vocabulary's counts), most first."""
    vocabulary = feature_map.vocabularies.get("ad_id")
    if vocabulary is None or vocabulary.counts is None or count <= 0:
        return np.zeros(0, np.int64)
    order = np.argsort(-np.asarray(vocabulary.counts), kind="stable")
    rows = [catalog.row_of[vocabulary.values[i]] for i in order if vocabulary.values[i] in catalog.row_of]
    return np.asarray(rows[:count], np.int64)


def sample_user_vectors(model_dir: Path, count: int = 256) -> np.ndarray:
    """U of up to ``count`` logged users: the realistic queries the index's recall is measured on (Q, D)."""
    builder = feature_builder(model_dir)
    users = pq.read_table(model_dir / "users.parquet", columns=["raw_user_id"])["raw_user_id"]
    step = max(1, len(users) // count)
    queries = [UserQuery(uid) for uid in users.to_pylist()[::step][:count]]
    if not queries:
        return None
    if builder.pseudonym_key:  # stored ids are pseudonyms already: build from them directly
        builder = FeatureBuilder(builder.feature_map, builder.store, builder.lookups, None)
    tower = load_tower(model_dir, "user_encoder")
    with torch.no_grad():
        return tower(to_features(builder.build(queries), tower.feature_names)).numpy()


def user_key(user_id: str) -> str:
    """The auction's frequency-cap key: a digest, so the shared state never holds raw user ids."""
    return hashlib.blake2b(user_id.encode(), digest_size=12).hexdigest()


def is_cold(builder: FeatureBuilder, query: UserQuery) -> bool:
    """No history in the request and none stored: the towers know nothing of this user's taste."""
    return not query.recent_ad_ids and (builder.store.row(builder.user_ids([query])[0].as_py()) is None)


class LocalRecommender:
    """Every side of one model version in one process: what each Serve request runs, without Serve."""

    def __init__(
        self, model_dir: str | Path, marketplace: Marketplace, index_options: dict | None = None, shortlist: int = 200, popular: int = 50
    ) -> None:
        self.features = feature_builder(resolve_model_dir(model_dir))
        self.users = UserSide(model_dir)
        self.retrieval = RetrievalSide(model_dir, index_options, popular)
        self.ranking = RankingSide(model_dir)
        self.marketplace = marketplace
        self.shortlist = shortlist
        self.version = self.users.version

    def recommend(self, query: UserQuery, k: int) -> tuple[AuctionResult, bool]:
        """(the auction's winners and removal counts, whether the user was cold)."""
        features = self.features.build([query])
        cold = is_cold(self.features, query)
        user = self.users.encode(features)
        ((rows, scores),) = self.retrieval.shortlist(user, max(self.shortlist, k), [cold])
        ranked = self.ranking.shortlist(features, rows, scores)
        key, request = user_key(query.user_id), {**query.attributes, **query.context}
        return self.marketplace.run_shortlist(key, request, ranked, k), cold

    def upsert_ad(self, update: AdUpdate) -> None:
        self.retrieval.apply([update])
        self.ranking.apply([update])
