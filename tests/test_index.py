import numpy as np
import pytest

from adrec.index import AdIndex, build_index, exact_top_k, measure_recall, recall_at_k

D = 32


def clustered(n: int, clusters: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, D) ad vectors as category centres plus noise, as real ad embeddings cluster; and the (clusters, D) centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, D)).astype(np.float32)
    ads = centres[rng.integers(clusters, size=n)] + 0.5 * rng.standard_normal((n, D))
    return ads.astype(np.float32), centres


def user_queries(centres: np.ndarray, n: int = 256, seed: int = 1) -> np.ndarray:
    """(n, D) users near a category they like, farther from it than its ads."""
    rng = np.random.default_rng(seed)
    return (centres[rng.integers(len(centres), size=n)] + 0.7 * rng.standard_normal((n, D))).astype(np.float32)


def distinct(seed: int, norm: float = 20.0) -> np.ndarray:
    """(D,) a vector of ~3x the ads' norm in a random direction: its own best match by inner product."""
    v = np.random.default_rng(seed).standard_normal(D).astype(np.float32)
    return norm * v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def catalog() -> tuple[np.ndarray, np.ndarray]:
    return clustered(20_000)


def ivf(vectors: np.ndarray, **options) -> AdIndex:
    index = build_index(vectors, exact_max_ads=1000, **options)
    assert index.kind == "ivf"
    return index


def test_exact_top_k_matches_brute_force_argsort():
    rng = np.random.default_rng(0)
    queries, vectors = rng.standard_normal((5, D), dtype=np.float32), rng.standard_normal((3000, D), dtype=np.float32)
    scores, rows = exact_top_k(queries, vectors, 50)
    everything = queries @ vectors.T
    expected = np.argsort(-everything, axis=1)[:, :50]
    assert rows.dtype == np.int64 and rows.shape == (5, 50)
    np.testing.assert_array_equal(rows, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(everything, expected, axis=1), rtol=1e-6)


def test_recall_at_k_on_hand_made_rows():
    found = np.array([[1, 2, 3], [4, -1, -1]])
    exact = np.array([[3, 2, 9], [4, 5, 6]])
    assert recall_at_k(found, exact) == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert recall_at_k(exact, exact) == 1.0
    assert recall_at_k(np.full((2, 3), -1), exact) == 0.0
    with pytest.raises(ValueError, match="same B"):
        recall_at_k(found[:1], exact)


def test_build_picks_exact_up_to_exact_max_ads_and_ivf_above(catalog):
    vectors, _ = catalog
    exact = build_index(vectors, exact_max_ads=len(vectors))
    assert (exact.kind, exact.size, exact.dim, exact.recall) == ("exact", 20_000, D, None)
    index = ivf(vectors)
    assert index.size == 20_000 and index.dim == D
    # nlist defaults to about 4 * sqrt(N) = 566, capped at 20_000 / 39 = 512 training points per list.
    assert index.recall["nlist"] == 512 and index.recall["nprobe"] == 32 and index.recall["k"] == 100


def test_ivf_recall_is_high_on_clustered_ads_and_recorded_faithfully(catalog):
    vectors, centres = catalog
    queries = user_queries(centres)
    index = ivf(vectors, recall_queries=queries)
    assert index.recall["recall"] >= 0.95
    assert index.recall["queries"] == 256
    assert index.recall["recall"] == measure_recall(index, queries, 100)
    # The figure is measured, not assumed: probing one list of 512 loses neighbours.
    assert ivf(vectors, recall_queries=queries, nprobe=1).recall["recall"] < 0.9


def test_ivf_pads_unfilled_results_with_minus_one_and_minus_inf(catalog):
    vectors, _ = catalog
    index = ivf(vectors[:2000], nprobe=1)
    scores, rows = index.search(vectors[:3], 2000)
    assert rows.shape == (3, 2000)
    padded = rows == -1
    assert padded.any() and np.isneginf(scores[padded]).all() and np.isfinite(scores[~padded]).all()
    # Real results come first, best first.
    assert (np.diff(padded.astype(int), axis=1) >= 0).all()
    for query_scores, query_padded in zip(scores, padded):
        assert (np.diff(query_scores[~query_padded]) <= 0).all()


@pytest.mark.parametrize("exact_max_ads", [50_000, 1000], ids=["exact", "ivf"])
def test_upsert_of_a_new_row_is_found_first(catalog, exact_max_ads):
    index = build_index(catalog[0], exact_max_ads=exact_max_ads)
    new = distinct(seed=7)
    index.upsert(np.array([20_000]), new[None, :])
    assert index.size == 20_001
    scores, rows = index.search(3 * new[None, :], 10)
    assert rows[0, 0] == 20_000
    assert scores[0, 0] == pytest.approx(3 * new @ new, rel=1e-5)


