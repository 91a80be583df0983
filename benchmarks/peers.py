"""The models adrec is compared against, run on adrec's own prepared splits and scored by adrec's evaluator.

Each peer reads exactly the Parquet files preparation wrote (``<prepared>/train``, ``validation``,
``test``, ``ads.parquet``, ``feature_map.json``), so a peer and adrec never see different splits.

Ranking (implicit feedback, per-user full ranking with seen items excluded; scored by
``adrec.eval.evaluate.UserRankingTask``, the code adrec's own evaluation uses):
    mostpop   items by their number of positives
    itemknn   cosine item-item similarity, the k nearest neighbours of each item kept (k tuned)
    ease      Steck 2019's closed form B = I - P / diag(P), P = (X'X + lambda I)^-1 (lambda tuned)
    als, bpr  ``implicit``'s ALS and BPR (factors, regularization, iterations tuned)
CTR (labelled impressions; AUC and logloss by ``adrec.eval.metrics``):
    lr        scikit-learn logistic regression on the one-hot encoded ids and buckets plus the dense values (C tuned)
    lightgbm  LightGBM on the encoded ids (as categoricals) and dense values, early-stopped on validation
Synthetic logs:
    LogisticMF  the generator's own functional form (attribute + own latent vectors, ad and slot biases), the
                well-specified reference for the towers

What each peer fits on: what adrec fits on. adrec trains on train and selects on validation; each
peer fits on train, chooses its hyperparameters on validation (for ranking: relevant = validation
positives, train items excluded) and is scored on test with that fit, its user rows built from
train alone as adrec's queries are (test excludes train and validation items for both).
``--refit`` (``refit=True``) instead refits each ranking and CTR peer on train + validation with
the chosen setting before the test score: more data than adrec learns from, the protocol of
papers that tune then retrain; the results page reports both. LogisticMF always fits on train.

    python benchmarks/peers.py /tmp/adrec-bench-quality/movielens-0/prepared --task ranking
    python benchmarks/peers.py /tmp/adrec-bench-quality/criteo-0-0/prepared --task ctr
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp
import torch
from threadpoolctl import threadpool_limits

from adrec.eval.evaluate import UserRankingTask, catalog_rows
from adrec.eval.metrics import auc, logloss
from adrec.features import FeatureMap

KS = (10,)
SELECT = "recall@10"  # what the ranking peers are tuned on (validation)
THREADS = 2  # the benchmark machines have two cores, shared with adrec's own runs

# user rows (q,) -> scores (q, A) over the catalog
Scorer = Callable[[np.ndarray], np.ndarray]

RANKING_GRIDS: dict[str, list[dict]] = {
    "mostpop": [{}],
    "itemknn": [{"neighbours": k} for k in (10, 20, 50, 100, 200, 500)],
    "ease": [{"l2": l2} for l2 in (50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)],
    "als": [{"factors": f, "regularization": r, "iterations": i} for f, r, i in itertools.product((32, 64, 128), (1.0, 3.0, 10.0, 30.0), (15, 30))],
    "bpr": [{"factors": f, "regularization": r, "iterations": i} for f, r, i in itertools.product((64, 128), (0.001, 0.01), (50, 100))],
}
LR_C = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
LIGHTGBM_LEAVES = (7, 15, 31)


def require_prepared(prepared: Path, files: tuple[str, ...] = ("train", "validation", "test", "feature_map.json")) -> None:
    """Fail with one clear line, not a Parquet traceback, when ``prepared`` is not a prepared folder."""
    missing = [name for name in files if not (prepared / name).exists()]
    if missing:
        raise SystemExit(f"{prepared} is not a prepared folder (no {', '.join(missing)}): run `python jobs/prepare.py ...` for it first")


# --- Ranking ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interactions:
    """Binary user x item matrix of some splits' positives, items in catalog order."""

    matrix: sp.csr_matrix  # (U, A) float32, 1.0 where the user has a positive with the item
    user_keys: np.ndarray  # (U,) ascending int64: row i is user user_keys[i]

    @classmethod
    def from_prepared(cls, prepared: Path, splits: tuple[str, ...], user_keys: np.ndarray, catalog_ids: pa.Array) -> Interactions:
        """The positives of ``splits``, one row per key of ``user_keys`` (ascending), duplicates counted once."""
        table = pa.concat_tables([pq.read_table(prepared / split, columns=["user_key", "raw_ad_id", "label"]) for split in splits])
        table = table.filter(pc.greater(table["label"], 0.5))
        items = catalog_rows(table["raw_ad_id"], catalog_ids)
        users = np.searchsorted(user_keys, table["user_key"].to_numpy())
        known = items >= 0  # a positive of an ad outside the catalog cannot be recommended
        matrix = sp.csr_matrix((np.ones(int(known.sum()), np.float32), (users[known], items[known])), shape=(len(user_keys), len(catalog_ids)))
        matrix.data[:] = 1.0  # csr_matrix sums duplicates
        return cls(matrix=matrix, user_keys=user_keys)

    def rows_of(self, keys: np.ndarray) -> np.ndarray:
        """(Q,) user keys -> (Q,) rows of the matrix (every key must be in ``user_keys``)."""
        return np.searchsorted(self.user_keys, keys)


