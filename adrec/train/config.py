"""The training stage's typed configs: what the trainer options are, and what a worker gets.

``TrainerOptions`` mirrors conf/trainer/default.yaml key for key. The YAML is the one home of
the defaults, so no field has one here: ``from_config`` takes the composed ``trainer`` group and
refuses an unknown (misspelled) key, a missing one, or a value of the wrong type, naming it,
before any Ray worker starts.

``LoopConfig`` is exactly what ``train_loop_per_worker`` reads: absolute paths (Ray Train
workers chdir into their run folder) and numbers already resolved on the driver (the learning
rate scaled for the global batch, an epoch's rows per worker).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass
from functools import cache
from types import NoneType, UnionType
from typing import Union, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, OmegaConf


@dataclass(frozen=True)
class MlflowOptions:
    """``trainer.mlflow``: log params and per-epoch metrics to an MLflow tracking server."""

    tracking_uri: str | None  # null: MLflow off
    experiment: str


@dataclass(frozen=True)
class TrainerOptions:
    """``trainer.*`` (conf/trainer/default.yaml, which documents each option and holds its default)."""

    # Scaling
    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    gpus_per_worker: float
    placement_strategy: str
    precision: str
    batch_size: int  # per worker
    lr: float  # for one worker, before lr_scaling
    lr_scaling: str
    weight_decay: float
    embedding_l2: float
    epochs: int
    early_stopping_patience: int
    lr_decay_patience: int
    lr_decay_factor: float
    shuffle_buffer: int
    prefetch_batches: int
    stream_epochs: bool
    torch_threads: int | None
    # Checkpoints and resuming
    keep_checkpoints: int
    select_metric: str
    select_mode: str
    validation_ranking_k: int
    validation_ranking_users: int
    checkpoint_every_steps: int
    max_failures: int
    resume_from: str | None
    storage_path: str
    name: str
    run_name: str | None
    # Observability
    log_every_steps: int
    tensorboard_dir: str | None
    mlflow: MlflowOptions | None
    fail_at_step: int | None

    @classmethod
    def from_config(cls, options: Mapping) -> TrainerOptions:
        """The options of a composed ``cfg.trainer`` (interpolations resolved) or a plain mapping.

        Raises ValueError naming any key that is not an option, any option that is missing,
        and any value of the wrong type.
        """
        if isinstance(options, DictConfig):
            options = OmegaConf.to_container(options, resolve=True, throw_on_missing=True)
        return _build(cls, options, "trainer")


@dataclass(frozen=True)
class LoopConfig:
    """What each Ray Train worker needs: paths absolute, numbers resolved, nothing left to look up."""

    seed: int
    feature_map: str  # feature_map.json of the prepared folder
    catalog: str | None  # ads.parquet (uniform negatives), or None when the data has no ad table
    model: dict  # the resolved model config: a ``_target_`` dict with a ``loss`` section (adrec.models.build_model)
    columns: tuple[str, ...]  # the example columns the model reads, plus the label
    validation_files: tuple[str, ...]  # the validation split's Parquet files
    epoch_rows: int  # an epoch: this worker's equal share of the training split
    epochs: int
    batch_size: int  # per worker
    lr: float  # already scaled for the global batch
    weight_decay: float  # L2 of dense weights
    embedding_l2: float  # L2 of id tables
    shuffle_buffer: int
    prefetch_batches: int
    stream_epochs: bool
    precision: str  # auto | fp32 | bf16
    torch_threads: int | None  # None: Ray's default
    select_metric: str  # the validation score that picks the best epoch (a mid-epoch checkpoint reports it as NaN)
    select_mode: str  # max | min
    early_stopping_patience: int  # 0: train every epoch
    lr_decay_patience: int  # 0: a constant learning rate
    lr_decay_factor: float
    validation_ranking: tuple[str, int, int] | None  # (prepared folder, K, users): per-epoch val_recall@K, val_ndcg@K
    checkpoint_every_steps: int  # 0: checkpoint at epoch ends only
    resume_from: str | None  # a verified checkpoint to warm-start the weights from
    log_every_steps: int  # 0: per epoch only
    tensorboard_dir: str | None
    mlflow: MlflowOptions | None  # None: MLflow off
    run_name: str  # the Ray Train run's name (also the MLflow run's)
    fail_at_step: int | None  # fault injection (tests): rank 0 dies once at this global step
    fault_marker: str | None  # the file that records the fault was injected, so a restart goes on

    def __post_init__(self) -> None:
        paths = [self.feature_map, self.catalog, self.resume_from, self.fault_marker, *self.validation_files, *(self.validation_ranking or ())[:1]]
        relative = [p for p in paths if p is not None and not os.path.isabs(p)]
        if self.tensorboard_dir and "://" not in self.tensorboard_dir and not os.path.isabs(self.tensorboard_dir):
            relative.append(self.tensorboard_dir)
        if relative:
            # A worker would read them against its run folder, not the launch directory.
            raise ValueError(f"LoopConfig paths must be absolute: {relative}")

    def params(self) -> dict:
        """The run's headline parameters, as an experiment tracker logs them."""
        keys = ("batch_size", "epochs", "lr", "weight_decay", "embedding_l2", "precision", "seed")
        return {**{k: getattr(self, k) for k in keys}, "model": str(self.model.get("_target_"))}


@cache
def _hints(cls) -> dict:
    return get_type_hints(cls)


def _build(cls, options: Mapping, prefix: str):
    """``cls(**options)`` with every key checked against ``cls``'s fields and every value against its type."""
    if not isinstance(options, Mapping):
        raise TypeError(f"{prefix} must be a mapping of options, not {options!r}")
    names = [f.name for f in fields(cls)]
    unknown = [k for k in options if k not in names]
    if unknown:
        key = str(unknown[0])
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" (did you mean {prefix}.{close[0]}?)" if close else ""
        raise ValueError(f"{prefix}.{key} is not a {prefix} option{hint}; known: {', '.join(names)}")
    missing = [n for n in names if n not in options]
    if missing:
        raise ValueError(
            f"{', '.join(f'{prefix}.{n}' for n in missing)} missing: every {prefix} option needs a value (conf/trainer/default.yaml gives each one)"
        )
    hints = _hints(cls)
    return cls(**{n: _coerce(f"{prefix}.{n}", options[n], hints[n]) for n in names})


def _coerce(key: str, value, hint):
    """``value`` as the field type ``hint`` (int, float, bool, str, a dataclass, or one of those | None)."""
    optional = get_origin(hint) in (Union, UnionType) and NoneType in get_args(hint)
    kind = next(a for a in get_args(hint) if a is not NoneType) if optional else hint
    if value is None:
        if optional:
            return None
        raise ValueError(f"{key} is null: it needs a value")
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, (str, os.PathLike)):
        return str(value)
    if is_dataclass(kind) and isinstance(value, Mapping):
        return _build(kind, value, key)
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, "a mapping")
    raise ValueError(f"{key}={value!r}: expected {expected}{' or null' if optional else ''}")
