"""Ray Train driver: prepared shards -> TorchTrainer -> best checkpoint and ``result.json``.

Scaling: ``trainer.num_workers`` data-parallel workers (DDP), each reading its own stream of
the Parquet shards, on CPUs or GPUs (``trainer.use_gpu``). ``trainer.batch_size`` is per worker,
so the global batch is batch_size * num_workers, and the learning rate is scaled to match by
``trainer.lr_scaling`` (sqrt for Adam, linear for SGD).
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import numpy as np
import pyarrow.fs
import ray.data
from omegaconf import OmegaConf
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from adrec.data.sources import ParquetRowGroups, list_files, row_groups
from adrec.data.staging import parquet_rows
from adrec.features import FeatureMap
from adrec.models import model_builder
from adrec.registry import check_grows_from, verify_manifest
from adrec.results import TrainResult
from adrec.runtime import init_ray_from, require, resolve
from adrec.train.config import LoopConfig, TrainerOptions
from adrec.train.loop import train_loop_per_worker

READ_CPUS = 0.5  # per read task: decoding Parquet leaves half a core for the training math
LR_SCALING = {"none": lambda n: 1.0, "linear": float, "sqrt": math.sqrt}


def model_columns(feature_map: FeatureMap) -> list[str]:
    """The example columns the two-tower model reads, plus the label."""
    return [f.name for f in feature_map.features] + ["label"]


def scaled_lr(lr: float, rule: str, num_workers: int) -> float:
    """The learning rate for a global batch num_workers times the per-worker one."""
    if rule not in LR_SCALING:
        raise ValueError(f"trainer.lr_scaling={rule!r}: use one of {sorted(LR_SCALING)}")
    return lr * LR_SCALING[rule](num_workers)


def scaling_config(trainer: TrainerOptions) -> ScalingConfig:
    resources = {"CPU": trainer.cpus_per_worker}
    if trainer.use_gpu:
        resources["GPU"] = trainer.gpus_per_worker
    return ScalingConfig(
        num_workers=trainer.num_workers,
        use_gpu=trainer.use_gpu,
        resources_per_worker=resources,
        placement_strategy=trainer.placement_strategy,
    )


def warm_start(path: str | None, prepared: Path) -> str | None:
    """``trainer.resume_from`` checked: an intact checkpoint trained on this feature map, or on one it grows."""
    if not path:
        return None
    directory = Path(resolve(path))
    if not directory.is_dir():
        raise FileNotFoundError(f"trainer.resume_from={path}: no such checkpoint directory")
    verify_manifest(directory)  # a corrupt or tampered checkpoint stops here, before any worker starts
    check_grows_from(directory, prepared)
    return str(directory)


def loop_config(trainer: TrainerOptions, model: dict, seed: int, prepared: Path, train_dir: Path, columns: list[str], run_name: str) -> LoopConfig:
    """The workers' config, resolved here on the driver (``prepared`` and ``train_dir`` absolute)."""
    catalog = prepared / "ads.parquet"
    return LoopConfig(
        seed=seed,
        feature_map=str(prepared / "feature_map.json"),
        catalog=str(catalog) if catalog.exists() else None,
        model=model,
        columns=tuple(columns),
        validation_files=tuple(sorted(str(f) for f in (prepared / "validation").rglob("*.parquet"))),
        epoch_rows=parquet_rows(prepared / "train") // trainer.num_workers,
        epochs=trainer.epochs,
        batch_size=trainer.batch_size,
        lr=scaled_lr(trainer.lr, trainer.lr_scaling, trainer.num_workers),
        weight_decay=trainer.weight_decay,
        embedding_l2=trainer.embedding_l2,
        shuffle_buffer=trainer.shuffle_buffer,
        prefetch_batches=trainer.prefetch_batches,
        stream_epochs=trainer.stream_epochs,
        precision=trainer.precision,
        torch_threads=trainer.torch_threads or None,
        select_metric=trainer.select_metric,
        select_mode=trainer.select_mode,
        early_stopping_patience=trainer.early_stopping_patience,
        lr_decay_patience=trainer.lr_decay_patience,
        lr_decay_factor=trainer.lr_decay_factor,
        validation_ranking=validation_ranking(trainer, model, prepared),
        checkpoint_every_steps=trainer.checkpoint_every_steps,
        resume_from=warm_start(trainer.resume_from, prepared),
        log_every_steps=trainer.log_every_steps,
        tensorboard_dir=resolve(trainer.tensorboard_dir) if trainer.tensorboard_dir else None,
        mlflow=trainer.mlflow if trainer.mlflow and trainer.mlflow.tracking_uri else None,
        run_name=run_name,
        fail_at_step=trainer.fail_at_step or None,
        fault_marker=str(train_dir / f"fault_injected-{run_name}") if trainer.fail_at_step else None,
    )


def check_select_metric(trainer: TrainerOptions) -> None:
    """A ranking select_metric (val_recall@K, val_ndcg@K) needs the epochs to rank at that K."""
    wants_k = trainer.select_metric.partition("@")[2]
    if wants_k and wants_k != str(trainer.validation_ranking_k):
        raise ValueError(f"trainer.select_metric={trainer.select_metric} is reported with trainer.validation_ranking_k={wants_k}")


