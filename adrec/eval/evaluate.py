"""Offline evaluation of the trained model on the test split -> ``metrics.json`` and PNG plots.

Calibration: Platt scaling fitted on the validation split (``calibration.json``), or the fixed
``evaluate.calibration`` {a, b}; test pCTR metrics use the calibrated probability, as the auction will.
Ranking: AUC, GAUC (per user), logloss, accuracy/precision/recall at 0.5, ECE, mean pCTR
against the observed CTR, and AUC on impressions of cold ads (out of the id vocabulary).
Retrieval over the whole catalog by U . V, by ``data.evaluation.protocol``:
    impression  each clicked test impression is a query for its ad, with the user's features
                and history at that moment (event logs: what the ad server would have asked)
    user        each test user is a query for all of their test positives, from their training
                history, with the items they interacted with in train and validation excluded
                (the MovieLens / RecBole full-ranking protocol)
Baselines: popularity (training clicks per ad) and, on synthetic logs, the oracle (the
generator's true click probability).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data
import torch
from omegaconf import OmegaConf

from adrec.eval.calibration import Platt, sigmoid
from adrec.eval.metrics import (
    auc,
    classification_metrics,
    group_auc,
    logloss,
    rank_of_target,
    retrieval_metrics,
    top_k_metrics,
)
from adrec.eval.plots import save_plots
from adrec.features import OOV, FeatureMap, add_history_attributes
from adrec.inference import catalog_lookups, embed, to_features
from adrec.registry import FEATURE_MAP, check_same_features, load_checkpoint
from adrec.results import EvalReport, TrainResult, finite_or_none
from adrec.runtime import init_ray_from, resolve

CURVE_KS = (1, 2, 5, 10, 20, 50, 100)
PROTOCOLS = ("impression", "user")


def ad_click_counts(train: ray.data.Dataset, catalog_ids: pa.Array) -> np.ndarray:
    """Training clicks of each catalog ad, (A,) float64: the popularity baseline's score."""

    def per_block(batch: pa.Table) -> pa.Table:
        return batch.group_by("raw_ad_id").aggregate([("label", "sum")])

    tables = ray.get(train.select_columns(["raw_ad_id", "label"]).map_batches(per_block, batch_format="pyarrow").to_arrow_refs())
    totals = pa.concat_tables(tables).group_by("raw_ad_id").aggregate([("label_sum", "sum")])
    counts = np.zeros(len(catalog_ids))
    rows = catalog_rows(totals["raw_ad_id"], catalog_ids)
    known = rows >= 0
    np.add.at(counts, rows[known], totals["label_sum_sum"].to_numpy()[known])
    return counts


def catalog_rows(ad_ids: pa.Array | pa.ChunkedArray, catalog_ids: pa.Array) -> np.ndarray:
    """(N,) raw ad ids -> (N,) int64 rows of the catalog; -1 for ads not in it."""
    return pc.fill_null(pc.index_in(ad_ids, value_set=catalog_ids), -1).to_numpy(zero_copy_only=False).astype(np.int64)


@torch.no_grad()
def score_split(model, split: ray.data.Dataset, catalog_ids: pa.Array) -> dict[str, np.ndarray]:
    """Stream a split through the model: per-example logit, label, truth, catalog row, user key,
    and, for a two-tower model, the user embeddings of clicked rows (``clicked_user``, (C, D))."""
    towers = hasattr(model, "user_tower")
    out = {"logit": [], "label": [], "true_pctr": [], "ad_row": [], "user_key": [], "cold_ad": [], "clicked_user": []}
    for batch in split.iter_batches(batch_size=8192, batch_format="numpy"):
        n = len(batch["label"])
        if towers:
            user = model.user_tower(to_features(batch, model.user_tower.feature_names))
            ad = model.ad_tower(to_features(batch, model.ad_tower.feature_names))
            out["logit"].append(((user * ad).sum(-1) + model.logit_bias).numpy())
            out["clicked_user"].append(user[torch.from_numpy(batch["label"] > 0.5)])
        else:
            out["logit"].append(model(to_features(batch, model.feature_names)).numpy())
        out["label"].append(batch["label"])
        out["cold_ad"].append(batch["ad_id"] == OOV if "ad_id" in batch else np.zeros(n, bool))  # unseen or rare in training
        out["true_pctr"].append(batch.get("true_pctr", np.full(n, np.nan, np.float32)))
        out["user_key"].append(batch.get("user_key", np.arange(n, dtype=np.int64)))  # no users: GAUC is plain AUC
        ad_ids = pa.array(batch["raw_ad_id"]) if "raw_ad_id" in batch else pa.nulls(n, pa.string())
        out["ad_row"].append(catalog_rows(ad_ids, catalog_ids))
    return {k: (torch.cat(v).numpy() if k == "clicked_user" else np.concatenate(v)) for k, v in out.items() if v}


