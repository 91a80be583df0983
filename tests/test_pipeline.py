"""The whole offline road on a tiny synthetic log, with real Ray Data, Ray Train and Parquet."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adrec.eval.calibration import Platt
from adrec.features import OOV, FeatureMap
from adrec.registry import ArtifactError, load_checkpoint, verify_manifest
from tests.conftest import BAD_EVENTS

pytestmark = pytest.mark.slow


def test_bad_rows_are_quarantined_and_counted(tiny_run):
    report = tiny_run["prepare"]
    events = tiny_run["generate"]["events"]
    assert report["rows_read"] == sum(events.values()) + len(BAD_EVENTS)
    assert report["rows_read"] == report["rows_kept"] + report["rows_quarantined"]
    assert report["quarantined_by_reason"] == {reason: 1 for _, reason in BAD_EVENTS}
    quarantine = pq.read_table(Path(tiny_run["cfg"].paths.prepared_dir) / "quarantine").to_pandas()
    assert len(quarantine) == len(BAD_EVENTS)
    assert sorted(quarantine["reason"]) == sorted(reason for _, reason in BAD_EVENTS)
    # Every good row was kept: each logged impression is exactly one example.
    assert sum(s["examples"] for s in report["splits"].values()) == events["impression"]


def test_splits_follow_time_and_cover_every_impression(tiny_run):
    prepared = Path(tiny_run["cfg"].paths.prepared_dir)
    report = tiny_run["prepare"]
    train_end, validation_end = report["split"]["cutoffs_ms"]
    ts = {s: pq.read_table(prepared / s, columns=["ts"])["ts"].to_numpy() for s in ("train", "validation", "test")}
    assert ts["train"].max() < train_end <= ts["validation"].min()
    assert ts["validation"].max() < validation_end <= ts["test"].min()
    assert sum(len(v) for v in ts.values()) == tiny_run["generate"]["events"]["impression"]


def test_training_rows_are_written_shuffled_not_grouped_by_user(tiny_run):
    # Preparation partitions the log by user; a trainer's local shuffle buffer could not undo that.
    keys = pq.read_table(Path(tiny_run["cfg"].paths.prepared_dir) / "train", columns=["user_key"])["user_key"].to_numpy()
    same_user_as_previous = float(np.mean(keys[1:] == keys[:-1]))
    users = len(np.unique(keys))
    assert same_user_as_previous < 5.0 / users, (same_user_as_previous, users)  # grouped rows would give ~1 - users / rows


def read_log(path, columns) -> pd.DataFrame:
    """The raw log with ``ts`` as int64 epoch milliseconds."""
    table = pq.read_table(path, columns=columns)
    return table.set_column(table.schema.get_field_index("ts"), "ts", table["ts"].cast(pa.int64())).to_pandas()


def decode(vocab_values, index):
    return vocab_values[index - 2] if index >= 2 else None


@pytest.mark.parametrize("split", ["validation", "test"])
def test_no_history_event_at_or_after_its_example(tiny_run, split):
    """Recompute every validation and test example's history from the raw log and compare."""
    cfg = tiny_run["cfg"]
    prepared = Path(cfg.paths.prepared_dir)
    fm = FeatureMap.load(prepared / "feature_map.json")
    users = fm.vocabularies["user_id"].values
    log = read_log(Path(cfg.paths.raw_dir) / "events", ["event_id", "user_id", "ad_id", "event", "ts"])
    log = log[~log.event_id.str.startswith("bad-")].drop_duplicates("event_id")  # quarantined rows are not history
    clicks = log[log.event == "click"].rename(columns={"ts": "t"})
    by_user = {u: g.sort_values("t") for u, g in clicks.groupby("user_id")}
    test = pq.read_table(prepared / split, columns=["user_id", "ts", "history", "history_len"]).to_pandas()
    length = fm.spec("history").max_len
    checked = 0
    for row in test.itertuples():
        user = decode(users, row.user_id)
        if user is None:
            continue
        earlier = by_user.get(user, pd.DataFrame({"t": [], "ad_id": []}))
        earlier = earlier[earlier.t < row.ts].ad_id.tolist()[::-1][:length]
        expected = fm.vocabularies["ad_id"].encode(pa.array(earlier, pa.string())).tolist()
        stored = list(np.asarray(row.history)[: row.history_len])
        assert stored == expected
        checked += 1
    assert checked > 100 if split == "test" else checked > 50


