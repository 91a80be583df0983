"""The ranking model: a logistic regression (the wide part) plus DCN-v2 over every feature, with
DIN-style target attention over the history.

Two towers meet only in a dot product, so they cannot learn crosses between user and ad
features (this user's device x that advertiser). The ranker sees all features at once:
    wide     logit_w = b + sum_f w_f[x_f] + v . dense: logistic regression on one-hot
             categorical (and quantile-bucket) features plus the dense values
    deep     x0 = [embeddings of every categorical/bucket feature, pooled token bags, dense values,
                   attention-pooled history against the candidate ad]
             cross layers (Wang et al., WWW 2021):  x_{l+1} = x0 * (W_l x_l + b_l) + x_l
             then an MLP to one logit (the "stacked" DCN-v2)
    logit  = logit_w + logit_deep
With both parts, the deep part's last layer starts at zero, so at initialisation the model *is*
the logistic regression it contains and the deep part learns only the residual the linear model
misses; ``wide_l2`` is the linear model's own L2 (``regularization()``), as strong as a tuned LR's.
Target attention (Zhou et al., KDD 2018) weighs each clicked ad by its relevance to the candidate:
history items share the candidate's embedding tables (ad_id, and e.g. category for
history_category), so "clicked something like this" is learned once.
"""

from __future__ import annotations

import torch
from torch import nn

from adrec.features import OOV, PAD, FeatureMap
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


class WideLinear(nn.Module):
    """Logistic regression on one-hot ids and dense values: (B,) logits.

    categorical: {name: cardinality}, inputs (B,) int64; each value gets one weight (an
    embedding of dim 1), OOV included, as a one-hot encoder fitted on the encoded ids would.
    dense: names of (B,) float inputs, one weight each. Every weight and the bias start at zero.
    """

    def __init__(self, categorical: dict[str, int], dense: list[str]) -> None:
        super().__init__()
        self.tables = nn.ModuleDict({n: nn.Embedding(c, 1, padding_idx=PAD) for n, c in categorical.items()})
        self.dense_names = list(dense)
        self.dense = nn.Linear(len(dense), 1, bias=False) if dense else None
        self.bias = nn.Parameter(torch.zeros(1))
        for parameter in (*self.tables.parameters(), *(self.dense.parameters() if self.dense else ())):
            nn.init.zeros_(parameter)  # N(0, 1) per value would start far from any sensible logit

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        logit = self.bias.expand(len(next(iter(features.values()))))
        for name, table in self.tables.items():
            logit = logit + table(features[name]).squeeze(-1)
        if self.dense is not None:
            logit = logit + self.dense(torch.stack([features[n].float() for n in self.dense_names], dim=-1)).squeeze(-1)
        return logit

    def squared_norm(self) -> torch.Tensor:
        """Sum of squared weights, the bias left out (as logistic regression's L2 leaves the intercept)."""
        weights = [t.weight for t in self.tables.values()] + ([self.dense.weight] if self.dense is not None else [])
        return sum((w.square().sum() for w in weights), torch.zeros(()))


