"""One real local Ray session and one tiny end-to-end run, shared by the whole test session."""

import os

# Set before Ray is imported anywhere: fast Train reports (the controller polls every 2 s by default),
# no token auth on the throwaway local cluster, quiet progress output.
for key, value in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",  # as adrec.runtime.init_ray sets for embedded Ray
}.items():
    os.environ.setdefault(key, value)

import socket  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.compute  # noqa: E402, F401
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import ray  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

CONF = str(Path(__file__).resolve().parents[1] / "conf")

TINY = [
    "data.generator.num_impressions=20000",
    "data.generator.rows_per_shard=8000",
    "data.generator.num_users=500",
    "data.prepare.num_partitions=2",
    "data.prepare.min_count=20",  # high enough that some users and ads really are OOV
    "trainer.epochs=3",
    "trainer.batch_size=512",
    # Two workers exercise DDP and the cross-worker validation gather.
    "trainer.num_workers=2",
    "trainer.cpus_per_worker=0.5",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compose_config(run_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=[f"run_dir={run_dir}", *TINY, *overrides])


@pytest.fixture(scope="session")
def ray_session():
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # never a cluster some `ray start` left behind
    yield
    ray.shutdown()


# One planted bad row per reason: (changes to a copy of a real impression row, expected reason).
BAD_EVENTS = [
    ({"event_id": "bad-1", "user_id": None}, "missing_user_id"),
    ({"event_id": "bad-2", "event": "purchase"}, "unknown_event"),
    ({"event_id": "bad-3", "event": "click", "impression_id": None}, "missing_impression_id"),
    ({"event_id": "bad-4", "ts": datetime(1990, 1, 1, tzinfo=timezone.utc)}, "ts_out_of_range"),
    ({"event_id": "bad-5", "slot": "x" * 2000}, "oversized_slot"),
    ({}, "duplicate_event_id"),  # an exact replay of a logged impression
]


def add_bad_events(events_dir: Path) -> None:
    """Append a shard of rows that break the schema, to check they are quarantined, not lost."""
    good = pq.read_table(next(events_dir.glob("*.parquet")))
    template = good.filter(pa.compute.equal(good["event"], "impression")).slice(0, 1).to_pylist()[0]
    rows = [{**template, **changes} for changes, _ in BAD_EVENTS]
    nullable = pa.schema([field.with_nullable(True) for field in good.schema])
    pq.write_table(pa.Table.from_pylist(rows, schema=nullable), events_dir / "part-bad.parquet")


@pytest.fixture(scope="session")
def tiny_run(ray_session, tmp_path_factory):
    """generate -> (bad rows added) -> prepare -> train -> evaluate -> (the DCN ranker) -> export, as the main job runs them."""
    from adrec import pipeline
    from adrec.data import synthetic

    cfg = compose_config(tmp_path_factory.mktemp("run"))
    results = {"cfg": cfg, "generate": synthetic.run(cfg)}
    add_bad_events(Path(cfg.paths.raw_dir) / "events")
    results.update(pipeline.from_logs(cfg))
    return results
