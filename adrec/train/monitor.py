"""What a training run shows while it runs: a progress line every N steps, per-epoch metrics
to TensorBoard, and to MLflow when ``trainer.mlflow.tracking_uri`` is set. Rank 0 only.

    tensorboard --logdir <train_dir>/tensorboard
"""

from __future__ import annotations

import math
import os
import time

from adrec.train.config import LoopConfig, MlflowOptions


class EpochLog:
    """Progress and metric sinks of one worker; every method is a no-op except on rank 0."""

    def __init__(self, config: LoopConfig, rank: int) -> None:
        self.enabled = rank == 0
        self.log_every = config.log_every_steps
        self.tensorboard = None
        self.mlflow = None
        if not self.enabled:
            return
        if config.tensorboard_dir:
            from tensorboardX import SummaryWriter  # installed with ray[train]

            self.tensorboard = SummaryWriter(config.tensorboard_dir)
        if config.mlflow is not None and config.mlflow.tracking_uri:
            self.mlflow = start_mlflow(config.mlflow, config)

    def step(self, epoch: int, step: int, mean_loss: float, seen: int, started: float) -> None:
        if self.enabled and self.log_every and step % self.log_every == 0:
            rate = seen / max(time.perf_counter() - started, 1e-9)
            print(f"[adrec] epoch {epoch} step {step}: train_loss {mean_loss:.4f}, {rate:,.0f} samples/s", flush=True)

    def epoch(self, metrics: dict) -> None:
        if not self.enabled:
            return
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v) and k != "epoch"}
        print("[adrec] epoch " + str(metrics["epoch"]) + ": " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(numbers.items())), flush=True)
        if self.tensorboard is not None:
            for name, value in numbers.items():
                self.tensorboard.add_scalar(name, value, metrics["epoch"])
            self.tensorboard.flush()
        if self.mlflow is not None:
            self.mlflow.log_metrics(numbers, step=int(metrics["epoch"]))

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.mlflow is not None:
            self.mlflow.end_run()


def start_mlflow(options: MlflowOptions, config: LoopConfig):
    """Start an MLflow run (named as the Ray Train run) with the training parameters; return the mlflow module."""
    try:
        import mlflow
    except ImportError:
        raise RuntimeError("trainer.mlflow.tracking_uri is set but MLflow is not installed: pip install mlflow-skinny (or mlflow)") from None
    uri = options.tracking_uri
    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 refuses a file store unless told: the user configured one explicitly.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(options.experiment)
    mlflow.start_run(run_name=config.run_name)
    mlflow.log_params(config.params())
    return mlflow
