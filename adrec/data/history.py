"""Labels and behaviour histories, computed per user on whole blocks with numpy.

Preparation hash-partitions the log by ``user_id`` (as Ray's own ``map_groups`` does),
so each block holds every event of its users and these functions see complete histories.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def history_before(
    click_user: np.ndarray,
    click_ts: np.ndarray,
    click_ad: pa.Array,
    query_user: np.ndarray,
    query_ts: np.ndarray,
    length: int,
) -> pa.ListArray:
    """For each query (user, t), the ads that user clicked strictly before t, most recent first.

    click_user, query_user: (C,), (Q,) int user codes from one shared encoding.
    click_ts, query_ts: (C,), (Q,) int64 epoch milliseconds. click_ad: (C,) ad ids.
    Returns (Q,) lists of at most ``length`` ad ids.
    """
    t0 = min(click_ts.min(initial=0), query_ts.min(initial=0))
    span = int(max(click_ts.max(initial=0), query_ts.max(initial=0)) - t0 + 1)
    top_user = int(max(click_user.max(initial=0), query_user.max(initial=0)))
    if top_user * span >= 2**62:
        raise OverflowError("too many users x time span in one block; raise prepare.num_partitions")
    # One sortable int64 key per (user, time) pair: clicks of a user are contiguous.
    click_key = click_user.astype(np.int64) * span + (click_ts - t0)
    order = np.argsort(click_key, kind="stable")
    click_key = click_key[order]
    query_key = query_user.astype(np.int64) * span + (query_ts - t0)
    end = np.searchsorted(click_key, query_key, side="left")  # clicks strictly before t
    start = np.searchsorted(click_key, query_user.astype(np.int64) * span, side="left")
    index = end[:, None] - 1 - np.arange(length)[None, :]
    valid = index >= start[:, None]
    offsets = np.concatenate([[0], np.cumsum(valid.sum(axis=1))]).astype(np.int32)
    values = click_ad.take(pa.array(order[index[valid]]))
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def _follows(events: pa.Table, kind: str) -> pa.Array:
    """The impression ids that an event of ``kind`` (click, conversion) refers to."""
    return events.filter(pc.equal(events["event"], kind))["impression_id"].combine_chunks()


def build_examples(events: pa.Table, history_length: int, cutoffs_ms: tuple[int, int]) -> pa.Table:
    """Turn the events of a set of users into one training example per impression.

    Each example gets ``label`` (clicked), ``converted``, ``history`` (ads the user
    clicked strictly before the impression) and ``split`` from the global time cutoffs
    (train < cutoffs_ms[0] <= validation < cutoffs_ms[1] <= test).
    """
    users = pc.dictionary_encode(events["user_id"].combine_chunks())
    user_code = users.indices.to_numpy(zero_copy_only=False)
    ts = pc.cast(events["ts"], pa.int64()).to_numpy(zero_copy_only=False)
    is_click = pc.equal(events["event"], "click").to_numpy(zero_copy_only=False).astype(bool)
    is_impression = pc.equal(events["event"], "impression").to_numpy(zero_copy_only=False).astype(bool)

    impressions = events.filter(pa.array(is_impression))
    history = history_before(
        user_code[is_click],
        ts[is_click],
        events["ad_id"].combine_chunks().filter(pa.array(is_click)),
        user_code[is_impression],
        ts[is_impression],
        history_length,
    )
    imp_ts = ts[is_impression]
    split = np.where(imp_ts < cutoffs_ms[0], "train", np.where(imp_ts < cutoffs_ms[1], "validation", "test"))
    columns = {
        "ts": impressions["ts"],
        "user_id": impressions["user_id"],
        "ad_id": impressions["ad_id"],
        "slot": impressions["slot"],
        "device": impressions["device"],
        "label": pc.cast(pc.is_in(impressions["event_id"], value_set=_follows(events, "click")), pa.float32()),
        "converted": pc.cast(pc.is_in(impressions["event_id"], value_set=_follows(events, "conversion")), pa.float32()),
        "history": history,
        "split": pa.array(split),
    }
    if "true_pctr" in events.column_names:
        columns["true_pctr"] = impressions["true_pctr"]
    return pa.table(columns)


def latest_history(clicks: pa.Table, history_length: int) -> pa.Table:
    """(user_id, history): each user's last ``history_length`` clicked ads, most recent first."""
    users = pc.dictionary_encode(clicks["user_id"].combine_chunks())
    code = users.indices.to_numpy(zero_copy_only=False)
    ts = pc.cast(clicks["ts"], pa.int64()).to_numpy(zero_copy_only=False)
    n_users = len(users.dictionary)
    after_all = np.full(n_users, ts.max(initial=0) + 1, dtype=np.int64)
    history = history_before(code, ts, clicks["ad_id"].combine_chunks(), np.arange(n_users), after_all, history_length)
    return pa.table({"user_id": users.dictionary, "history": history})
