"""Offline evaluation of the trained two-tower model on the test split -> ``metrics.json``.

Ranking: AUC, logloss, accuracy/precision/recall at 0.5 over test impressions.
Retrieval: for each clicked test impression, the clicked ad's rank among all catalog
ads by U . V -> Recall@K, NDCG@K. Baselines: popularity (training clicks per ad) and,
on synthetic logs, the oracle (the generator's true click probability).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data
import torch

from adrec.eval.metrics import auc, classification_metrics, logloss, rank_of_target, retrieval_metrics
from adrec.inference import embed, to_features
from adrec.registry import check_same_features, load_checkpoint
from adrec.runtime import init_ray_from, read_json, require, resolve, write_json


def ad_click_counts(train: ray.data.Dataset, catalog_ids: pa.Array) -> np.ndarray:
    """Training clicks of each catalog ad, (A,) float64: the popularity baseline's score."""

    def per_block(batch: pa.Table) -> pa.Table:
        return batch.group_by("raw_ad_id").aggregate([("label", "sum")])

    tables = ray.get(train.select_columns(["raw_ad_id", "label"]).map_batches(per_block, batch_format="pyarrow").to_arrow_refs())
    totals = pa.concat_tables(tables).group_by("raw_ad_id").aggregate([("label_sum", "sum")])
    counts = np.zeros(len(catalog_ids))
    rows = pc.index_in(totals["raw_ad_id"], value_set=catalog_ids).to_numpy(zero_copy_only=False)
    known = ~np.isnan(rows.astype(float))
    np.add.at(counts, rows[known].astype(np.int64), totals["label_sum_sum"].to_numpy()[known])
    return counts


@torch.no_grad()
def score_split(model, split: ray.data.Dataset, user_names: list[str], ad_names: list[str], catalog_ids: pa.Array):
    """Stream a split through the model. Returns per-example arrays and the clicked rows' user embeddings."""
    out = {"prob": [], "label": [], "true_pctr": [], "ad_row": [], "clicked_user": []}
    for batch in split.iter_batches(batch_size=8192, batch_format="numpy"):
        user = model.user_tower(to_features(batch, user_names))
        ad = model.ad_tower(to_features(batch, ad_names))
        prob = torch.sigmoid((user * ad).sum(-1) + model.logit_bias).numpy()
        clicked = batch["label"] > 0.5
        out["prob"].append(prob)
        out["label"].append(batch["label"])
        out["true_pctr"].append(batch.get("true_pctr", np.full(len(prob), np.nan, np.float32)))
        rows = pc.index_in(pa.array(batch["raw_ad_id"]), value_set=catalog_ids)
        out["ad_row"].append(pc.fill_null(rows, -1).to_numpy(zero_copy_only=False))
        out["clicked_user"].append(user[torch.from_numpy(clicked)])
    return {k: (torch.cat(v).numpy() if k == "clicked_user" else np.concatenate(v)) for k, v in out.items()}


def retrieval_ranks(user: np.ndarray, ads: np.ndarray, target: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """0-based rank of each query's target ad among all ads by dot product; user (Q, D), ads (A, D)."""
    return np.concatenate([rank_of_target(user[i : i + chunk] @ ads.T, target[i : i + chunk]) for i in range(0, len(target), chunk)])


def ranking_report(scored: dict, popularity: np.ndarray) -> dict:
    """pCTR metrics of the model, the popularity baseline and (synthetic logs) the oracle."""
    labels, ad_row = scored["label"], scored["ad_row"]
    metrics = classification_metrics(labels, scored["prob"])
    metrics["popularity_auc"] = auc(labels, np.where(ad_row >= 0, popularity[ad_row], 0.0))
    truth = scored["true_pctr"]
    known = ~np.isnan(truth)
    if known.any():
        metrics["oracle_auc"] = auc(labels[known], truth[known])
        metrics["oracle_logloss"] = logloss(labels[known], truth[known])
        metrics["auc_over_oracle"] = metrics["auc"] / metrics["oracle_auc"]
    return metrics


def retrieval_report(scored: dict, ad_matrix: np.ndarray, popularity: np.ndarray, ks: list[int], limit: int) -> dict:
    """Recall@K / NDCG@K over the whole catalog for clicked impressions of catalog ads, model and popularity."""
    target = scored["ad_row"][scored["label"] > 0.5]
    in_catalog = target >= 0
    user, target = scored["clicked_user"][in_catalog][:limit], target[in_catalog][:limit]
    metrics = retrieval_metrics(retrieval_ranks(user, ad_matrix, target), ks)
    popular_ranks = rank_of_target(np.broadcast_to(popularity, (len(target), len(popularity))), target)
    metrics.update({f"popularity_{k}": v for k, v in retrieval_metrics(popular_ranks, ks).items()})
    metrics["retrieval_queries"] = int(len(target))
    return metrics


def run(cfg) -> dict:
    """Evaluate the best checkpoint on the test split; write and return ``metrics.json``."""
    init_ray_from(cfg)
    prepared = Path(resolve(cfg.paths.prepared_dir))
    trained = read_json(require(Path(resolve(cfg.paths.train_dir)) / "result.json", "jobs/train.py"))
    model = load_checkpoint(trained["best_checkpoint"])
    check_same_features(trained["best_checkpoint"], prepared)
    catalog = pq.read_table(prepared / "ads.parquet")
    catalog_ids = catalog["raw_ad_id"].combine_chunks()
    ad_matrix = embed(model.ad_tower, catalog).numpy()  # (A, D)

    test = ray.data.read_parquet(str(prepared / "test"))
    scored = score_split(model, test, model.user_tower.feature_names, model.ad_tower.feature_names, catalog_ids)
    popularity = ad_click_counts(ray.data.read_parquet(str(prepared / "train")), catalog_ids)
    metrics = {
        **ranking_report(scored, popularity),
        **retrieval_report(scored, ad_matrix, popularity, list(cfg.evaluate.ks), int(cfg.evaluate.max_retrieval_queries)),
        "test_examples": int(len(scored["label"])),
        "test_clicks": int((scored["label"] > 0.5).sum()),
        "num_ads": int(len(catalog_ids)),
        "checkpoint": trained["best_checkpoint"],
    }
    metrics = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    write_json(Path(resolve(cfg.paths.eval_dir)) / "metrics.json", metrics)
    return metrics
