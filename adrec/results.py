"""What each stage returns and the files it writes: one typed result per stage.

    stage                      result          file it writes (under the stage's folder)
    prepare(...)               PrepareReport   <prepared_dir>/report.json       counts, splits, vocabulary sizes
    train(...)                 TrainResult     <train_dir>/result.json          best checkpoint, its metrics, every epoch
    select(...)                Selection       <train_dir>/selection.json       every candidate's validation metrics, the winner
    evaluate(...)              EvalReport      <eval_dir>/metrics.json          test metrics, calibration, plots
    export(...)                ModelVersion    <models_dir>/<version>/manifest.json (+ model.json, metrics.json)
    retrain(...)               dict            <run_dir>/retrain/<stamp>/report.json

Stages pass these objects to each other as arguments; the files are what a later process (a
job run on its own, Serve, a person) reads back with ``from_json``. Each ``to_json`` gives
the file's exact keys, so the JSON below is the documentation of the artifacts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from adrec.runtime import read_json, require, write_json


class _Json:
    """``to_json``/``from_json``/``save``/``load`` for a flat dataclass whose fields are JSON values."""

    FILE = ""
    MADE_BY = ""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / self.FILE
        write_json(path, self.to_json())
        return path

    @classmethod
    def load(cls, directory: str | Path):
        """The result a stage left in ``directory``; FileNotFoundError naming the job that makes it."""
        return cls.from_json(read_json(require(Path(directory) / cls.FILE, cls.MADE_BY)))


@dataclass
class PrepareReport(_Json):
    """``report.json`` of a prepared folder. Rows read = kept + quarantined."""

    FILE = "report.json"
    MADE_BY = "jobs/prepare.py"

    dataset: str
    rows_read: int
    rows_kept: int
    rows_quarantined: int
    quarantined_by_reason: dict[str, int]
    side_tables: dict[str, dict]  # {"users": {rows_read, rows_quarantined, by_reason}, "ads": {...}}
    splits: dict[str, dict]  # {"train": {"examples": n, "clicks": c}, "validation": ..., "test": ..., ["unused"]}
    split: dict  # the split rule: {kind, cutoffs_ms[, replay_before_ms, replay]}
    ts_range_ms: list[int] | None  # [first, last] event time; retraining treats what is newer as new
    vocabulary_sizes: dict[str, int]
    partitions: int
    seconds: float


@dataclass
class TrainResult(_Json):
    """``result.json`` of a training run: the checkpoint that evaluation and export take."""

    FILE = "result.json"
    MADE_BY = "jobs/train.py"

    best_checkpoint: str  # a local checkpoint directory (weights, feature map, model config, manifest)
    best: dict[str, float]  # the best epoch's reported metrics: val_auc, val_logloss, val_loss, epoch, ...
    epochs: list[dict] = field(default_factory=list)  # every epoch's metrics, in order (the training curves)
    run_path: str | None = None  # Ray Train's run folder
    seconds: float | None = None
    workers: int | None = None
    global_batch_size: int | None = None
    lr: float | None = None  # after lr_scaling for the global batch
    selected_encoder: str | None = None  # set by select: the user encoder that won

    @classmethod
    def of_checkpoint(cls, checkpoint: str) -> TrainResult:
        """A checkpoint trained elsewhere (e.g. a champion rebuilt for a grown feature map): no curves."""
        return cls(best_checkpoint=checkpoint, best={})


@dataclass
class Selection(_Json):
    """``selection.json``: model selection over user encoders."""

    FILE = "selection.json"
    MADE_BY = "jobs/select_model.py"

    metric: str
    mode: str  # max | min
    winner: str
    candidates: dict[str, dict]  # {encoder: {"validation": {val_*: x}, "checkpoint": path}}


@dataclass
class EvalReport(_Json):
    """``metrics.json``: the test split's metrics of one checkpoint, flat in the file.

    ``metrics`` holds auc, gauc, logloss, accuracy, precision, recall, ece, mean_pctr,
    observed_ctr, cold_ad_auc, popularity_auc, recall@K, ndcg@K, hitrate@K (and popularity_*),
    and on synthetic logs oracle_auc, oracle_logloss, auc_over_oracle; None where a split
    cannot give one (e.g. one class only).
    """

    FILE = "metrics.json"
    MADE_BY = "jobs/evaluate.py"

    checkpoint: str
    calibration: dict  # {"method": "platt", "a": x, "b": y}: pCTR = sigmoid(a * logit + b)
    metrics: dict
    plots: list[str] = field(default_factory=list)  # PNG file names in the eval folder

    def __getitem__(self, name: str):
        return self.metrics[name]

    def get(self, name: str, default=None):
        return self.metrics.get(name, default)

    def to_json(self) -> dict:
        return {**self.metrics, "calibration": self.calibration, "checkpoint": self.checkpoint, "plots": self.plots}

    @classmethod
    def from_json(cls, data: dict) -> EvalReport:
        metrics = {k: v for k, v in data.items() if k not in ("calibration", "checkpoint", "plots")}
        return cls(checkpoint=data["checkpoint"], calibration=data["calibration"], metrics=metrics, plots=data.get("plots") or [])

    def check_is_for(self, trained: TrainResult) -> None:
        """Metrics of another checkpoint than ``trained``'s would ship wrong numbers: refuse them."""
        if self.checkpoint != trained.best_checkpoint:
            raise ValueError(f"these metrics are for {self.checkpoint}, not the trained model {trained.best_checkpoint}: evaluate it again")


def finite_or_none(metrics: dict) -> dict:
    """NaN metrics (undefined on this split) as None, which JSON can hold."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}


@dataclass
class ModelVersion(_Json):
    """An exported version: ``<models_dir>/<version>/`` (its files are listed in adrec.registry).

    Its ``manifest.json`` holds: format, version, created_at, config (the resolved config it was
    trained with: retraining rebuilds ``config.model`` and ``config.ranker.model``), lineage
    {checkpoint, ranker_checkpoint (kept even when the ranker does not ship), ranker_choice,
    train_run, prepared_dir, prepare_report (this prepared folder's PrepareReport)}, and files
    {name: sha256}, checked before anything loads. ``model.json``: format, version, logit_bias,
    embedding_dim, calibration {method, a, b} of the towers' pCTR, ranker (null, or its
    calibration and auc). ``metrics.json``: the towers' EvalReport.
    """

    version: str
    model_dir: str
    files: dict[str, str]  # {file: sha256}, as the manifest lists them
    ranker: bool  # whether a DCN ranker ships beside the towers
    ranker_choice: str  # why it ships or not
