"""Behaviour-sequence encoders: the user's recent clicks, (B, L, E) -> (B, E).

Each kind has an options dataclass, which a config names by ``_target_``
(conf/model/user_encoder/<kind>.yaml) and which holds the kind's defaults:
    mlp        MeanEncoderOptions       masked mean of the item embeddings (the tower's MLP follows)
    cnn        ConvEncoderOptions       1-D convolutions over neighbouring clicks, then a masked max-pool
    gru        GRUEncoderOptions        a GRU read from the oldest click to the newest; its last state
    attention  AttentionEncoderOptions  a transformer encoder with position embeddings, read at a [CLS] slot
A tower stores its encoder as ``options.describe()``, ``{"kind": <kind>, **options}``: artifacts
name the encoder by kind from this fixed set (ENCODERS), so loading one imports nothing it names.

Histories are stored most recent first and right-padded with PAD; ``mask`` (B, L) is True on
real clicks. Every encoder maps an empty history to a learned or zero vector, never NaN.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import nn

from adrec.models.components import ConfigError, build_options


def masked_mean(items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, E), (B, L) -> (B, E); an empty row gives zeros."""
    weights = mask.unsqueeze(-1).to(items.dtype)
    return (items * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class MeanEncoder(nn.Module):
    def forward(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(items, mask)


class ConvEncoder(nn.Module):
    """Convolutions of widths ``kernel_sizes`` over the sequence, max-pooled over real positions."""

    def __init__(self, dim: int, kernel_sizes: list[int], channels: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(dim, channels, k, padding=k // 2) for k in kernel_sizes)
        self.project = nn.Linear(channels * len(kernel_sizes), dim)

    def forward(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = items.transpose(1, 2)  # (B, E, L)
        length = items.shape[1]
        pooled = []
        for conv in self.convs:
            y = torch.relu(conv(x))[:, :, :length]  # even kernels pad one extra step
            y = y.masked_fill(~mask.unsqueeze(1), float("-inf")).amax(dim=2)
            pooled.append(torch.where(mask.any(1, keepdim=True), y, torch.zeros_like(y)))
        return self.project(torch.cat(pooled, dim=-1))


class GRUEncoder(nn.Module):
    """A GRU over the clicks from oldest to newest; the state after the newest is the summary."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gru = nn.GRU(dim, hidden, batch_first=True)
        self.project = nn.Linear(hidden, dim)

    def forward(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lengths = mask.sum(1)
        # Stored newest first: flip the real part of each row so the GRU ends on the newest click.
        position = torch.arange(items.shape[1], device=items.device)
        reverse = (lengths.unsqueeze(1) - 1 - position).clamp(min=0)
        ordered = items.gather(1, reverse.unsqueeze(-1).expand_as(items))
        packed = nn.utils.rnn.pack_padded_sequence(ordered, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        _, last = self.gru(packed)  # (1, B, H)
        summary = self.project(last[0])
        return torch.where((lengths > 0).unsqueeze(1), summary, torch.zeros_like(summary))


class AttentionEncoder(nn.Module):
    """Self-attention over the clicks plus a [CLS] slot that is never masked (so empty rows stay finite)."""

    def __init__(self, dim: int, max_len: int, heads: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Embedding(max_len + 1, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cls.expand(items.shape[0], -1, -1), items], dim=1)  # (B, 1 + L, E)
        x = x + self.position(torch.arange(x.shape[1], device=x.device))
        keep = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        return self.encoder(x, src_key_padding_mask=~keep)[:, 0]


@dataclass(frozen=True, kw_only=True)
class EncoderOptions:
    """The options of one kind of encoder; ``build`` makes the (B, L, dim) + (B, L) -> (B, dim) module."""

    kind: ClassVar[str]

    def build(self, dim: int, max_len: int) -> nn.Module:
        raise NotImplementedError

    def describe(self) -> dict:
        """What an artifact stores: ``{"kind": ..., **options}`` (JSON: tuples as lists)."""
        return {"kind": self.kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}}


@dataclass(frozen=True, kw_only=True)
class MeanEncoderOptions(EncoderOptions):
    kind: ClassVar[str] = "mlp"

    def build(self, dim: int, max_len: int) -> nn.Module:
        return MeanEncoder()


@dataclass(frozen=True, kw_only=True)
class ConvEncoderOptions(EncoderOptions):
    kind: ClassVar[str] = "cnn"
    kernel_sizes: tuple[int, ...] = (2, 3)  # one convolution per width
    channels: int = 32  # per convolution

    def build(self, dim: int, max_len: int) -> nn.Module:
        return ConvEncoder(dim, list(self.kernel_sizes), self.channels)


@dataclass(frozen=True, kw_only=True)
class GRUEncoderOptions(EncoderOptions):
    kind: ClassVar[str] = "gru"
    hidden: int = 32  # the GRU's state size

    def build(self, dim: int, max_len: int) -> nn.Module:
        return GRUEncoder(dim, self.hidden)


@dataclass(frozen=True, kw_only=True)
class AttentionEncoderOptions(EncoderOptions):
    kind: ClassVar[str] = "attention"
    heads: int = 2  # must divide the embedding dimension
    layers: int = 1
    dropout: float = 0.1

    def build(self, dim: int, max_len: int) -> nn.Module:
        return AttentionEncoder(dim, max_len, self.heads, self.layers, self.dropout)


ENCODERS: dict[str, type[EncoderOptions]] = {
    options.kind: options for options in (MeanEncoderOptions, ConvEncoderOptions, GRUEncoderOptions, AttentionEncoderOptions)
}


def encoder_options(encoder: EncoderOptions | Mapping) -> EncoderOptions:
    """``encoder`` itself, or the options a stored ``{"kind": ..., **options}`` describes (``describe``'s inverse)."""
    if isinstance(encoder, EncoderOptions):
        return encoder
    values = dict(encoder)
    kind = values.pop("kind", None)
    if kind not in ENCODERS:
        raise ConfigError(f"user encoder kind {kind!r} is not one of {', '.join(ENCODERS)}")
    return build_options(ENCODERS[kind], values, "encoder")
