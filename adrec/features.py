"""The feature map: vocabularies and feature specs, written by preparation, read by
training, evaluation and Serve.

Every categorical value becomes an integer index: 0 pads lists, 1 is out-of-vocabulary
(unseen, rare or missing), known values start at 2. The same ``FeatureMap.encode`` turns
a Parquet batch during preparation and a request at serving time into those indices,
so training and serving cannot drift apart.

Kinds of feature:
    categorical  one id per row, by vocabulary or, for huge id spaces, by hashing buckets
    sequence     a padded list of ids (behaviour history; text as a bag of hashed words)
    bucket       a number's quantile bucket (boundaries fitted on the training split)
    dense        a number as a float, optionally sign(x) * log1p(|x|); missing is 0
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PAD, OOV = 0, 1
NUMBER = r"^\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*$"
FORMAT = "adrec.feature_map/1"


@dataclass
class Vocabulary:
    """Known values of one categorical column, most frequent first."""

    values: list[str]
    min_count: int = 1
    counts: list[int] | None = None  # training occurrences of each value (None in maps from before they were kept)
    oov_count: int = 0  # training occurrences of the values left out (rarer than min_count)
    _value_set: pa.Array | None = field(default=None, repr=False, compare=False)

    @property
    def cardinality(self) -> int:
        """Rows an embedding table needs: known values plus PAD and OOV."""
        return len(self.values) + 2

    def encode(self, array: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """(N,) strings -> (N,) int64 indices; unknown and null values map to OOV."""
        if self._value_set is None:
            self._value_set = pa.array(self.values, pa.string())
        index = pc.index_in(pc.cast(array, pa.string()), value_set=self._value_set)
        return pc.fill_null(pc.add(index, 2), OOV).to_numpy(zero_copy_only=False).astype(np.int64)

    @classmethod
    def fit(cls, counts: dict[str, int], min_count: int) -> Vocabulary:
        """Keep values seen at least ``min_count`` times, ordered by count then value."""
        kept = [(v, c) for v, c in counts.items() if c >= min_count and v is not None]
        kept.sort(key=lambda vc: (-vc[1], vc[0]))
        dropped = sum(c for v, c in counts.items() if c < min_count or v is None)
        return cls(values=[v for v, _ in kept], min_count=min_count, counts=[c for _, c in kept], oov_count=dropped)

    def extend(self, counts: dict[str, int], min_count: int) -> Vocabulary:
        """This vocabulary's values at their own indices, then the new values seen ``min_count`` times
        (by count, then value). A model warm-started across the growth keeps every old row; new
        users and ads get rows of their own instead of sharing OOV."""
        known = set(self.values)
        grown = Vocabulary.fit({v: c for v, c in counts.items() if v not in known}, min_count)
        return Vocabulary(
            values=self.values + grown.values,
            min_count=min_count,
            counts=[counts.get(v, 0) for v in self.values] + grown.counts,
            oov_count=grown.oov_count,
        )

    def frequencies(self) -> np.ndarray | None:
        """(cardinality,) share of training rows per index (PAD 0, OOV the dropped values); None without counts."""
        if self.counts is None:
            return None
        counts = np.array([0, self.oov_count, *self.counts], dtype=np.float64)
        return counts / max(counts.sum(), 1.0)


@dataclass(frozen=True)
class FeatureSpec:
    """One model input. ``group`` is the tower it feeds: user, context or ad."""

    name: str
    group: str  # "user" | "context" | "ad"
    kind: str  # "categorical" | "sequence" | "bucket" | "dense"
    vocabulary: str | None = None  # name of the vocabulary it is encoded with (None when hashed)
    max_len: int = 1
    hash_buckets: int = 0  # > 0: ids are 2 + stable_hash(value) % hash_buckets, no vocabulary
    tokenize: bool = False  # sequence from a string: lower-cased words
    boundaries: tuple[float, ...] | None = None  # bucket: sorted quantile boundaries
    log1p: bool = False  # dense: sign(x) * log1p(|x|)
    source: str | None = None  # input column, when it differs from ``name``

    @property
    def column(self) -> str:
        return self.source or self.name


@dataclass
class FeatureMap:
    features: list[FeatureSpec]
    vocabularies: dict[str, Vocabulary]
    metadata: dict = field(default_factory=dict)

    def spec(self, name: str) -> FeatureSpec:
        for feature in self.features:
            if feature.name == name:
                return feature
        raise KeyError(f"feature {name!r} is not in the feature map; known: {[f.name for f in self.features]}")

    def names(self, group: str, kind: str | None = None) -> list[str]:
        return [f.name for f in self.features if f.group == group and (kind is None or f.kind == kind)]

    def cardinality(self, name: str) -> int:
        """Rows of the embedding table a categorical, sequence or bucket feature needs."""
        spec = self.spec(name)
        if spec.kind == "bucket":
            return len(spec.boundaries) + 3  # PAD, OOV, and len + 1 intervals
        if spec.hash_buckets:
            return spec.hash_buckets + 2
        return self.vocabularies[spec.vocabulary].cardinality

    def encoder(self, spec: FeatureSpec):
        """(N,) values -> (N,) int64 ids for a categorical feature or a sequence's items."""
        if spec.hash_buckets:
            return partial(hash_ids, buckets=spec.hash_buckets)
        return self.vocabularies[spec.vocabulary].encode

    def encode(self, table: pa.Table) -> dict[str, np.ndarray]:
        """Encode every feature whose input column is present in ``table``.

        Returns (N,) int64 arrays for categorical and bucket features, (N,) float32 for
        dense ones, and (N, max_len) int64 arrays, padded with PAD, for sequences; a
        sequence also yields ``<name>_len`` (N,).
        """
        out = {}
        for spec in self.features:
            if spec.column not in table.column_names:
                continue
            column = table[spec.column]
            if spec.kind == "categorical":
                out[spec.name] = self.encoder(spec)(column)
            elif spec.kind == "sequence":
                lists = tokenize(column) if spec.tokenize else column
                out[spec.name], out[f"{spec.name}_len"] = encode_sequence(lists, self.encoder(spec), spec.max_len)
            elif spec.kind == "bucket":
                out[spec.name] = bucketize(column, spec.boundaries)
            else:
                out[spec.name] = dense(column, spec.log1p)
        return out

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "features": [vars(f) for f in self.features],
            "vocabularies": {
                k: {"min_count": v.min_count, "values": v.values, "counts": v.counts, "oov_count": v.oov_count} for k, v in self.vocabularies.items()
            },
            "metadata": self.metadata,
        }

    @classmethod
    def from_json(cls, data: dict) -> FeatureMap:
        if data.get("format") != FORMAT:
            raise ValueError(f"not an adrec feature map: format is {data.get('format')!r}, expected {FORMAT!r}")
        return cls(
            features=[FeatureSpec(**{**f, "boundaries": tuple(f["boundaries"]) if f.get("boundaries") else None}) for f in data["features"]],
            vocabularies={
                k: Vocabulary(values=v["values"], min_count=v["min_count"], counts=v.get("counts"), oov_count=v.get("oov_count", 0))
                for k, v in data["vocabularies"].items()
            },
            metadata=data.get("metadata", {}),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> FeatureMap:
        return cls.from_json(json.loads(Path(path).read_text()))


def encode_sequence(column: pa.Array | pa.ChunkedArray, encode, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(N,) lists of strings -> ((N, max_len) int64 ids, right-padded; (N,) lengths).

    ``encode`` maps (M,) strings to (M,) ids. Lists longer than ``max_len`` keep their first
    ``max_len`` items (histories are stored most recent first, so the oldest are dropped).
    Null lists are empty.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    column = pc.fill_null(column, pa.scalar([], column.type))
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    ids = encode(pc.list_flatten(column))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    kept = np.minimum(lengths, max_len)
    position = np.arange(max_len)
    valid = position[None, :] < kept[:, None]
    out = np.full((len(lengths), max_len), PAD, dtype=np.int64)
    out[valid] = ids[(starts[:, None] + position[None, :])[valid]]
    return out, kept


FNV_OFFSET, FNV_PRIME = np.uint64(14695981039346656037), np.uint64(1099511628211)


def stable_hash(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(N,) strings -> (N,) uint64 FNV-1a hashes of their UTF-8 bytes; the same on every machine and run."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    values = pc.fill_null(pc.cast(values, pa.string()), "")
    n = len(values)
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int32)[values.offset : values.offset + n + 1]
    data = np.frombuffer(values.buffers()[2], dtype=np.uint8) if values.buffers()[2] is not None else np.empty(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    h = np.full(n, FNV_OFFSET, dtype=np.uint64)
    for j in range(int(lengths.max(initial=0))):  # one vectorised step per byte position
        active = lengths > j
        h[active] = (h[active] ^ data[starts[active] + j]) * FNV_PRIME
    return h


def hash_ids(values: pa.Array | pa.ChunkedArray, buckets: int) -> np.ndarray:
    """(N,) strings -> (N,) ids 2 + hash % buckets; null -> OOV."""
    ids = (stable_hash(values) % np.uint64(buckets)).astype(np.int64) + 2
    missing = pc.is_null(values).to_numpy(zero_copy_only=False)
    return np.where(missing, OOV, ids)


def tokenize(column: pa.Array | pa.ChunkedArray) -> pa.ListArray:
    """(N,) strings -> (N,) lists of lower-cased words; list columns pass through."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_list(column.type):
        return column
    words = pc.split_pattern_regex(pc.utf8_lower(pc.fill_null(column, "")), r"[^\w]+")
    flat = pc.list_flatten(words)
    keep = pc.not_equal(flat, "").to_numpy(zero_copy_only=False)
    parent = pc.list_parent_indices(words).to_numpy(zero_copy_only=False)
    counts = np.bincount(parent[keep], minlength=len(words))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), flat.filter(pa.array(keep)))


def as_float(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(N,) numbers or numeric strings -> (N,) float64; anything else is NaN."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        number = pc.fill_null(pc.match_substring_regex(column, NUMBER), False)
        column = pc.if_else(number, pc.utf8_trim_whitespace(column), pa.scalar(None, pa.string()))
    return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)


def bucketize(column: pa.Array | pa.ChunkedArray, boundaries: tuple[float, ...]) -> np.ndarray:
    """(N,) numbers -> (N,) ids 2 + (number of boundaries <= x); null -> OOV."""
    values = as_float(column)
    ids = np.searchsorted(np.asarray(boundaries), values, side="right").astype(np.int64) + 2
    return np.where(np.isnan(values), OOV, ids)


def dense(column: pa.Array | pa.ChunkedArray, log1p: bool) -> np.ndarray:
    """(N,) numbers -> (N,) float32, sign(x) * log1p(|x|) when ``log1p``; null -> 0."""
    values = np.nan_to_num(as_float(column), nan=0.0, posinf=0.0, neginf=0.0)
    if log1p:
        values = np.sign(values) * np.log1p(np.abs(values))
    return values.astype(np.float32)


def lookup_lists(lists: pa.Array | pa.ChunkedArray, keys: pa.Array, values: pa.Array) -> pa.ListArray:
    """Map every item of (N,) lists through ``keys -> values``; unknown items become null (OOV)."""
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    lists = pc.fill_null(lists, pa.scalar([], lists.type))
    mapped = values.take(pc.index_in(pc.list_flatten(lists), value_set=keys))
    offsets = np.concatenate([[0], np.cumsum(pc.list_value_length(lists).to_numpy(zero_copy_only=False))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), mapped)


def add_history_attributes(table: pa.Table, lookups: dict[str, tuple[pa.Array, pa.Array]]) -> pa.Table:
    """Append ``history_<attribute>``: each history ad's attribute (e.g. category), from the catalog.

    lookups: {attribute: (catalog ad ids, their raw attribute values)}. Used by preparation and
    by Serve, so both derive these lists the same way.
    """
    for attribute, (ad_ids, values) in lookups.items():
        table = table.append_column(f"history_{attribute}", lookup_lists(table["history"], ad_ids, values))
    return table