def fit_mostpop(x: sp.csr_matrix) -> Scorer:
    """Every user gets the items by their number of positives in ``x`` (U, A)."""
    counts = np.asarray(x.sum(axis=0)).ravel()  # (A,)
    return lambda rows: np.broadcast_to(counts, (len(rows), len(counts)))


def fit_itemknn(x: sp.csr_matrix, neighbours: int) -> Scorer:
    """Score(u, j) = sum over the user's items i of cos(i, j), keeping for each target item j only its
    ``neighbours`` most similar items. Dense (A, A): for catalogs up to some 10^4 items."""
    co = (x.T @ x).toarray().astype(np.float64)  # (A, A) co-occurrence counts
    norms = np.sqrt(np.diag(co))
    similarity = co / np.maximum(np.outer(norms, norms), 1e-12)
    np.fill_diagonal(similarity, 0.0)  # an item is not its own neighbour
    if neighbours < similarity.shape[0]:
        weakest = np.argpartition(-similarity, neighbours, axis=0)[neighbours:]  # per column j: all but the top `neighbours`
        np.put_along_axis(similarity, weakest, 0.0, axis=0)
    return lambda rows: np.asarray(x[rows] @ similarity)


def ease_weights(x: sp.csr_matrix, l2: float) -> np.ndarray:
    """EASE's item-item weights B (A, A): argmin ||X - XB||^2 + l2 ||B||^2 with diag(B) = 0, in closed
    form B = I - P diag(1 / diag(P)), P = (X'X + l2 I)^-1 (Steck 2019)."""
    gram = (x.T @ x).toarray().astype(np.float64)
    gram[np.diag_indices_from(gram)] += l2
    p = np.linalg.inv(gram)
    weights = -p / np.diag(p)[None, :]
    np.fill_diagonal(weights, 0.0)
    return weights


def fit_ease(x: sp.csr_matrix, l2: float) -> Scorer:
    """Score = X B, B from ``ease_weights``."""
    weights = ease_weights(x, l2)
    return lambda rows: np.asarray(x[rows] @ weights)


def fit_implicit(x: sp.csr_matrix, kind: str, factors: int, regularization: float, iterations: int, seed: int) -> Scorer:
    """``implicit``'s ALS or BPR (its CPU models) on the binary matrix; score = user . item factors
    (BPR's factors carry its item bias as one more column)."""
    from implicit.cpu.als import AlternatingLeastSquares
    from implicit.cpu.bpr import BayesianPersonalizedRanking

    model_class = AlternatingLeastSquares if kind == "als" else BayesianPersonalizedRanking
    with threadpool_limits(1, "blas"):  # implicit runs its own threads; nested BLAS threads only slow it
        model = model_class(factors=factors, regularization=regularization, iterations=iterations, num_threads=THREADS, random_state=seed)
        model.fit(x, show_progress=False)
    users, items = np.asarray(model.user_factors), np.asarray(model.item_factors)
    return lambda rows: users[rows] @ items.T


