"""Preparation's per-block functions: plain functions of Arrow tables, run by ``map_batches``
(or on the driver, for the small side tables), each testable without Ray.

    ingest          source rows -> canonical, validated rows (user ids pseudonymised)
    count_values    -> (feature, value, count) rows, summed over blocks by ``merge_counts``
    block_stats     -> counts by validation reason and the time range
    split_stats     -> examples and clicks per split
    sample_numbers  -> a sample of each numeric column, for quantile boundaries
    encode_examples raw example rows -> model-ready columns
    serving_users, serving_ads: the encoded side tables Serve reads
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.extensions import ArrowTensorArray

from adrec.data.history import row_keys, uniform
from adrec.data.privacy import pseudonymize
from adrec.data.sources import RAW_LINE
from adrec.data.validate import REASON, Rules, canonicalize
from adrec.features import FeatureMap, add_history_attributes, stable_hash

QUANTILE_SAMPLE = 2_000  # values drawn per block to fit quantile boundaries


def ingest(batch: pa.Table, rules: Rules, key: bytes | None, fill_missing: bool) -> pa.Table:
    """Canonicalise and validate a batch; pseudonymise user ids before anything is kept."""
    if fill_missing:  # JSON lines: an absent key is a null value
        needed = [c for c in rules.columns.values() if c] + list(rules.features)
        for name in needed:
            if name not in batch.column_names:
                batch = batch.append_column(name, pa.nulls(batch.num_rows, pa.string()))
    table = canonicalize(batch, rules)
    if key is not None:
        if "user_id" in table.column_names:
            table = table.set_column(table.schema.get_field_index("user_id"), "user_id", pseudonymize(table["user_id"], key))
        if RAW_LINE in table.column_names:  # a malformed line may hold a raw id: keep only that it was there
            withheld = pc.if_else(pc.is_valid(table[RAW_LINE]), "<withheld: pseudonymised source>", pa.scalar(None, pa.string()))
            table = table.set_column(table.schema.get_field_index(RAW_LINE), RAW_LINE, withheld)
    return table


def count_values(batch: pa.Table, columns: list[str]) -> pa.Table:
    """(feature, value, count) rows for each column of ``batch``; list columns are flattened."""
    parts = []
    for name in columns:
        column = batch[name]
        if pa.types.is_list(column.type):
            column = pc.list_flatten(column)
        counts = pc.value_counts(column)
        parts.append(
            pa.table(
                {
                    "feature": pa.array([name] * len(counts), pa.string()),
                    "value": pc.cast(counts.field("values"), pa.string()),
                    "count": pc.cast(counts.field("counts"), pa.int64()),
                }
            )
        )
    return pa.concat_tables(parts)


def block_stats(batch: pa.Table) -> pa.Table:
    """Counts by validation reason (None = valid) and the valid rows' time range, in ``count_values`` form."""
    counts = count_values(batch, [REASON])
    if "ts" not in batch.column_names:
        return counts
    valid_ts = batch.filter(pc.is_null(batch[REASON]))["ts"]
    if len(valid_ts) == 0:
        return counts
    bounds = pa.table(
        {
            "feature": ["ts_min", "ts_max"],
            "value": [str(pc.min(valid_ts).as_py()), str(pc.max(valid_ts).as_py())],
            "count": pa.array([1, 1], pa.int64()),
        }
    )
    return pa.concat_tables([counts, bounds])


def split_stats(batch: pa.Table) -> pa.Table:
    """Examples and clicks per split, in ``count_values`` form."""
    grouped = batch.group_by("split").aggregate([("label", "count"), ("label", "sum")])
    n = grouped.num_rows
    return pa.table(
        {
            "feature": ["examples"] * n + ["clicks"] * n,
            "value": pa.concat_arrays([grouped["split"].combine_chunks()] * 2),
            "count": pa.concat_arrays(
                [pc.cast(grouped["label_count"], pa.int64()).combine_chunks(), pc.cast(grouped["label_sum"], pa.int64()).combine_chunks()]
            ),
        }
    )


def sample_numbers(batch: pa.Table, columns: list[str], seed: int) -> pa.Table:
    """Up to QUANTILE_SAMPLE non-null values of each numeric column, for fitting quantiles."""
    rng = np.random.default_rng(seed)
    parts = []
    for name in columns:
        values = pc.drop_null(batch[name]).to_numpy(zero_copy_only=False).astype(np.float64)
        if len(values) > QUANTILE_SAMPLE:
            values = rng.choice(values, QUANTILE_SAMPLE, replace=False)
        parts.append(pa.table({"feature": pa.array([name] * len(values), pa.string()), "value": pa.array(values, pa.float64())}))
    return pa.concat_tables(parts)


def merge_counts(ds: ray.data.Dataset, chunk: int = 16) -> dict[str, dict[str, int]]:
    """Sum the per-block counts of ``count_values`` into {feature: {value: count}}.

    Blocks are folded into a running total ``chunk`` at a time, so the driver holds the
    distinct values once, not every block's copy of them.
    """
    total = None
    for batch in _chunks(ds.iter_internal_ref_bundles(), chunk):
        tables = [t for t in ray.get([ref for bundle in batch for ref in bundle.block_refs]) if t.num_rows]
        if total is not None:
            tables.append(total)
        if tables:
            total = (
                pa.concat_tables(tables).group_by(["feature", "value"]).aggregate([("count", "sum")]).rename_columns(["feature", "value", "count"])
            )
    if total is None:
        return {}
    out: dict[str, dict[str, int]] = {}
    for feature, value, count in zip(*(total[c].to_pylist() for c in ("feature", "value", "count")), strict=True):
        out.setdefault(feature, {})[value] = count
    return out


