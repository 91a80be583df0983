"""Ad-embedding index for serving: exact inner-product top-k for small catalogs, FAISS IVF above.

Rows are stable positions: row i is the i-th ad ever added, so the caller keeps one
row -> ad id table and never renumbers it. An IVF index is approximate, so its
recall@k against exact search is measured at every build and kept on ``.recall``;
a deployment can log the figure it serves with, and ``measure_recall`` re-measures
after upserts.

Not locked: one thread at a time may call ``search`` or ``upsert`` (as one asyncio
Serve replica does). The only global state touched is faiss's OpenMP thread count,
and only when ``build_index(threads=...)`` asks for it.
"""

from __future__ import annotations

import logging
import math
import time

# faiss's loader reports every instruction set it tries at INFO; Ray's logging would print them all.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

# faiss's k-means warns below 39 training points per centroid: fewer leave centroids poorly placed.
MIN_POINTS_PER_LIST = 39


def as_matrix(array: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    """Any array-like -> C-contiguous float32 (N, D), the layout faiss needs.

    Raises ValueError naming ``name`` when it is not 2-D, or not ``dim`` wide when ``dim`` is given.
    """
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D); got shape {array.shape}. Pass one vector as v[None, :].")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(
            f"{name} are {array.shape[1]}-dimensional but the index holds {dim}-dimensional vectors; "
            f"pass (N, {dim}) embeddings from the model version the index was built from."
        )
    return array


def check_finite(vectors: np.ndarray, name: str) -> None:
    """Refuse NaN or inf in (N, D) ``vectors``: one such ad would win or poison every inner product."""
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise ValueError(f"{name} hold NaN or inf in rows {np.flatnonzero(bad)[:5].tolist()}; fix the embeddings before indexing them.")


def check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be at least 1; got {k}.")