def fit_ranking_peer(name: str, x: sp.csr_matrix, params: dict, seed: int) -> Scorer:
    """The scorer of peer ``name`` fitted on ``x`` (U, A) with ``params`` (one point of its grid)."""
    if name == "mostpop":
        return fit_mostpop(x)
    if name == "itemknn":
        return fit_itemknn(x, **params)
    if name == "ease":
        return fit_ease(x, **params)
    if name in ("als", "bpr"):
        return fit_implicit(x, name, **params, seed=seed)
    raise ValueError(f"unknown ranking peer {name!r}; known: {', '.join(RANKING_GRIDS)}")


def score_task(task: UserRankingTask, data: Interactions, scorer: Scorer) -> dict[str, float]:
    """The task's metrics of ``scorer``, whose rows are ``data``'s users."""
    rows = data.rows_of(task.users)
    return task.metrics(lambda chunk: scorer(rows[chunk]), KS)


def ranking_peers(prepared: Path, seed: int, names: tuple[str, ...] = tuple(RANKING_GRIDS), refit: bool = False) -> dict[str, dict]:
    """Each ranking peer tuned on validation (by ``SELECT``) and scored on test, fitted on train (or,
    with ``refit``, refitted on train + validation):
    {name: {"recall@10", "ndcg@10", "hitrate@10", "validation_recall@10", "params", "seconds"}}."""
    require_prepared(prepared, ("train", "validation", "test", "ads.parquet"))
    catalog_ids = pq.read_table(prepared / "ads.parquet", columns=["raw_ad_id"])["raw_ad_id"].combine_chunks()
    keys = np.unique(
        np.concatenate([pq.read_table(prepared / s, columns=["user_key"])["user_key"].to_numpy() for s in ("train", "validation", "test")])
    )
    train = Interactions.from_prepared(prepared, ("train",), keys, catalog_ids)
    fit_on = Interactions.from_prepared(prepared, ("train", "validation"), keys, catalog_ids) if refit else train
    validation_task = UserRankingTask.from_prepared(prepared, catalog_ids, target="validation", seen=("train",))
    test_task = UserRankingTask.from_prepared(prepared, catalog_ids, target="test", seen=("train", "validation"))
    results = {}
    for name in names:
        started = time.time()
        tried = [
            (score_task(validation_task, train, fit_ranking_peer(name, train.matrix, params, seed))[SELECT], params) for params in RANKING_GRIDS[name]
        ]
        best_value, best = max(tried, key=lambda pair: pair[0])  # the first of equals: grids run from small to large
        test = score_task(test_task, fit_on, fit_ranking_peer(name, fit_on.matrix, best, seed))
        results[name] = {**test, f"validation_{SELECT}": best_value, "params": best, "seconds": round(time.time() - started, 1)}
    return results


# --- CTR ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CtrSplits:
    """A prepared folder's splits as frames, with the encoded feature columns by how a peer uses them."""

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    categorical: list[str]  # integer ids: categorical features' vocabulary ids and dense features' quantile buckets
    dense: list[str]  # float values (log1p where the feature map says so)

    @classmethod
    def from_prepared(cls, prepared: Path) -> CtrSplits:
        """Read the splits; the feature map names the columns (sequence features, e.g. histories, are left out)."""
        require_prepared(prepared)
        feature_map = FeatureMap.load(prepared / "feature_map.json")
        categorical = [f.name for f in feature_map.features if f.kind in ("categorical", "bucket")]
        dense = [f.name for f in feature_map.features if f.kind == "dense"]
        read = lambda split: pq.read_table(prepared / split, columns=[*categorical, *dense, "label"]).to_pandas()  # noqa: E731
        return cls(read("train"), read("validation"), read("test"), categorical, dense)

    @property
    def train_and_validation(self) -> pd.DataFrame:
        return pd.concat([self.train, self.validation], ignore_index=True)


