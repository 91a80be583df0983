"""The benchmark's peers (benchmarks/peers.py) and the ranking task they share with adrec's evaluation,
on hand-made interactions whose answers are known. No Ray."""

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from adrec.eval.evaluate import UserRankingTask
from benchmarks import peers

CATALOG = ["a", "b", "c", "d", "e", "f"]


def write_prepared(folder: Path) -> Path:
    """A prepared folder of three users over the catalog a..f (only the columns the task reads):

    user 1: train a, validation b and e, test c and d (clicked) -> relevant {c, d}, seen {a, b, e}
    user 2: train c, test c (clicked)                         -> every positive seen: dropped from the test task
    user 3: train b, test e (clicked) and a (not)             -> relevant {e}; a is no positive
    Nobody has f.
    """
    splits = {
        "train": [(1, "a", 1.0), (2, "c", 1.0), (3, "b", 1.0)],
        "validation": [(1, "b", 1.0), (1, "e", 1.0)],
        "test": [(1, "c", 1.0), (1, "d", 1.0), (2, "c", 1.0), (3, "e", 1.0), (3, "a", 0.0)],
    }
    for split, rows in splits.items():
        (folder / split).mkdir(parents=True)
        users, ads, labels = zip(*rows)
        table = pa.table({"user_key": pa.array(users, pa.int64()), "raw_ad_id": list(ads), "label": pa.array(labels, pa.float32())})
        pq.write_table(table, folder / split / "part-0.parquet")
    pq.write_table(pa.table({"raw_ad_id": CATALOG}), folder / "ads.parquet")
    return folder


def test_the_ranking_task_excludes_seen_items_drops_users_left_without_relevant_ones_and_scores_recall(tmp_path):
    task = UserRankingTask.from_prepared(write_prepared(tmp_path))
    assert task.users.tolist() == [1, 3]
    assert [r.tolist() for r in task.relevant] == [[2, 3], [4]]  # catalog rows of c, d and of e
    assert [s.tolist() for s in task.seen] == [[0, 1, 4], [1]]
    # User 1 scores the seen a, b, e highest; unseen, f > c > d, so its top 2 is f, c: one of its two.
    # User 3 ranks e first among the unseen.
    scores = np.array([[9.0, 8.0, 3.0, 1.0, 5.0, 4.0], [0.0, 9.0, 1.0, 2.0, 3.0, 0.0]])
    metrics = task.metrics(scores, [2])
    assert metrics["recall@2"] == pytest.approx((1 / 2 + 1) / 2)
    user1_ndcg = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert metrics["ndcg@2"] == pytest.approx((user1_ndcg + 1.0) / 2)
    assert metrics["hitrate@2"] == 1.0
    # The same figures from a function called one user at a time.
    assert task.metrics(lambda rows: scores[rows], [2], chunk=1) == metrics


def test_the_validation_task_takes_validation_positives_and_excludes_train_only(tmp_path):
    task = UserRankingTask.from_prepared(write_prepared(tmp_path), target="validation", seen=("train",))
    assert task.users.tolist() == [1]
    assert [r.tolist() for r in task.relevant] == [[1, 4]] and [s.tolist() for s in task.seen] == [[0]]
    # One score per item for every user, a first: a is seen, so b tops user 1's list, one of its two.
    assert task.metrics(np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0]), [1])["recall@1"] == 0.5


def test_mostpop_counts_train_as_adrec_learns_from_it_or_train_and_validation_when_refitted(tmp_path):
    """Train + validation positives per item: b 2, a 1, c 1, e 1 (ties in catalog order). User 1 (a, b, e
    seen) gets c, d first: both relevant, NDCG 1. User 3 (b seen) gets a, c, e: e third, NDCG 1/log2(4).
    Counted on train alone (e 0), e comes fourth, after d: NDCG 1/log2(5)."""
    prepared = write_prepared(tmp_path)
    train_only = peers.ranking_peers(prepared, seed=0, names=("mostpop",))["mostpop"]
    assert train_only["ndcg@10"] == pytest.approx((1.0 + 1 / math.log2(5)) / 2)
    refitted = peers.ranking_peers(prepared, seed=0, names=("mostpop",), refit=True)["mostpop"]
    assert refitted["ndcg@10"] == pytest.approx((1.0 + 0.5) / 2)
    assert refitted["recall@10"] == train_only["recall@10"] == 1.0  # six items: the top 10 holds them all


def random_interactions(seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    return sp.csr_matrix((rng.random((30, 8)) < 0.35).astype(np.float32))


def test_ease_closed_form_equals_one_ridge_regression_per_item_without_itself():
    """EASE's column j is the ridge regression of item j on every other item (its own weight held at 0)."""
    x = random_interactions().toarray().astype(np.float64)
    l2 = 3.0
    weights = peers.ease_weights(sp.csr_matrix(x), l2)
    for j in range(x.shape[1]):
        others = np.delete(np.arange(x.shape[1]), j)
        solved = np.linalg.solve(x[:, others].T @ x[:, others] + l2 * np.eye(len(others)), x[:, others].T @ x[:, j])
        assert weights[j, j] == 0.0
        np.testing.assert_allclose(weights[others, j], solved, rtol=1e-8, atol=1e-10)


def test_itemknn_scores_by_cosine_keeping_each_items_nearest_neighbours():
    # Items 0 and 1 share two users, 0 and 2 one, 1 and 2 none: cos(0,1) = 2/sqrt(6), cos(0,2) = 1/sqrt(3), cos(1,2) = 0.
    x = sp.csr_matrix(np.array([[1, 1, 0], [1, 0, 1], [1, 1, 0]], np.float32))
    c01, c02 = 2 / math.sqrt(6), 1 / math.sqrt(3)
    # Every other item as a neighbour: user 1 (items 0 and 2) scores sim(0, j) + sim(2, j).
    np.testing.assert_allclose(peers.fit_itemknn(x, neighbours=2)(np.array([1])), [[c02, c01, c02]], rtol=1e-6)
    # One neighbour per target item: item 0 keeps item 1 (not 2), items 1 and 2 keep item 0,
    # so user 1's item 2 no longer speaks for item 0.
    nearest = peers.fit_itemknn(x, neighbours=1)
    np.testing.assert_allclose(nearest(np.array([1])), [[0.0, c01, c02]], rtol=1e-6)
    np.testing.assert_allclose(nearest(np.array([0])), [[c01, c01, c02]], rtol=1e-6)