@pytest.mark.parametrize("exact_max_ads", [50_000, 1000], ids=["exact", "ivf"])
def test_upsert_of_an_existing_row_replaces_its_vector(catalog, exact_max_ads):
    vectors = catalog[0].copy()
    old = distinct(seed=8)
    vectors[7] = old
    index = build_index(vectors, exact_max_ads=exact_max_ads)
    assert index.search(old[None, :], 1)[1][0, 0] == 7
    index.upsert([7], -old[None, :])  # now the least like its old self
    assert index.size == 20_000
    assert 7 not in index.search(old[None, :], 100)[1][0]
    rows = index.search(-old[None, :], 100)[1][0]
    assert rows[0] == 7 and (rows == 7).sum() == 1  # IVF: the old entry was removed, not left beside the new
    np.testing.assert_array_equal(index.vectors[7], -old)


def test_appends_grow_one_at_a_time_and_keep_recall(catalog):
    vectors, centres = catalog
    index = ivf(vectors[:10_000])
    for row in range(10_000, 10_200):
        index.upsert([row], vectors[row][None, :])
    assert index.size == 10_200
    np.testing.assert_array_equal(index.vectors, vectors[:10_200])
    assert measure_recall(index, user_queries(centres), 100) >= 0.95


def test_exact_search_with_k_above_size_returns_every_ad():
    vectors = np.random.default_rng(0).standard_normal((10, D), dtype=np.float32)
    index = build_index(vectors)
    scores, rows = index.search(vectors[:2], 50)
    assert rows.shape == (2, 10) and sorted(rows[0]) == list(range(10))
    assert rows[0, 0] != -1 and np.isfinite(scores).all()


def test_search_accepts_strided_float64_queries(catalog):
    index = build_index(catalog[0][:500])
    queries = np.asfortranarray(catalog[0][:4].astype(np.float64))
    np.testing.assert_array_equal(index.search(queries, 5)[1], exact_top_k(catalog[0][:4], catalog[0][:500], 5)[1])


def test_bad_input_says_what_was_wrong_and_what_to_do(catalog):
    index = build_index(catalog[0][:100])
    with pytest.raises(ValueError, match="16-dimensional but the index holds 32"):
        index.search(np.zeros((1, 16), np.float32), 5)
    with pytest.raises(ValueError, match="2-D"):
        index.search(np.zeros(D, np.float32), 5)
    with pytest.raises(ValueError, match="16-dimensional"):
        index.upsert([100], np.zeros((1, 16), np.float32))
    with pytest.raises(ValueError, match=r"continue from size=100 .*got \[101\]"):
        index.upsert([101], np.zeros((1, D), np.float32))  # skips row 100
    with pytest.raises(ValueError, match=r"without gaps.*got \[100, 102\]"):
        index.upsert([100, 102], np.zeros((2, D), np.float32))
    with pytest.raises(ValueError, match=r"in order.*got \[101, 100\]"):
        index.upsert([101, 100], np.zeros((2, D), np.float32))
    with pytest.raises(ValueError, match="more than once"):
        index.upsert([3, 3], np.zeros((2, D), np.float32))
    with pytest.raises(ValueError, match="one vector per row"):
        index.upsert([3, 4], np.zeros((1, D), np.float32))
    with pytest.raises(ValueError, match="integer"):
        index.upsert(np.array([3.0]), np.zeros((1, D), np.float32))
    with pytest.raises(ValueError, match="NaN or inf in rows \\[0\\]"):
        index.upsert([3], np.full((1, D), np.nan, np.float32))
    assert index.size == 100  # a refused upsert changed nothing
    with pytest.raises(ValueError, match="k must be at least 1"):
        index.search(catalog[0][:1], 0)
    with pytest.raises(ValueError, match="nlist must be between"):
        build_index(catalog[0][:2000], exact_max_ads=10, nlist=5000)


def test_ivf_finds_the_best_inner_products_when_ad_norms_vary_widely(catalog):
    # Ads whose lengths differ 4x: by raw inner product the long ones dominate every IVF cell;
    # the MIPS -> L2 transform keeps recall high.
    vectors, centres = catalog
    lengths = np.random.default_rng(5).uniform(0.5, 2.0, len(vectors)).astype(np.float32)
    index = ivf(vectors * lengths[:, None], recall_queries=user_queries(centres))
    assert index.recall["recall"] >= 0.95
    scores, rows = index.search(user_queries(centres, n=3), 10)
    expected = np.einsum("bkd,bd->bk", index.vectors[rows], user_queries(centres, n=3))
    np.testing.assert_allclose(scores, expected, rtol=1e-5)  # reported scores are the inner products
    assert (np.diff(scores, axis=1) <= 0).all()


def test_recall_counts_an_equally_good_duplicate_as_a_hit(catalog):
    # 300 identical ads are the best 300 for this query: any 100 of them is a perfect answer,
    # though exact search and IVF need not pick the same 100.
    vectors, _ = catalog
    best = distinct(3)
    index = ivf(np.concatenate([vectors[:5000], np.tile(best, (300, 1))]))
    assert measure_recall(index, best[None, :], 100) == 1.0
    scores, rows = index.search(best[None, :], 100)
    assert (rows >= 5000).all() and np.allclose(scores, best @ best)
