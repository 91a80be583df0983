"""Preparation on Ray Data: raw logs -> validated, labelled, encoded example shards.

    events --validate--> kept | quarantine (with a reason)
    kept --partition by user--> examples (label, history, split) --join--> user, ad attributes
    train split --value counts--> vocabularies (feature map)
    examples --encode--> train/ validation/ test/ Parquet shards

Plus the serving side tables: the encoded ad catalog and each user's features and
latest history. Every count goes into ``report.json``; read = kept + quarantined.
"""

from __future__ import annotations

import math
import shutil
import time
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from adrec.data import schema
from adrec.data.history import build_examples, latest_history
from adrec.data.validate import REASON, invalid_rows, tag_invalid, valid_rows
from adrec.features import FeatureMap, FeatureSpec, Vocabulary
from adrec.runtime import init_ray_from, resolve, write_json

SPLITS = ("train", "validation", "test")


def feature_specs(history_length: int, token_length: int) -> list[FeatureSpec]:
    """The model inputs built from the skeleton schema, each tagged with its tower."""
    specs = [FeatureSpec(name, "user", "categorical", name) for name in schema.USER_FEATURES]
    specs.append(FeatureSpec("history", "user", "sequence", "ad_id", history_length))
    specs += [FeatureSpec(name, "context", "categorical", name) for name in schema.CONTEXT_FEATURES]
    specs += [FeatureSpec(name, "ad", "categorical", name) for name in schema.AD_FEATURES]
    specs.append(FeatureSpec("tokens", "ad", "sequence", "tokens", token_length))
    return specs


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


def merge_counts(ds: ray.data.Dataset) -> dict[str, dict[str, int]]:
    """Sum the per-block counts of ``count_values`` into {feature: {value: count}}."""
    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    if not tables:
        return {}
    total = pa.concat_tables(tables).group_by(["feature", "value"]).aggregate([("count", "sum")])
    out: dict[str, dict[str, int]] = {}
    for feature, value, count in zip(*(total[c].to_pylist() for c in ("feature", "value", "count_sum"))):
        out.setdefault(feature, {})[value] = count
    return out


def block_stats(batch: pa.Table) -> pa.Table:
    """Counts by validation reason (None = valid) and the valid rows' time range, in ``count_values`` form."""
    counts = count_values(batch, [REASON])
    valid_ts = pc.cast(batch.filter(pc.is_null(batch[REASON]))["ts"], pa.int64())
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
    return pa.table(
        {
            "feature": ["examples"] * grouped.num_rows + ["clicks"] * grouped.num_rows,
            "value": pa.concat_arrays([grouped["split"].combine_chunks()] * 2),
            "count": pc.cast(pa.concat_arrays([grouped["label_count"].combine_chunks(), grouped["label_sum"].combine_chunks().cast(pa.int64())]), pa.int64()),
        }
    )


def rows_where(batch: pa.Table, column: str, value: str) -> pa.Table:
    return batch.filter(pc.equal(batch[column], value))


def encode_examples(batch: pa.Table, feature_map: FeatureMap) -> dict[str, np.ndarray]:
    """Raw example rows -> model-ready int64 columns plus label, ts and split."""
    out = feature_map.encode(batch)
    out["label"] = batch["label"].to_numpy().astype(np.float32)
    out["converted"] = batch["converted"].to_numpy().astype(np.float32)
    out["ts"] = pc.cast(batch["ts"], pa.int64()).to_numpy()
    out["split"] = batch["split"].to_numpy(zero_copy_only=False)
    # Ads are not personal data; evaluation needs the raw id to find the clicked ad in the catalog.
    out["raw_ad_id"] = batch["ad_id"].to_numpy(zero_copy_only=False)
    if "true_pctr" in batch.column_names:
        out["true_pctr"] = pc.fill_null(batch["true_pctr"], np.nan).to_numpy().astype(np.float32)
    return out


def read_parquet_checked(path: str, required: tuple[str, ...], what: str) -> ray.data.Dataset:
    ds = ray.data.read_parquet(path)
    schema.check_columns(ds.schema().names, required, f"{what} at {path}")
    return ds


