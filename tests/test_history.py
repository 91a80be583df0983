import numpy as np
import pyarrow as pa

from adrec.data.history import LabelRule, SplitRule, assign_split, build_examples, latest_history
from adrec.data.validate import Rules, canonicalize

T0 = 1_767_225_600_000  # 2026-01-01


def events(rows):
    """rows: (event_id, minute, user, ad, event, impression_id)."""
    cols = list(zip(*rows))
    return pa.table(
        {
            "event_id": list(cols[0]),
            "ts": pa.array([T0 + 60_000 * m for m in cols[1]], pa.int64()),
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
    split = SplitRule("time", cutoffs_ms=(T0 + 3 * 60_000, T0 + 8 * 60_000))
    rows = as_dict(build_examples(LOG, history_length=5, split=split, label_rule=None))
    assert len(rows) == 6  # one example per impression
    assert rows["u1", "a1"]["label"] == 1 and rows["u1", "a1"]["history"] == []
    assert rows["u1", "a2"]["history"] == ["a1"] and rows["u1", "a2"]["converted"] == 1
    assert rows["u1", "a3"]["history"] == ["a1"]  # the click at the same instant is not history
    assert rows["u1", "a4"]["history"] == ["a2", "a1"] and rows["u1", "a4"]["label"] == 0
    assert rows["u2", "a1"]["history"] == ["a9"]  # other users' clicks never leak in
    assert [rows[k]["split"] for k in [("u1", "a1"), ("u1", "a3"), ("u2", "a1")]] == ["train", "validation", "test"]


def test_history_is_truncated_to_the_most_recent():
    rows = as_dict(build_examples(LOG, history_length=1, split=SplitRule("time", cutoffs_ms=(0, 0)), label_rule=None))
    assert rows["u1", "a4"]["history"] == ["a2"]


def test_user_scope_gives_every_row_the_users_latest_training_clicks_but_its_own():
    rated = pa.table(
        {
            "user_id": ["u1"] * 4 + ["u2"],
            "ad_id": ["a1", "a2", "a3", "a4", "a1"],
            "ts": pa.array([T0 + 60_000 * m for m in (0, 1, 2, 3, 0)], pa.int64()),
            "label": [5, 5, 5, 5, 5],
        }
    )
    split = SplitRule("per_user_random", train=1.0, validation=0.0)  # every row is training
    rows = as_dict(build_examples(rated, history_length=2, split=split, label_rule=LabelRule(implicit=True), history_scope="user"))
    assert rows["u1", "a1"]["history"] == ["a4", "a3"]  # later clicks too: the history is a set, not a past
    assert rows["u1", "a4"]["history"] == ["a3", "a2"]  # its own ad left out, the next latest in
    assert rows["u2", "a1"]["history"] == []


def test_user_scope_refuses_a_time_split():
    import pytest

    from adrec.data.options import _history_scope

    with pytest.raises(ValueError, match="history_scope=before"):
        _history_scope("user", "time")


def test_latest_history_per_user():
    clicks = LOG.filter(np.array(LOG["event"].to_pylist()) == "click")
    latest = dict(zip(*latest_history(clicks, history_length=5).to_pydict().values()))
    assert latest == {"u1": ["a2", "a1"], "u2": ["a9"]}


RULES = Rules(
    columns={"event_id": "event_id", "ts": "ts", "user_id": "user_id", "ad_id": "ad_id", "event": "event", "impression_id": "impression_id"},
    features={"slot": "categorical", "price": "numeric"},
    time_unit="ms",
    max_string_length=12,
)


def reasons(rows):
    """rows: dicts of raw string columns, as a CSV source gives them."""
    table = pa.Table.from_pylist([{"slot": "top", "price": "1", "ts": str(T0), **r} for r in rows])
    return canonicalize(table, RULES)["reason"].to_pylist()


def test_validation_names_what_is_wrong():
    ok = {"event_id": "e", "user_id": "u1", "ad_id": "a1", "event": "impression", "impression_id": None}
    assert reasons(
        [
            ok,
            {**ok, "event_id": ""},
            {**ok, "event": "purchase"},
            {**ok, "event": "click"},
            {**ok, "user_id": None},
            {**ok, "ts": "yesterday"},
            {**ok, "ts": "12"},
            {**ok, "price": "cheap"},
            {**ok, "price": "inf"},
            {**ok, "slot": "a-very-long-slot-name"},
            {**ok, "ts": "2026-01-02T03:04:05"},
            {**ok, "event": "CLICK", "impression_id": "e0"},
        ]
    ) == [
        None,
        "missing_event_id",
        "unknown_event",
        "missing_impression_id",
        "missing_user_id",
        "bad_ts",
        "ts_out_of_range",
        "bad_price",
        "nonfinite_price",
        "oversized_slot",
        None,
        None,
    ]


def test_labelled_rows_follow_the_label_rule_and_positives_are_the_history():
    rows = pa.table(
        {
            "user_id": ["u1"] * 4,
            "ad_id": ["m1", "m2", "m3", "m4"],
            "ts": pa.array([T0, T0 + 1, T0 + 2, T0 + 3], pa.int64()),
            "label": [5.0, 2.0, 4.0, 3.0],
        }
    )
    out = build_examples(rows, 3, SplitRule("leave_last_out"), LabelRule(at_least=4))
    assert out["label"].to_pylist() == [1, 0, 1, 0]
    assert out["history"].to_pylist() == [[], ["m1"], ["m1"], ["m3", "m1"]]
    assert out["split"].to_pylist() == ["train", "train", "validation", "test"]
    assert LabelRule(implicit=True).apply(rows["label"]).tolist() == [1, 1, 1, 1]


def test_per_user_random_split_gives_each_user_the_shares():
    n_users, per_user = 50, 40
    rows = pa.table({"event_id": [f"e{i}" for i in range(n_users * per_user)], "ts": pa.array(np.arange(n_users * per_user), pa.int64())})
    users = np.repeat(np.arange(n_users), per_user)
    split = assign_split(rows, users, SplitRule("per_user_random"), seed=1)
    for user in range(n_users):
        mine = split[users == user]
        assert (mine == "train").sum() == 32 and (mine == "validation").sum() == 4 and (mine == "test").sum() == 4
    again = assign_split(rows, users, SplitRule("per_user_random"), seed=1)
    assert (split == again).all() and not (split == assign_split(rows, users, SplitRule("per_user_random"), seed=2)).all()


def test_random_splits_build_histories_from_training_clicks_only():
    n = 60
    rows = pa.table(
        {
            "user_id": ["u1"] * n,
            "ad_id": [f"m{i}" for i in range(n)],
            "ts": pa.array(T0 + 1000 * np.arange(n), pa.int64()),
            "label": [5.0] * n,
        }
    )
    out = build_examples(rows, n, SplitRule("per_user_random", train=0.8, validation=0.1), LabelRule(at_least=4), seed=3)
    split = dict(zip(out["ad_id"].to_pylist(), out["split"].to_pylist()))
    held_out = {ad for ad, s in split.items() if s != "train"}
    assert held_out  # the draw holds some rows out
    for ad, history in zip(out["ad_id"].to_pylist(), out["history"].to_pylist()):
        assert not held_out & set(history), f"{ad} ({split[ad]}) sees held-out items in its history"
        assert history == [h for h in history if split[h] == "train"]
    # Every earlier training click is still there, most recent first.
    last = out["history"].to_pylist()[-1]
    assert last == [f"m{i}" for i in reversed(range(n - 1)) if split[f"m{i}"] == "train"]


def test_kfold_splits_put_every_row_in_exactly_one_test_fold():
    rows = pa.table({"event_id": [f"e{i}" for i in range(5000)]})
    tests = [assign_split(rows, None, SplitRule("kfold", validation=0.1, folds=5, fold=f), seed=4) == "test" for f in range(5)]
    assert (np.sum(tests, axis=0) == 1).all()
    assert all(800 < t.sum() < 1200 for t in tests)
    split = assign_split(rows, None, SplitRule("kfold", validation=0.1, folds=5, fold=2), seed=4)
    assert 0.06 < (split == "validation").mean() < 0.1
