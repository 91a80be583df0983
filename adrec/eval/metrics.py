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


def group_auc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """GAUC: per-group (user) AUC weighted by the group's rows, over groups with both classes."""
    order = np.argsort(groups, kind="stable")
    labels, scores, groups = np.asarray(labels)[order], np.asarray(scores)[order], np.asarray(groups)[order]
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    total, weight = 0.0, 0
    for start, end in zip(starts, np.r_[starts[1:], len(groups)]):
        positives = labels[start:end].sum()
        if 0 < positives < end - start:
            total += auc(labels[start:end], scores[start:end]) * (end - start)
            weight += end - start
    return total / weight if weight else float("nan")


def calibration_bins(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Equal-count bins by predicted probability: (mean predicted, observed rate, rows) per bin, each (bins,).

    Equal counts, not equal widths: CTRs crowd into the bottom of [0, 1], where equal-width bins
    would put nearly every row in one bin.
    """
    order = np.argsort(probs, kind="stable")
    parts = [part for part in np.array_split(order, bins) if len(part)]
    predicted = np.array([np.mean(probs[p]) for p in parts])
    observed = np.array([np.mean(labels[p]) for p in parts])
    return predicted, observed, np.array([len(p) for p in parts])


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> float:
    """ECE: row-weighted mean |mean predicted - observed| over equal-count bins."""
    if len(labels) == 0:
        return float("nan")
    predicted, observed, rows = calibration_bins(np.asarray(labels, np.float64), np.asarray(probs, np.float64), bins)
    return float(np.sum(np.abs(predicted - observed) * rows) / rows.sum())


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUC, logloss, accuracy/precision/recall at 0.5, ECE, and mean predicted vs observed CTR."""
    return {
        "auc": auc(labels, probs),
        "logloss": logloss(labels, probs),
        **threshold_metrics(labels, probs),
        "ece": expected_calibration_error(labels, probs),
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
    """Recall@K, NDCG@K and HitRate@K for one relevant item per query, given its 0-based ``ranks``
    (with one relevant item, recall and hit rate coincide)."""
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"recall@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
        out[f"hitrate@{k}"] = out[f"recall@{k}"]
    return out


def top_k_metrics(hits: np.ndarray, relevant: np.ndarray, ks: list[int] | tuple[int, ...]) -> dict[str, float]:
    """Recall@K, NDCG@K and HitRate@K averaged over queries with several relevant items.

    hits: (Q, K_max) bool, whether the item ranked j is relevant; relevant: (Q,) count of relevant
    items per query (> 0). Recall@K = hits in the top K / relevant (as RecBole); NDCG's ideal
    ranking puts min(relevant, K) hits first.
    """
    discount = 1.0 / np.log2(np.arange(hits.shape[1]) + 2.0)
    out = {}
    for k in ks:
        top = hits[:, :k]  # fewer columns when the catalog is smaller than k
        ideal = np.cumsum(discount[:k])[np.minimum(relevant, top.shape[1]) - 1]
        out[f"recall@{k}"] = float(np.mean(top.sum(1) / relevant))
        out[f"ndcg@{k}"] = float(np.mean((top * discount[: top.shape[1]]).sum(1) / ideal))
        out[f"hitrate@{k}"] = float(np.mean(top.any(1)))
    return out
