"""The two-tower model: S = U . V + b, with U from the user tower and V from the ad tower."""

from __future__ import annotations

import torch
from torch import nn

from adrec.features import FeatureMap
from adrec.models.sequence import EncoderOptions
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

    def forward(self, features: dict[str, torch.Tensor], return_embeddings: bool = False, negatives: dict[str, torch.Tensor] | None = None):
        """Click logits (B,); with ``return_embeddings`` also U (B, D) and V (B + M, D), V's last M
        rows from the ad features ``negatives`` (M rows). Training goes through here, not the
        towers, so that DistributedDataParallel sees every forward pass."""
        user = self.user_tower(features)  # (B, D)
        ad = self.ad_tower(features)  # (B, D)
        logits = (user * ad).sum(dim=-1) + self.logit_bias
        if not return_embeddings:
            return logits
        if negatives is not None:
            ad = torch.cat([ad, self.ad_tower(negatives)])
        return logits, user, ad


def is_behaviour(name: str) -> bool:
    """The position-aligned click sequences: ``history`` and ``history_<attribute>``."""
    return name == "history" or name.startswith("history_")


def build_two_tower(
    feature_map: FeatureMap,
    *,
    embedding_dim: int,
    hidden_dims: list[int],
    output_dim: int,
    oov_dropout: float,
    history_dropout: float,
    user_encoder: EncoderOptions,
    normalize: bool,
    temperature: float,
    drop_features: list[str],
    sparse_embeddings: bool,
    item_bias: bool,
) -> TwoTower:
    """Size both towers from ``feature_map``: user + context features on one side, ad features on the other.

    The options are conf/model/two_tower.yaml's, which states each (no defaults here):
    history_dropout: share of a history's clicks hidden in training (see EmbeddingMLPTower).
    user_encoder: the behaviour sequence's encoder (conf/model/user_encoder/, adrec.models.sequence).
    normalize, temperature: U . V becomes cos(U, V) / temperature (see EmbeddingMLPTower).
    drop_features: features the towers leave out, e.g. [user_id] so that users are known only by
        their history and profile (no per-user table to memorise; new users are no different).
    sparse_embeddings: id tables get sparse, row-wise gradients (see EmbeddingMLPTower).
    item_bias: S = U . V + b_ad, a learned scalar per ad id (see EmbeddingMLPTower's score_column):
        popularity the embeddings need not encode, as matrix factorisation's item bias.
    """
    dropped = set(drop_features)
    unknown = dropped - {f.name for f in feature_map.features}
    if unknown:
        raise ValueError(f"model.drop_features names {sorted(unknown)}, which the feature map does not have")

    if not (feature_map.names("user") and feature_map.names("ad")):
        raise ValueError(
            "the two-tower model needs user and ad features, and this dataset has "
            f"user={feature_map.names('user')} ad={feature_map.names('ad')}: map user_id and ad_id in data.events.columns"
        )

    if item_bias and "ad_id" in dropped:
        raise ValueError("model.item_bias needs the ad_id feature, which model.drop_features leaves out")

    def tower(groups: tuple[str, ...], encoder: EncoderOptions | None, score_column: str | None) -> EmbeddingMLPTower:
        def names(kind: str) -> list[str]:
            return [n for g in groups for n in feature_map.names(g, kind) if n not in dropped]

        sequences = names("sequence")
        behaviour = [n for n in sequences if is_behaviour(n)] if encoder else []
        return EmbeddingMLPTower(
            {n: feature_map.cardinality(n) for n in names("categorical") + names("bucket")},
            {n: feature_map.cardinality(n) for n in sequences if n not in behaviour},
            embedding_dim,
            hidden_dims,
            output_dim,
            dense=names("dense"),
            oov_dropout=oov_dropout,
            history_dropout=history_dropout if encoder else 0.0,
            behaviour={n: feature_map.cardinality(n) for n in behaviour},
            encoder=encoder,
            max_len=max((feature_map.spec(n).max_len for n in behaviour), default=0),
            normalize=normalize,
            temperature=temperature,
            sparse=sparse_embeddings,
            score_column=score_column,
        )

    user_column, ad_column = ("one", "bias:ad_id") if item_bias else (None, None)
    return TwoTower(tower(("user", "context"), user_encoder, user_column), tower(("ad",), None, ad_column))
