import numpy as np
import pyarrow.parquet as pq

from adrec.data import schema
from adrec.data.synthetic import GeneratorConfig, write_logs
from adrec.eval.metrics import auc


def test_generator_is_deterministic_sharded_and_plants_a_learnable_truth(tmp_path):
    cfg = GeneratorConfig(num_impressions=40_000, rows_per_shard=15_000, seed=3)
    summary = write_logs(cfg, tmp_path / "a")
    write_logs(cfg, tmp_path / "b")
    assert summary["shards"] == 3 and summary["events"]["impression"] == 40_000
    log = pq.read_table(tmp_path / "a" / "events")
    assert log.schema.equals(schema.EVENTS, check_metadata=False)
    assert log.equals(pq.read_table(tmp_path / "b" / "events"))
    assert len(set(log["event_id"].to_pylist())) == log.num_rows

    impressions = log.filter(np.array(log["event"].to_pylist()) == "impression")
    clicked = set(log.filter(np.array(log["event"].to_pylist()) == "click")["impression_id"].to_pylist())
    labels = np.isin(impressions["event_id"].to_numpy(zero_copy_only=False), list(clicked))
    truth = impressions["true_pctr"].to_numpy()
    assert abs(labels.mean() - truth.mean()) < 0.01  # clicks follow the stored probability
    assert auc(labels, truth) > 0.75  # the oracle's ceiling is high: there is signal to learn
    # Every click and conversion follows its impression in time.
    ts = dict(zip(log["event_id"].to_pylist(), log["ts"].cast("int64").to_pylist()))
    follow = log.filter(np.array(log["event"].to_pylist()) != "impression")
    assert all(ts[e] > ts[i] for e, i in zip(follow["event_id"].to_pylist(), follow["impression_id"].to_pylist()))
