"""Compaction: feedback segments -> a Parquet partition of the behaviour log (adrec.data.schema.events_schema).

* Exactly once: records are deduplicated by event_id, within the batch and against the
  partitions already written (clients post at least once; a replayed batch adds nothing).
* An impression's log event_id is its token's impression id (request id : ad id), the id its
  clicks name in ``impression_id``; a click whose impression was never posted still proves it
  was served, so its impression row is written from the click's token.
* Attribution: a click or conversion joins its impression when it comes within
  ``attribution_window_s`` of it. Later ones are kept apart in ``late/`` and counted, not lost.
* Context: every field of the request's context that the token carries becomes a string
  column of its rows, named as the request named it. The data config's context columns are
  always written (null when a request left one out), so every partition has the columns
  preparation reads; any other field a token carries follows them, sorted.
* Each impression's model version and propensity (the probability the auction gave it its
  slot) go to ``raw_dir/propensities/``, keyed by impression id, for off-policy (IPS) estimates.
* ``compaction.json`` records how many bytes of each segment were compacted, so the next run
  reads only what was appended since, even from segments still being written. It is saved
  after the partition: a crash in between re-reads records that deduplication then drops.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from adrec.data import schema
from adrec.feedback.log import read_new_records, segments
from adrec.runtime import read_json

PARTITION_PREFIX = "part-feedback-"


def logged_ids(events_dir: Path, late_dir: Path) -> set[str]:
    """event_ids of the feedback partitions (and late events) already written."""
    files = sorted(events_dir.glob(f"{PARTITION_PREFIX}*.parquet")) + sorted(late_dir.glob("*.parquet"))
    return {i for f in files for i in pq.read_table(f, columns=["event_id"])["event_id"].to_pylist()}


def save_offsets(path: Path, offsets: dict[str, int]) -> None:
    """Atomically (a temporary file renamed over the old one), so a crash never leaves half a state."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"offsets": offsets}, indent=1, sort_keys=True))
    os.replace(tmp, path)


def context_of(record: dict, columns: list[str]) -> dict:
    """The served request's context fields. Segments written before tokens carried a context
    dict hold the data config's context columns as the record's own keys."""
    if "context" in record:
        return record["context"] or {}
    return {c: record[c] for c in columns if record.get(c) is not None}


def context_columns(records: list[dict], configured: list[str]) -> list[str]:
    """``configured`` (in order), then every other context field the records carry, sorted."""
    seen = {key for r in records if r.get("context") for key in r["context"]}
    return list(configured) + sorted(seen - set(configured))


def impression_row(record: dict, columns: list[str]) -> dict:
    context = context_of(record, columns)
    return {
        "event_id": record["impression_id"],
        "ts": datetime.fromtimestamp(record["served_ts"], timezone.utc),
        "user_id": record["user_id"],
        "ad_id": record["ad_id"],
        "event": "impression",
        "impression_id": None,
        **{c: context.get(c) for c in columns},
        "true_pctr": None,
    }


def response_row(record: dict, columns: list[str]) -> dict:
    return {
        **impression_row(record, columns),
        "event_id": record["event_id"],
        "ts": datetime.fromtimestamp(record["ts"], timezone.utc),
        "event": record["event"],
        "impression_id": record["impression_id"],
    }


PROPENSITIES = pa.schema(
    [
        pa.field("impression_id", pa.string(), nullable=False),
        pa.field("version", pa.string()),
        pa.field("propensity", pa.float64()),
    ]
)


def served_row(record: dict) -> dict:
    """How an impression was chosen: the model version and the probability it had (for IPS)."""
    return {"impression_id": record["impression_id"], "version": record.get("version"), "propensity": record.get("propensity", 1.0)}


def split_rows(records: list[dict], already: set[str], window_s: float, columns: list[str]) -> tuple[list[dict], list[dict], list[dict], dict]:
    """(log rows, late rows, propensity rows, counts) from deduplicated records; rows have the context ``columns``."""
    rows, late, served, seen = [], [], [], set(already)
    counts = {"records": len(records), "duplicates": 0, "impressions": 0, "clicks": 0, "conversions": 0, "late": 0}
    for record in records:
        key = record["impression_id"] if record["event"] == "impression" else record["event_id"]
        if key in seen:
            counts["duplicates"] += 1
            continue
        seen.add(key)
        if record["event"] == "impression":
            rows.append(impression_row(record, columns))
            served.append(served_row(record))
            counts["impressions"] += 1
            continue
        if record["ts"] - record["served_ts"] > window_s:
            late.append(response_row(record, columns))
            counts["late"] += 1
            continue
        if record["impression_id"] not in seen:  # the impression itself was never posted: the token proves it
            seen.add(record["impression_id"])
            rows.append(impression_row(record, columns))
            served.append(served_row(record))
            counts["impressions"] += 1
        rows.append(response_row(record, columns))
        counts[record["event"] + "s"] += 1
    return rows, late, served, counts


def run_compaction(feedback_dir: str | Path, raw_dir: str | Path, attribution_window_s: float, context: Sequence[str] = ()) -> dict:
    """Compact every uncompacted segment of ``feedback_dir`` into ``raw_dir/events/``; return the counts.

    ``context``: the log's context columns (the data config's), written into every partition.
    """
    feedback_dir, events_dir = Path(feedback_dir), Path(raw_dir) / "events"
    events_dir.mkdir(parents=True, exist_ok=True)
    feedback_dir.mkdir(parents=True, exist_ok=True)  # no feedback yet is a normal state: nothing to compact
    state_path = feedback_dir / "compaction.json"
    offsets = read_json(state_path)["offsets"] if state_path.is_file() else {}
    records, offsets = read_new_records(segments(feedback_dir), offsets)
    columns = context_columns(records, list(context))
    events = schema.events_schema(columns)  # before anything is written: a clashing name fails here
    rows, late, served, counts = split_rows(records, logged_ids(events_dir, feedback_dir / "late"), attribution_window_s, columns)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + f"-{time.time_ns() % 10**6:06d}"
    if rows:
        # Written under a temporary name and renamed, so a reader never sees half a partition.
        path = events_dir / f"{PARTITION_PREFIX}{stamp}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=events), path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
        counts["partition"] = str(path)
        (Path(raw_dir) / "propensities").mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(served, schema=PROPENSITIES), Path(raw_dir) / "propensities" / f"{PARTITION_PREFIX}{stamp}.parquet")
    if late:
        (feedback_dir / "late").mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(late, schema=events), feedback_dir / "late" / f"late-{stamp}.parquet")
    save_offsets(state_path, offsets)
    counts["segments"] = len(offsets)
    return counts


def run(cfg) -> dict:
    """jobs/compact.py: compact ``paths.feedback_dir`` into ``paths.raw_dir``, with the context
    columns ``data.events.features`` declares (group context), so preparation finds them."""
    from adrec.runtime import resolve

    # An event feature feeds the context tower unless it names another group (conf/data/generic.yaml).
    features = (cfg.data.get("events") or {}).get("features") or {}
    context = [str(name) for name, o in features.items() if (o or {}).get("group", "context") == "context"]
    return run_compaction(resolve(cfg.paths.feedback_dir), resolve(cfg.paths.raw_dir), float(cfg.feedback.attribution_window_s), context)