def test_vocabularies_use_min_count_and_oov(tiny_run):
    cfg = tiny_run["cfg"]
    fm = FeatureMap.load(Path(cfg.paths.prepared_dir) / "feature_map.json")
    log = read_log(Path(cfg.paths.raw_dir) / "events", ["event_id", "user_id", "event", "ts"])
    log = log[~log.event_id.str.startswith("bad-")].drop_duplicates("event_id")  # as preparation keeps them
    train_end = tiny_run["prepare"]["split"]["cutoffs_ms"][0]
    train = log[(log.event == "impression") & (log.ts < train_end)]
    counts = train.user_id.value_counts()
    assert set(fm.vocabularies["user_id"].values) == set(counts[counts >= cfg.data.prepare.min_count].index)
    assert counts.min() < cfg.data.prepare.min_count  # some users really are left out
    # A value never seen in training is OOV, never an error.
    encoded = fm.encode(pa.table({"user_id": ["nobody"], "slot": ["nowhere"]}))
    assert encoded["user_id"].tolist() == [OOV] and encoded["slot"].tolist() == [OOV]


def test_training_reports_each_epoch_with_a_checkpoint(tiny_run):
    trained = tiny_run["train"]
    assert [e["epoch"] for e in trained["epochs"]] == [1, 2, 3]
    assert all(e["val_auc"] > 0.5 for e in trained["epochs"])
    checkpoints = [p for p in Path(trained["run_path"]).glob("checkpoint_*") if p.is_dir()]
    assert len(checkpoints) == tiny_run["cfg"].trainer.keep_checkpoints
    load_checkpoint(trained["best_checkpoint"])


def test_model_beats_popularity_and_approaches_the_oracle(tiny_run):
    metrics = tiny_run["evaluate"]
    assert metrics["oracle_auc"] > 0.75
    assert metrics["auc"] > metrics["popularity_auc"] + 0.05
    assert metrics["auc"] < metrics["oracle_auc"] + 0.01  # the ceiling holds
    assert 0.0 < metrics["logloss"] < metrics["oracle_logloss"] + 0.2
    for key in ("accuracy", "precision", "recall", "recall@10", "ndcg@10", "popularity_recall@10"):
        assert 0.0 <= metrics[key] <= 1.0
    written = json.loads((Path(tiny_run["cfg"].paths.eval_dir) / "metrics.json").read_text())
    assert written["auc"] == metrics["auc"]


def test_evaluation_calibrates_on_validation_and_plots(tiny_run):
    metrics, eval_dir = tiny_run["evaluate"], Path(tiny_run["cfg"].paths.eval_dir)
    # Calibrated on validation, the test pCTR matches the observed rate closely and is no worse than raw.
    assert abs(metrics["mean_pctr"] - metrics["observed_ctr"]) < 0.2 * metrics["observed_ctr"]
    assert metrics["logloss"] <= metrics["uncalibrated_logloss"] + 0.002
    assert 0.0 <= metrics["ece"] < 0.03
    assert metrics["gauc"] > 0.5 and metrics["hitrate@10"] == metrics["recall@10"]
    # min_count=20 leaves some ads out of the vocabulary: their content features still rank them.
    test_ads = pq.read_table(Path(tiny_run["cfg"].paths.prepared_dir) / "test", columns=["ad_id"])["ad_id"].to_numpy()
    assert metrics["cold_ad_examples"] == int((test_ads == OOV).sum()) > 50
    assert metrics["cold_ad_auc"] > 0.5
    assert Platt.load(eval_dir / "calibration.json") == Platt(**{k: metrics["calibration"][k] for k in ("a", "b")})
    for name in metrics["plots"]:
        assert (eval_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_is_self_describing_and_refuses_tampering(tiny_run, tmp_path):
    model_dir = Path(tiny_run["export"]["model_dir"])
    manifest = verify_manifest(model_dir)
    assert {
        "user_encoder.safetensors",
        "ad_encoder.safetensors",
        "ad_embeddings.safetensors",
        "feature_map.json",
        "metrics.json",
        "ads.parquet",
        "users.parquet",
    } <= set(manifest["files"])
    assert manifest["config"]["trainer"]["num_workers"] == 2
    assert manifest["lineage"]["checkpoint"] == tiny_run["train"]["best_checkpoint"]
    assert (model_dir.parent / "LATEST").read_text().strip() == model_dir.name

    copy = tmp_path / "tampered"
    shutil.copytree(model_dir, copy)
    data = bytearray((copy / "user_encoder.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "user_encoder.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupt or tampered"):
        verify_manifest(copy)

    (copy / "user_encoder.safetensors").write_bytes((model_dir / "user_encoder.safetensors").read_bytes())
    (copy / "extra.safetensors").write_bytes(b"weights nobody checksummed")
    with pytest.raises(ArtifactError, match="does not cover"):
        verify_manifest(copy)


def test_checkpoint_with_a_changed_weight_file_is_refused(tiny_run, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_run["train"]["best_checkpoint"], copy)
    (copy / "model.safetensors").write_bytes((copy / "model.safetensors").read_bytes()[:-8])
    with pytest.raises(ArtifactError):
        load_checkpoint(copy)