class DCNRanker(nn.Module):
    """pCTR logits (B,) from every feature of an example: the wide part plus the deep part.

    categorical: {name: cardinality}, inputs (B,) int64. bags: {name: cardinality}, inputs (B, L)
    pooled as means (text tokens). dense: names of (B,) float inputs. history: {name: the
    categorical feature whose table it shares}, for position-aligned click sequences (B, L).
    wide: add the logistic regression (WideLinear) over categorical and dense inputs, with L2
    ``wide_l2`` (see ``regularization``). deep: add the cross network and MLP; at least one of the two.
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
        deep: bool = True,
        wide_l2: float = 0.0,
        training_rows: int = 1,
        deep_rows: dict[str, int] | None = None,
        dense_norm: bool = False,
    ) -> None:
        super().__init__()
        if not (wide or deep):
            raise ValueError("DCNRanker needs wide, deep or both: with neither it has nothing to score with")
        if wide_l2 < 0 or training_rows < 1:
            raise ValueError(f"wide_l2={wide_l2} must be >= 0 and training_rows={training_rows} >= 1")
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
            "deep": deep,
            "wide_l2": wide_l2,
            "training_rows": training_rows,
            "deep_rows": dict(deep_rows or {}),
            "dense_norm": dense_norm,
        }
        self.dense = list(dense)
        self.history = dict(history) if deep else {}
        self.bag_names = list(bags)
        self.wide = WideLinear(categorical, dense) if wide else None
        self.wide_l2, self.training_rows = wide_l2, training_rows
        # The deep part reads the first deep_rows[name] ids (the most frequent values: vocabularies
        # are in count order); later, rarer ids read as OOV there, never in the wide part. Its
        # tables keep every row all the same, so a retrained ranker's tables only grow (warm starts
        # load the champion's rows) whatever the new window counted.
        self.deep_rows = {n: min(deep_rows.get(n, c), c) for n, c in categorical.items()} if deep_rows else dict(categorical)
        if deep:
            self._build_deep(categorical, bags, embedding_dim, cross_layers, hidden_dims, dropout)
            self.dense_norm = nn.BatchNorm1d(len(dense)) if dense_norm and dense else None
            if wide:  # the deep part adds to the logistic regression, from exactly nothing at init
                nn.init.zeros_(self.deep[-1].weight)
                nn.init.zeros_(self.deep[-1].bias)
        else:
            self.embeddings = nn.ModuleDict()

    def _build_deep(
        self, categorical: dict[str, int], bags: dict[str, int], embedding_dim: int, cross_layers: int, hidden_dims: list[int], dropout: float
    ) -> None:
        self.embeddings = nn.ModuleDict({n: nn.Embedding(c, embedding_dim, padding_idx=PAD) for n, c in categorical.items()})
        self.bags = nn.ModuleDict({n: nn.EmbeddingBag(c, embedding_dim, mode="mean", padding_idx=PAD) for n, c in bags.items()})
        self.attention = TargetAttention(embedding_dim) if self.history else None
        width = embedding_dim * (len(categorical) + len(bags) + bool(self.history)) + len(self.dense)
        self.cross = CrossNetwork(width, cross_layers)
        self.dropout = nn.Dropout(dropout)
        self.deep = mlp(width, hidden_dims, 1)

    @property
    def feature_names(self) -> list[str]:
        wide = list(self.wide.tables) if self.wide is not None else []
        names = list(self.embeddings) + [n for n in wide if n not in self.embeddings]
        return names + (self.bag_names if self.config["deep"] else []) + list(self.history) + self.dense

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        logit = self.wide(features) if self.wide is not None else 0.0
        if self.config["deep"]:
            logit = logit + self._deep_logit(features)
        return logit

    def regularization(self) -> torch.Tensor:
        """The scalar penalty the training loss adds to its batch mean: wide_l2 * |w_wide|^2 / training_rows.

        scikit-learn's LogisticRegression(C) minimises sum_i logloss_i + |w|^2 / (2 C), i.e. per row
        mean logloss + |w|^2 / (2 C N): wide_l2 = 1 / (2 C) is that LR's strength, whatever N is.
        """
        if self.wide is None or not self.wide_l2:
            return torch.zeros(())
        return self.wide_l2 / self.training_rows * self.wide.squared_norm()

    def _deep_logit(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The DCN-v2 logit (B,): cross layers then the MLP over the concatenated inputs."""
        parts = [embedding(self._deep_ids(name, features[name])) for name, embedding in self.embeddings.items()]
        parts += [bag(features[name]) for name, bag in self.bags.items()]
        if self.attention is not None:
            parts.append(self._attend(features))
        if self.dense:
            dense = torch.stack([features[name].float() for name in self.dense], dim=-1)  # (B, len(dense))
            parts.append(self.dense_norm(dense) if self.dense_norm is not None else dense)
        return self.deep(self.dropout(self.cross(torch.cat(parts, dim=-1)))).squeeze(-1)

    def _deep_ids(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """(B,) or (B, L) ids with those past the deep table's rows (values rarer than it keeps) as OOV."""
        rows = self.deep_rows[name]
        return ids if rows == self.config["categorical"][name] else torch.where(ids < rows, ids, torch.full_like(ids, OOV))

    def _attend(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The candidate (sum of its shared tables' embeddings) attends over the clicked ads."""
        tables = [self.embeddings[table] for table in self.history.values()]
        candidate = sum(table(self._deep_ids(shared, features[shared])) for shared, table in zip(self.history.values(), tables))
        items = sum(table(self._deep_ids(shared, features[name])) for (name, shared), table in zip(self.history.items(), tables))
        mask = features[next(iter(self.history))] != PAD
        return self.attention(candidate, items, mask)


def training_rows(feature_map: FeatureMap) -> int:
    """Rows of the training split, as the vocabularies counted them (each counts every row, nulls and
    rare values included); 1 when no vocabulary kept counts (hashed features only, or an old map)."""
    totals = [sum(v.counts) + v.oov_count for v in feature_map.vocabularies.values() if v.counts is not None]
    return max(totals, default=1) or 1


def deep_table_rows(feature_map: FeatureMap, names: list[str], min_count: int) -> dict[str, int]:
    """{name: ids its deep part reads} for the vocabulary features of ``names`` with values seen fewer
    than ``min_count`` times in training: PAD, OOV and the values before the first rarer one. A
    vocabulary lists its values most frequent first, so these are the values seen that often (a
    vocabulary grown for retraining appends its new values, and the prefix stops at the first rare one).
    ``min_count`` <= 1 cuts nothing: a grown vocabulary's old values, unseen in a retraining window, stay read."""
    rows = {}
    if min_count <= 1:
        return rows
    for name in names:
        spec = feature_map.spec(name)
        counts = feature_map.vocabularies[spec.vocabulary].counts if spec.vocabulary else None
        if counts is not None:
            kept = 2 + next((i for i, count in enumerate(counts) if count < min_count), len(counts))
            if kept < feature_map.cardinality(name):
                rows[name] = kept
    return rows


def build_dcn(
    feature_map: FeatureMap,
    *,
    embedding_dim: int,
    cross_layers: int,
    hidden_dims: list[int],
    target_attention: bool,
    wide: bool,
    deep: bool,
    wide_l2: float,
    deep_min_count: int,
    dense_norm: bool,
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
    return DCNRanker(
        categorical,
        bags,
        dense,
        history,
        embedding_dim,
        cross_layers,
        hidden_dims,
        wide=wide,
        dropout=dropout,
        deep=deep,
        wide_l2=wide_l2,
        training_rows=training_rows(feature_map),
        deep_rows=deep_table_rows(feature_map, list(categorical), deep_min_count),
        dense_norm=dense_norm,
    )