def ranking_report(scored: dict, calibration: Platt, popularity: np.ndarray) -> dict:
    """pCTR metrics of the calibrated model, the uncalibrated one, popularity and (synthetic logs) the oracle."""
    labels, ad_row = scored["label"], scored["ad_row"]
    probs = calibration(scored["logit"])
    metrics = classification_metrics(labels, probs)
    raw = classification_metrics(labels, sigmoid(scored["logit"]))
    metrics.update({"uncalibrated_logloss": raw["logloss"], "uncalibrated_ece": raw["ece"], "uncalibrated_mean_pctr": raw["mean_pctr"]})
    metrics["gauc"] = group_auc(labels, probs, scored["user_key"])
    # Ads the model has no id embedding for: only their content features speak for them.
    cold = scored["cold_ad"]
    metrics["cold_ad_examples"] = int(cold.sum())
    metrics["cold_ad_auc"] = auc(labels[cold], probs[cold])
    if len(popularity):
        metrics["popularity_auc"] = auc(labels, np.where(ad_row >= 0, popularity[np.maximum(ad_row, 0)], 0.0))
    truth = scored["true_pctr"]
    known = ~np.isnan(truth)
    if known.any():
        metrics["oracle_auc"] = auc(labels[known], truth[known])
        metrics["oracle_logloss"] = logloss(labels[known], truth[known])
        metrics["auc_over_oracle"] = metrics["auc"] / metrics["oracle_auc"]
    return metrics


