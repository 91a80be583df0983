import numpy as np
import pyarrow as pa

from adrec.data import schema
from adrec.data.history import build_examples, latest_history
from adrec.data.validate import event_reasons

T0 = 1_767_225_600_000  # 2026-01-01


def events(rows):
    """rows: (event_id, minute, user, ad, event, impression_id)."""
    cols = list(zip(*rows))
    return pa.table(
        {
            "event_id": list(cols[0]),
            "ts": pa.array([T0 + 60_000 * m for m in cols[1]], pa.int64()).cast(schema.TIMESTAMP),
            "user_id": list(cols[2]),
            "ad_id": list(cols[3]),
            "event": list(cols[4]),
            "impression_id": pa.array(list(cols[5]), pa.string()),
            "slot": ["top"] * len(rows),
            "device": ["mobile"] * len(rows),
        }
    )


LOG = events(
    [
        ("i1", 0, "u1", "a1", "impression", None),
        ("c1", 1, "u1", "a1", "click", "i1"),
        ("i2", 2, "u1", "a2", "impression", None),
        ("c2", 3, "u1", "a2", "click", "i2"),
        ("v2", 4, "u1", "a2", "conversion", "i2"),
        ("i3", 3, "u1", "a3", "impression", None),  # same minute as click c2: c2 is not before it
        ("i4", 9, "u1", "a4", "impression", None),
        ("j1", 0, "u2", "a9", "impression", None),
        ("d1", 5, "u2", "a9", "click", "j1"),
        ("j2", 8, "u2", "a1", "impression", None),
    ]
)


def as_dict(table):
    return {(u, a): row for u, a, row in zip(table["user_id"].to_pylist(), table["ad_id"].to_pylist(), table.to_pylist())}


def test_examples_carry_labels_and_strictly_earlier_histories():
    rows = as_dict(build_examples(LOG, history_length=5, cutoffs_ms=(T0 + 3 * 60_000, T0 + 8 * 60_000)))
    assert len(rows) == 6  # one example per impression
    assert rows["u1", "a1"]["label"] == 1 and rows["u1", "a1"]["history"] == []
    assert rows["u1", "a2"]["history"] == ["a1"] and rows["u1", "a2"]["converted"] == 1
    assert rows["u1", "a3"]["history"] == ["a1"]  # the click at the same instant is not history
    assert rows["u1", "a4"]["history"] == ["a2", "a1"] and rows["u1", "a4"]["label"] == 0
    assert rows["u2", "a1"]["history"] == ["a9"]  # other users' clicks never leak in
    assert [rows[k]["split"] for k in [("u1", "a1"), ("u1", "a3"), ("u2", "a1")]] == ["train", "validation", "test"]


def test_history_is_truncated_to_the_most_recent():
    rows = as_dict(build_examples(LOG, history_length=1, cutoffs_ms=(0, 0)))
    assert rows["u1", "a4"]["history"] == ["a2"]


def test_latest_history_per_user():
    clicks = LOG.filter(np.array(LOG["event"].to_pylist()) == "click")
    latest = dict(zip(*latest_history(clicks, history_length=5).to_pydict().values()))
    assert latest == {"u1": ["a2", "a1"], "u2": ["a9"]}


def test_validation_names_what_is_wrong():
    bad = events(
        [
            ("ok", 0, "u1", "a1", "impression", None),
            ("", 0, "u1", "a1", "impression", None),
            ("x2", 0, "u1", "a1", "purchase", None),
            ("x3", 0, "u1", "a1", "click", None),
            ("x4", 0, None, "a1", "impression", None),
        ]
    )
    reasons = event_reasons(bad, min_ts_ms=0, max_ts_ms=T0 * 2).tolist()
    assert reasons == [None, "missing_event_id", "unknown_event", "missing_impression_id", "missing_user_id"]
    assert event_reasons(bad.slice(0, 1), min_ts_ms=T0 + 1, max_ts_ms=T0 * 2).tolist() == ["ts_out_of_range"]
