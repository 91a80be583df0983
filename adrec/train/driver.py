"""Ray Train driver: prepared shards -> TorchTrainer -> best checkpoint and ``result.json``."""

from __future__ import annotations

import time
from pathlib import Path

import ray.data
from omegaconf import OmegaConf
from ray.train import CheckpointConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from adrec.features import FeatureMap
from adrec.runtime import init_ray_from, require, resolve, write_json
from adrec.train.loop import train_loop_per_worker

def model_columns(feature_map: FeatureMap) -> list[str]:
    """The example columns the two-tower model reads, plus the label."""
    return [f.name for f in feature_map.features] + ["label"]


def run(cfg) -> dict:
    """Train on ``prepared_dir``; return the best epoch's metrics and checkpoint path."""
    init_ray_from(cfg)
    prepared = Path(resolve(cfg.paths.prepared_dir))
    feature_map_path = require(prepared / "feature_map.json", "jobs/prepare.py")
    columns = model_columns(FeatureMap.load(feature_map_path))
    datasets = {split: ray.data.read_parquet(str(prepared / split)).select_columns(columns) for split in ("train", "validation")}
    t = cfg.trainer
    loop_config = {
        "seed": int(cfg.seed),
        "feature_map": str(feature_map_path),
        "catalog": str(prepared / "ads.parquet") if (prepared / "ads.parquet").exists() else None,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "batch_size": int(t.batch_size),
        "epochs": int(t.epochs),
        "lr": float(t.lr),
        "weight_decay": float(t.weight_decay),
        "shuffle_buffer": int(t.shuffle_buffer),
    }
    score, order = str(t.select_metric), str(t.select_mode)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=int(t.num_workers), use_gpu=bool(t.use_gpu), resources_per_worker={"CPU": float(t.cpus_per_worker)}
        ),
        run_config=RunConfig(
            # A fresh name per run: Ray Train resumes a run whose name and storage path it has seen.
            name=f"{t.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=resolve(t.storage_path),
            checkpoint_config=CheckpointConfig(
                num_to_keep=int(t.keep_checkpoints), checkpoint_score_attribute=score, checkpoint_score_order=order
            ),
        ),
        datasets=datasets,
    )
    started = time.time()
    result = trainer.fit()
    best = result.get_best_checkpoint(score, order)
    best_metrics = next(m for c, m in result.best_checkpoints if c.path == best.path)
    summary = {
        "best_checkpoint": best.path,
        "best": best_metrics,
        # Every epoch's metrics, as the loop returned them (metrics_dataframe keeps only retained checkpoints).
        "epochs": result.return_value["epochs"],
        "run_path": result.path,
        "seconds": round(time.time() - started, 1),
    }
    write_json(Path(resolve(cfg.paths.train_dir)) / "result.json", summary)
    return summary
