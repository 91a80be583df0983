"""Feature towers: embeddings of categorical ids, pooled id lists and the behaviour sequence, then an MLP.

The same class builds the user (query) tower and the ad tower; they differ only in
which features they read, which comes from the feature map, and in the user tower's
behaviour-sequence encoder (adrec.models.sequence).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from adrec.features import OOV, PAD
from adrec.models.sequence import EncoderOptions, encoder_options


def mlp(input_dim: int, hidden_dims: list[int], output_dim: int) -> nn.Sequential:
    """Linear-ReLU layers ending in a plain Linear to ``output_dim``."""
    layers: list[nn.Module] = []
    for width in hidden_dims:
        layers += [nn.Linear(input_dim, width), nn.ReLU()]
        input_dim = width
    layers.append(nn.Linear(input_dim, output_dim))
    return nn.Sequential(*layers)


def _drop_clicks(items: torch.Tensor, mask: torch.Tensor, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Hide a random ``share`` of the clicks, keeping the rest in order at the front (the encoders
    read a real prefix, newest first). items: (B, L, E), mask: (B, L) -> the same shapes."""
    keep = mask & (torch.rand(mask.shape, device=mask.device) >= share)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept positions first, in order
    return items.gather(1, order.unsqueeze(-1).expand_as(items)), keep.gather(1, order)


class EmbeddingMLPTower(nn.Module):
    """Concatenate embeddings of categorical features, pooled id lists, the encoded behaviour
    sequence and dense values; apply an MLP.

    categorical: {feature name: vocabulary cardinality}, each input (B,) int64.
    sequences: {feature name: vocabulary cardinality}, each input (B, L) int64 padded with PAD,
        mean-pooled as bags (text tokens).
    behaviour: {feature name: cardinality} of position-aligned click sequences (``history`` and
        ``history_<attribute>``), each (B, L); their embeddings are summed per position and read
        by ``encoder``: sequence-encoder options (adrec.models.sequence), or their stored form
        ``{"kind": mlp|cnn|gru|attention, ...options}``; the mean (mlp) when None.
    dense: feature names, each input (B,) float32.
    oov_dropout: share of training values of each categorical feature replaced by OOV, so every
        OOV row learns what "unknown" means: a new user or ad, a missing attribute or context.
    history_dropout: share of training clicks of the behaviour sequence hidden (as padding), so the
        tower learns from every subset of a history, not its exact set (Mult-DAE's input dropout).
    normalize, temperature: the output is L2-normalised when ``normalize`` and divided by
        sqrt(temperature), so a dot product of two towers' outputs is cos / temperature.
    sparse: id tables produce sparse gradients (only the rows a batch touched), for tables too
        big to update densely; train them with ``adrec.train.optim.build_optimizer``.
    score_column: one more output column, so that a dot product of two towers adds a per-ad bias:
        ``"bias:<feature>"`` appends a learned scalar per id of that categorical feature (the ad
        tower: b_ad, the ad's popularity beyond its embedding), ``"one"`` a constant 1 (the user
        tower). U . V then equals u . v + b_ad, so retrieval indexes and serving need no change.
    Output: (B, output_dim), or (B, output_dim + 1) with a ``score_column``.
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
        behaviour: dict[str, int] | None = None,
        encoder: EncoderOptions | Mapping | None = None,
        max_len: int = 0,
        normalize: bool = False,
        temperature: float = 1.0,
        sparse: bool = False,
        score_column: str | None = None,
        history_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        behaviour = dict(behaviour or {})
        encoder = encoder_options(encoder or {"kind": "mlp"})
        # Constructor arguments travel with the weights, so a tower rebuilds without the training config.
        self.config = {
            "categorical": dict(categorical),
            "sequences": dict(sequences),
            "embedding_dim": embedding_dim,
            "hidden_dims": list(hidden_dims),
            "output_dim": output_dim,
            "dense": list(dense or []),
            "oov_dropout": oov_dropout,
            "behaviour": behaviour,
            "encoder": encoder.describe(),
            "max_len": max_len,
            "normalize": normalize,
            "temperature": temperature,
            "sparse": sparse,
            "score_column": score_column,
            "history_dropout": history_dropout,
        }
        self.embeddings = nn.ModuleDict({name: nn.Embedding(card, embedding_dim, sparse=sparse) for name, card in categorical.items()})
        # EmbeddingBag with padding_idx leaves PAD out of the mean; an empty sequence pools to zeros.
        self.pools = nn.ModuleDict(
            {name: nn.EmbeddingBag(card, embedding_dim, mode="mean", padding_idx=PAD, sparse=sparse) for name, card in sequences.items()}
        )
        self.behaviour = nn.ModuleDict({name: nn.Embedding(card, embedding_dim, padding_idx=PAD, sparse=sparse) for name, card in behaviour.items()})
        self.sequence_encoder = encoder.build(embedding_dim, max_len) if behaviour else None
        self.dense = list(dense or [])
        width = embedding_dim * (len(categorical) + len(sequences) + bool(behaviour)) + len(self.dense)
        self.mlp = mlp(width, hidden_dims, output_dim)
        self.oov_dropout = oov_dropout
        self.normalize = normalize
        self.scale = temperature**-0.5
        self.history_dropout = history_dropout
        self.score_column = score_column
        self.id_bias = None
        if score_column and score_column != "one":
            feature = score_column.removeprefix("bias:")
            if not score_column.startswith("bias:") or feature not in categorical:
                raise ValueError(f"score_column={score_column!r}: use 'one' or 'bias:<categorical feature>' (of {sorted(categorical)})")
            self.id_bias = nn.Embedding(categorical[feature], 1, sparse=sparse)
            nn.init.zeros_(self.id_bias.weight)

    @property
    def width(self) -> int:
        """Output columns: ``output_dim``, plus one with a ``score_column``."""
        return self.config["output_dim"] + bool(self.score_column)

    @property
    def feature_names(self) -> list[str]:
        return list(self.embeddings) + list(self.pools) + list(self.behaviour) + self.dense

    def _hide(self, ids: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.oov_dropout > 0):
            return ids
        hidden = torch.rand(ids.shape, device=ids.device) < self.oov_dropout
        return torch.where(hidden, torch.full_like(ids, OOV), ids)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [emb(self._hide(features[name])) for name, emb in self.embeddings.items()]
        parts += [pool(features[name]) for name, pool in self.pools.items()]
        if self.sequence_encoder is not None:
            parts.append(self._encode_behaviour(features))
        parts += [features[name].float().unsqueeze(-1) for name in self.dense]
        out = self.mlp(torch.cat(parts, dim=-1))
        if self.normalize:
            out = nn.functional.normalize(out, dim=-1)
        out = out * self.scale
        if self.score_column == "one":
            return torch.cat([out, torch.ones_like(out[:, :1])], dim=-1)
        if self.id_bias is not None:
            feature = self.score_column.removeprefix("bias:")
            return torch.cat([out, self.id_bias(features[feature])], dim=-1)
        return out

    def _encode_behaviour(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum the aligned sequences' embeddings per click, mask PAD, encode: (B, E)."""
        first = next(iter(self.behaviour))
        mask = features[first] != PAD  # (B, L)
        items = sum(embedding(features[name]) for name, embedding in self.behaviour.items())  # (B, L, E)
        if self.training and self.history_dropout > 0:
            items, mask = _drop_clicks(items, mask, self.history_dropout)
        return self.sequence_encoder(items, mask)