def retrieval_ranks(user: np.ndarray, ads: np.ndarray, target: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """0-based rank of each query's target ad among all ads by dot product; user (Q, D), ads (A, D)."""
    return np.concatenate([rank_of_target(user[i : i + chunk] @ ads.T, target[i : i + chunk]) for i in range(0, len(target), chunk)])


def impression_retrieval(scored: dict, ad_matrix: np.ndarray, popularity: np.ndarray, ks: list[int], limit: int) -> dict:
    """Recall/NDCG/HitRate@K over the whole catalog for clicked test impressions of catalog ads, model and popularity."""
    target = scored["ad_row"][scored["label"] > 0.5]
    in_catalog = target >= 0
    user, target = scored["clicked_user"][in_catalog][:limit], target[in_catalog][:limit]
    metrics = retrieval_metrics(retrieval_ranks(user, ad_matrix, target), ks)
    popular_ranks = rank_of_target(np.broadcast_to(popularity, (len(target), len(popularity))), target)
    metrics.update({f"popularity_{k}": v for k, v in retrieval_metrics(popular_ranks, ks).items()})
    metrics["retrieval_queries"] = int(len(target))
    return metrics


def rows_by_user(table: pa.Table, users: np.ndarray, catalog_ids: pa.Array) -> list[np.ndarray]:
    """For each of ``users`` (user keys), the catalog rows of its ads in ``table`` (user_key, raw_ad_id)."""
    rows = catalog_rows(table["raw_ad_id"], catalog_ids)
    keys = table["user_key"].to_numpy()
    position = np.searchsorted(users, keys)
    known = (position < len(users)) & (users[np.minimum(position, len(users) - 1)] == keys) & (rows >= 0)
    order = np.argsort(position[known], kind="stable")
    grouped_rows = rows[known][order]
    bounds = np.searchsorted(position[known][order], np.arange(len(users) + 1))
    return [grouped_rows[bounds[i] : bounds[i + 1]] for i in range(len(users))]


def training_histories(train: pa.Table, users: np.ndarray, length: int) -> list[list[str]]:
    """Each user's latest ``length`` clicked ads in the training split, most recent first."""
    clicks = train.filter(pc.greater(train["label"], 0.5))
    clicks = clicks.take(pc.sort_indices(clicks, [("user_key", "ascending"), ("ts", "descending")]))
    keys, ads = clicks["user_key"].to_numpy(), clicks["raw_ad_id"].to_numpy(zero_copy_only=False)
    starts = np.searchsorted(keys, users, side="left")
    ends = np.minimum(np.searchsorted(keys, users, side="right"), starts + length)
    return [list(ads[s:e]) for s, e in zip(starts, ends)]


@torch.no_grad()
def user_queries(model, feature_map: FeatureMap, test: pa.Table, train: pa.Table, users: np.ndarray, catalog: pa.Table) -> torch.Tensor:
    """U (Q, D) per user: profile and context features from one of its test rows, history from training clicks."""
    first_row = np.searchsorted(test["user_key"].to_numpy(), users)
    features = to_features(test.take(pa.array(first_row)), model.user_tower.feature_names)
    behaviour = list(model.user_tower.config.get("behaviour") or []) or [n for n in model.user_tower.feature_names if n.startswith("history")]
    if behaviour:
        length = feature_map.spec("history").max_len
        histories = pa.table({"history": pa.array(training_histories(train, users, length), pa.list_(pa.string()))})
        encoded = feature_map.encode(add_history_attributes(histories, catalog_lookups(catalog)))
        features.update({name: torch.from_numpy(encoded[name]) for name in behaviour})
    return model.user_tower(features)


@dataclass(frozen=True)
class UserRankingTask:
    """Per-user full ranking over the catalog, seen items excluded (the MovieLens / RecBole protocol),
    built once from a prepared folder so that every model (adrec's towers, popularity, a benchmark's
    peers) is scored by the same code: :meth:`metrics` takes scores and returns Recall/NDCG/HitRate@K.

    ``target`` is the split whose positives are relevant, ``seen`` the splits whose items are
    excluded: ("test", ("train", "validation")) for the test score, ("validation", ("train",)) for
    tuning on validation. Items are catalog rows (the order of ``ads.parquet``).
    """

    users: np.ndarray  # (Q,) int64 user keys, ascending: users with at least one relevant, unseen item
    relevant: tuple[np.ndarray, ...]  # Q arrays: catalog rows of the user's target positives, seen ones removed (non-empty)
    seen: tuple[np.ndarray, ...]  # Q arrays: catalog rows of the user's items in the seen splits, never recommended
    num_items: int  # A, the catalog size
    target: str = "test"
    seen_splits: tuple[str, ...] = ("train", "validation")

    @classmethod
    def from_prepared(
        cls,
        prepared: Path,
        catalog_ids: pa.Array | None = None,
        *,
        target: str = "test",
        seen: tuple[str, ...] = ("train", "validation"),
        limit: int | None = None,
    ) -> UserRankingTask:
        """The task of ``prepared``'s ``target`` split; ``catalog_ids`` (A,) default to ``ads.parquet``'s
        raw_ad_id. ``limit``: at most that many users (the first by key), before dropping those whose
        every target positive was seen."""
        if catalog_ids is None:
            catalog_ids = pq.read_table(prepared / "ads.parquet", columns=["raw_ad_id"])["raw_ad_id"].combine_chunks()
        target_rows = pq.read_table(prepared / target, columns=["user_key", "raw_ad_id", "label"])
        positives = target_rows.filter(pc.greater(target_rows["label"], 0.5))
        users = np.unique(positives["user_key"].to_numpy())[:limit]
        seen_rows = pa.concat_tables([pq.read_table(prepared / split, columns=["user_key", "raw_ad_id"]) for split in seen])
        relevant, done = rows_by_user(positives, users, catalog_ids), rows_by_user(seen_rows, users, catalog_ids)
        relevant = [np.setdiff1d(mine, seen_by_user) for mine, seen_by_user in zip(relevant, done)]
        # A target positive already seen cannot be recommended; RecBole drops users left with none.
        keep = np.array([len(mine) > 0 for mine in relevant], bool)
        return cls(
            users=users[keep],
            relevant=tuple(r for r, k in zip(relevant, keep) if k),
            seen=tuple(s for s, k in zip(done, keep) if k),
            num_items=len(catalog_ids),
            target=target,
            seen_splits=tuple(seen),
        )

    def metrics(self, scores: np.ndarray | Callable[[slice], np.ndarray], ks: list[int] | tuple[int, ...], chunk: int = 1024) -> dict[str, float]:
        """Recall/NDCG/HitRate@K (``top_k_metrics``) of ranking every catalog item by ``scores``, seen items excluded.

        ``scores``: (Q, A) for the task's users in order; (A,), one score per item for every user
        (popularity); or a function from a slice of the task's users to their (q, A) or (A,) scores,
        called ``chunk`` users at a time so that Q x A never has to fit in memory. Ties rank in
        catalog order (a stable sort).
        """
        score = scores if callable(scores) else (lambda rows: scores if scores.ndim == 1 else scores[rows])
        k_max = min(max(ks), self.num_items)
        hits = [self.top_hits(score(slice(start, start + chunk)), slice(start, start + chunk), k_max) for start in range(0, len(self.users), chunk)]
        return top_k_metrics(np.concatenate(hits) if hits else np.zeros((0, k_max), bool), self.relevant_counts, ks)

    def top_hits(self, scores: np.ndarray, rows: slice, k: int) -> np.ndarray:
        """(q, k) bool: whether each of the users ``rows``' top ``k`` unseen items by ``scores`` (q, A) or (A,) is relevant."""
        relevant, seen = self.relevant[rows], self.seen[rows]
        values = np.broadcast_to(scores, (len(relevant), self.num_items)).copy()  # a copy: seen items are overwritten
        is_relevant = np.zeros(values.shape, bool)
        for i, (mine, done) in enumerate(zip(relevant, seen)):
            values[i, done] = -np.inf
            is_relevant[i, mine] = True
        top = np.argsort(-values, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(is_relevant, top, axis=1)

    @property
    def relevant_counts(self) -> np.ndarray:
        """(Q,) relevant items per user (each > 0)."""
        return np.array([len(mine) for mine in self.relevant], dtype=np.int64)


def user_retrieval(
    model, feature_map: FeatureMap, prepared: Path, catalog: pa.Table, ad_matrix: np.ndarray, popularity: np.ndarray, ks: list[int], limit: int
) -> dict:
    """Per-user full ranking with seen items excluded: Recall/NDCG/HitRate@K for the model and popularity."""
    task = UserRankingTask.from_prepared(prepared, catalog["raw_ad_id"].combine_chunks(), limit=limit)
    test = pq.read_table(prepared / "test")
    test = test.take(pc.sort_indices(test, [("user_key", "ascending")]))
    train = pq.read_table(prepared / "train", columns=["user_key", "raw_ad_id", "label", "ts"])
    user = user_queries(model, feature_map, test, train, task.users, catalog).numpy()  # (Q, D)
    metrics = task.metrics(lambda rows: user[rows] @ ad_matrix.T, sorted(set(ks) | set(CURVE_KS)))
    metrics.update({f"popularity_{k}": v for k, v in task.metrics(popularity, ks).items()})
    metrics["retrieval_queries"] = len(task.users)
    return metrics


def fit_calibration(model, prepared: Path, catalog_ids: pa.Array) -> Platt:
    """Platt scaling on the validation split's logits."""
    scored = score_split(model, ray.data.read_parquet(str(prepared / "validation")), catalog_ids)
    return Platt.fit(scored["logit"], scored["label"])


def evaluate(
    trained: TrainResult,
    prepared: Path,
    eval_dir: Path,
    *,
    ks: list[int],
    max_retrieval_queries: int,
    protocol: str = "impression",
    calibration: dict | None = None,
) -> EvalReport:
    """Evaluate ``trained``'s best checkpoint on ``prepared``'s test split; write ``metrics.json``,
    ``calibration.json`` and plots into ``eval_dir``.

    ``calibration`` {a, b}: score with this fixed Platt calibration (a model scored as it serves
    keeps its own) instead of fitting one on the validation split. ``protocol``: see the module docstring.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"data.evaluation.protocol={protocol!r} is not one of {', '.join(PROTOCOLS)}")
    checkpoint = trained.best_checkpoint
    model = load_checkpoint(checkpoint)
    check_same_features(checkpoint, prepared)
    feature_map = FeatureMap.load(Path(checkpoint) / FEATURE_MAP)
    has_catalog = (prepared / "ads.parquet").exists()
    catalog = pq.read_table(prepared / "ads.parquet") if has_catalog else pa.table({"raw_ad_id": pa.array([], pa.string())})
    catalog_ids = catalog["raw_ad_id"].combine_chunks()

    platt = Platt(float(calibration["a"]), float(calibration["b"])) if calibration else fit_calibration(model, prepared, catalog_ids)
    eval_dir.mkdir(parents=True, exist_ok=True)
    platt.save(eval_dir / "calibration.json")
    scored = score_split(model, ray.data.read_parquet(str(prepared / "test")), catalog_ids)
    has_ads = "raw_ad_id" in ray.data.read_parquet(str(prepared / "train")).schema().names
    popularity = ad_click_counts(ray.data.read_parquet(str(prepared / "train")), catalog_ids) if has_ads else np.zeros(0)
    retrieval = {}
    if hasattr(model, "user_tower") and has_catalog:  # a ranker scores given ads; it does not retrieve
        ad_matrix = embed(model.ad_tower, catalog).numpy()  # (A, D)
        if protocol == "user":
            retrieval = user_retrieval(model, feature_map, prepared, catalog, ad_matrix, popularity, ks, max_retrieval_queries)
        else:
            retrieval = impression_retrieval(scored, ad_matrix, popularity, sorted(set(ks) | set(CURVE_KS)), max_retrieval_queries)
    metrics = finite_or_none(
        {
            **ranking_report(scored, platt, popularity),
            **retrieval,
            "retrieval_protocol": protocol if retrieval else None,
            "test_examples": int(len(scored["label"])),
            "test_clicks": int((scored["label"] > 0.5).sum()),
            "num_ads": int(len(catalog_ids)),
        }
    )
    report = EvalReport(checkpoint=checkpoint, calibration={"method": "platt", "a": platt.a, "b": platt.b}, metrics=metrics)
    report.plots = save_plots(eval_dir, trained.epochs, report.to_json(), scored["label"], platt(scored["logit"]), CURVE_KS)
    report.save(eval_dir)
    return report


def run(cfg) -> dict:
    """jobs/evaluate.py: the checkpoint of ``paths.train_dir``'s result.json on ``paths.prepared_dir``."""
    init_ray_from(cfg)
    report = evaluate(
        TrainResult.load(resolve(cfg.paths.train_dir)),
        Path(resolve(cfg.paths.prepared_dir)),
        Path(resolve(cfg.paths.eval_dir)),
        ks=list(cfg.evaluate.ks),
        max_retrieval_queries=int(cfg.evaluate.max_retrieval_queries),
        protocol=(cfg.data.get("evaluation") or {}).get("protocol", "impression"),
        calibration=OmegaConf.to_container(cfg.evaluate.calibration) if cfg.evaluate.get("calibration") else None,
    )
    return report.to_json()
