"""Feedback without Serve: impression tokens, ingestion, the fsync'd segment log, compaction into the behaviour log."""

import json
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from adrec.data import schema
from adrec.feedback.compact import run_compaction
from adrec.feedback.ingest import events_to_records, feedback_record, impression_token, sign_answer
from adrec.feedback.log import SegmentLog, read_new_records, segments
from adrec.feedback.tokens import Impression, Signer, TokenError, b64
from adrec.recommend import user_key

SECRET = b"a-test-secret-of-32-bytes-......"
SERVED = 1_800_000_000.0


def impression(ad: str = "a1", request: str = "r1", user: str = "u1", ts: float = SERVED) -> Impression:
    return Impression(request, user_key(user), ad, "v1", ts, {"slot": "top", "device": "mobile"}, propensity=0.25)


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


def test_a_token_of_the_old_format_is_refused_not_a_crash():
    signer = Signer(SECRET, ttl_s=3600)
    old = {
        "request_id": "r1",
        "user": user_key("u1"),
        "ad_id": "a1",
        "version": "v1",
        "ts": SERVED,
        "slot": "top",
        "device": "mobile",
        "propensity": 1.0,
    }  # slot and device were fields of their own
    payload = json.dumps(old, separators=(",", ":"), sort_keys=True).encode()
    with pytest.raises(TokenError, match="outdated"):
        signer.verify(f"{b64(payload)}.{b64(signer._mac(payload))}", SERVED + 10)


def event(token: str, event_id: str, kind: str = "click", user: str = "u1", ts: float | None = None) -> SimpleNamespace:
    """What serve.schemas.FeedbackEvent holds; ingestion reads only these attributes."""
    return SimpleNamespace(event_id=event_id, event=kind, user_id=user, token=token, ts=ts)


def test_ingestion_refuses_another_users_token_and_a_forged_one_naming_each_event():
    signer = Signer(SECRET, ttl_s=3600)
    token = impression_token(signer, "r1", "u1", "a1", "v1", {"slot": "top"}, 0.5, SERVED)
    forged = Signer(b"another-secret-of-32-bytes-.....", 3600).sign(impression())
    events = [event(token, "e0"), event(token, "e1", user="u2"), event(forged, "e2"), event(token, "e3", ts=SERVED + 7)]
    records, refused = events_to_records(signer, events, now=SERVED + 10)
    assert [r["event_id"] for r in records] == ["e0", "e3"]
    assert [r["ts"] for r in records] == [SERVED + 10, SERVED + 7]  # no ts: when received
    assert records[0]["impression_id"] == "r1:a1" and records[0]["served_ts"] == SERVED and records[0]["propensity"] == 0.5
    assert refused == [
        {"loc": ["body", "events", 1, "token"], "msg": "the token was issued for another user", "type": "invalid_token"},
        {"loc": ["body", "events", 2, "token"], "msg": "invalid token: its signature does not match (forged or edited)", "type": "invalid_token"},
    ]
    assert events_to_records(signer, [event(token, "e4")], now=SERVED + 3601)[1][0]["msg"].startswith("expired token")


def test_any_context_field_survives_from_the_answer_into_its_own_column_of_the_log(tmp_path):
    signer, feedback, raw = Signer(SECRET, ttl_s=3600), tmp_path / "feedback", tmp_path / "raw"
    (home,) = sign_answer(signer, "r1", "u1", "v1", {"page": "home", "slot": "top"}, [SimpleNamespace(ad_id="a1", propensity=1.0)], SERVED)
    bare = impression_token(signer, "r2", "u1", "a2", "v1", {}, 1.0, SERVED)
    assert sign_answer(None, "r3", "u1", "v1", {}, [SimpleNamespace(ad_id="a1", propensity=1.0)] * 2, SERVED) == [None, None]  # feedback off
    assert signer.verify(home, SERVED).context == {"page": "home", "slot": "top"}
    records, refused = events_to_records(signer, [event(home, "e1", "impression"), event(home, "e2"), event(bare, "e3")], SERVED + 5)
    assert not refused
    SegmentLog(feedback, "w1").append(records)
    counts = run_compaction(feedback, raw, attribution_window_s=3600, context=["slot", "device"])
    table = pq.read_table(counts["partition"])
    # The configured columns first, in order, even when no request stated one; then the others.
    assert table.schema.equals(schema.events_schema(["slot", "device", "page"]))
    rows = {r["event_id"]: r for r in table.to_pylist()}
    assert rows["r1:a1"]["page"] == rows["e2"]["page"] == "home" and rows["e2"]["slot"] == "top" and rows["e2"]["device"] is None
    assert rows["r2:a2"]["page"] is None and rows["e3"]["slot"] is None  # served without context


def test_the_log_schema_takes_any_context_columns_but_not_the_logs_own_names():
    assert schema.events_schema(["page"]).field("page").type == pa.string()
    assert schema.EVENTS.equals(schema.events_schema(schema.SYNTHETIC_CONTEXT))
    for bad in (["ts"], ["page", "page"], ["true_pctr"]):
        with pytest.raises(ValueError, match="clash"):
            schema.events_schema(bad)


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


def record(kind: str, event_id: str, ts: float, imp: Impression) -> dict:
    return feedback_record(imp, event("", event_id, kind, ts=ts), now=ts)


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
    counts = run_compaction(feedback, raw, attribution_window_s=3600, context=schema.SYNTHETIC_CONTEXT)
    assert (counts["impressions"], counts["clicks"], counts["late"], counts["duplicates"]) == (2, 2, 1, 4)
    table = pq.read_table(counts["partition"])
    assert table.schema.equals(schema.EVENTS)  # as the synthetic log's own partitions
    assert {(r["slot"], r["device"]) for r in table.to_pylist()} == {("top", "mobile")}
    rows = {r["event_id"]: r for r in table.to_pylist()}
    assert rows["e2"]["impression_id"] == "r1:a1" and "r1:a1" in rows and "r2:a2" in rows
    assert len(pq.read_table(feedback / "late").to_pylist()) == 1
    served = {r["impression_id"]: r["propensity"] for r in pq.read_table(raw / "propensities").to_pylist()}
    assert served == {"r1:a1": 0.25, "r2:a2": 0.25}  # as each token said

    log.append(batch)  # replayed again after compaction
    legacy = {k: v for k, v in record("click", "e5", SERVED + 20, first).items() if k != "context"}
    log.append([{**legacy, "slot": "top", "device": "mobile"}])  # written before records carried a context dict
    again = run_compaction(feedback, raw, attribution_window_s=3600, context=schema.SYNTHETIC_CONTEXT)
    assert (again["clicks"], again["impressions"], again["late"], again["duplicates"]) == (1, 0, 0, 4)
    everything = pq.read_table(raw / "events")
    assert len(set(everything["event_id"].to_pylist())) == everything.num_rows == 5
    assert everything.filter(pc.equal(everything["event_id"], "e5"))["slot"].to_pylist() == ["top"]
    assert json.loads((feedback / "compaction.json").read_text())["offsets"]
