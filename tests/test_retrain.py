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


def test_a_lower_is_better_metric_gains_by_dropping():
    from adrec.feedback.retrain import decide

    assert decide({"logloss": 0.30}, {"logloss": 0.32}, "logloss", 0.0) == {
        "metric": "logloss",
        "gain": pytest.approx(0.02),
        "margin": 0.0,
        "promote": True,
    }
    assert not decide({"logloss": 0.33}, {"logloss": 0.32}, "logloss", 0.0)["promote"]


def test_the_fresh_split_holds_out_the_latest_new_rows_and_replays_a_share_of_the_old():
    import numpy as np

    from adrec.data.history import SplitRule, assign_split
    from adrec.feedback.retrain import fresh_split

    new = np.arange(1_000, 2_000, dtype=np.int64)  # ms
    rule = SplitRule(**fresh_split(new, after_ms=999, train=0.7, validation=0.1, replay=0.25))
    old = np.arange(0, 4_000, dtype=np.int64) % 1_000  # 4000 old rows, all before the new ones
    rows = pa.table({"event_id": [f"e{i}" for i in range(5_000)], "ts": np.concatenate([old, new])})
    split = assign_split(rows, None, rule, seed=3)
    assert list(np.unique(split[4_000:], return_counts=True)[1]) == [200, 700, 100]  # test, train, validation
    assert (split[4_000:4_700] == "train").all() and (split[4_800:] == "test").all()  # the holdout is the latest
    assert set(split[:4_000]) == {"train", "unused"} and (split[:4_000] == "train").mean() == pytest.approx(0.25, abs=0.03)


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


def served_feedback(version: str, after_s: float, views: int, seed: int = 0) -> list[dict]:
    """Segment records of ``views`` served impressions (3 ads each, a click on about a third)
    from ``after_s`` on, one second apart: what /feedback would have written."""
    import random

    from adrec.feedback.tokens import Impression
    from adrec.recommend import user_key

    rng, records = random.Random(seed), []
    for v in range(views):
        user = f"u{rng.randrange(50)}"
        for ad in rng.sample(range(40), 3):
            served = Impression(f"req-{v}", user_key(user), f"a{ad}", version, after_s + v, {"slot": "top", "device": "mobile"})
            record = {**vars(served), "served_ts": served.ts, "impression_id": served.impression_id, "user_id": user}
            records.append({**record, "event_id": f"{served.impression_id}-imp", "event": "impression", "ts": served.ts})
            if rng.random() < 0.3:
                records.append({**record, "event_id": f"{served.impression_id}-click", "event": "click", "ts": served.ts + 5})
    return records


@pytest.mark.slow
def test_retrain_trains_on_what_is_new_to_the_champion_holds_out_the_latest_and_promotes(tiny_run, tmp_path):
    import shutil

    from adrec.feedback import retrain
    from adrec.feedback.log import SegmentLog
    from adrec.registry import LATEST

    shutil.copytree(tiny_run["cfg"].paths.raw_dir, tmp_path / "raw")  # compaction appends to the log
    shutil.copytree(tiny_run["cfg"].paths.models_dir, tmp_path / "models")  # promotion moves LATEST
    log_end_s = tiny_run["prepare"]["ts_range_ms"][1] / 1000
    SegmentLog(tmp_path / "feedback", "test").append(served_feedback(tiny_run["export"]["version"], log_end_s + 86_400, views=150))
    # Any challenger wins (the promotion path), and it ships its ranker whatever the tiny validation says.
    cfg = compose_config(tmp_path, "retrain.epochs=1", "retrain.margin=-1e9", "retrain.replay=0.05", "retrain.ranker_ship=always")
    report = retrain.run(cfg)

    assert report["champion"] == tiny_run["export"]["version"]
    assert report["new_impressions"] == report["compaction"]["impressions"] == 450
    splits = report["prepare"]["splits"]
    # The new impressions split 70/10/20 by time; the old log only trains, and only its replay share.
    assert (splits["validation"]["examples"], splits["test"]["examples"]) == (pytest.approx(45, abs=3), pytest.approx(90, abs=3))
    old_train = splits["train"]["examples"] - 315
    assert old_train == pytest.approx(0.05 * (old_train + splits["unused"]["examples"]), rel=0.2)
    for model in ("towers", "ranker"):  # the champion ships a ranker, so both are challenged on the same holdout
        assert {"challenger", "champion"} == set(report[model])
        assert report[model]["challenger"]["test_examples"] == report[model]["champion"]["test_examples"] == splits["test"]["examples"]
    decision = report["decision"]
    assert decision["metric"] == "logloss" and decision["challenger_serves"] == decision["champion_serves"] == "ranker"
    assert decision["gain"] == pytest.approx(report["ranker"]["champion"]["logloss"] - report["ranker"]["challenger"]["logloss"])
    assert decision["promote"] and report["exported"]["ranker"]
    assert (tmp_path / "models" / LATEST).read_text().strip() == report["exported"]["version"] != report["champion"]
    assert (Path(report["work_dir"]) / "report.json").is_file()

    again = retrain.run(compose_config(tmp_path))  # the promoted version has learned all of it: nothing is new
    assert again["new_impressions"] == 0 and not again["decision"]["promote"] and "min_new_impressions" in again["decision"]["reason"]