def ctr_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    return {"auc": auc(labels, probs), "logloss": logloss(labels, probs)}


def fit_logistic_regression(splits: CtrSplits, fit: pd.DataFrame, c: float):
    """L2 logistic regression on [one-hot(categorical), dense] of ``fit``; returns frame -> (N,) P(click)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import OneHotEncoder

    encoder = OneHotEncoder(handle_unknown="ignore").fit(fit[splits.categorical])

    def design(frame: pd.DataFrame) -> sp.csr_matrix:
        return sp.hstack([encoder.transform(frame[splits.categorical]), frame[splits.dense].to_numpy()]).tocsr()

    model = LogisticRegression(C=c, max_iter=2000).fit(design(fit), fit["label"])
    return lambda frame: model.predict_proba(design(frame))[:, 1]


def logistic_regression(splits: CtrSplits, refit: bool = False) -> dict:
    """C chosen by validation logloss (fit on train; with ``refit``, refitted on train + validation): test AUC, logloss."""
    fits = {c: fit_logistic_regression(splits, splits.train, c) for c in LR_C}
    best_logloss, c = min((logloss(splits.validation["label"], predict(splits.validation)), c) for c, predict in fits.items())
    predict = fit_logistic_regression(splits, splits.train_and_validation, c) if refit else fits[c]
    return {**ctr_metrics(splits.test["label"].to_numpy(), predict(splits.test)), "validation_logloss": best_logloss, "params": {"C": c}}


def lightgbm_params(num_leaves: int, seed: int) -> dict:
    # Settings for a few thousand rows: shallow trees, many rows per leaf and per category, L2 on
    # leaves and on categorical splits; the number of rounds comes from early stopping.
    return {
        "objective": "binary",
        "learning_rate": 0.05,
        "num_leaves": num_leaves,
        "min_data_in_leaf": 50,
        "min_data_per_group": 50,
        "cat_smooth": 10.0,
        "lambda_l2": 1.0,
        "feature_fraction": 0.8,
        "seed": seed,
        "num_threads": THREADS,
        "verbosity": -1,
    }


def lightgbm(splits: CtrSplits, seed: int, refit: bool = False) -> dict:
    """LightGBM with the ids as categoricals: leaves chosen and rounds early-stopped (50 without a
    better validation logloss) on validation; with ``refit``, refitted on train + validation with those rounds."""
    import lightgbm as lgb

    columns = [*splits.categorical, *splits.dense]

    def dataset(frame: pd.DataFrame) -> lgb.Dataset:
        return lgb.Dataset(frame[columns], frame["label"], categorical_feature=splits.categorical, free_raw_data=False)

    tried = []
    for leaves in LIGHTGBM_LEAVES:
        params = lightgbm_params(leaves, seed)
        booster = lgb.train(
            params,
            dataset(splits.train),
            num_boost_round=2000,
            valid_sets=[dataset(splits.validation)],
            callbacks=[lgb.early_stopping(50, verbose=False)],
        )
        tried.append((booster.best_score["valid_0"]["binary_logloss"], leaves, booster.best_iteration, booster))
    best_logloss, leaves, rounds, booster = min(tried, key=lambda fit: fit[:3])
    if refit:
        booster = lgb.train(lightgbm_params(leaves, seed), dataset(splits.train_and_validation), num_boost_round=rounds)
    return {
        **ctr_metrics(splits.test["label"].to_numpy(), booster.predict(splits.test[columns], num_iteration=rounds)),
        "validation_logloss": best_logloss,
        "params": {"num_leaves": leaves, "rounds": rounds},
    }


def ctr_peers(prepared: Path, seed: int, refit: bool = False) -> dict[str, dict]:
    """{"lr": {...}, "lightgbm": {...}}: test AUC and logloss of each, with what was chosen on validation."""
    splits = CtrSplits.from_prepared(prepared)
    return {"lr": logistic_regression(splits, refit), "lightgbm": lightgbm(splits, seed, refit)}


# --- The synthetic log's well-specified reference ------------------------------------------------

# How adrec/data/synthetic.py builds its hidden vectors, as prepared columns: a user's latent interest is
# the sum of its age, gender and region vectors plus its own; an ad's topic is its category's vector plus its own.
USER_PARTS = ("user_id", "age_bucket", "gender", "region")
AD_PARTS = ("ad_id", "category")
MF_COLUMNS = (*USER_PARTS, *AD_PARTS, "slot")


class LogisticMF(torch.nn.Module):
    """The generator's click model (adrec/data/synthetic.py) with every unknown learned:

        logit = bias + <P(user), Q(ad)> + ad_bias[ad] + slot_bias[slot]
        P(user) = age[.] + gender[.] + region[.] + own[user]      Q(ad) = category[.] + own[ad]

    which is ``base + affinity * <u, a> / sqrt(d) + quality[ad] + slot_effect[slot]`` with the scale
    folded into P and Q, (N, d) each. Ids are the prepared (encoded) columns of ``MF_COLUMNS``."""

    def __init__(self, sizes: dict[str, int], rank: int):
        super().__init__()
        self.vectors = torch.nn.ModuleDict({name: torch.nn.Embedding(sizes[name], rank) for name in (*USER_PARTS, *AD_PARTS)})
        self.ad_bias = torch.nn.Embedding(sizes["ad_id"], 1)
        self.slot_bias = torch.nn.Embedding(sizes["slot"], 1)
        self.bias = torch.nn.Parameter(torch.zeros(()))
        for table in self.vectors.values():
            torch.nn.init.normal_(table.weight, std=0.1)
        for table in (self.ad_bias, self.slot_bias):
            torch.nn.init.zeros_(table.weight)

    def part(self, names: tuple[str, ...], ids: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, d): the sum of the ``names`` tables' rows."""
        return torch.stack([self.vectors[name](ids[name]) for name in names]).sum(0)

    def forward(self, ids: dict[str, torch.Tensor]) -> torch.Tensor:
        """{column: (N,) int64} -> (N,) click logits."""
        affinity = (self.part(USER_PARTS, ids) * self.part(AD_PARTS, ids)).sum(-1)
        return self.bias + affinity + self.ad_bias(ids["ad_id"]).squeeze(-1) + self.slot_bias(ids["slot"]).squeeze(-1)

    def penalty(self, ids: dict[str, torch.Tensor]) -> torch.Tensor:
        """() mean squared norm of the rows' own user and ad vectors and ad biases: the generator draws each
        as Gaussian noise, so L2 is their prior. The shared attribute vectors are well determined and go free."""
        own = (self.vectors["user_id"](ids["user_id"]) ** 2).sum(-1) + (self.vectors["ad_id"](ids["ad_id"]) ** 2).sum(-1)
        return (own + self.ad_bias(ids["ad_id"]).squeeze(-1) ** 2).mean()