def _reset_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _serving_users(users: pa.Table, latest: pa.Table, feature_map: FeatureMap) -> pa.Table:
    """Encoded user features and latest history, one row per known user, for Serve."""
    # Users who clicked but have no profile row still get their history served.
    unprofiled = latest.filter(pc.invert(pc.is_in(latest["user_id"], value_set=users["user_id"])))
    users = pa.concat_tables([users, pa.table({"user_id": unprofiled["user_id"]})], promote_options="default")
    # Table.join cannot carry list columns, so look histories up by position.
    position = pc.index_in(users["user_id"], value_set=latest["user_id"])
    joined = users.append_column("history", latest["history"].take(position))
    encoded = feature_map.encode(joined)
    columns = {"raw_user_id": joined["user_id"]}
    columns.update({name: encoded[name] for name in feature_map.names("user", "categorical")})
    columns["history"] = pa.array(list(encoded["history"]), pa.list_(pa.int64()))
    columns["history_len"] = encoded["history_len"]
    return pa.table(columns)


def _serving_ads(ads: pa.Table, feature_map: FeatureMap) -> pa.Table:
    """The encoded ad catalog: ``raw_ad_id`` and ``bid`` beside the ad tower's inputs."""
    encoded = feature_map.encode(ads)
    columns = {"raw_ad_id": ads["ad_id"], "bid": ads["bid"]}
    columns.update({name: encoded[name] for name in feature_map.names("ad", "categorical")})
    columns["tokens"] = pa.array(list(encoded["tokens"]), pa.list_(pa.int64()))
    return pa.table(columns)


def validate(events: ray.data.Dataset, p, out: Path) -> tuple[ray.data.Dataset, dict]:
    """Tag every row valid or not, write the invalid ones to ``out/quarantine``, and count.

    Returns the tagged dataset and {rows_read, rows_quarantined, by_reason, ts_min, ts_max};
    raises when the quarantined share passes ``p.max_quarantine_fraction``.
    """
    tagged = events.map_batches(
        tag_invalid, batch_format="pyarrow", fn_kwargs={"min_ts_ms": int(p.min_ts_ms), "max_ts_ms": int(p.max_ts_ms)}
    ).materialize()
    stats = merge_counts(tagged.map_batches(block_stats, batch_format="pyarrow"))
    by_reason = {k: v for k, v in stats.get(REASON, {}).items() if k is not None}
    summary = {
        "rows_read": sum(stats[REASON].values()),
        "rows_quarantined": sum(by_reason.values()),
        "by_reason": by_reason,
    }
    if summary["rows_quarantined"]:
        tagged.map_batches(invalid_rows, batch_format="pyarrow").write_parquet(str(out / "quarantine"))
    share = summary["rows_quarantined"] / max(summary["rows_read"], 1)
    if share > p.max_quarantine_fraction:
        raise ValueError(
            f"{summary['rows_quarantined']} of {summary['rows_read']} events ({share:.1%}) failed validation, above "
            f"data.prepare.max_quarantine_fraction={p.max_quarantine_fraction}; reasons: {by_reason}. "
            f"Inspect {out / 'quarantine'} and fix the source, or raise the threshold."
        )
    if "ts_min" not in stats:
        raise ValueError("the event log has no valid rows: nothing to prepare")
    summary["ts_min"], summary["ts_max"] = min(map(int, stats["ts_min"])), max(map(int, stats["ts_max"]))
    return tagged, summary


def time_cutoffs(t_min: int, t_max: int, split) -> tuple[int, int]:
    """(train_end, validation_end) at fractions ``split.train`` and ``+ split.validation`` of the time span."""
    span = t_max - t_min
    return t_min + int(span * split.train), t_min + int(span * (split.train + split.validation))


def labelled_examples(
    kept: ray.data.Dataset, sources: dict, p, partitions: int, cutoffs: tuple[int, int]
) -> ray.data.Dataset:
    """One raw example per impression, with label, history, split, and user and ad attributes."""
    examples = kept.repartition(partitions, keys=["user_id"], sort=True).map_batches(
        build_examples,
        batch_size=None,  # whole blocks: each holds every event of its users
        batch_format="pyarrow",
        fn_kwargs={"history_length": p.history_length, "cutoffs_ms": cutoffs},
    )
    users = read_parquet_checked(sources["users"], ("user_id",), "user profiles")
    ads = read_parquet_checked(sources["ads"], ("ad_id", "bid"), "ad catalog")
    return (
        examples.join(users, "left_outer", partitions, on=("user_id",))
        .join(ads.drop_columns(["bid"]), "left_outer", partitions, on=("ad_id",))
        .materialize()
    )


