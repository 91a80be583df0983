"""Preparation on Ray Data: a user's logs, as they are -> validated, encoded example shards.

    source --canonicalise, validate, pseudonymise--> rows | quarantine (with a reason)
    rows --dedupe by event_id--> kept --partition by user--> examples (label, history, split)
    examples --join--> user and ad attributes (side tables)
    training split --per-block counts and samples--> vocabularies, quantile boundaries (feature map)
    examples --encode--> train/ validation/ test/ Parquet shards

Plus the serving side tables: the encoded ad catalog and each user's features and latest
history. Intermediates that several steps read (validated rows, raw examples) are staged as
compressed Parquet under ``out/_stage`` (adrec.data.staging), not materialised in the object
store, so neither memory nor spill grows with the log. Every count goes into ``report.json``; rows read = kept + quarantined.
A new dataset needs a YAML file under conf/data/, not code.
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
from omegaconf import OmegaConf
from ray.data import DataContext
from ray.data.extensions import ArrowTensorArray

from adrec.data.history import SPLITS, LabelRule, SplitRule, build_examples, latest_history, positive_rows
from adrec.data.privacy import pseudonym_key, pseudonymize
from adrec.data.sources import BATCH_ROWS, RAW_LINE, SourceSpec, read_source, read_table
from adrec.data.staging import parquet_rows, stage, staged
from adrec.data.validate import REASON, Rules, canonicalize, invalid_rows, mark_duplicates, valid_rows
from adrec.features import FeatureMap, FeatureSpec, Vocabulary, add_history_attributes, stable_hash
from adrec.runtime import init_ray_from, resolve, write_json

TABLE_GROUPS = {"events": "context", "users": "user", "ads": "ad"}
QUANTILE_SAMPLE = 2_000  # values drawn per block to fit quantile boundaries


# ---------------------------------------------------------------- config -> rules and specs


def feature_options(cfg) -> dict[str, dict]:
    """{column: options} for every declared feature, with ``table`` and ``group`` filled in."""
    out = {}
    for table, group in TABLE_GROUPS.items():
        section = cfg.data.get(table)
        for name, options in ((section or {}).get("features") or {}).items():
            options = OmegaConf.to_container(options, resolve=True) if options is not None else {}
            out[name] = {"table": table, "group": options.get("group", group), "kind": "categorical", **options}
    return out


def rules_for(cfg, table: str, columns: dict) -> Rules:
    p = cfg.data.prepare
    features = {n: o["kind"] for n, o in feature_options(cfg).items() if o["table"] == table}
    return Rules(
        columns=columns,
        features=features,
        min_ts_ms=int(p.min_ts_ms),
        max_ts_ms=int(p.max_ts_ms),
        time_unit=cfg.data.get("time_unit", "s"),
        time_format=cfg.data.get("time_format", "%Y-%m-%dT%H:%M:%S"),
        max_string_length=int(p.max_string_length),
    )


def event_columns(cfg) -> dict[str, str | None]:
    columns = {k: v for k, v in OmegaConf.to_container(cfg.data.events.columns, resolve=True).items() if v}
    if "event" in columns and "label" in columns:
        raise ValueError("data.events.columns maps both event and label: a log is either an event log or labelled rows")
    if "event" not in columns and "label" not in columns:
        raise ValueError("data.events.columns must map event (impression/click/conversion rows) or label (labelled rows)")
    return columns


def feature_specs(cfg, columns: dict) -> list[FeatureSpec]:
    """The model inputs this dataset yields, each tagged with its tower (boundaries fitted later)."""
    p = cfg.data.prepare
    specs = []
    if "user_id" in columns:
        specs.append(FeatureSpec("user_id", "user", "categorical", "user_id", hash_buckets=int(p.id_hash_buckets or 0)))
    if "ad_id" in columns:
        specs.append(FeatureSpec("ad_id", "ad", "categorical", "ad_id", hash_buckets=int(p.id_hash_buckets or 0)))
        if "user_id" in columns and "ts" in columns:
            specs.append(FeatureSpec("history", "user", "sequence", "ad_id", p.history_length, hash_buckets=int(p.id_hash_buckets or 0)))
            options = feature_options(cfg)
            for attribute in p.get("history_attributes") or []:
                hashed = int(options[attribute].get("hash_buckets") or 0)
                specs.append(FeatureSpec(f"history_{attribute}", "user", "sequence", None if hashed else attribute,
                                         p.history_length, hash_buckets=hashed))
    for name, o in feature_options(cfg).items():
        hashed = int(o.get("hash_buckets") or 0)
        if o["kind"] == "categorical":
            specs.append(FeatureSpec(name, o["group"], "categorical", None if hashed else name, hash_buckets=hashed))
        elif o["kind"] == "text":
            specs.append(FeatureSpec(name, o["group"], "sequence", None, int(o.get("max_len", 16)),
                                     hash_buckets=hashed or 4096, tokenize=True))
        elif o["kind"] == "numeric":
            specs.append(FeatureSpec(name, o["group"], "dense", log1p=bool(o.get("log1p", False))))
            if o.get("quantiles"):
                specs.append(FeatureSpec(f"{name}_q", o["group"], "bucket", boundaries=(), source=name))
        else:
            raise ValueError(f"feature {name}: kind {o['kind']!r} is not one of categorical, numeric, text")
    return specs


# ---------------------------------------------------------------- per-block functions


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
            total = pa.concat_tables(tables).group_by(["feature", "value"]).aggregate([("count", "sum")]).rename_columns(["feature", "value", "count"])
    if total is None:
        return {}
    out: dict[str, dict[str, int]] = {}
    for feature, value, count in zip(*(total[c].to_pylist() for c in ("feature", "value", "count"))):
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


def encode_examples(batch: pa.Table, feature_map: FeatureMap, lookups: dict) -> pa.Table:
    """Raw example rows -> model-ready columns plus label, ts, split (and truth where known)."""
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


# ---------------------------------------------------------------- steps


def validate(cfg, out: Path, columns: dict, key: bytes | None) -> tuple[Path, dict]:
    """Read and validate the event log; write invalid rows to ``out/quarantine``; count.

    Returns the staged validated rows (valid and invalid, tagged with REASON) and the counts.
    Raises when the quarantined share passes ``data.prepare.max_quarantine_fraction``.
    """
    p = cfg.data.prepare
    spec = SourceSpec.from_config(OmegaConf.to_container(cfg.data.events, resolve=True))
    rules = rules_for(cfg, "events", columns)
    needed = list(columns.values()) + list(rules.features)
    tagged = read_source(spec, needed, f"event log at {spec.paths}").map_batches(
        ingest, batch_size=BATCH_ROWS, batch_format="pyarrow", fn_kwargs={"rules": rules, "key": key, "fill_missing": spec.format == "json"}
    )
    checked = stage(tagged, out / "_stage" / "tagged", int(p.rows_per_file))
    if "event_id" in columns:
        partitions = max(2, math.ceil(parquet_rows(checked) / p.rows_per_partition))
        deduped = staged(checked).repartition(partitions, keys=["event_id"]).map_batches(mark_duplicates, batch_size=None, batch_format="pyarrow")
        checked = stage(deduped, out / "_stage" / "checked", int(p.rows_per_file))
        shutil.rmtree(out / "_stage" / "tagged")
    stat_columns = [REASON] + (["ts"] if "ts" in columns else [])
    stats = merge_counts(staged(checked, stat_columns).map_batches(block_stats, batch_size=BATCH_ROWS, batch_format="pyarrow"))
    by_reason = {k: v for k, v in stats.get(REASON, {}).items() if k is not None}
    summary = {"rows_read": sum(stats.get(REASON, {}).values()), "rows_quarantined": sum(by_reason.values()), "by_reason": by_reason}
    if summary["rows_quarantined"]:
        staged(checked).map_batches(invalid_rows, batch_size=BATCH_ROWS, batch_format="pyarrow").write_parquet(str(out / "quarantine"))
    share = summary["rows_quarantined"] / max(summary["rows_read"], 1)
    if share > p.max_quarantine_fraction or summary["rows_read"] == summary["rows_quarantined"]:
        raise ValueError(
            f"{summary['rows_quarantined']} of {summary['rows_read']} events ({share:.1%}) failed validation, above "
            f"data.prepare.max_quarantine_fraction={p.max_quarantine_fraction}; reasons: {by_reason}. "
            f"Inspect {out / 'quarantine'} and fix the source or its column mapping, or raise the threshold."
        )
    if "ts_min" in stats:
        summary["ts_min"], summary["ts_max"] = min(map(int, stats["ts_min"])), max(map(int, stats["ts_max"]))
    return checked, summary


def split_rule(cfg, checked: dict) -> SplitRule:
    s = cfg.data.prepare.split
    cutoffs, replay = None, {}
    if s.kind == "time":
        if "ts_min" not in checked:
            raise ValueError("data.prepare.split.kind=time needs a time column: map data.events.columns.ts, or use split.kind=random")
        span = checked["ts_max"] - checked["ts_min"]
        cutoffs = (checked["ts_min"] + int(span * s.train), checked["ts_min"] + int(span * (s.train + s.validation)))
        if s.get("cutoffs_ms"):
            cutoffs = tuple(int(c) for c in s.cutoffs_ms)
        if s.get("replay_before_ms") is not None:
            replay = {"replay_before_ms": int(s.replay_before_ms), "replay": float(s.get("replay", 1.0))}
    elif s.get("cutoffs_ms") or s.get("replay_before_ms") is not None:
        raise ValueError(f"data.prepare.split.cutoffs_ms and replay_before_ms apply to split.kind=time, not {s.kind}")
    folds = {"folds": int(s.folds), "fold": int(s.fold)} if s.kind == "kfold" else {}
    return SplitRule(kind=s.kind, train=float(s.train), validation=float(s.validation), cutoffs_ms=cutoffs, **folds, **replay)


def label_rule(cfg) -> LabelRule | None:
    rule = cfg.data.get("label_rule")
    return LabelRule(**OmegaConf.to_container(rule, resolve=True)) if rule else None


def side_table(cfg, table: str, key: bytes | None) -> tuple[pa.Table | None, dict]:
    """A side table (users, ads) read on the driver, keyed by user_id / ad_id, with its own counts."""
    section = cfg.data.get(table)
    if not section:
        return None, {}
    role = {"users": "user_id", "ads": "ad_id"}[table]
    columns = {role: section.key}
    if table == "ads" and section.get("bid"):
        columns["bid"] = section.bid
    spec = SourceSpec.from_config(OmegaConf.to_container(section, resolve=True))
    rules = rules_for(cfg, table, {role: section.key})
    raw = read_table(spec, list(columns.values()) + list(rules.features), f"{table} table at {spec.paths}")
    rows = ingest(raw, rules, key if table == "users" else None, spec.format == "json")
    if "bid" in columns:
        rows = rows.append_column("bid", pc.cast(raw[section.bid], pa.float32()))
    counts = dict(zip(*np.unique(rows[REASON].drop_null().to_numpy(zero_copy_only=False), return_counts=True)))
    report = {"rows_read": rows.num_rows, "rows_quarantined": int(sum(counts.values())), "by_reason": {k: int(v) for k, v in counts.items()}}
    return valid_rows(rows), report


def labelled_examples(kept, cfg, columns: dict, rule: SplitRule, partitions: int, users, ads, path: Path) -> Path:
    """One raw example per impression or labelled row, with history, split and side attributes, staged at ``path``."""
    kwargs = {"history_length": int(cfg.data.prepare.history_length), "split": rule, "label_rule": label_rule(cfg), "seed": int(cfg.seed)}
    if "user_id" in columns:
        examples = kept.repartition(partitions, keys=["user_id"], sort=True).map_batches(
            build_examples, batch_size=None, batch_format="pyarrow", fn_kwargs=kwargs  # whole blocks: every event of a user
        )
    else:
        examples = kept.map_batches(build_examples, batch_size=BATCH_ROWS, batch_format="pyarrow", fn_kwargs=kwargs)
    if users is not None:
        examples = examples.join(ray.data.from_arrow(users), "left_outer", partitions, on=("user_id",))
    if ads is not None:
        attributes = ads.drop_columns([c for c in ("bid",) if c in ads.column_names])
        examples = examples.join(ray.data.from_arrow(attributes), "left_outer", partitions, on=("ad_id",))
    return stage(examples, path, int(cfg.data.prepare.rows_per_file))


def fit_feature_map(examples: Path, specs: list[FeatureSpec], cfg, metadata: dict) -> FeatureMap:
    """Vocabularies and quantile boundaries from the training split (distributed per block, merged here).

    With ``data.prepare.base_feature_map`` (a serving model's map, for retraining), vocabularies
    grow from it, old values keeping their indices, and bucket boundaries stay its own.
    """
    vocab_columns = sorted({s.vocabulary for s in specs if s.vocabulary and s.kind in ("categorical", "sequence")})
    numeric = [s.column for s in specs if s.kind == "bucket"]
    train = staged(examples, ["split", *vocab_columns, *numeric]).map_batches(
        partial(rows_where, column="split", value="train"), batch_size=BATCH_ROWS, batch_format="pyarrow"
    )
    counts = merge_counts(train.map_batches(count_values, batch_size=BATCH_ROWS, batch_format="pyarrow", fn_kwargs={"columns": vocab_columns})) if vocab_columns else {}
    options = feature_options(cfg)
    min_count = lambda name: int(options.get(name, {}).get("min_count", cfg.data.prepare.min_count))  # noqa: E731
    base = FeatureMap.load(resolve(cfg.data.prepare.base_feature_map)) if cfg.data.prepare.get("base_feature_map") else None
    vocabularies = {
        name: base.vocabularies[name].extend(counts.get(name, {}), min_count(name))
        if base is not None and name in base.vocabularies
        else Vocabulary.fit(counts.get(name, {}), min_count(name))
        for name in vocab_columns
    }
    if numeric:
        samples = ray.get(train.map_batches(sample_numbers, batch_size=BATCH_ROWS, batch_format="pyarrow", fn_kwargs={"columns": numeric, "seed": int(cfg.seed)}).to_arrow_refs())
        pooled = pa.concat_tables(samples)
        fitted = []
        for spec in specs:
            if spec.kind == "bucket" and base is not None and spec.name in {f.name for f in base.features}:
                spec = FeatureSpec(**{**vars(spec), "boundaries": base.spec(spec.name).boundaries})  # bucket ids must not move
            elif spec.kind == "bucket":
                values = pooled.filter(pc.equal(pooled["feature"], spec.column))["value"].to_numpy()
                quantiles = int(options[spec.column]["quantiles"])
                edges = np.unique(np.quantile(values, np.linspace(0, 1, quantiles + 1)[1:-1])) if len(values) else np.array([])
                spec = FeatureSpec(**{**vars(spec), "boundaries": tuple(float(e) for e in edges)})
            fitted.append(spec)
        specs = fitted
    return FeatureMap(specs, vocabularies, metadata=metadata)


def history_lookups(ads: pa.Table | None, attributes: list[str]) -> dict[str, tuple[pa.Array, pa.Array]]:
    """{attribute: (ad ids, raw values)} from the catalog, for ``history_<attribute>`` features."""
    if not attributes:
        return {}
    if ads is None:
        raise ValueError("data.prepare.history_attributes needs an ad catalog (data.ads)")
    return {a: (ads["ad_id"].combine_chunks(), ads[a].combine_chunks()) for a in attributes}


def write_splits(examples: Path, feature_map: FeatureMap, lookups: dict, out: Path, rows_per_file: int) -> dict:
    """Encode and write ``out/{train,validation,test}/``; return examples and clicks per split."""
    used = staged(examples).map_batches(drop_unused, batch_size=BATCH_ROWS, batch_format="pyarrow")
    encoded = used.map_batches(
        encode_examples, batch_size=BATCH_ROWS, batch_format="pyarrow", fn_kwargs={"feature_map": feature_map, "lookups": lookups}
    )
    # One streaming pass writes all three splits (hive folders split=train, ...), so the encoded
    # examples never sit in the object store; the folders are then renamed to plain split names.
    encoded.write_parquet(str(out / "_encoded"), partition_cols=["split"], max_rows_per_file=rows_per_file)
    for split in SPLITS:
        written = out / "_encoded" / f"split={split}"
        if written.exists():
            written.rename(out / split)
        else:
            (out / split).mkdir()
    shutil.rmtree(out / "_encoded")
    counts = merge_counts(staged(examples, ["split", "label"]).map_batches(split_stats, batch_size=BATCH_ROWS, batch_format="pyarrow"))
    names = SPLITS + (("unused",) if "unused" in counts["examples"] else ())
    return {s: {"examples": counts["examples"].get(s, 0), "clicks": counts["clicks"].get(s, 0)} for s in names}


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


def write_serving_tables(kept, cfg, feature_map: FeatureMap, out: Path, partitions: int, users, ads) -> None:
    """``users.parquet`` (features + latest history) and ``ads.parquet`` (encoded catalog), when the log has them."""
    if "history" in {f.name for f in feature_map.features}:
        positives = kept.map_batches(positive_rows, batch_size=BATCH_ROWS, batch_format="pyarrow", fn_kwargs={"label_rule": label_rule(cfg)})
        latest = positives.repartition(partitions, keys=["user_id"], sort=True).map_batches(
            latest_history, batch_size=None, batch_format="pyarrow", fn_kwargs={"history_length": int(cfg.data.prepare.history_length)}
        )
        latest_table = pa.concat_tables(ray.get(latest.to_arrow_refs()), promote_options="default")
        pq.write_table(serving_users(users, latest_table, feature_map), out / "users.parquet")
    if ads is not None:
        pq.write_table(serving_ads(ads, feature_map), out / "ads.parquet")


def run(cfg) -> dict:
    """Prepare ``cfg.data`` into ``cfg.paths.prepared_dir``; return the report."""
    started = time.time()
    p = cfg.data.prepare
    out = Path(resolve(cfg.paths.prepared_dir))
    init_ray_from(cfg)
    # Ray batches up to 1 GiB of input per shuffle-map task by default, so a task's memory grew
    # with the log until that cap; a smaller batch keeps it flat (more, smaller shards).
    DataContext.get_current().shuffle_input_batch_bytes = int(p.shuffle_batch_mb) * 2**20
    columns = event_columns(cfg)
    key = pseudonym_key(cfg.data.get("pseudonym_key")) if cfg.data.get("pseudonymize") else None
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    validated, checked = validate(cfg, out, columns, key)
    rule = split_rule(cfg, checked)
    # Blocks of about rows_per_partition events each keep per-task memory flat as the log grows.
    partitions = int(p.num_partitions or max(2, math.ceil(checked["rows_read"] / p.rows_per_partition)))
    users, users_report = side_table(cfg, "users", key)
    ads, ads_report = side_table(cfg, "ads", key)
    kept = staged(validated).map_batches(valid_rows, batch_size=BATCH_ROWS, batch_format="pyarrow")
    examples = labelled_examples(kept, cfg, columns, rule, partitions, users, ads, out / "_stage" / "examples")
    metadata = {
        "dataset": cfg.data.name,
        "split": {"kind": rule.kind, "cutoffs_ms": rule.cutoffs_ms, **({"replay_before_ms": rule.replay_before_ms, "replay": rule.replay}
                                                                      if rule.replay_before_ms is not None else {})},
        "pseudonymized": key is not None,
    }
    feature_map = fit_feature_map(examples, feature_specs(cfg, columns), cfg, metadata)
    feature_map.save(out / "feature_map.json")
    lookups = history_lookups(ads, list(p.get("history_attributes") or []))
    splits = write_splits(examples, feature_map, lookups, out, int(p.rows_per_file))
    write_serving_tables(kept, cfg, feature_map, out, partitions, users, ads)
    shutil.rmtree(out / "_stage")

    report = {
        "dataset": cfg.data.name,
        "rows_read": checked["rows_read"],
        "rows_kept": checked["rows_read"] - checked["rows_quarantined"],
        "rows_quarantined": checked["rows_quarantined"],
        "quarantined_by_reason": checked["by_reason"],
        "side_tables": {"users": users_report, "ads": ads_report},
        "splits": splits,
        "split": metadata["split"],
        "ts_range_ms": [checked["ts_min"], checked["ts_max"]] if "ts_min" in checked else None,  # retraining: what is new after this
        "vocabulary_sizes": {name: v.cardinality for name, v in feature_map.vocabularies.items()},
        "partitions": partitions,
        "seconds": round(time.time() - started, 1),
    }
    write_json(out / "report.json", report)
    return report