def _chunks(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def rows_where(batch: pa.Table, column: str, value: str) -> pa.Table:
    return batch.filter(pc.equal(batch[column], value))


def to_arrow(columns: dict[str, np.ndarray]) -> pa.Table:
    """(N,) arrays as plain columns, (N, L) arrays as Ray tensor columns: typed even when N = 0."""
    return pa.table({k: ArrowTensorArray.from_numpy(v) if v.ndim == 2 else pa.array(v) for k, v in columns.items()})


def encode_examples(batch: pa.Table, feature_map: FeatureMap, lookups: dict, seed: int) -> pa.Table:
    """Raw example rows -> model-ready columns plus label, ts, split (and truth where known), in a seeded random order.

    Rows arrive grouped by user (the log is partitioned by user for histories); a trainer's local
    shuffle buffer is much smaller than a partition, so without this a batch would hold a few
    users' rows and the softmax would mostly see their ads."""
    batch = batch.take(pa.array(np.argsort(uniform(row_keys(batch), seed), kind="stable")))
    out = feature_map.encode(add_history_attributes(batch, lookups) if lookups else batch)
    out["label"] = batch["label"].to_numpy().astype(np.float32)
    out["split"] = batch["split"].to_numpy(zero_copy_only=False)
    for name in ("converted", "true_pctr"):
        if name in batch.column_names:
            out[name] = pc.fill_null(pc.cast(batch[name], pa.float32()), np.nan).to_numpy()
    if "ts" in batch.column_names:
        out["ts"] = batch["ts"].to_numpy()
    if "user_id" in batch.column_names:
        # A hash, not the id: evaluation only groups rows by user (GAUC, per-user ranking).
        out["user_key"] = stable_hash(batch["user_id"]).view(np.int64)
    if "ad_id" in batch.column_names:
        # Ads are not personal data; evaluation needs the raw id to find the clicked ad in the catalog.
        out["raw_ad_id"] = batch["ad_id"].to_numpy(zero_copy_only=False)
    return to_arrow(out)


def history_lookups(ads: pa.Table | None, attributes: Sequence[str]) -> dict[str, tuple[pa.Array, pa.Array]]:
    """{attribute: (ad ids, raw values)} from the catalog, for ``history_<attribute>`` features."""
    if not attributes:
        return {}
    if ads is None:
        raise ValueError("data.prepare.history_attributes needs an ad catalog (data.ads)")
    return {a: (ads["ad_id"].combine_chunks(), ads[a].combine_chunks()) for a in attributes}


def drop_unused(batch: pa.Table) -> pa.Table:
    """Rows a replay split left out (``SplitRule.replay``): not encoded, not written."""
    return batch.filter(pc.not_equal(batch["split"], "unused"))


def serving_users(users: pa.Table | None, latest: pa.Table, feature_map: FeatureMap) -> pa.Table:
    """Encoded user features and latest history, one row per known user, for Serve."""
    users = users if users is not None else pa.table({"user_id": pa.array([], pa.string())})
    # Users who clicked but have no profile row still get their history served.
    unprofiled = latest.filter(pc.invert(pc.is_in(latest["user_id"], value_set=users["user_id"])))
    users = pa.concat_tables([users, pa.table({"user_id": unprofiled["user_id"]})], promote_options="default")
    # Table.join cannot carry list columns, so look histories up by position.
    position = pc.index_in(users["user_id"], value_set=latest["user_id"])
    joined = users.append_column("history", latest["history"].take(position))
    encoded = feature_map.encode(joined.drop_columns(["history"]))
    columns = {"raw_user_id": joined["user_id"]}
    columns.update({n: encoded[n] for n in feature_map.names("user") if n in encoded})
    # Raw ad ids, most recent first: Serve merges them with a request's and encodes them as training did.
    columns["history"] = pc.fill_null(joined["history"], pa.scalar([], pa.list_(pa.string())))
    return pa.table(columns)


def serving_ads(ads: pa.Table, feature_map: FeatureMap) -> pa.Table:
    """The encoded ad catalog: ``raw_ad_id``, ``bid``, ``raw_campaign_id`` and raw history attributes beside the ad tower's inputs."""
    encoded = feature_map.encode(ads)
    bid = ads["bid"] if "bid" in ads.column_names else pa.array(np.ones(ads.num_rows, np.float32))
    columns = {"raw_ad_id": ads["ad_id"], "bid": bid}
    if "campaign_id" in ads.column_names:  # the auction's budget and targeting unit
        columns["raw_campaign_id"] = ads["campaign_id"]
    for spec in feature_map.features:  # raw attributes that histories are mapped through at serving time
        if spec.name.startswith("history_"):
            attribute = spec.name.removeprefix("history_")
            columns[f"raw_{attribute}"] = ads[attribute]
    for name in feature_map.names("ad"):
        if name in encoded:
            value = encoded[name]
            columns[name] = pa.array(list(value), pa.list_(pa.int64())) if value.ndim == 2 else value
    return pa.table(columns)
