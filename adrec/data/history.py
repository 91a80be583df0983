"""Labels, behaviour histories and splits, computed on whole blocks with numpy.

Two shapes of log become examples:
    event log     impression, click and conversion rows; a click names its impression.
                  Each impression is an example, clicked = 1; clicks are the history.
    labelled rows each row is an example with a label column (Criteo, MovieLens ratings),
                  turned into 0/1 by a rule; positive rows are the history.

With a user column, preparation hash-partitions the log by ``user_id`` (as Ray's own
``map_groups`` does), so each block holds every event of its users: histories and per-user
splits see a user's whole log.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from adrec.features import stable_hash

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class SplitRule:
    """How examples are split.

    time            global cutoffs: train < cutoffs[0] <= validation < cutoffs[1] <= test
    random          each example by a hash of its id: fractions train / validation / rest
    per_user_random each user's examples in hash order: the first ``train`` share, then validation
    leave_last_out  each user's last example is test, the one before validation, the rest train
    kfold           cross-validation: a hash of each row picks one of ``folds`` folds; fold ``fold``
                    is test, and a ``validation`` share of the other rows is validation

    ``replay_before_ms`` (time splits; incremental retraining): rows before it are data a model
    already learned; a hash-drawn ``replay`` share of them is train (against forgetting), the rest
    ``unused``. The cutoffs then split only the rows from it on.
    """

    kind: str = "time"
    train: float = 0.8
    validation: float = 0.1
    cutoffs_ms: tuple[int, int] | None = None
    folds: int = 5
    fold: int = 0
    replay_before_ms: int | None = None
    replay: float = 1.0


@dataclass(frozen=True)
class LabelRule:
    """Labelled rows: clicked = 1 when ``label >= at_least`` (or always, when ``implicit``)."""

    at_least: float = 0.5
    implicit: bool = False

    def apply(self, label: pa.ChunkedArray | pa.Array) -> np.ndarray:
        values = pc.cast(label, pa.float64()).to_numpy(zero_copy_only=False)
        return np.ones(len(values), np.float32) if self.implicit else (values >= self.at_least).astype(np.float32)


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
    times = np.concatenate([click_ts, query_ts])
    t0 = int(times.min()) if len(times) else 0
    span = int(times.max()) - t0 + 1 if len(times) else 1
    top_user = int(max(click_user.max(initial=0), query_user.max(initial=0)))
    if top_user * span >= 2**62:
        raise OverflowError("too many users x time span in one block; raise data.prepare.num_partitions")
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


def history_of_user(
    click_user: np.ndarray,
    click_ts: np.ndarray,
    click_ad: pa.Array,
    query_user: np.ndarray,
    query_ad: pa.Array,
    length: int,
) -> pa.ListArray:
    """For each query (user, ad), that user's latest ``length`` clicks on other ads, most recent first.

    The set-valued history of random-split benchmarks: a row's own ad is left out, so the model
    learns to predict it from the rest of the user's clicks, as it will predict held-out ones.
    Shapes as ``history_before``; query_ad: (Q,) ad ids of the same type as click_ad.
    """
    after_all = np.full(len(query_user), int(click_ts.max(initial=0)) + 1, np.int64)
    lists = history_before(click_user, click_ts, click_ad, query_user, after_all, length + 1)
    parent = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    values = pc.list_flatten(lists)
    other = ~pc.fill_null(pc.equal(values, query_ad.take(pa.array(parent))), False).to_numpy(zero_copy_only=False)
    parent, values = parent[other], values.filter(pa.array(other))
    rank = np.arange(len(parent)) - np.searchsorted(parent, parent, side="left")  # position within its list
    kept = rank < length
    counts = np.bincount(parent[kept], minlength=len(query_user))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values.filter(pa.array(kept)))


def row_keys(rows: pa.Table) -> np.ndarray:
    """(N,) uint64 per-row hash: of ``event_id`` when present, else of every column's text."""
    if "event_id" in rows.column_names:
        return stable_hash(rows["event_id"])
    text = [pc.fill_null(pc.cast(rows[c], pa.string()), "") for c in rows.column_names if not pa.types.is_list(rows[c].type)]
    return stable_hash(pc.binary_join_element_wise(*text, "\x1f"))


def uniform(keys: np.ndarray, seed: int) -> np.ndarray:
    """(N,) uint64 hashes -> (N,) floats in [0, 1), a different draw per seed."""
    mixed = (keys ^ np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)) * np.uint64(0xBF58476D1CE4E5B9)
    return (mixed >> np.uint64(11)).astype(np.float64) / float(2**53)


def assign_split(rows: pa.Table, user_code: np.ndarray | None, rule: SplitRule, seed: int) -> np.ndarray:
    """(N,) split names for ``rows`` (a block holding all rows of its users, for per-user rules)."""
    if rule.kind == "time":
        ts = rows["ts"].to_numpy(zero_copy_only=False)
        split = np.where(ts < rule.cutoffs_ms[0], "train", np.where(ts < rule.cutoffs_ms[1], "validation", "test"))
        if rule.replay_before_ms is None:
            return split
        replayed = np.where(uniform(row_keys(rows), seed) < rule.replay, "train", "unused")
        return np.where(ts < rule.replay_before_ms, replayed, split)
    draw = uniform(row_keys(rows), seed)
    if rule.kind == "random":
        return np.where(draw < rule.train, "train", np.where(draw < rule.train + rule.validation, "validation", "test"))
    if rule.kind == "kfold":
        if not 0 <= rule.fold < rule.folds:
            raise ValueError(f"split.fold={rule.fold} must be in [0, split.folds={rule.folds})")
        held_out = np.floor(draw * rule.folds).astype(np.int64) == rule.fold
        second = uniform(row_keys(rows), seed + 1)  # independent of the fold draw
        return np.where(held_out, "test", np.where(second < rule.validation, "validation", "train"))
    if user_code is None:
        raise ValueError(f"split.kind={rule.kind} needs a user column (columns.user_id)")
    # Position of each row within its user: by draw (per_user_random) or by time (leave_last_out).
    within = draw if rule.kind == "per_user_random" else rows["ts"].to_numpy(zero_copy_only=False)
    order = np.lexsort((within, user_code))
    counts = np.bincount(user_code)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order)) - first[user_code[order]]
    size = counts[user_code]
    if rule.kind == "per_user_random":
        share = rank / size
        return np.where(share < rule.train, "train", np.where(share < rule.train + rule.validation, "validation", "test"))
    if rule.kind == "leave_last_out":
        return np.where(rank == size - 1, "test", np.where(rank == size - 2, "validation", "train"))
    raise ValueError(f"unknown split.kind {rule.kind!r}: use time, random, kfold, per_user_random or leave_last_out")


