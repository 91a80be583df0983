"""Validation by ranking: each epoch, validation users rank the whole catalog as evaluation will.

Selecting retrieval models on the training loss or on pointwise AUC picks the wrong epoch: what
evaluation measures is Recall@K / NDCG@K of a full ranking. ``RankingValidation`` scores exactly
that on the validation split, with the evaluator's own code (adrec.eval.evaluate): each user's
query is its profile plus its training history, its training items are excluded, and its
validation positives are relevant.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from adrec.eval.evaluate import UserRankingTask, user_queries
from adrec.features import FeatureMap
from adrec.inference import embed


class RankingValidation:
    """val_recall@K and val_ndcg@K of a two-tower model over ``prepared``'s catalog, for at most ``users`` validation users."""

    def __init__(self, prepared: str, k: int, users: int, feature_map: FeatureMap) -> None:
        folder = Path(prepared)
        self.k, self.feature_map = k, feature_map
        self.catalog = pq.read_table(folder / "ads.parquet")
        self.task = UserRankingTask.from_prepared(
            folder, self.catalog["raw_ad_id"].combine_chunks(), target="validation", seen=("train",), limit=users
        )
        if not len(self.task.users):
            raise ValueError(f"trainer.validation_ranking_k: {folder}/validation has no user with a positive outside training to rank for")
        validation = pq.read_table(folder / "validation")
        self.validation = validation.take(pc.sort_indices(validation, [("user_key", "ascending")]))
        self.train = pq.read_table(folder / "train", columns=["user_key", "raw_ad_id", "label", "ts"])

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """{val_recall@K, val_ndcg@K, val_ranking_users} of ``model`` (a bare TwoTower) as it is now."""
        # The evaluator builds its queries on the CPU; a GPU model is copied there for this pass.
        on_cpu = next(model.parameters()).device.type == "cpu"
        ranker = model if on_cpu else copy.deepcopy(model).cpu()
        was_training = ranker.training
        ranker.eval()
        try:
            user = user_queries(ranker, self.feature_map, self.validation, self.train, self.task.users, self.catalog).numpy()  # (Q, D)
            ads = embed(ranker.ad_tower, self.catalog).numpy()  # (A, D)
        finally:
            ranker.train(was_training)
        metrics = self.task.metrics(lambda rows: user[rows] @ ads.T, [self.k])
        return {f"val_{name}@{self.k}": metrics[f"{name}@{self.k}"] for name in ("recall", "ndcg")} | {"val_ranking_users": len(self.task.users)}
