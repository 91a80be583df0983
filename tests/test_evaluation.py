"""The per-user full-ranking protocol (MovieLens / RecBole) on a small MovieLens-format log."""

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from adrec.data import prepare
from adrec.eval import evaluate
from adrec.train import driver
from tests.test_sources import compose_data, write_movielens

IMPLICIT = [
    "data.label_rule.implicit=true",
    "data.prepare.min_count=1",
    "model.loss.bce_weight=0.0",
    "model.loss.softmax_weight=1.0",
    "trainer.select_metric=val_loss",
    "trainer.select_mode=min",
    "trainer.epochs=2",
    "trainer.batch_size=64",
    "trainer.num_workers=1",
    "evaluate.ks=[5,10]",
]


def brute_force_popularity_recall(prepared: Path, k: int) -> tuple[float, int]:
    """Recall@k of training popularity with each user's train/validation items excluded, by plain loops."""
    catalog = pq.read_table(prepared / "ads.parquet")["raw_ad_id"].to_pylist()
    read = lambda split: pq.read_table(prepared / split, columns=["user_key", "raw_ad_id", "label"]).to_pylist()  # noqa: E731
    train, validation, test = read("train"), read("validation"), read("test")
    clicks = {ad: sum(r["label"] for r in train if r["raw_ad_id"] == ad) for ad in catalog}
    ranked = sorted(catalog, key=lambda ad: -clicks[ad])  # stable: ties keep catalog order
    recalls = []
    for user in sorted({r["user_key"] for r in test if r["label"] > 0.5}):
        seen = {r["raw_ad_id"] for r in train + validation if r["user_key"] == user}
        relevant = {r["raw_ad_id"] for r in test if r["user_key"] == user and r["label"] > 0.5} - seen
        if relevant:
            top = [ad for ad in ranked if ad not in seen][:k]
            recalls.append(len(relevant & set(top)) / len(relevant))
    return float(np.mean(recalls)), len(recalls)


def test_per_user_protocol_excludes_seen_items_and_matches_a_brute_force_baseline(ray_session, tmp_path):
    write_movielens(tmp_path / "ml")
    cfg = compose_data(tmp_path, "data=movielens", f"data.path={tmp_path / 'ml'}", *IMPLICIT)
    prepare.run(cfg)
    driver.run(cfg)
    metrics = evaluate.run(cfg)
    prepared = Path(cfg.paths.prepared_dir)
    expected, users = brute_force_popularity_recall(prepared, 10)
    assert metrics["retrieval_protocol"] == "user"
    assert metrics["retrieval_queries"] == users > 0
    assert metrics["popularity_recall@10"] == pytest.approx(expected, abs=1e-12)
    for k in (5, 10):
        assert 0.0 <= metrics[f"recall@{k}"] <= metrics[f"hitrate@{k}"] <= 1.0
    assert metrics["recall@5"] <= metrics["recall@10"]
    # Implicit feedback: every row is a positive, so AUC is undefined and reported as null, not a number.
    assert metrics["auc"] is None and pc.min(pq.read_table(prepared / "test")["label"]).as_py() == 1.0
