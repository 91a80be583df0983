"""Preparation at scale: synthetic logs of 1M and 10M events through ``adrec.data.prepare``.

    python benchmarks/prepare.py                      # 1M and 10M events (what the README quotes)
    python benchmarks/prepare.py --events 100000000   # the documented 100M run; needs ~60 GB of disk

Prints JSON: {"runs": [{events, rows_per_s, wall_s, driver_peak_mb, workers_peak_mb, ...}]}.
Memory is sampled every 0.5 s: the driver's RSS; for Ray's worker processes their anonymous
(heap) memory from /proc/PID/smaps_rollup, the largest of any one worker (``workers_peak_mb``)
and of all together; and the object store's use of /dev/shm. RSS and USS would also count the
object-store pages a worker has read or written (the store maps them but never touches them),
so they grow with whatever the object store holds; the worker RSS peak is reported beside.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import psutil  # noqa: E402 (pip install -e ".[bench]")
import ray  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from adrec.data import prepare, synthetic  # noqa: E402
from adrec.runtime import init_ray  # noqa: E402

CONF = str(Path(__file__).resolve().parents[1] / "conf")
EVENTS_PER_IMPRESSION = 1.11  # clicks and conversions on top of impressions, as the generator draws them


def anonymous_bytes(pid: int) -> int:
    """A process's anonymous (heap) memory: its own data, not files or shared memory it maps."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """Samples the RSS of this process and of every Ray worker process in a background thread."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.driver = self.worker = self.workers_total = self.worker_rss = self.object_store = 0
        self.worker_name = ""
        self._last_task: dict[int, str] = {}  # pid -> the last task it ran (idle pooled workers keep their memory)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            self.driver = max(self.driver, me.memory_info().rss)
            unique, resident, names = [], [], []
            for proc in psutil.process_iter(["name", "cmdline"]):
                try:
                    if (proc.info["cmdline"] or [""])[0].startswith("ray::"):
                        unique.append(anonymous_bytes(proc.pid))
                        resident.append(proc.memory_info().rss)
                        name = proc.info["cmdline"][0]
                        if name != "ray::IDLE":
                            self._last_task[proc.pid] = name
                        names.append(self._last_task.get(proc.pid, name))
                except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError, ProcessLookupError):
                    continue
            self.object_store = max(self.object_store, shutil.disk_usage("/dev/shm").used)
            if unique:
                if max(unique) > self.worker:
                    self.worker_name = names[int(np.argmax(unique))]
                self.worker = max(self.worker, max(unique))
                self.workers_total = max(self.workers_total, sum(unique))
                self.worker_rss = max(self.worker_rss, max(resident))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_size(events: int, out_dir: Path) -> dict:
    impressions = int(events / EVENTS_PER_IMPRESSION)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[f"run_dir={out_dir / str(events)}", f"data.generator.num_impressions={impressions}", "data.generator.rows_per_shard=1000000"],
        )
    synthetic.run(cfg)
    started = time.perf_counter()
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
