"""Training throughput: a bare PyTorch loop against Ray Train streaming from Parquet.

    python benchmarks/train_throughput.py                 # what the README quotes
    python benchmarks/train_throughput.py --quick         # a smoke run
    python benchmarks/train_throughput.py --huge-table    # a 10M-row id table: dense vs sparse steps

The same two-tower model (conf/model/two_tower.yaml), loss, optimizer and batch size in
three set-ups, each for ``--epochs`` epochs over the prepared synthetic training split:

    bare   one process, the whole split as in-memory tensors, a permutation per epoch:
           the limit on this machine
    ray_1w Ray Train, 1 worker, streaming the Parquet shards through Ray Data
    ray_2w Ray Train, 2 workers (DDP)

Samples/s are steady state: training samples over training time of epochs 2.. (each epoch's
time includes its data pipeline's start-up). ``*_startup_s`` is what comes before: building
the model and data (bare), or ``fit()`` up to the first epoch (Ray: actors, process group,
Ray Data). Prints JSON with ``bare_samples_per_s``, ``ray_1w_samples_per_s``,
``ray_2w_samples_per_s``, ``ratio_1w`` (ray_1w / bare), per-epoch figures and peak memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")  # reports return in ~0.1 s, not ~2 s

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from peak import PeakMemory, spilled_mib  # noqa: E402 (benchmarks/peak.py, beside this script)

from adrec.data import prepare, synthetic  # noqa: E402
from adrec.features import FeatureMap  # noqa: E402
from adrec.inference import to_features  # noqa: E402
from adrec.models import build_model  # noqa: E402
from adrec.runtime import init_ray  # noqa: E402
from adrec.train import driver  # noqa: E402
from adrec.train.loop import Objective, train_step  # noqa: E402
from adrec.train.losses import LossConfig  # noqa: E402
from adrec.train.optim import build_optimizer  # noqa: E402

CONF = str(Path(__file__).resolve().parents[1] / "conf")
MB = 1 / 2**20


def config(out_dir: Path, impressions: int, epochs: int, *overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(
            "config",
            overrides=[
                f"run_dir={out_dir}",
                f"data.generator.num_impressions={impressions}",
                f"trainer.epochs={epochs}",
                "trainer.log_every_steps=0",
                "trainer.tensorboard_dir=null",
                "trainer.keep_checkpoints=1",
                *overrides,
            ],
        )


def prepared(cfg) -> Path:
    """The prepared synthetic log, made once per size and reused."""
    path = Path(cfg.paths.prepared_dir)
    if not (path / "report.json").exists():
        synthetic.run(cfg)
        prepare.run(cfg)
    return path


def bare_loop(cfg) -> dict:
    """The same model, loss and optimizer over in-memory tensors: no Ray, no data pipeline."""
    started = time.perf_counter()
    torch.manual_seed(int(cfg.seed))
    path = prepared(cfg)
    feature_map = FeatureMap.load(path / "feature_map.json")
    columns = driver.model_columns(feature_map)
    data = to_features(pq.read_table(path / "train", columns=columns), columns)
    model, loss_options = build_model(OmegaConf.to_container(cfg.model, resolve=True), feature_map)
    optimizer = build_optimizer(model, float(cfg.trainer.lr), float(cfg.trainer.weight_decay))
    objective = Objective(LossConfig.from_dict(loss_options), feature_map, None, torch.device("cpu"))
    rows, batch_size = len(data["label"]), int(cfg.trainer.batch_size)
    startup = time.perf_counter() - started
    epochs = []
    for _ in range(int(cfg.trainer.epochs)):
        began = time.perf_counter()
        order = torch.randperm(rows)
        for start in range(0, rows, batch_size):
            index = order[start : start + batch_size]
            train_step(model, {k: v[index] for k, v in data.items()}, optimizer, objective, contextlib.nullcontext)
        epochs.append({"samples": rows, "seconds": time.perf_counter() - began})
    return {"startup_s": startup, "epochs": epochs, "torch_threads": torch.get_num_threads()}


def ray_loop(cfg, workers: int, threads: int | None) -> dict:
    """Ray Train with ``workers`` workers; per-epoch figures come from the loop's own metrics."""
    cpus = 1.0 if workers == 1 else 0.5  # two cores: leave Ray Data a share for reading and batching
    run_cfg = cfg.copy()
    OmegaConf.update(run_cfg, "trainer.torch_threads", threads)
    OmegaConf.update(run_cfg, "trainer.num_workers", workers)
    OmegaConf.update(run_cfg, "trainer.cpus_per_worker", cpus)
    OmegaConf.update(run_cfg, "trainer.lr_scaling", "none")  # the same optimisation problem as bare
    OmegaConf.update(run_cfg, "paths.train_dir", str(Path(cfg.paths.train_dir) / f"{workers}w"))
    spilled = spilled_mib()
    started = time.perf_counter()
    with PeakMemory() as memory:
        result = driver.run(run_cfg)
    wall = time.perf_counter() - started
    epochs = [
        {
            "samples": e["samples_per_s"] * e["train_seconds"],
            "seconds": e["train_seconds"],
            "first_batch_s": e["first_batch_seconds"],
            "validate_s": e["validate_seconds"],
        }
        for e in result["epochs"]
    ]
    in_epochs = sum(e["seconds"] + e["validate_s"] for e in epochs)
    return {
        "startup_s": wall - in_epochs,  # fit() overhead: actors, process group, reports, checkpoints
        "epochs": epochs,
        "workers_peak_mb": round(memory.worker * MB),
        "driver_peak_mb": round(memory.driver * MB),
        "object_store_peak_mb": round(memory.object_store * MB),
        "spilled_mb": spilled_mib() - spilled,
    }


