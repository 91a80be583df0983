import itertools

import numpy as np
import pytest

from adrec.eval.calibration import Platt
from adrec.eval.metrics import (
    auc,
    expected_calibration_error,
    group_auc,
    logloss,
    rank_of_target,
    retrieval_metrics,
    threshold_metrics,
    top_k_metrics,
)


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


def test_platt_recovers_a_known_miscalibration():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, 200_000)
    labels = rng.random(len(logits)) < 1 / (1 + np.exp(-(0.5 * logits - 1.0)))
    platt = Platt.fit(logits, labels)
    assert abs(platt.a - 0.5) < 0.03 and abs(platt.b + 1.0) < 0.03
    raw = 1 / (1 + np.exp(-logits))
    assert expected_calibration_error(labels, platt(logits)) < 0.01 < expected_calibration_error(labels, raw)


def test_platt_stays_finite_on_few_rows_with_wide_logits():
    # A retrained ranker's validation split: 75 rows, logits spread over tens of units. Plain
    # Newton from a = 1 overshot here and fitted a = 5e10, which served every pCTR as 0 or 1.
    rng = np.random.default_rng(3)
    logits = rng.normal(-8.0, 10.0, 75)
    labels = rng.random(75) < 1 / (1 + np.exp(-(0.3 * logits + 1.0)))
    platt = Platt.fit(logits, labels)
    assert abs(platt.a - 0.3) < 0.15 and abs(platt.b - 1.0) < 0.5, platt  # the truth the labels were drawn from


def test_platt_with_one_class_is_the_identity():
    assert Platt.fit(np.array([0.3, -1.0]), np.array([1.0, 1.0])) == Platt()


def test_gauc_averages_per_user_auc_weighted_by_rows_and_skips_one_class_users():
    labels = np.array([1, 0, 0, 1, 0, 1, 1])
    scores = np.array([0.9, 0.1, 0.2, 0.3, 0.8, 0.5, 0.6])
    users = np.array([1, 1, 1, 2, 2, 3, 3])  # user 1: AUC 1 over 3 rows; user 2: AUC 0 over 2; user 3 one class
    assert group_auc(labels, scores, users) == pytest.approx(3 / 5)


def test_top_k_metrics_with_several_relevant_items():
    hits = np.array([[True, False, True], [False, False, False]])
    relevant = np.array([2, 4])
    out = top_k_metrics(hits, relevant, [1, 3])
    assert out["recall@1"] == pytest.approx((1 / 2 + 0) / 2)
    assert out["recall@3"] == pytest.approx((2 / 2 + 0) / 2)
    assert out["hitrate@3"] == pytest.approx(0.5)
    ideal = 1 + 1 / np.log2(3)
    assert out["ndcg@3"] == pytest.approx(((1 + 1 / np.log2(4)) / ideal + 0) / 2)


def test_calibration_survives_a_save_and_load(tmp_path):
    Platt(0.7, -2.0).save(tmp_path / "c.json")
    assert Platt.load(tmp_path / "c.json") == Platt(0.7, -2.0)
