import itertools

import numpy as np
import pytest

from adrec.eval.metrics import auc, logloss, rank_of_target, retrieval_metrics, threshold_metrics


def brute_force_auc(labels, scores):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.3
    scores = rng.integers(0, 20, 300).astype(float)  # many ties
    assert auc(labels, scores) == pytest.approx(brute_force_auc(labels, scores))


def test_auc_is_nan_with_one_class():
    assert np.isnan(auc(np.ones(5), np.arange(5)))


def test_logloss_and_thresholds():
    labels = np.array([1, 0, 1, 0])
    probs = np.array([0.9, 0.2, 0.4, 0.6])
    assert logloss(labels, probs) == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.4, 0.4])))
    assert threshold_metrics(labels, probs) == {"accuracy": 0.5, "precision": 0.5, "recall": 0.5}


def test_ranks_count_ties_against_the_target():
    scores = np.array([[0.1, 0.5, 0.5, 0.9], [3.0, 2.0, 1.0, 0.0]])
    assert rank_of_target(scores, np.array([1, 0])).tolist() == [2, 0]
    metrics = retrieval_metrics(np.array([0, 2, 10]), [1, 3])
    assert metrics["recall@1"] == pytest.approx(1 / 3)
    assert metrics["recall@3"] == pytest.approx(2 / 3)
    assert metrics["ndcg@3"] == pytest.approx((1 + 1 / np.log2(4)) / 3)
