"""Turning encoded rows into tower inputs and embeddings; shared by evaluation, export and Serve."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from torch import nn


def column_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(N,) ints -> (N,); (N,) equal-length int lists -> (N, L)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type) or pa.types.is_fixed_size_list(column.type):
        return np.stack(column.to_numpy(zero_copy_only=False)).astype(np.int64) if len(column) else np.empty((0, 0), np.int64)
    return column.to_numpy(zero_copy_only=False)


def to_features(batch: dict[str, np.ndarray] | pa.Table, names: list[str]) -> dict[str, torch.Tensor]:
    """Select model inputs ``names`` from a numpy dict or an Arrow table: ids as int64, dense values as float32."""
    columns = {n: column_to_numpy(batch[n]) for n in names} if isinstance(batch, pa.Table) else {n: np.asarray(batch[n]) for n in names}
    return {n: torch.from_numpy(as_model_dtype(v)) for n, v in columns.items()}


def as_model_dtype(values: np.ndarray) -> np.ndarray:
    """Floats stay float32 (dense features); everything else becomes int64 ids."""
    return values.astype(np.float32) if np.issubdtype(values.dtype, np.floating) else values.astype(np.int64)


@torch.no_grad()
def embed(tower: nn.Module, rows: pa.Table, batch_size: int = 65_536) -> torch.Tensor:
    """Tower outputs for every row of an encoded table (ads.parquet or users.parquet): (N, D)."""
    names = tower.feature_names
    parts = [tower(to_features(rows.slice(start, batch_size), names)) for start in range(0, rows.num_rows, batch_size)]
    return torch.cat(parts) if parts else torch.empty(0, tower.width)


def catalog_lookups(catalog: pa.Table) -> dict[str, tuple[pa.Array, pa.Array]]:
    """{attribute: (ad ids, raw values)} from an ads.parquet's ``raw_<attribute>`` columns, for history features."""
    return {
        name.removeprefix("raw_"): (catalog["raw_ad_id"].combine_chunks(), catalog[name].combine_chunks())
        for name in catalog.column_names
        if name.startswith("raw_") and name not in ("raw_ad_id", "raw_campaign_id")
    }
