"""Pseudonymisation: user ids replaced by a keyed hash at ingestion, before anything is written.

HMAC-SHA256 with a secret key: the same id always maps to the same pseudonym (so histories
and vocabularies still work), and without the key a pseudonym cannot be linked back.
Serve applies the same function to incoming user ids, with the same key.
"""

from __future__ import annotations

import hashlib
import hmac
import os

import pyarrow as pa
import pyarrow.compute as pc

KEY_ENV = "ADREC_PSEUDONYM_KEY"


def pseudonym_key(configured: str | None) -> bytes:
    """The key from config, else from the environment; an error when neither is set."""
    key = configured or os.environ.get(KEY_ENV)
    if not key:
        raise ValueError(f"data.pseudonymize is on but no key is set: set data.pseudonym_key or the {KEY_ENV} environment variable")
    return key.encode()


def pseudonymize(values: pa.Array | pa.ChunkedArray, key: bytes) -> pa.Array:
    """(N,) ids -> (N,) 'p' + 24 hex characters of HMAC-SHA256(key, id); nulls stay null."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    values = pc.cast(values, pa.string())
    unique = pc.unique(values.drop_null())
    mapped = pa.array(["p" + hmac.new(key, v.encode(), hashlib.sha256).hexdigest()[:24] for v in unique.to_pylist()], pa.string())
    return mapped.take(pc.index_in(values, value_set=unique))