@dataclass(frozen=True)
class ClickLog:
    """One split's ``MF_COLUMNS`` ids and click labels, as tensors."""

    ids: dict[str, torch.Tensor]  # column -> (N,) int64
    labels: torch.Tensor  # (N,) float32

    @classmethod
    def read(cls, prepared: Path, split: str) -> ClickLog:
        table = pq.read_table(prepared / split, columns=[*MF_COLUMNS, "label"])
        ids = {c: torch.from_numpy(table[c].to_numpy().astype(np.int64)) for c in MF_COLUMNS}
        return cls(ids=ids, labels=torch.from_numpy(table["label"].to_numpy().astype(np.float32)))

    def rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {c: v[index] for c, v in self.ids.items()}

    @torch.no_grad()
    def probabilities(self, model: LogisticMF) -> np.ndarray:
        """(N,) P(click) of every row."""
        return torch.sigmoid(model(self.ids)).numpy()


def fit_logistic_mf(
    train: ClickLog,
    validation: ClickLog,
    sizes: dict[str, int],
    rank: int,
    l2: float,
    seed: int,
    *,
    epochs: int = 40,
    patience: int = 3,
    batch_size: int = 4096,
    lr: float = 0.03,
) -> tuple[LogisticMF, float]:
    """Minibatch Adam on the train split's BCE + ``l2`` * ``LogisticMF.penalty``, stopped after
    ``patience`` epochs without a better validation logloss: (the best epoch's model, its logloss)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = LogisticMF(sizes, rank)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    best, best_state, waited = math.inf, copy.deepcopy(model.state_dict()), 0
    for _ in range(epochs):
        for batch in torch.randperm(len(train.labels), generator=generator).split(batch_size):
            ids = train.rows(batch)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(ids), train.labels[batch]) + l2 * model.penalty(ids)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        current = logloss(validation.labels.numpy(), validation.probabilities(model))
        if current < best:
            best, best_state, waited = current, copy.deepcopy(model.state_dict()), 0
        elif (waited := waited + 1) >= patience:
            break
    model.load_state_dict(best_state)
    return model, best


def well_specified_reference(prepared: Path, rank: int, seed: int, l2_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1), **fit_options) -> dict:
    """LogisticMF fitted on train, its L2 and epochs chosen by validation logloss: test AUC, logloss
    and, when the split carries ``true_pctr`` (a synthetic log), the oracle's AUC and the ratio."""
    require_prepared(prepared)
    torch.set_num_threads(THREADS)
    feature_map = FeatureMap.load(prepared / "feature_map.json")
    sizes = {name: feature_map.cardinality(name) for name in MF_COLUMNS}
    train, validation, test = (ClickLog.read(prepared, split) for split in ("train", "validation", "test"))
    fits = [(*fit_logistic_mf(train, validation, sizes, rank, l2, seed, **fit_options), l2) for l2 in l2_grid]
    model, _, l2 = min(fits, key=lambda fit: fit[1])
    labels = test.labels.numpy()
    result = {**ctr_metrics(labels, test.probabilities(model)), "params": {"l2": l2, "rank": rank}}
    if "true_pctr" in pq.ParquetDataset(prepared / "test").schema.names:
        truth = pq.read_table(prepared / "test", columns=["true_pctr"])["true_pctr"].to_numpy()
        result["oracle_auc"] = auc(labels, truth)
        result["auc_over_oracle"] = result["auc"] / result["oracle_auc"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prepared", type=Path, help="a folder jobs/prepare.py wrote")
    parser.add_argument("--task", choices=["ranking", "ctr", "synthetic"], required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peers", nargs="+", choices=list(RANKING_GRIDS), default=list(RANKING_GRIDS), help="ranking peers to run")
    parser.add_argument("--rank", type=int, default=8, help="synthetic: the generator's latent_dim")
    parser.add_argument("--refit", action="store_true", help="refit ranking and CTR peers on train + validation before the test score")
    args = parser.parse_args()
    if args.task == "ranking":
        result = ranking_peers(args.prepared, args.seed, tuple(args.peers), args.refit)
    elif args.task == "ctr":
        result = ctr_peers(args.prepared, args.seed, args.refit)
    else:
        result = {"reference": well_specified_reference(args.prepared, args.rank, args.seed)}
    json.dump(result, sys.stdout, indent=2, default=lambda v: None if isinstance(v, float) and not math.isfinite(v) else v)
    print()


if __name__ == "__main__":
    main()