def _follows(events: pa.Table, kind: str) -> pa.Array:
    """The impression ids that events of ``kind`` (click, conversion) refer to."""
    return events.filter(pc.equal(events["event"], kind))["impression_id"].combine_chunks()


def build_examples(
    events: pa.Table, history_length: int, split: SplitRule, label_rule: LabelRule | None, seed: int = 0, history_scope: str = "before"
) -> pa.Table:
    """One example per impression (event log) or per row (labelled rows), with ``label``,
    ``history`` (when the log has users and ads), ``split``, and every other column kept.

    ``history_scope``: before (the user's clicks before the row) or user (``history_of_user``)."""
    if "event" in events.column_names:
        is_exposure = pc.equal(events["event"], "impression").to_numpy(zero_copy_only=False).astype(bool)
        is_positive = pc.equal(events["event"], "click").to_numpy(zero_copy_only=False).astype(bool)
        examples = events.filter(pa.array(is_exposure))
        label = pc.cast(pc.is_in(examples["event_id"], value_set=_follows(events, "click")), pa.float32())
        converted = pc.cast(pc.is_in(examples["event_id"], value_set=_follows(events, "conversion")), pa.float32())
        examples = examples.drop_columns(["event", "impression_id"]).append_column("converted", converted)
    else:
        is_exposure = np.ones(events.num_rows, bool)
        label = pa.array((label_rule or LabelRule()).apply(events["label"]))
        is_positive = label.to_numpy(zero_copy_only=False) > 0.5
        examples = events.drop_columns(["label"])
    examples = examples.append_column("label", label)

    user_code = None
    if "user_id" in events.column_names:
        codes = pc.dictionary_encode(events["user_id"].combine_chunks()).indices.to_numpy(zero_copy_only=False)
        user_code = codes[is_exposure]
    split_names = assign_split(examples, user_code, split, seed)
    if user_code is not None and "ad_id" in events.column_names and "ts" in events.column_names:
        source = is_positive & history_split_mask(events, is_exposure, split_names, split)
        ts = events["ts"].to_numpy(zero_copy_only=False)
        ads = events["ad_id"].combine_chunks()
        clicks = (codes[source], ts[source], ads.filter(pa.array(source)))
        if history_scope == "user":
            history = history_of_user(*clicks, user_code, ads.filter(pa.array(is_exposure)), history_length)
        else:
            history = history_before(*clicks, user_code, ts[is_exposure], history_length)
        examples = examples.append_column("history", history)
    return examples.append_column("split", pa.array(split_names))


def history_split_mask(events: pa.Table, is_exposure: np.ndarray, split_names: np.ndarray, rule: SplitRule) -> np.ndarray:
    """(N,) bool: the event rows that may enter histories.

    Time and leave-last-out splits hold out each user's latest rows, so every earlier click is
    fair history. Random splits scatter held-out rows through time, so only clicks on training
    examples count; otherwise a training row's history would reveal a user's validation and
    test items.
    """
    if rule.kind in ("time", "leave_last_out"):
        return np.ones(events.num_rows, bool)
    in_train = np.zeros(events.num_rows, bool)
    in_train[np.flatnonzero(is_exposure)[split_names == "train"]] = True
    if "event" not in events.column_names:
        return in_train
    # Event log: a click or conversion belongs to the split of the impression it names.
    train_impressions = events["event_id"].filter(pa.array(in_train))
    follows = pc.is_in(events["impression_id"], value_set=train_impressions.combine_chunks()).to_numpy(zero_copy_only=False)
    return in_train | np.asarray(follows, bool)


def latest_history(positives: pa.Table, history_length: int) -> pa.Table:
    """(user_id, history): each user's last ``history_length`` positive ads, most recent first."""
    users = pc.dictionary_encode(positives["user_id"].combine_chunks())
    code = users.indices.to_numpy(zero_copy_only=False)
    ts = positives["ts"].to_numpy(zero_copy_only=False)
    n_users = len(users.dictionary)
    after_all = np.full(n_users, ts.max(initial=0) + 1, dtype=np.int64)
    history = history_before(code, ts, positives["ad_id"].combine_chunks(), np.arange(n_users), after_all, history_length)
    return pa.table({"user_id": users.dictionary, "history": history})


def positive_rows(batch: pa.Table, label_rule: LabelRule | None) -> pa.Table:
    """The rows that count as history: clicks, or positive labelled rows."""
    if "event" in batch.column_names:
        return batch.filter(pc.equal(batch["event"], "click"))
    return batch.filter(pa.array((label_rule or LabelRule()).apply(batch["label"]) > 0.5))
