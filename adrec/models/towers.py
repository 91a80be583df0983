"""Feature towers: embeddings of categorical ids and pooled id sequences, then an MLP.

The same class builds the user (query) tower and the ad tower; they differ only in
which features they read, which comes from the feature map.
"""

from __future__ import annotations

import torch
from torch import nn

from adrec.features import OOV, PAD


def mlp(input_dim: int, hidden_dims: list[int], output_dim: int) -> nn.Sequential:
    """Linear-ReLU layers ending in a plain Linear to ``output_dim``."""
    layers: list[nn.Module] = []
    for width in hidden_dims:
        layers += [nn.Linear(input_dim, width), nn.ReLU()]
        input_dim = width
    layers.append(nn.Linear(input_dim, output_dim))
    return nn.Sequential(*layers)


class EmbeddingMLPTower(nn.Module):
    """Concatenate embeddings of categorical features, mean-pooled sequences and dense values; apply an MLP.

    categorical: {feature name: vocabulary cardinality}, each input (B,) int64.
    sequences: {feature name: vocabulary cardinality}, each input (B, L) int64 padded with PAD.
    dense: feature names, each input (B,) float32.
    oov_dropout: share of training values of each categorical feature replaced by OOV, so every
        OOV row learns what "unknown" means: a new user or ad, a missing attribute or context.
    Output: (B, output_dim).
    """

    def __init__(
        self,
        categorical: dict[str, int],
        sequences: dict[str, int],
        embedding_dim: int,
        hidden_dims: list[int],
        output_dim: int,
        dense: list[str] | None = None,
        oov_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        # Constructor arguments travel with the weights, so a tower rebuilds without the training config.
        self.config = {
            "categorical": dict(categorical),
            "sequences": dict(sequences),
            "embedding_dim": embedding_dim,
            "hidden_dims": list(hidden_dims),
            "output_dim": output_dim,
            "dense": list(dense or []),
            "oov_dropout": oov_dropout,
        }
        self.embeddings = nn.ModuleDict({name: nn.Embedding(card, embedding_dim) for name, card in categorical.items()})
        # EmbeddingBag with padding_idx leaves PAD out of the mean; an empty sequence pools to zeros.
        self.pools = nn.ModuleDict(
            {name: nn.EmbeddingBag(card, embedding_dim, mode="mean", padding_idx=PAD) for name, card in sequences.items()}
        )
        self.dense = list(dense or [])
        self.mlp = mlp(embedding_dim * (len(categorical) + len(sequences)) + len(self.dense), hidden_dims, output_dim)
        self.oov_dropout = oov_dropout

    @property
    def feature_names(self) -> list[str]:
        return list(self.embeddings) + list(self.pools) + self.dense

    def _hide(self, ids: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.oov_dropout > 0):
            return ids
        hidden = torch.rand(ids.shape, device=ids.device) < self.oov_dropout
        return torch.where(hidden, torch.full_like(ids, OOV), ids)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [emb(self._hide(features[name])) for name, emb in self.embeddings.items()]
        parts += [pool(features[name]) for name, pool in self.pools.items()]
        parts += [features[name].float().unsqueeze(-1) for name in self.dense]
        return self.mlp(torch.cat(parts, dim=-1))