def validation_ranking(trainer: TrainerOptions, model: dict, prepared: Path) -> tuple[str, int, int] | None:
    """(prepared folder, K, users) when each epoch should rank the catalog for validation users; else None."""
    check_select_metric(trainer)
    if not trainer.validation_ranking_k:
        return None
    if "two_tower" not in str(model.get("_target_")):
        raise ValueError("trainer.validation_ranking_k ranks the catalog by U . V: it needs the two-tower model, not a ranker")
    if not (prepared / "ads.parquet").exists():
        raise ValueError("trainer.validation_ranking_k needs an ad catalog (data.ads) to rank")
    return (str(prepared), trainer.validation_ranking_k, trainer.validation_ranking_users)


def epoch_row_groups(split: Path, epochs: int, seed: int) -> list[tuple[pyarrow.fs.FileSystem, str, int]]:
    """The split's row groups once per epoch, each epoch in its own shuffled order: one stream's input.

    Row groups, not files: a file may hold many of them (preparation bounds them at
    ``ROW_GROUP_ROWS``), and a file-level order would feed one file's rows as one long run,
    which the local shuffle buffer cannot mix when files are few and large.
    """
    pieces = row_groups(list_files([str(split)]))
    rng = np.random.default_rng(seed)
    return [pieces[i] for _ in range(epochs) for i in rng.permutation(len(pieces))]


def local_checkpoint(checkpoint: ray.train.Checkpoint, train_dir: Path) -> str:
    """A local directory holding ``checkpoint``: itself on local storage, else a download."""
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return checkpoint.path
    return checkpoint.to_directory(str(train_dir / "best_checkpoint"))


def training_datasets(prepared: Path, columns: list[str], stream_epochs: int, seed: int) -> dict[str, ray.data.Dataset]:
    """A lazy read of the training split: each worker streams its share, so a split larger than
    the object store trains without being held in it. (Workers read validation themselves.)

    ``stream_epochs`` > 0: the training split's files once per epoch, as one stream, so the
    pipeline starts once per run rather than once per epoch.
    """
    datasets = {"train": ray.data.read_parquet(str(prepared / "train"), num_cpus=READ_CPUS).select_columns(columns)}
    if stream_epochs:
        pieces = epoch_row_groups(prepared / "train", stream_epochs, seed)
        # One read task at a time, so the stream leaves CPU to the workers' math.
        # A row group is read as often as it is listed; Ray's reader would read it once.
        datasets["train"] = ray.data.read_datasource(ParquetRowGroups(pieces, columns), num_cpus=READ_CPUS, concurrency=1)
    return datasets


def train(prepared_dir: Path, train_dir: Path, model: dict, trainer: TrainerOptions, seed: int) -> TrainResult:
    """Train ``model`` (a resolved model config) on ``prepared_dir``'s splits; write and return
    ``<train_dir>/result.json``: the best epoch's metrics and checkpoint, and every epoch's."""
    model_builder(model)  # a misspelled model, encoder or loss option fails here, not in every worker
    prepared, train_dir = Path(resolve(prepared_dir)), Path(resolve(train_dir))
    feature_map_path = require(prepared / "feature_map.json", "jobs/prepare.py")
    columns = model_columns(FeatureMap.load(feature_map_path))
    datasets = training_datasets(prepared, columns, trainer.epochs if trainer.stream_epochs else 0, seed)
    # A fresh name per run unless given: Ray Train resumes a run whose name and storage it has seen.
    name = trainer.run_name or f"{trainer.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    config = loop_config(trainer, model, seed, prepared, train_dir, columns, name)
    score, order = trainer.select_metric, trainer.select_mode
    fit = TorchTrainer(
        # The typed config travels bound to the loop: Ray's train_loop_config is for plain dicts.
        functools.partial(train_loop_per_worker, config),
        scaling_config=scaling_config(trainer),
        run_config=RunConfig(
            name=name,
            storage_path=resolve(trainer.storage_path),
            checkpoint_config=CheckpointConfig(num_to_keep=trainer.keep_checkpoints, checkpoint_score_attribute=score, checkpoint_score_order=order),
            failure_config=FailureConfig(max_failures=trainer.max_failures),
        ),
        datasets=datasets,
    )
    started = time.time()
    result = fit.fit()
    # Mid-epoch checkpoints carry a NaN score: only epoch ends compete for best.
    scored = [(c, m) for c, m in result.best_checkpoints if math.isfinite(float(m.get(score, math.nan)))]
    if not scored:
        raise RuntimeError(f"training reported no {score}: is trainer.select_metric one of val_auc, val_loss, val_logloss, val_recall@K, val_ndcg@K?")
    best, best_metrics = (max if order == "max" else min)(scored, key=lambda cm: cm[1][score])
    trained = TrainResult(
        best_checkpoint=local_checkpoint(best, train_dir),
        best=best_metrics,
        # Every epoch's metrics, as the loop returned them (metrics_dataframe keeps only retained checkpoints).
        epochs=result.return_value["epochs"],
        run_path=result.path,
        seconds=round(time.time() - started, 1),
        workers=trainer.num_workers,
        global_batch_size=trainer.batch_size * trainer.num_workers,
        lr=config.lr,
    )
    trained.save(train_dir)
    return trained


def run(cfg) -> dict:
    """``train`` on a composed config: the job's (and the tests') entry; returns ``result.json``'s dict."""
    # Checked before Ray starts, so a misspelled option costs no cluster start-up.
    trainer = TrainerOptions.from_config(cfg.trainer)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model_builder(model)
    check_select_metric(trainer)
    init_ray_from(cfg)
    result = train(Path(resolve(cfg.paths.prepared_dir)), Path(resolve(cfg.paths.train_dir)), model, trainer, int(cfg.seed))
    return result.to_json()
