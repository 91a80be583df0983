"""Canonicalise and validate rows: every row is kept or set aside with a reason, never dropped.

A source's columns are mapped to adrec's roles (``event_id``, ``ts``, ``user_id``, ``ad_id``,
``event``, ``impression_id``, ``label``, ``true_pctr``) and its feature columns are cast to
their declared kind. The first broken rule names the row's ``reason``:

    malformed_row          a text line that did not parse (its text is kept in raw_line)
    missing_<role>         a required id or timestamp is null or empty
    bad_ts                 a timestamp that does not parse; ts_out_of_range: outside the configured range
    unknown_event          an event type other than impression, click, conversion
    missing_impression_id  a click or conversion that names no impression
    bad_label              a label that is not a finite number
    bad_<feature>          a numeric feature that is not a number; nonfinite_<feature>: NaN or inf
    oversized_<column>     a string longer than max_string_length
    duplicate_event_id     an event_id seen before (set by ``mark_duplicates``)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from adrec.data import schema
from adrec.data.sources import RAW_LINE
from adrec.features import NUMBER

REASON = "reason"
ID_ROLES = ("event_id", "user_id", "ad_id", "impression_id")
NONFINITE = r"^\s*[-+]?(nan|inf|infinity)\s*$"
TIME_UNITS = {"s": 1000, "ms": 1, "us": 1e-3, "ns": 1e-6}


@dataclass
class Rules:
    """What a valid row of one source looks like."""

    columns: dict[str, str | None]  # role -> source column (None: the source has none)
    features: dict[str, str] = field(default_factory=dict)  # column -> kind: categorical | numeric | text
    min_ts_ms: int = 946_684_800_000  # 2000-01-01
    max_ts_ms: int = 4_102_444_800_000  # 2100-01-01
    time_unit: str = "s"  # for numeric time columns
    time_format: str = "%Y-%m-%dT%H:%M:%S"  # for string time columns that are not numbers
    max_string_length: int = 1024

    def role(self, name: str) -> str | None:
        return self.columns.get(name)


class Reasons:
    """Collects the first reason each row breaks."""

    def __init__(self, n: int) -> None:
        self.values = np.full(n, None, dtype=object)

    def mark(self, mask, reason: str) -> None:
        mask = np.asarray(mask, dtype=bool)
        self.values[mask & (self.values == None)] = reason  # noqa: E711 (elementwise on object array)

    def array(self) -> pa.Array:
        return pa.array(self.values, pa.string())


def _numpy(array) -> np.ndarray:
    return np.asarray(pc.fill_null(array, False).to_numpy(zero_copy_only=False), dtype=bool)


def _blank(column) -> np.ndarray:
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return _numpy(pc.or_kleene(pc.is_null(column), pc.equal(pc.utf8_trim_whitespace(column), "")))
    return _numpy(pc.is_null(column))


def parse_number(column) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """Any column -> (float64 values with null where missing or bad, ill-typed mask, non-finite mask)."""
    if pa.types.is_floating(column.type) or pa.types.is_integer(column.type):
        values = pc.cast(column, pa.float64())
        finite = pc.is_finite(values)
        return pc.if_else(finite, values, None), np.zeros(len(column), bool), ~_numpy(pc.or_kleene(finite, pc.is_null(values)))
    text = pc.cast(column, pa.string())
    number = _numpy(pc.match_substring_regex(text, NUMBER))
    nonfinite = _numpy(pc.match_substring_regex(text, NONFINITE, ignore_case=True))
    values = pc.cast(pc.if_else(pa.array(number), pc.utf8_trim_whitespace(text), pa.scalar(None, pa.string())), pa.float64())
    return values, ~number & ~nonfinite & ~_blank(text), nonfinite


def parse_time(column, rules: Rules) -> tuple[pa.Array, np.ndarray]:
    """Any time column -> (int64 epoch milliseconds, null where missing or bad; mask of unparseable)."""
    if pa.types.is_timestamp(column.type):
        return pc.cast(pc.cast(column, pa.timestamp("ms", tz=column.type.tz)), pa.int64()), np.zeros(len(column), bool)
    if pa.types.is_date(column.type):
        return pc.cast(pc.cast(column, pa.timestamp("ms")), pa.int64()), np.zeros(len(column), bool)
    values, ill_typed, nonfinite = parse_number(column)
    millis = pc.cast(pc.round(pc.multiply(values, TIME_UNITS[rules.time_unit])), pa.int64())
    if pa.types.is_string(column.type):
        parsed = pc.cast(pc.strptime(column, format=rules.time_format, unit="ms", error_is_null=True), pa.int64())
        millis = pc.coalesce(millis, parsed)
    bad = (ill_typed | nonfinite) & _numpy(pc.is_null(millis))
    return millis, bad


def canonicalize(batch: pa.Table, rules: Rules) -> pa.Table:
    """Source rows -> canonical role columns, typed feature columns, and ``reason`` (null when valid)."""
    n = batch.num_rows
    reasons = Reasons(n)
    if RAW_LINE in batch.column_names:
        reasons.mark(_numpy(pc.is_valid(batch[RAW_LINE])), "malformed_row")
    out: dict[str, pa.Array] = {}

    for role in ID_ROLES:
        if rules.role(role):
            out[role] = pc.cast(batch[rules.role(role)], pa.string())
            if role != "impression_id":
                reasons.mark(_blank(out[role]), f"missing_{role}")
    if rules.role("ts"):
        source = batch[rules.role("ts")]
        reasons.mark(_blank(source), "missing_ts")
        out["ts"], bad = parse_time(source, rules)
        reasons.mark(bad, "bad_ts")
        ts = pc.fill_null(out["ts"], rules.min_ts_ms).to_numpy(zero_copy_only=False)
        reasons.mark((ts < rules.min_ts_ms) | (ts > rules.max_ts_ms), "ts_out_of_range")
    if rules.role("event"):
        out["event"] = pc.utf8_lower(pc.cast(batch[rules.role("event")], pa.string()))
        reasons.mark(~_numpy(pc.is_in(out["event"], value_set=pa.array(schema.EVENT_TYPES))), "unknown_event")
        follows = _numpy(pc.not_equal(out["event"], "impression"))
        missing = _blank(out["impression_id"]) if "impression_id" in out else np.ones(n, bool)
        reasons.mark(follows & missing, "missing_impression_id")
    if rules.role("label"):
        out["label"], ill_typed, nonfinite = parse_number(batch[rules.role("label")])
        reasons.mark(ill_typed | nonfinite | _blank(batch[rules.role("label")]), "bad_label")
    if rules.role("true_pctr"):
        out["true_pctr"] = pc.cast(batch[rules.role("true_pctr")], pa.float32())

    for name, kind in rules.features.items():
        column = batch[name]
        if kind == "numeric":
            out[name], ill_typed, nonfinite = parse_number(column)
            reasons.mark(ill_typed, f"bad_{name}")
            reasons.mark(nonfinite, f"nonfinite_{name}")
        elif pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            out[name] = pc.cast(column, pa.list_(pa.string()))
        else:
            out[name] = pc.cast(column, pa.string())
    for name, column in out.items():
        if pa.types.is_string(column.type):
            reasons.mark(_numpy(pc.greater(pc.utf8_length(column), rules.max_string_length)), f"oversized_{name}")

    out[REASON] = reasons.array()
    if RAW_LINE in batch.column_names:
        out[RAW_LINE] = batch[RAW_LINE]
    return pa.table(out)


def mark_duplicates(batch: pa.Table) -> pa.Table:
    """Within a block holding every copy of its event_ids: keep the first valid copy, mark the rest."""
    reasons = batch[REASON].to_numpy(zero_copy_only=False).astype(object)
    ids = batch["event_id"].to_numpy(zero_copy_only=False)
    order = np.flatnonzero(_numpy(pc.is_null(batch[REASON])))
    _, first = np.unique(ids[order], return_index=True)
    duplicate = np.zeros(len(ids), bool)
    duplicate[order] = True
    duplicate[order[first]] = False
    reasons[duplicate] = "duplicate_event_id"
    return batch.set_column(batch.schema.get_field_index(REASON), REASON, pa.array(reasons, pa.string()))


def valid_rows(batch: pa.Table) -> pa.Table:
    keep = batch.filter(pc.is_null(batch[REASON]))
    return keep.drop_columns([c for c in (REASON, RAW_LINE) if c in keep.column_names])


def invalid_rows(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_valid(batch[REASON]))
