"""Retraining on new data: vocabularies grow without moving old ids, and a warm start keeps old rows."""

from pathlib import Path

import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from adrec.features import FeatureMap, Vocabulary
from adrec.models.towers import EmbeddingMLPTower
from adrec.registry import ArtifactError, load_grown
from tests.conftest import compose_config


def test_a_grown_vocabulary_keeps_old_values_at_their_ids():
    old = Vocabulary.fit({"u1": 5, "u2": 9, "u3": 1}, min_count=2)
    grown = old.extend({"u1": 1, "u4": 7, "u5": 3, "u6": 1}, min_count=2)
    assert grown.values[: len(old.values)] == old.values == ["u2", "u1"]
    assert grown.values[2:] == ["u4", "u5"] and grown.counts == [0, 1, 7, 3]
    ids = pa.array(["u1", "u2", "u4", "u6"])
    assert grown.encode(ids)[:2].tolist() == old.encode(ids)[:2].tolist()
    assert grown.encode(ids)[2] == 4 and old.encode(ids)[2] == grown.encode(ids)[3] == 1  # new to old: OOV; rare: OOV


def tower(users: int) -> EmbeddingMLPTower:
    return EmbeddingMLPTower({"user_id": users}, {}, embedding_dim=4, hidden_dims=[8], output_dim=4)


def test_a_warm_start_copies_old_rows_into_grown_tables():
    torch.manual_seed(0)
    old, new = tower(10), tower(15)
    fresh = new.embeddings["user_id"].weight.detach().clone()
    assert load_grown(new, old.state_dict()) == ["embeddings.user_id.weight"]
    table = new.embeddings["user_id"].weight.detach()
    assert torch.equal(table[:10], old.embeddings["user_id"].weight) and torch.equal(table[10:], fresh[10:])
    assert torch.equal(new.mlp[0].weight, old.mlp[0].weight)
    with pytest.raises(ArtifactError, match="only id tables may grow"):
        load_grown(tower(5), old.state_dict())


@pytest.mark.parametrize(
    ("challenger", "champion", "margin", "promote"),
    [(0.80, 0.79, 0.0, True), (0.80, 0.79, 0.02, False), (0.78, 0.79, 0.0, False), (0.80, 0.80, 0.0, False), (None, 0.79, -1.0, False)],
)
def test_the_gate_promotes_only_past_the_margin(challenger, champion, margin, promote):
    from adrec.feedback.retrain import decide

    decision = decide({"auc": challenger}, {"auc": champion}, "auc", margin)
    assert decision["promote"] is promote
    assert decision["gain"] == (None if challenger is None else pytest.approx(challenger - champion))


@pytest.mark.slow
def test_retraining_on_a_log_with_new_users_grows_their_rows_and_keeps_the_old(tiny_run, tmp_path):
    champion = Path(tiny_run["train"]["best_checkpoint"])
    cfg = compose_config(
        tmp_path,
        "data.generator.num_users=650",  # u500..u649 are new
        "data.generator.seed=11",
        f"data.prepare.base_feature_map={champion / 'feature_map.json'}",
        f"trainer.resume_from={champion}",
        "trainer.epochs=1",
        "trainer.lr=0",  # nothing moves: what the warm start loaded is what the checkpoint holds
        "trainer.num_workers=1",
    )
    from adrec.data import prepare, synthetic
    from adrec.train import driver

    synthetic.run(cfg)
    prepare.run(cfg)
    old_map, new_map = FeatureMap.load(champion / "feature_map.json"), FeatureMap.load(Path(cfg.paths.prepared_dir) / "feature_map.json")
    old_users, new_users = old_map.vocabularies["user_id"].values, new_map.vocabularies["user_id"].values
    assert new_users[: len(old_users)] == old_users and len(new_users) > len(old_users)
    retrained = Path(driver.run(cfg)["best_checkpoint"])
    before, after = load_file(champion / "model.safetensors"), load_file(retrained / "model.safetensors")
    name = "user_tower.embeddings.user_id.weight"
    assert after[name].shape[0] == new_map.cardinality("user_id") > before[name].shape[0]
    assert torch.equal(after[name][: before[name].shape[0]], before[name])


@pytest.mark.slow
def test_retrain_compacts_feedback_challenges_the_serving_version_and_promotes_it(tiny_run, tmp_path):
    import shutil

    from adrec.feedback import retrain
    from adrec.feedback.log import SegmentLog
    from adrec.feedback.tokens import Impression
    from adrec.recommend import user_key
    from adrec.registry import LATEST

    shutil.copytree(tiny_run["cfg"].paths.raw_dir, tmp_path / "raw")  # compaction appends to the log
    shutil.copytree(tiny_run["cfg"].paths.models_dir, tmp_path / "models")  # promotion moves LATEST
    served = Impression("req-1", user_key("u3"), "a1", tiny_run["export"]["version"], 1_769_500_000.0, "top", "mobile")  # within the log's days
    record = {**vars(served), "served_ts": served.ts, "impression_id": served.impression_id, "user_id": "u3"}
    SegmentLog(tmp_path / "feedback", "test").append(
        [{**record, "event_id": "fb-imp", "event": "impression", "ts": served.ts},
         {**record, "event_id": "fb-click", "event": "click", "ts": served.ts + 30}]
    )
    cfg = compose_config(tmp_path, "retrain.epochs=1", "retrain.margin=-1.0")  # any challenger wins: the promotion path
    report = retrain.run(cfg)

    assert report["champion"] == tiny_run["export"]["version"]
    assert (report["compaction"]["impressions"], report["compaction"]["clicks"]) == (1, 1)
    for model in ("towers", "ranker"):  # the champion ships a ranker, so both are challenged
        assert {"challenger", "champion"} == set(report[model]) and report[model]["champion"]["auc"] > 0.5
    decision = report["decision"]
    assert decision["gain"] == pytest.approx(report["ranker"]["challenger"]["auc"] - report["ranker"]["champion"]["auc"])
    assert decision["promote"] and report["exported"]["ranker"]
    assert (tmp_path / "models" / LATEST).read_text().strip() == report["exported"]["version"] != report["champion"]
    assert (Path(report["work_dir"]) / "report.json").is_file()
