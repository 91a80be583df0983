"""Peak memory of this process and of Ray's worker processes, sampled in a background thread.

Memory is sampled every 0.5 s: the driver's RSS; for Ray's worker processes their anonymous
(heap) memory from /proc/PID/smaps_rollup, the largest of any one worker (``worker``) and of all
together; and the object store's use of /dev/shm. RSS and USS would also count the
object-store pages a worker has read or written (the store maps them but never touches them),
so they grow with whatever the object store holds; the worker RSS peak is kept beside.
"""

from __future__ import annotations

import re
import shutil
import threading

import numpy as np
import psutil  # pip install -e ".[bench]"


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
        self.driver = self.worker = self.workers_total = self.worker_rss = self.object_store = self.disk = 0
        self._disk_start = shutil.disk_usage("/tmp").used
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
            self.disk = max(self.disk, shutil.disk_usage("/tmp").used - self._disk_start)
            if unique:
                if max(unique) > self.worker:
                    self.worker_name = names[int(np.argmax(unique))]
                self.worker = max(self.worker, max(unique))
                self.workers_total = max(self.workers_total, sum(unique))
                self.worker_rss = max(self.worker_rss, max(resident))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def spilled_mib() -> int:
    """MiB spilled from the object store since Ray started (the raylet's running total)."""
    import ray
    from ray._private.internal_api import memory_summary

    # This process's instance by address: other Ray instances may run on the machine.
    summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    found = re.search(r"Spilled (\d+) MiB", summary)
    return int(found.group(1)) if found else 0