def fit_feature_map(examples: ray.data.Dataset, p, metadata: dict) -> FeatureMap:
    """Vocabularies from the training split's value counts (distributed per block, merged here)."""
    specs = feature_specs(p.history_length, p.token_length)
    vocab_columns = sorted({s.vocabulary for s in specs})
    train_rows = examples.map_batches(partial(rows_where, column="split", value="train"), batch_format="pyarrow")
    counts = merge_counts(train_rows.map_batches(count_values, batch_format="pyarrow", fn_kwargs={"columns": vocab_columns}))
    vocabularies = {name: Vocabulary.fit(counts.get(name, {}), p.min_count) for name in vocab_columns}
    return FeatureMap(specs, vocabularies, metadata=metadata)


def write_splits(examples: ray.data.Dataset, feature_map: FeatureMap, out: Path, rows_per_file: int) -> dict:
    """Encode and write ``out/{train,validation,test}/``; return examples and clicks per split."""
    encoded = examples.map_batches(encode_examples, batch_format="pyarrow", fn_kwargs={"feature_map": feature_map}).materialize()
    for split in SPLITS:
        part = encoded.map_batches(partial(rows_where_numpy, value=split), batch_format="numpy")
        part.write_parquet(str(out / split), max_rows_per_file=rows_per_file)
    counts = merge_counts(examples.map_batches(split_stats, batch_format="pyarrow"))
    return {s: {"examples": counts["examples"].get(s, 0), "clicks": counts["clicks"].get(s, 0)} for s in SPLITS}


def write_serving_tables(kept: ray.data.Dataset, sources: dict, feature_map: FeatureMap, out: Path, partitions: int) -> None:
    """``users.parquet`` (features + latest history per user) and ``ads.parquet`` (encoded catalog) for Serve."""
    history_length = feature_map.spec("history").max_len
    clicks = kept.map_batches(partial(rows_where, column="event", value="click"), batch_format="pyarrow")
    latest = clicks.repartition(partitions, keys=["user_id"], sort=True).map_batches(
        latest_history, batch_size=None, batch_format="pyarrow", fn_kwargs={"history_length": history_length}
    )
    latest_table = pa.concat_tables(ray.get(latest.to_arrow_refs()), promote_options="default")
    pq.write_table(_serving_users(pq.read_table(sources["users"]), latest_table, feature_map), out / "users.parquet")
    pq.write_table(_serving_ads(pq.read_table(sources["ads"]), feature_map), out / "ads.parquet")


def run(cfg) -> dict:
    """Prepare ``cfg.data.source`` into ``cfg.paths.prepared_dir``; return the report."""
    started = time.time()
    p = cfg.data.prepare
    out = Path(resolve(cfg.paths.prepared_dir))
    init_ray_from(cfg)
    sources = {k: resolve(v) for k, v in cfg.data.source.items()}
    events = read_parquet_checked(sources["events"], schema.EVENTS_REQUIRED, "event log")
    _reset_dir(out)

    tagged, checked = validate(events, p, out)
    train_end, validation_end = time_cutoffs(checked["ts_min"], checked["ts_max"], p.split)
    # Blocks of about rows_per_partition events each keep per-task memory flat as the log grows.
    partitions = int(p.num_partitions or max(2, math.ceil(checked["rows_read"] / p.rows_per_partition)))
    kept = tagged.map_batches(valid_rows, batch_format="pyarrow")
    examples = labelled_examples(kept, sources, p, partitions, (train_end, validation_end))
    cutoffs = {"start": checked["ts_min"], "train_end": train_end, "validation_end": validation_end, "end": checked["ts_max"]}
    feature_map = fit_feature_map(examples, p, metadata={"cutoffs_ms": cutoffs, "sources": sources})
    feature_map.save(out / "feature_map.json")
    splits = write_splits(examples, feature_map, out, int(p.rows_per_file))
    write_serving_tables(kept, sources, feature_map, out, partitions)

    report = {
        "rows_read": checked["rows_read"],
        "rows_kept": checked["rows_read"] - checked["rows_quarantined"],
        "rows_quarantined": checked["rows_quarantined"],
        "quarantined_by_reason": checked["by_reason"],
        "splits": splits,
        "cutoffs_ms": cutoffs,
        "vocabulary_sizes": {name: v.cardinality for name, v in feature_map.vocabularies.items()},
        "partitions": partitions,
        "seconds": round(time.time() - started, 1),
    }
    write_json(out / "report.json", report)
    return report


def rows_where_numpy(batch: dict[str, np.ndarray], value: str) -> dict[str, np.ndarray]:
    keep = batch["split"] == value
    return {k: v[keep] for k, v in batch.items() if k != "split"}
