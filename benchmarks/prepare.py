"""Preparation at scale: synthetic logs of 1M and 10M events through ``adrec.data.prepare``.

    python benchmarks/prepare.py                      # 1M and 10M events (what the README quotes)
    python benchmarks/prepare.py --events 100000000   # the documented 100M run; needs ~60 GB of disk

Prints JSON: {"runs": [{events, rows_per_s, wall_s, driver_peak_mb, workers_peak_mb, ...}]}.
Memory is sampled as benchmarks/peak.py says (``workers_peak_mb``: the largest heap of any
one Ray worker). Disk: ``spilled_mb`` is what Ray spilled from the object store during the run, and
``disk_peak_mb`` the most the run added to the disk at once (spill, staged Parquet, output).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import psutil  # noqa: E402 (pip install -e ".[bench]")
from hydra import compose, initialize_config_dir  # noqa: E402
from peak import PeakMemory, spilled_mib  # noqa: E402 (benchmarks/peak.py, beside this script)

from adrec.data import prepare, synthetic  # noqa: E402
from adrec.runtime import init_ray  # noqa: E402

CONF = str(Path(__file__).resolve().parents[1] / "conf")
EVENTS_PER_IMPRESSION = 1.11  # clicks and conversions on top of impressions, as the generator draws them


def run_size(events: int, out_dir: Path) -> dict:
    impressions = int(events / EVENTS_PER_IMPRESSION)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[f"run_dir={out_dir / str(events)}", f"data.generator.num_impressions={impressions}", "data.generator.rows_per_shard=1000000"],
        )
    synthetic.run(cfg)
    started, spilled_before = time.perf_counter(), spilled_mib()
    with PeakMemory() as memory:
        report = prepare.run(cfg)
    wall = time.perf_counter() - started
    mb = 1 / 2**20
    return {
        "events": report["rows_read"],
        "examples": sum(s["examples"] for s in report["splits"].values()),
        "wall_s": round(wall, 1),
        "rows_per_s": round(report["rows_read"] / wall),
        "driver_peak_mb": round(memory.driver * mb),
        "workers_peak_mb": round(memory.worker * mb),
        "workers_total_peak_mb": round(memory.workers_total * mb),
        "workers_peak_rss_mb": round(memory.worker_rss * mb),
        "object_store_peak_mb": round(memory.object_store * mb),
        "spilled_mb": spilled_mib() - spilled_before,
        "disk_peak_mb": round(memory.disk * mb),
        "workers_peak_process": memory.worker_name,
        "partitions": report["partitions"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/adrec-bench-prepare"))
    parser.add_argument("--object-store-mb", type=int, default=1024, help="cap on the object store; Ray spills to disk beyond it")
    args = parser.parse_args()
    init_ray(object_store_mb=args.object_store_mb)
    runs = [run_size(n, args.out_dir) for n in args.events]
    print(json.dumps({"runs": runs, "cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30)}, indent=2))


if __name__ == "__main__":
    main()
