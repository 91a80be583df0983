"""Row validation: every row is kept or set aside with a reason, never dropped silently."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from adrec.data import schema

REASON = "reason"


def _blank(column: pa.ChunkedArray) -> np.ndarray:
    """True where a string column is null or empty."""
    empty = pc.equal(pc.utf8_length(column), 0) if pa.types.is_string(column.type) else pc.is_null(column)
    return pc.or_kleene(pc.is_null(column), empty).to_numpy(zero_copy_only=False).astype(bool)


def event_reasons(batch: pa.Table, min_ts_ms: int, max_ts_ms: int) -> np.ndarray:
    """(N,) object array: why each event row is invalid, or None when it is valid.

    The first broken rule wins, checked in a fixed order so reports are stable.
    """
    n = batch.num_rows
    reasons = np.full(n, None, dtype=object)

    def mark(mask: np.ndarray, reason: str) -> None:
        reasons[mask & (reasons == None)] = reason  # noqa: E711 (elementwise on object array)

    for name in schema.EVENTS_REQUIRED:
        mark(_blank(batch[name]), f"missing_{name}")
    event = batch["event"]
    mark(~pc.is_in(event, value_set=pa.array(schema.EVENT_TYPES)).to_numpy(zero_copy_only=False).astype(bool), "unknown_event")
    follows = pc.not_equal(event, "impression").to_numpy(zero_copy_only=False)
    if "impression_id" in batch.column_names:
        mark(np.asarray(follows, dtype=bool) & _blank(batch["impression_id"]), "missing_impression_id")
    else:
        mark(np.asarray(follows, dtype=bool), "missing_impression_id")
    ts = pc.cast(batch["ts"], pa.int64()).to_numpy(zero_copy_only=False)
    mark((ts < min_ts_ms) | (ts > max_ts_ms), "ts_out_of_range")
    return reasons


def tag_invalid(batch: pa.Table, min_ts_ms: int, max_ts_ms: int) -> pa.Table:
    """Append the ``reason`` column (null on valid rows) to an event batch."""
    return batch.append_column(REASON, pa.array(event_reasons(batch, min_ts_ms, max_ts_ms), pa.string()))


def valid_rows(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch[REASON])).drop_columns([REASON])


def invalid_rows(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_valid(batch[REASON]))
