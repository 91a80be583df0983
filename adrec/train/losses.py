"""Training losses: pointwise BCE for pCTR, a full or sampled softmax for retrieval.

A catalog small enough to score whole every step (``full_softmax_max_ads``) gets the exact
softmax over every ad: sampled softmax only approximates it, and on small catalogs it is the
one that wins (Klenitskiy & Vasilev, RecSys 2023). Larger catalogs use the sampled one.

The sampled softmax treats each clicked row of a batch as a query whose positive is its own ad and
whose negatives are the batch's other ads (plus optional uniform draws from the catalog).
In-batch ads are sampled by impression frequency, so popular ads are over-represented as
negatives; subtracting log q (the logQ correction of Yi et al., RecSys 2019) removes that bias.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from adrec.models.components import ConfigError, instantiate, target_of


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """``model.loss``: the training objective, bce_weight * BCE + softmax_weight * in-batch softmax.

    conf/model/*.yaml name it ``_target_: adrec.train.losses.LossConfig``; these defaults apply to
    the options a section leaves out (two_tower.yaml states every one, so each can be overridden).
    """

    bce_weight: float = 1.0  # pointwise BCE on impressions: the pCTR
    softmax_weight: float = 0.0  # in-batch sampled softmax over the batch's ads: retrieval
    logq_correction: bool = True  # subtract log(sampling probability) of each in-batch candidate
    remove_accidental_hits: bool = True  # a candidate that is the positive's own ad is not a negative
    uniform_negatives: int = 0  # extra negatives drawn uniformly from the ad catalog per batch
    full_softmax_max_ads: int = 0  # catalogs of at most this many ads: the softmax over all of them, not sampled

    def __post_init__(self) -> None:
        if self.bce_weight < 0 or self.softmax_weight < 0 or self.bce_weight + self.softmax_weight == 0:
            raise ValueError(f"model.loss weights must be >= 0 and not both 0, got bce_weight={self.bce_weight} softmax_weight={self.softmax_weight}")
        if self.uniform_negatives < 0 or self.full_softmax_max_ads < 0:
            raise ValueError(
                f"model.loss.uniform_negatives and full_softmax_max_ads must be >= 0, got {self.uniform_negatives}, {self.full_softmax_max_ads}"
            )

    @classmethod
    def from_dict(cls, options: Mapping | LossConfig | None) -> LossConfig:
        """The loss a model config's ``loss`` section sets (its ``_target_`` may be left out), or ``options``
        itself when already one. Raises ConfigError naming an unknown option or a value of the wrong type."""
        if isinstance(options, cls):
            return options
        config = instantiate({"_target_": target_of(cls), **(options or {})}, "model.loss")
        if not isinstance(config, cls):
            raise ConfigError(f"model.loss._target_ must be {target_of(cls)}, not {options['_target_']!r}")
        return config


def in_batch_softmax(
    user: torch.Tensor,
    ad: torch.Tensor,
    ad_ids: torch.Tensor,
    positive: torch.Tensor,
    log_q: torch.Tensor | None = None,
    remove_accidental_hits: bool = True,
) -> torch.Tensor:
    """Mean cross-entropy of each positive row's own ad against every candidate ad.

    user: (B, D) query embeddings; positive: (B,) bool, the rows that are queries.
    ad: (C, D) candidate embeddings, C >= B, whose first B rows are the batch's own ads.
    ad_ids: (C,) int ids of the candidates; log_q: (C,) log sampling probability of each.
    Returns a scalar; zero (with a graph) when the batch has no positive.
    """
    rows = torch.nonzero(positive, as_tuple=True)[0]  # (P,) each query's target column
    if len(rows) == 0:
        return ad.sum() * 0.0
    logits = user[rows] @ ad.T  # (P, C)
    if log_q is not None:
        logits = logits - log_q.unsqueeze(0)
    if remove_accidental_hits:
        same_ad = ad_ids[rows].unsqueeze(1) == ad_ids.unsqueeze(0)
        same_ad[torch.arange(len(rows), device=rows.device), rows] = False
        logits = logits.masked_fill(same_ad, torch.finfo(logits.dtype).min)
    return nn.functional.cross_entropy(logits, rows)


def full_softmax(user: torch.Tensor, catalog: torch.Tensor, target_row: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each positive row's ad against every ad of the catalog.

    user: (B, D); catalog: (A, D), every ad's embedding; target_row: (B,) the catalog row of each
    row's ad, -1 where it has none (an id shared by several rare ads); positive: (B,) bool.
    Returns a scalar; zero (with a graph) when no positive row has a catalog row.
    """
    rows = torch.nonzero(positive & (target_row >= 0), as_tuple=True)[0]
    if len(rows) == 0:
        return catalog.sum() * 0.0
    return nn.functional.cross_entropy(user[rows] @ catalog.T, target_row[rows])


def catalog_rows_of_ids(catalog_ids: torch.Tensor, cardinality: int) -> torch.Tensor:
    """(cardinality,) the catalog row of each ad id, -1 for ids with no row or with several (OOV). catalog_ids: (A,)."""
    counts = torch.bincount(catalog_ids, minlength=cardinality)
    rows = torch.full((cardinality,), -1, dtype=torch.long, device=catalog_ids.device)
    rows[catalog_ids] = torch.arange(len(catalog_ids), device=catalog_ids.device)
    return torch.where(counts == 1, rows, torch.full_like(rows, -1))


def candidate_log_q(ad_ids: torch.Tensor, log_frequency: torch.Tensor, batch_rows: int, catalog_size: int, uniform: int) -> torch.Tensor:
    """log q of each candidate: log(B * p(ad)) for the B in-batch ads, log(M / A) for M uniform draws. (C,)"""
    in_batch = log_frequency[ad_ids[:batch_rows]] + torch.log(torch.tensor(float(batch_rows)))
    drawn = torch.full((uniform,), float(torch.log(torch.tensor(uniform / max(catalog_size, 1)))), device=ad_ids.device)
    return torch.cat([in_batch, drawn])
