"""What a training run shows while it runs: a progress line every N steps, per-epoch metrics
to TensorBoard, and to MLflow when ``trainer.mlflow.tracking_uri`` is set. Rank 0 only.

    tensorboard --logdir <train_dir>/tensorboard
"""

from __future__ import annotations

import math
import os
import time


class EpochLog:
    """Progress and metric sinks of one worker; every method is a no-op except on rank 0."""

    def __init__(self, config: dict, rank: int) -> None:
        self.enabled = rank == 0
        self.log_every = int(config.get("log_every_steps") or 0)
        self.tensorboard = None
        self.mlflow = None
        if not self.enabled:
            return
        if config.get("tensorboard_dir"):
            from tensorboardX import SummaryWriter  # installed with ray[train]

            self.tensorboard = SummaryWriter(config["tensorboard_dir"])
        mlflow_config = config.get("mlflow") or {}
        if mlflow_config.get("tracking_uri"):
            self.mlflow = start_mlflow(mlflow_config, config)

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


def start_mlflow(mlflow_config: dict, config: dict):
    """Start an MLflow run with the training parameters; return the mlflow module."""
    try:
        import mlflow
    except ImportError:
        raise RuntimeError(
            "trainer.mlflow.tracking_uri is set but MLflow is not installed: pip install mlflow-skinny (or mlflow)"
        ) from None
    uri = str(mlflow_config["tracking_uri"])
    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 refuses a file store unless told: the user configured one explicitly.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(mlflow_config.get("experiment") or "adrec")
    mlflow.start_run(run_name=mlflow_config.get("run_name"))
    params = {k: config[k] for k in ("batch_size", "epochs", "lr", "weight_decay", "precision", "seed") if k in config}
    params["model"] = str((config.get("model") or {}).get("_target_"))
    mlflow.log_params(params)
    return mlflow
