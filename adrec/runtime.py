"""Ray start-up and path handling shared by every job."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ray
import ray.data


def init_ray(address: str | None = None, num_cpus: int | None = None, object_store_mb: int | None = None) -> None:
    """Connect to Ray: an embedded local instance by default, a cluster when ``address`` is set.

    Under ``ray job submit`` the job's environment names the cluster, so ``address=None``
    joins it instead of starting a new one; ``address="auto"`` joins a local ``ray start`` cluster. ``object_store_mb`` caps an embedded instance's
    object store (Ray spills to local disk beyond it); a cluster keeps its own setting.
    """
    if ray.is_initialized():
        return
    # Ray Train 2.x patches print() on workers, so each line would show twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    embedded = address is None and "RAY_ADDRESS" not in os.environ
    if embedded:
        # Serve's latency set-up (gRPC between replicas, user code on each replica's event loop,
        # direct ingress): a cluster sets it in its own environment; see README "Serving".
        os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    store_bytes = int(object_store_mb) * 2**20 if object_store_mb and embedded else None
    # "local" always starts the embedded instance: without it, ray.init() would join whatever
    # cluster a past `ray start` on this machine recorded, even a dead one. ray.address=auto joins it.
    ray.init(address="local" if embedded else address, num_cpus=num_cpus, object_store_memory=store_bytes)
    # Our pipelines are many and short: one progress line per stage beats Ray Data's per-pipeline logs.
    ray.data.DataContext.get_current().enable_progress_bars = False


def init_ray_from(cfg) -> None:
    """The job adapters' start: ``init_ray`` with the ``ray`` group of their config (all it reads)."""
    init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.get("object_store_mb"))


def resolve(path: str | os.PathLike) -> str:
    """Absolute local path, or the URI unchanged (s3://, gs://, ...).

    Train workers chdir into their run folder, so relative paths must be resolved on the driver.
    """
    text = str(path)
    return text if "://" in text else str(Path(text).expanduser().resolve())


def write_json(path: str | os.PathLike, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())


def require(path: str | os.PathLike, made_by: str) -> Path:
    """``path`` if it exists, else a FileNotFoundError saying which job makes it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run {made_by} with the same run_dir first")
    return path


def print_result(result: dict) -> None:
    """A job's result on stdout as JSON."""
    print(json.dumps(result, indent=2, sort_keys=True, default=str), flush=True)


def wait_until_ok(url: str, timeout_s: float, interval_s: float = 1.0) -> None:
    """Poll ``url`` until it answers 200 (a Serve app starting, or coming back after a replica died)."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(interval_s)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s} s")
