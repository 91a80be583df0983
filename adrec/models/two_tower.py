"""The two-tower model: S = U . V + b, with U from the user tower and V from the ad tower."""

from __future__ import annotations

import torch
from torch import nn

from adrec.features import FeatureMap
from adrec.models.towers import EmbeddingMLPTower


class TwoTower(nn.Module):
    """Scores (user, ad) pairs by the dot product of their tower outputs.

    ``forward`` returns click logits (B,); sigmoid(logit) is the pCTR. The bias is one
    scalar, so ranking ads for a user by U . V equals ranking them by pCTR.
    """

    def __init__(self, user_tower: nn.Module, ad_tower: nn.Module) -> None:
        super().__init__()
        self.user_tower = user_tower
        self.ad_tower = ad_tower
        self.logit_bias = nn.Parameter(torch.zeros(()))

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        user = self.user_tower(features)  # (B, D)
        ad = self.ad_tower(features)  # (B, D)
        return (user * ad).sum(dim=-1) + self.logit_bias


def build_two_tower(
    feature_map: FeatureMap,
    embedding_dim: int,
    hidden_dims: list[int],
    output_dim: int,
    oov_dropout: float = 0.0,
) -> TwoTower:
    """Size both towers from ``feature_map``: user + context features on one side, ad features on the other."""

    if not (feature_map.names("user") and feature_map.names("ad")):
        raise ValueError(
            "the two-tower model needs user and ad features, and this dataset has "
            f"user={feature_map.names('user')} ad={feature_map.names('ad')}: map user_id and ad_id in data.events.columns"
        )

    def tower(groups: tuple[str, ...]) -> EmbeddingMLPTower:
        def names(kind: str) -> list[str]:
            return [n for g in groups for n in feature_map.names(g, kind)]

        return EmbeddingMLPTower(
            {n: feature_map.cardinality(n) for n in names("categorical") + names("bucket")},
            {n: feature_map.cardinality(n) for n in names("sequence")},
            embedding_dim,
            hidden_dims,
            output_dim,
            dense=names("dense"),
            oov_dropout=oov_dropout,
        )

    return TwoTower(tower(("user", "context")), tower(("ad",)))
