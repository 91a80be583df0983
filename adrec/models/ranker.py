"""The ranking model: DCN-v2 over every feature, with DIN-style target attention over the history.

Two towers meet only in a dot product, so they cannot learn crosses between user and ad
features (this user's device x that advertiser). The ranker sees all features at once:
    x0 = [embeddings of every categorical/bucket feature, pooled token bags, dense values,
          attention-pooled history against the candidate ad]
    cross layers (Wang et al., WWW 2021):  x_{l+1} = x0 * (W_l x_l + b_l) + x_l
    then an MLP to one logit (the "stacked" DCN-v2),
    plus, with ``wide``, a linear term: one learned weight per feature value, summed (logistic
    regression on one-hot features), which carries small logs while the deep part learns.
Target attention (Zhou et al., KDD 2018) weighs each clicked ad by its relevance to the candidate:
history items share the candidate's embedding tables (ad_id, and e.g. category for
history_category), so "clicked something like this" is learned once.
"""

from __future__ import annotations

import torch
from torch import nn

from adrec.features import PAD, FeatureMap
from adrec.models.towers import mlp
from adrec.models.two_tower import is_behaviour


class TargetAttention(nn.Module):
    """Softmax over the history of an MLP score of (candidate, item, candidate * item, candidate - item)."""

    def __init__(self, dim: int, hidden: int = 32) -> None:
        super().__init__()
        self.score = mlp(4 * dim, [hidden], 1)

    def forward(self, candidate: torch.Tensor, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """candidate (B, E), items (B, L, E), mask (B, L) -> (B, E); an empty history gives zeros."""
        query = candidate.unsqueeze(1).expand_as(items)
        logits = self.score(torch.cat([query, items, query * items, query - items], dim=-1)).squeeze(-1)  # (B, L)
        weights = torch.softmax(logits.masked_fill(~mask, -1e9), dim=1) * mask
        return (weights.unsqueeze(-1) * items).sum(1)


class CrossNetwork(nn.Module):
    """DCN-v2 cross layers: x_{l+1} = x0 * (W x_l + b) + x_l, (B, D) -> (B, D)."""

    def __init__(self, dim: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


class DCNRanker(nn.Module):
    """pCTR logits (B,) from every feature of an example.

    categorical: {name: cardinality}, inputs (B,) int64. bags: {name: cardinality}, inputs (B, L)
    pooled as means (text tokens). dense: names of (B,) float inputs. history: {name: the
    categorical feature whose table it shares}, for position-aligned click sequences (B, L).
    """

    def __init__(
        self,
        categorical: dict[str, int],
        bags: dict[str, int],
        dense: list[str],
        history: dict[str, str],
        embedding_dim: int,
        cross_layers: int,
        hidden_dims: list[int],
        wide: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.config = {
            "categorical": dict(categorical),
            "bags": dict(bags),
            "dense": list(dense),
            "history": dict(history),
            "embedding_dim": embedding_dim,
            "cross_layers": cross_layers,
            "hidden_dims": list(hidden_dims),
            "wide": wide,
            "dropout": dropout,
        }
        self.embeddings = nn.ModuleDict({n: nn.Embedding(c, embedding_dim, padding_idx=PAD) for n, c in categorical.items()})
        self.bags = nn.ModuleDict({n: nn.EmbeddingBag(c, embedding_dim, mode="mean", padding_idx=PAD) for n, c in bags.items()})
        self.dense = list(dense)
        self.history = dict(history)
        self.attention = TargetAttention(embedding_dim) if history else None
        width = embedding_dim * (len(categorical) + len(bags) + bool(history)) + len(dense)
        self.cross = CrossNetwork(width, cross_layers)
        self.dropout = nn.Dropout(dropout)
        self.deep = mlp(width, hidden_dims, 1)
        # The wide part: a weight per categorical value, and per dense value.
        self.wide = nn.ModuleDict({n: nn.Embedding(c, 1, padding_idx=PAD) for n, c in categorical.items()}) if wide else None
        self.wide_dense = nn.Linear(len(dense), 1, bias=False) if wide and dense else None
        if self.wide is not None:
            for weight in self.wide.values():  # start as the deep part alone; N(0, 1) per feature would swamp it
                nn.init.zeros_(weight.weight)

    @property
    def feature_names(self) -> list[str]:
        return list(self.embeddings) + list(self.bags) + list(self.history) + self.dense

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [embedding(features[name]) for name, embedding in self.embeddings.items()]
        parts += [bag(features[name]) for name, bag in self.bags.items()]
        if self.attention is not None:
            parts.append(self._attend(features))
        dense = [features[name].float().unsqueeze(-1) for name in self.dense]
        logit = self.deep(self.dropout(self.cross(torch.cat(parts + dense, dim=-1)))).squeeze(-1)
        if self.wide is not None:
            logit = logit + sum(weight(features[name]).squeeze(-1) for name, weight in self.wide.items())
        if self.wide_dense is not None:
            logit = logit + self.wide_dense(torch.cat(dense, dim=-1)).squeeze(-1)
        return logit

    def _attend(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The candidate (sum of its shared tables' embeddings) attends over the clicked ads."""
        tables = [self.embeddings[table] for table in self.history.values()]
        candidate = sum(table(features[name]) for name, table in zip(self.history.values(), tables))
        items = sum(table(features[name]) for name, table in zip(self.history, tables))
        mask = features[next(iter(self.history))] != PAD
        return self.attention(candidate, items, mask)


def build_dcn(
    feature_map: FeatureMap,
    *,
    embedding_dim: int,
    cross_layers: int,
    hidden_dims: list[int],
    target_attention: bool,
    wide: bool,
    dropout: float,
) -> DCNRanker:
    """Size the ranker from ``feature_map``: every group's features, histories attending when their tables exist.

    The options are conf/model/dcn.yaml's, which states each (no defaults here)."""
    specs = feature_map.features
    categorical = {s.name: feature_map.cardinality(s.name) for s in specs if s.kind in ("categorical", "bucket")}
    history = {}
    if target_attention:
        for s in specs:
            # history -> ad_id, history_<attribute> -> <attribute>: the same vocabulary, so one table.
            shared = "ad_id" if s.name == "history" else s.name.removeprefix("history_")
            if s.kind == "sequence" and is_behaviour(s.name) and shared in categorical:
                history[s.name] = shared
        if "history" not in history:
            history = {}  # attributes alone have no candidate-aligned anchor
    bags = {s.name: feature_map.cardinality(s.name) for s in specs if s.kind == "sequence" and s.name not in history}
    dense = [s.name for s in specs if s.kind == "dense"]
    return DCNRanker(categorical, bags, dense, history, embedding_dim, cross_layers, hidden_dims, wide, dropout)
