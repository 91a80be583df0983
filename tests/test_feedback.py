"""Feedback without Serve: impression tokens, the fsync'd segment log, compaction into the behaviour log."""

import json

import pyarrow.parquet as pq
import pytest

from adrec.data import schema
from adrec.feedback.compact import run_compaction
from adrec.feedback.log import SegmentLog, read_new_records, segments
from adrec.feedback.tokens import Impression, Signer, TokenError
from adrec.recommend import user_key

SECRET = b"a-test-secret-of-32-bytes-......"
SERVED = 1_800_000_000.0


def impression(ad: str = "a1", request: str = "r1", user: str = "u1", ts: float = SERVED) -> Impression:
    return Impression(request, user_key(user), ad, "v1", ts, "top", "mobile", propensity=0.25)


def test_a_token_proves_what_was_served_and_nothing_else():
    signer = Signer(SECRET, ttl_s=3600)
    token = signer.sign(impression())
    assert signer.verify(token, SERVED + 10) == impression()
    payload, mac = token.split(".")
    forged = Signer(b"another-secret-of-32-bytes-.....", 3600).sign(impression(ad="a2")).split(".")[0]
    for bad in (f"{forged}.{mac}", f"{payload}.{mac[:-2]}AA", "not-a-token", f"{payload}."):
        with pytest.raises(TokenError, match="invalid|malformed"):
            signer.verify(bad, SERVED + 10)
    with pytest.raises(TokenError, match="expired"):
        signer.verify(token, SERVED + 3601)
    with pytest.raises(ValueError, match="16 bytes"):
        Signer(b"short", 10)


def test_segments_are_appended_durably_and_read_incrementally(tmp_path):
    log = SegmentLog(tmp_path, "w1", max_bytes=200)
    log.append([{"i": 0}, {"i": 1}])
    records, offsets = read_new_records(segments(tmp_path), {})
    assert [r["i"] for r in records] == [0, 1]
    for i in range(2, 12):
        log.append([{"i": i, "pad": "x" * 40}])
    assert len(segments(tmp_path)) > 1  # rotated past max_bytes
    with open(segments(tmp_path)[-1], "a") as f:
        f.write('{"i": 99, "torn')  # a crash mid-append: never acknowledged
    records, offsets = read_new_records(segments(tmp_path), offsets)
    assert [r["i"] for r in records] == list(range(2, 12))
    assert read_new_records(segments(tmp_path), offsets)[0] == []
    assert SegmentLog(tmp_path, "w1").sequence == len(segments(tmp_path))  # a restarted writer starts a new file


def record(event: str, event_id: str, ts: float, imp: Impression) -> dict:
    return {**vars(imp), "served_ts": imp.ts, "impression_id": imp.impression_id, "event_id": event_id,
            "event": event, "user_id": "u1", "ts": ts}


def test_compaction_writes_each_event_once_and_keeps_late_clicks_apart(tmp_path):
    feedback, raw = tmp_path / "feedback", tmp_path / "raw"
    log = SegmentLog(feedback, "w1")
    first, second, third = impression("a1", "r1"), impression("a2", "r2"), impression("a3", "r3")
    batch = [
        record("impression", "e1", SERVED, first),
        record("click", "e2", SERVED + 5, first),
        record("click", "e3", SERVED + 10, second),  # its impression was never posted: the token proves it
        record("click", "e4", SERVED + 7200, third),  # after the one-hour window
    ]
    log.append(batch)
    log.append(batch)  # the client retried: at least once
    counts = run_compaction(feedback, raw, attribution_window_s=3600)
    assert (counts["impressions"], counts["clicks"], counts["late"], counts["duplicates"]) == (2, 2, 1, 4)
    table = pq.read_table(counts["partition"])
    assert table.schema.equals(schema.EVENTS)
    rows = {r["event_id"]: r for r in table.to_pylist()}
    assert rows["e2"]["impression_id"] == "r1:a1" and "r1:a1" in rows and "r2:a2" in rows
    assert len(pq.read_table(feedback / "late").to_pylist()) == 1
    served = {r["impression_id"]: r["propensity"] for r in pq.read_table(raw / "propensities").to_pylist()}
    assert served == {"r1:a1": 0.25, "r2:a2": 0.25}  # as each token said

    log.append(batch)  # replayed again after compaction
    log.append([record("click", "e5", SERVED + 20, first)])
    again = run_compaction(feedback, raw, attribution_window_s=3600)
    assert (again["clicks"], again["impressions"], again["late"], again["duplicates"]) == (1, 0, 0, 4)
    everything = pq.read_table(raw / "events")
    assert len(set(everything["event_id"].to_pylist())) == everything.num_rows == 5
    assert json.loads((feedback / "compaction.json").read_text())["offsets"]