def huge_table(rows: int, batch_size: int, steps: int = 20) -> dict:
    """ms per optimizer step of a tower with a ``rows``-row id table, dense against sparse gradients."""
    from adrec.models.towers import EmbeddingMLPTower

    out = {"huge_table_rows": rows, "batch_size": batch_size}
    for kind in ("dense", "sparse"):
        torch.manual_seed(0)
        tower = EmbeddingMLPTower({"ad_id": rows}, {}, 32, [64], 32, sparse=kind == "sparse")
        optimizer = build_optimizer(tower, lr=1e-3, weight_decay=0.0)
        times = []
        for step in range(steps + 2):
            batch = {"ad_id": torch.randint(rows, (batch_size,))}
            began = time.perf_counter()
            tower(batch).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            if step >= 2:  # the first steps allocate optimizer state
                times.append(time.perf_counter() - began)
        out[f"{kind}_step_ms"] = round(1000 * float(np.median(times)), 2)
        del tower, optimizer
    out["speedup"] = round(out["dense_step_ms"] / out["sparse_step_ms"], 1)
    return out


def arrow_bytes(split: Path) -> int:
    """The split's size as Arrow tables: what it would take in the object store, held whole."""
    return sum(pq.read_table(path).nbytes for path in split.rglob("*.parquet"))


def steady(run: dict) -> float:
    """Samples/s over epochs 2.. (all epochs when there is only one)."""
    later = run["epochs"][1:] or run["epochs"]
    return sum(e["samples"] for e in later) / sum(e["seconds"] for e in later)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, default=1_000_000, help="synthetic impressions (about 0.8 of them train)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/adrec-bench-train"))
    parser.add_argument("--object-store-mb", type=int, default=512, help="a cap below the training split's size: training must stream")
    parser.add_argument("--quick", action="store_true", help="100k impressions, 2 epochs")
    parser.add_argument("--worker-threads", type=int, default=None, help="torch threads per Ray worker (default: one per reserved CPU)")
    parser.add_argument("--huge-table", action="store_true", help="only the 10M-row id table, dense against sparse")
    parser.add_argument("--only", nargs="+", choices=["bare", "ray_1w", "ray_2w"], default=["bare", "ray_1w", "ray_2w"])
    args = parser.parse_args()
    if args.huge_table:
        print(json.dumps(huge_table(10_000_000, 1024), indent=2))
        return
    impressions, epochs = (100_000, 2) if args.quick else (args.impressions, args.epochs)
    cfg = config(args.out_dir / str(impressions), impressions, epochs)
    init_ray(object_store_mb=args.object_store_mb)
    train_dir = prepared(cfg) / "train"
    out = {
        "impressions": impressions,
        "train_rows": pq.ParquetDataset(str(train_dir)).read(columns=["label"]).num_rows,
        "train_parquet_mb": round(sum(f.stat().st_size for f in train_dir.rglob("*.parquet")) * MB),
        "train_arrow_mb": round(arrow_bytes(train_dir) * MB),
        "object_store_mb": args.object_store_mb,
        "batch_size": int(cfg.trainer.batch_size),
        "epochs": epochs,
        "cpus": os.cpu_count(),
    }
    runs = {}
    if "bare" in args.only:
        runs["bare"] = bare_loop(cfg)
    for name, workers in (("ray_1w", 1), ("ray_2w", 2)):
        if name in args.only:
            runs[name] = ray_loop(cfg, workers, args.worker_threads)
    for name, run in runs.items():
        out[f"{name}_samples_per_s"] = round(steady(run))
        out[f"{name}_startup_s"] = round(run["startup_s"], 1)
        out[name] = run
    if "bare" in runs and "ray_1w" in runs:
        out["ratio_1w"] = round(out["ray_1w_samples_per_s"] / out["bare_samples_per_s"], 3)
    if "bare" in runs and "ray_2w" in runs:
        out["ratio_2w"] = round(out["ray_2w_samples_per_s"] / out["bare_samples_per_s"], 3)
    print(json.dumps(out, indent=2, default=lambda x: round(float(x), 3) if isinstance(x, (float, np.floating)) else str(x)))


if __name__ == "__main__":
    main()
