"""Evaluation plots as PNG files: training curves, Recall@K against K, calibration reliability."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and Ray workers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from adrec.eval.metrics import calibration_bins  # noqa: E402


def training_curves(epochs: list[dict], path: Path) -> None:
    """Train and validation loss, and validation AUC, per epoch."""
    x = [e["epoch"] for e in epochs]
    fig, (loss, score) = plt.subplots(1, 2, figsize=(9, 3.5))
    loss.plot(x, [e["train_loss"] for e in epochs], marker="o", label="train")
    loss.plot(x, [e.get("val_loss", np.nan) for e in epochs], marker="o", label="validation")
    loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    loss.legend()
    score.plot(x, [e.get("val_auc", np.nan) for e in epochs], marker="o")
    score.set(xlabel="epoch", ylabel="AUC", title="Validation AUC")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def recall_curve(metrics: dict, ks: tuple[int, ...], path: Path) -> None:
    """Recall@K of the model and the popularity baseline for each K measured."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for prefix, label in (("", "model"), ("popularity_", "popularity")):
        points = [(k, metrics[f"{prefix}recall@{k}"]) for k in ks if metrics.get(f"{prefix}recall@{k}") is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set(xscale="log", xlabel="K", ylabel="Recall@K", title=f"Retrieval ({metrics.get('retrieval_protocol')} protocol)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def reliability(labels: np.ndarray, probs: np.ndarray, path: Path) -> None:
    """Observed click rate against mean predicted pCTR in equal-count bins; the diagonal is perfect."""
    predicted, observed, _ = calibration_bins(np.asarray(labels, np.float64), np.asarray(probs, np.float64))
    top = float(max(predicted.max(initial=0), observed.max(initial=0), 1e-3)) * 1.05
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, top], [0, top], color="grey", linestyle="--", label="perfect")
    ax.plot(predicted, observed, marker="o", label="calibrated model")
    ax.set(xlim=(0, top), ylim=(0, top), xlabel="mean predicted pCTR", ylabel="observed CTR", title="Reliability (test)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_plots(directory: Path, epochs: list[dict], metrics: dict, labels: np.ndarray, probs: np.ndarray, ks: tuple[int, ...]) -> list[str]:
    """Write the plots into ``directory`` (Recall@K only for a model that retrieves); return their file names."""
    training_curves(epochs, directory / "training_curves.png")
    reliability(labels, probs, directory / "reliability.png")
    written = ["training_curves.png", "reliability.png"]
    if metrics.get("retrieval_protocol"):
        recall_curve(metrics, ks, directory / "recall_at_k.png")
        written.append("recall_at_k.png")
    return written
