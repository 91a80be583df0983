"""Offline metrics on numpy arrays: classification (pCTR) and retrieval (top-K)."""

from __future__ import annotations

import numpy as np


def _average_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks of ``scores``, ties sharing their average rank (as scipy's rankdata)."""
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # Start index of each run of equal scores, and the run each position belongs to.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    run_of = np.cumsum(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]]) - 1
    ends = np.r_[starts[1:], len(scores)]
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = (starts + ends + 1)[run_of] / 2.0
    return ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U); NaN when only one class is present."""
    labels = np.asarray(labels).astype(bool)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = _average_ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities ``probs`` against 0/1 ``labels``."""
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def threshold_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, precision and recall of ``probs >= threshold``; precision is 0 with no positive call."""
    y = np.asarray(labels).astype(bool)
    pred = np.asarray(probs) >= threshold
    tp = int(np.sum(pred & y))
    return {
        "accuracy": float(np.mean(pred == y)),
        "precision": tp / int(pred.sum()) if pred.any() else 0.0,
        "recall": tp / int(y.sum()) if y.any() else float("nan"),
    }


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUC, logloss, accuracy/precision/recall at 0.5, and mean predicted vs observed CTR."""
    return {
        "auc": auc(labels, probs),
        "logloss": logloss(labels, probs),
        **threshold_metrics(labels, probs),
        "mean_pctr": float(np.mean(probs)),
        "observed_ctr": float(np.mean(labels)),
    }


def rank_of_target(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """0-based rank of each row's target column when sorted by descending score.

    scores: (Q, A) float; target: (Q,) int column index. Ties count against the target,
    so a model that scores everything equal gets no credit.
    """
    target_score = scores[np.arange(len(target)), target]
    return (scores >= target_score[:, None]).sum(axis=1) - 1


def retrieval_metrics(ranks: np.ndarray, ks: list[int] | tuple[int, ...]) -> dict[str, float]:
    """Recall@K and NDCG@K for one relevant item per query, given its 0-based ``ranks``."""
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"recall@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
    return out
