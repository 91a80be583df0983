"""The feature map: vocabularies and feature specs, written by preparation, read by
training, evaluation and Serve.

Every categorical value becomes an integer index: 0 pads lists, 1 is out-of-vocabulary
(unseen, rare or missing), known values start at 2. The same ``FeatureMap.encode`` turns
a Parquet batch during preparation and a request at serving time into those indices,
so training and serving cannot drift apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PAD, OOV = 0, 1
FORMAT = "adrec.feature_map/1"


@dataclass
class Vocabulary:
    """Known values of one categorical column, most frequent first."""

    values: list[str]
    min_count: int = 1
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
    def fit(cls, counts: dict[str, int], min_count: int) -> "Vocabulary":
        """Keep values seen at least ``min_count`` times, ordered by count then value."""
        kept = [(v, c) for v, c in counts.items() if c >= min_count and v is not None]
        kept.sort(key=lambda vc: (-vc[1], vc[0]))
        return cls(values=[v for v, _ in kept], min_count=min_count)


@dataclass(frozen=True)
class FeatureSpec:
    """One model input. ``group`` is the tower it feeds: user, context or ad."""

    name: str
    group: str  # "user" | "context" | "ad"
    kind: str  # "categorical" | "sequence" (fixed-length list of indices)
    vocabulary: str  # name of the vocabulary it is encoded with
    max_len: int = 1


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
        return self.vocabularies[self.spec(name).vocabulary].cardinality

    def encode(self, table: pa.Table) -> dict[str, np.ndarray]:
        """Encode every feature column present in ``table``.

        Returns (N,) int64 arrays for categorical features and (N, max_len) int64 arrays,
        padded with PAD, for sequences; a sequence also yields ``<name>_len`` (N,).
        """
        out = {}
        for feature in self.features:
            if feature.name not in table.column_names:
                continue
            vocab = self.vocabularies[feature.vocabulary]
            column = table[feature.name]
            if feature.kind == "categorical":
                out[feature.name] = vocab.encode(column)
            else:
                out[feature.name], out[f"{feature.name}_len"] = encode_sequence(column, vocab, feature.max_len)
        return out

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "features": [vars(f) for f in self.features],
            "vocabularies": {k: {"min_count": v.min_count, "values": v.values} for k, v in self.vocabularies.items()},
            "metadata": self.metadata,
        }

    @classmethod
    def from_json(cls, data: dict) -> "FeatureMap":
        if data.get("format") != FORMAT:
            raise ValueError(f"not an adrec feature map: format is {data.get('format')!r}, expected {FORMAT!r}")
        return cls(
            features=[FeatureSpec(**f) for f in data["features"]],
            vocabularies={k: Vocabulary(values=v["values"], min_count=v["min_count"]) for k, v in data["vocabularies"].items()},
            metadata=data.get("metadata", {}),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> "FeatureMap":
        return cls.from_json(json.loads(Path(path).read_text()))


def encode_sequence(column: pa.Array | pa.ChunkedArray, vocab: Vocabulary, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(N,) lists of strings -> ((N, max_len) int64 indices, right-padded; (N,) lengths).

    Lists longer than ``max_len`` keep their first ``max_len`` items (histories are
    stored most recent first, so the oldest are dropped). Null lists are empty.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    column = pc.fill_null(column, pa.scalar([], column.type))
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    ids = vocab.encode(pc.list_flatten(column))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    kept = np.minimum(lengths, max_len)
    position = np.arange(max_len)
    valid = position[None, :] < kept[:, None]
    out = np.full((len(lengths), max_len), PAD, dtype=np.int64)
    out[valid] = ids[(starts[:, None] + position[None, :])[valid]]
    return out, kept