def exact_top_k(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """queries (B, D), vectors (N, D) float32 -> (scores (B, k') float32, rows (B, k') int64)
    by inner product, best first; k' = min(k, N)."""
    check_k(k)
    vectors = as_matrix(vectors, "vectors")
    queries = as_matrix(queries, "queries", vectors.shape[1])
    # numpy's BLAS forms the (B, N) scores and torch.topk picks the best k. On 2 cores against
    # 1M x 32 ads: 1 query 5.7 ms, 64 queries 140 ms. All-numpy (argpartition + argsort) took
    # 14 / 756 ms (argpartition is single-threaded); all-torch 6.3 / 185 ms. The scores come
    # out of numpy freshly allocated, so read-only inputs (memory maps, Arrow) need no copy.
    scores = torch.from_numpy(queries @ vectors.T)
    best, rows = torch.topk(scores, min(k, len(vectors)), dim=1)
    return best.numpy(), rows.numpy()


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """found (B, k1), exact (B, k) int rows -> mean over queries of |found ∩ exact| / k.

    -1 entries in ``found`` (IVF padding) are ignored; a row found twice counts once.
    """
    found, exact = np.asarray(found), np.asarray(exact)
    if found.ndim != 2 or exact.ndim != 2 or len(found) != len(exact) or len(found) == 0:
        raise ValueError(f"found and exact must be (B, k) with the same B >= 1; got {found.shape} and {exact.shape}.")
    if exact.shape[1] == 0:
        raise ValueError("exact has no columns: recall against an empty top-k is undefined.")
    hits = [np.intersect1d(f[f >= 0], e).size for f, e in zip(found, exact)]
    return float(np.mean(hits) / exact.shape[1])


class AdIndex:
    """Inner-product top-k over ad vectors whose rows are stable positions (row i = the i-th ad ever added).

    Build with ``build_index``. ``kind`` is "exact" or "ivf". ``recall`` is the dict
    ``build_index`` measured for IVF ({"k", "recall", "queries", "nprobe", "nlist",
    "train_points", "build_s"}) and None for exact, which is right by construction.
    """

    def __init__(self, vectors: np.ndarray, ivf: faiss.IndexIVFFlat | None = None, recall: dict | None = None, radius: float = 0.0) -> None:
        # (capacity, D) float32; rows [:size] are live and the rest is room to append into,
        # doubled when full so a stream of single-ad upserts costs amortised O(1) copies.
        self._buffer = vectors
        self._size = len(vectors)
        # The IVF index holds its own copy of the vectors, with row numbers as faiss ids;
        # the buffer stays too, for recall measurement and exact fallback.
        self._ivf = ivf
        self._radius = radius  # the IVF's MIPS -> L2 radius (see augment)
        self.kind = "exact" if ivf is None else "ivf"
        self.recall = recall

    @property
    def size(self) -> int:
        return self._size

    @property
    def dim(self) -> int:
        return self._buffer.shape[1]

    @property
    def vectors(self) -> np.ndarray:
        """(size, D) read-only view of the indexed vectors; later upserts may change or detach it."""
        view = self._buffer[: self._size]
        view.flags.writeable = False
        return view

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries (B, D) float32 -> (scores (B, k') float32, rows (B, k') int64), best first; k' = min(k, size).

        For IVF, rows the probed lists could not fill are padded with row -1 and score -inf; callers drop them.
        """
        check_k(k)
        queries = as_matrix(queries, "queries", self.dim)
        if self._ivf is None:
            return exact_top_k(queries, self.vectors, k)
        _, rows = self._ivf.search(with_zero(queries), min(k, self._size))
        # The lists ranked by L2 in the augmented space, which orders as the inner product does;
        # report the inner products themselves (k dot products per query), best first.
        scores = np.einsum("bkd,bd->bk", self._buffer[np.maximum(rows, 0)], queries)
        scores[rows < 0] = -np.inf  # faiss pads unfilled results with id -1
        order = np.argsort(-scores, axis=1, kind="stable")
        return np.take_along_axis(scores, order, 1).astype(np.float32), np.take_along_axis(rows, order, 1)

    def upsert(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """rows (N,) int, vectors (N, D): a row < size replaces that ad's vector; rows from size on append.

        New rows must be exactly size, size + 1, ... in the order given, so rows stay positions.
        For IVF the old entries are removed and the new ones added to the trained lists: no retraining,
        so a catalog that drifts far from the training sample should be rebuilt (watch ``measure_recall``).
        Input is checked before anything changes: a ValueError leaves the index as it was.
        """
        rows = self._check_rows(rows)
        vectors = as_matrix(vectors, "vectors", self.dim)
        if len(vectors) != len(rows):
            raise ValueError(f"got {len(rows)} rows but {len(vectors)} vectors; pass one vector per row.")
        check_finite(vectors, "vectors")
        if len(rows) == 0:
            return
        appended = int((rows >= self._size).sum())
        self._reserve(self._size + appended)
        self._buffer[rows] = vectors
        if self._ivf is not None:
            replaced = rows[rows < self._size]
            if len(replaced):
                self._ivf.remove_ids(replaced)  # scans every list: O(size), a few ms at 1M ads
            self._ivf.add_with_ids(augment(vectors, self._radius), rows)
        self._size += appended

    def _check_rows(self, rows: np.ndarray) -> np.ndarray:
        """rows (N,) -> int64 (N,), or ValueError saying which rows are wrong and what to pass instead."""
        rows = np.asarray(rows)
        if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
            raise ValueError(f"rows must be a 1-D integer array (N,); got dtype {rows.dtype} and shape {rows.shape}.")
        rows = rows.astype(np.int64)
        if (rows < 0).any():
            raise ValueError(f"rows must be >= 0; got {rows[rows < 0][:5].tolist()}. Rows are index positions, not ad ids.")
        unique, counts = np.unique(rows, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"rows {unique[counts > 1][:5].tolist()} appear more than once; pass each ad once per upsert.")
        new = rows[rows >= self._size]
        if not np.array_equal(new, np.arange(self._size, self._size + len(new))):
            raise ValueError(
                f"new rows must continue from size={self._size} without gaps, in order ({self._size}, {self._size + 1}, ...); "
                f"got {new[:5].tolist()}. Give each new ad the next free row, or rebuild with build_index to renumber."
            )
        return rows

    def _reserve(self, needed: int) -> None:
        """Make room for ``needed`` rows, at least doubling the capacity when it grows."""
        if needed <= len(self._buffer):
            return
        grown = np.empty((max(needed, 2 * len(self._buffer)), self.dim), dtype=np.float32)
        grown[: self._size] = self._buffer[: self._size]
        self._buffer = grown


def measure_recall(index: AdIndex, queries: np.ndarray, k: int) -> float:
    """Recall@k of ``index.search`` against exact search over ``index.vectors`` for queries (Q, D).

    Ties count as hits: a found ad scoring at least the exact k-th score is a right answer, since
    exact search itself picks arbitrarily among equal scores (identical ads embed identically).
    """
    queries = as_matrix(queries, "queries", index.dim)
    found_scores, found = index.search(queries, k)
    kth = exact_top_k(queries, index.vectors, k)[0][:, -1:]  # (Q, 1)
    tolerance = 1e-5 * np.maximum(np.abs(kth), 1.0)
    hits = ((found >= 0) & (found_scores >= kth - tolerance)).sum(axis=1)
    return float(np.mean(np.minimum(hits, k) / min(k, index.size)))


def default_nlist(num_ads: int, train_points: int) -> int:
    """About 4 * sqrt(N) lists, fewer when the training sample cannot give each list 39 points."""
    return max(1, min(round(4 * math.sqrt(num_ads)), train_points // MIN_POINTS_PER_LIST))


def augment(vectors: np.ndarray, radius: float) -> np.ndarray:
    """(N, D) -> (N, D + 1): [x, sqrt(R^2 - |x|^2)], so every ad lies on the sphere of radius R.

    Then |q' - x'|^2 = |q|^2 + R^2 - 2 q.x for q' = [q, 0]: the nearest ad in L2 is the best by
    inner product (Bachrach et al., RecSys 2014). IVF's lists are L2 cells, so with the raw inner
    product a few long vectors dominate every cell and recall suffers (0.77 against 0.998 on
    the 1M-ad benchmark catalog at nprobe 32). An ad added later that is longer than R gets 0
    (its rank among others is then approximate; rebuild when many are).
    """
    extra = np.sqrt(np.maximum(radius**2 - np.einsum("nd,nd->n", vectors, vectors), 0.0))
    return np.ascontiguousarray(np.hstack([vectors, extra[:, None]]), dtype=np.float32)


def with_zero(queries: np.ndarray) -> np.ndarray:
    """(B, D) -> (B, D + 1) with a zero last coordinate: queries in the augmented space."""
    return np.ascontiguousarray(np.hstack([queries, np.zeros((len(queries), 1), np.float32)]))


def train_ivf(vectors: np.ndarray, nlist: int | None, train_sample: int, rng: np.random.Generator) -> faiss.IndexIVFFlat:
    """k-means over at most ``train_sample`` of the (N, D + 1) augmented vectors -> an empty, trained L2 IVF index."""
    num_ads, dim = vectors.shape
    train_points = min(num_ads, train_sample)
    nlist = default_nlist(num_ads, train_points) if nlist is None else nlist
    if not 1 <= nlist <= train_points:
        raise ValueError(f"nlist must be between 1 and the {train_points} training points; got {nlist}. Leave it None for about 4 * sqrt(N).")
    sample = vectors if train_points == num_ads else vectors[np.sort(rng.choice(num_ads, train_points, replace=False))]
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist, faiss.METRIC_L2)
    ivf.cp.seed = int(rng.integers(2**31))  # faiss's k-means seeds itself; tie it to ours so builds repeat
    ivf.train(sample)
    return ivf


def recall_query_sample(vectors: np.ndarray, queries: np.ndarray | None, max_queries: int, rng: np.random.Generator) -> np.ndarray:
    """(Q, D) queries for measuring recall: a seeded subset of ``queries``, or, without them,
    random ads plus noise at a tenth of the catalog's spread (users sit near ads they like, not on them)."""
    if queries is not None:
        queries = as_matrix(queries, "recall_queries", vectors.shape[1])
        if len(queries) > max_queries:
            queries = queries[np.sort(rng.choice(len(queries), max_queries, replace=False))]
        return queries
    picked = vectors[rng.choice(len(vectors), min(max_queries, len(vectors)), replace=False)]
    noise = rng.standard_normal(picked.shape, dtype=np.float32) * (0.1 * picked.std(axis=0))
    return picked + noise


def build_index(
    vectors: np.ndarray,
    *,
    exact_max_ads: int = 50_000,
    nlist: int | None = None,
    nprobe: int = 32,
    recall_k: int = 100,
    recall_queries: np.ndarray | None = None,
    max_recall_queries: int = 256,
    train_sample: int = 100_000,
    threads: int | None = None,
    seed: int = 0,
) -> AdIndex:
    """vectors (N, D) float32 -> an exact index when N <= exact_max_ads, else IVF.

    For IVF, recall@recall_k against exact search is measured on ``recall_queries`` (Q, D)
    (realistic ones: user embeddings; at most ``max_recall_queries``, a seeded subset when
    more are given) or, without them, on noisy copies of random ads, and stored in ``.recall``.
    ``nlist`` None: about 4 * sqrt(N), at most one list per 39 training points. ``threads``
    sets faiss's process-wide OpenMP thread count. The vectors are copied.
    """
    check_k(recall_k)
    if nprobe < 1:
        raise ValueError(f"nprobe must be at least 1; got {nprobe}.")
    vectors = np.array(as_matrix(vectors, "vectors"), order="C")  # a copy the index owns and appends into
    if len(vectors) == 0 or vectors.shape[1] == 0:
        raise ValueError(f"build_index needs at least one vector of at least one dimension; got shape {vectors.shape}.")
    check_finite(vectors, "vectors")
    if threads is not None:
        faiss.omp_set_num_threads(threads)
    if len(vectors) <= exact_max_ads:
        return AdIndex(vectors)

    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    radius = float(np.sqrt(np.einsum("nd,nd->n", vectors, vectors).max()))
    augmented = augment(vectors, radius)
    ivf = train_ivf(augmented, nlist, train_sample, rng)
    ivf.add_with_ids(augmented, np.arange(len(vectors), dtype=np.int64))
    del augmented
    ivf.nprobe = min(nprobe, ivf.nlist)
    build_s = time.perf_counter() - start

    index = AdIndex(vectors, ivf, radius=radius)
    queries = recall_query_sample(vectors, recall_queries, max_recall_queries, rng)
    k = min(recall_k, len(vectors))
    index.recall = {
        "k": k,
        "recall": measure_recall(index, queries, k),
        "queries": len(queries),
        "nprobe": ivf.nprobe,
        "nlist": ivf.nlist,
        "train_points": min(len(vectors), train_sample),
        "build_s": round(build_s, 3),
    }
    return index
