"""Preparation on Ray Data: a user's logs, as they are -> validated, encoded example shards.

    source --canonicalise, validate, pseudonymise--> rows | quarantine (with a reason)
    rows --dedupe by event_id--> kept --partition by user--> examples (label, history, split)
    examples --join--> user and ad attributes (side tables)
    training split --per-block counts and samples--> vocabularies, quantile boundaries (feature map)
    examples --encode--> train/ validation/ test/ Parquet shards

Plus the serving side tables: the encoded ad catalog and each user's features and latest
history. Intermediates that several steps read (validated rows, raw examples) are staged as
compressed Parquet under ``out/_stage`` (adrec.data.staging), not materialised in the object
store, so neither memory nor spill grows with the log. Every count goes into ``report.json``
(adrec.results.PrepareReport); rows read = kept + quarantined.
A new dataset needs a YAML file under conf/data/, not code: adrec.data.options reads and checks
it, adrec.data.blocks holds the per-block functions the steps below run.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from omegaconf import OmegaConf
from ray.data import DataContext

from adrec.data.blocks import (
    block_stats,
    count_values,
    drop_unused,
    encode_examples,
    history_lookups,
    ingest,
    merge_counts,
    rows_where,
    sample_numbers,
    serving_ads,
    serving_users,
    split_stats,
)
from adrec.data.history import SPLITS, LabelRule, SplitRule, build_examples, latest_history, positive_rows
from adrec.data.options import DataOptions, PrepareOptions, SplitOptions, feature_specs
from adrec.data.privacy import pseudonym_key
from adrec.data.sources import BATCH_ROWS, read_source, read_table
from adrec.data.staging import parquet_rows, stage, staged
from adrec.data.validate import REASON, invalid_rows, mark_duplicates, valid_rows
from adrec.features import FeatureMap, FeatureSpec, Vocabulary
from adrec.results import PrepareReport
from adrec.runtime import init_ray_from, resolve

# The split files' row groups: the training stream shuffles its order per epoch at this grain
# (adrec.train.driver.epoch_row_groups), so it is small beside the trainer's shuffle buffer.
ROW_GROUP_ROWS = 8192


def validate(data: DataOptions, out: Path, key: bytes | None) -> tuple[Path, dict]:
    """Read and validate the event log; write invalid rows to ``out/quarantine``; count.

    Returns the staged validated rows (valid and invalid, tagged with REASON) and the counts.
    Raises when the quarantined share passes ``data.prepare.max_quarantine_fraction``.
    """
    p, columns = data.prepare, data.columns
    spec = data.source("events")
    rules = data.rules("events", columns)
    needed = list(columns.values()) + list(rules.features)
    tagged = read_source(spec, needed, f"event log at {spec.paths}").map_batches(
        ingest, batch_size=BATCH_ROWS, batch_format="pyarrow", fn_kwargs={"rules": rules, "key": key, "fill_missing": spec.format == "json"}
    )
    checked = stage(tagged, out / "_stage" / "tagged", p.rows_per_file)
    if "event_id" in columns:
        partitions = max(2, math.ceil(parquet_rows(checked) / p.rows_per_partition))
        deduped = staged(checked).repartition(partitions, keys=["event_id"]).map_batches(mark_duplicates, batch_size=None, batch_format="pyarrow")
        checked = stage(deduped, out / "_stage" / "checked", p.rows_per_file)
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


def split_rule(s: SplitOptions, checked: dict) -> SplitRule:
    """The split rule of ``data.prepare.split`` for a log whose validated counts (and time range) are ``checked``."""
    cutoffs, replay = None, {}
    if s.kind == "time":
        if "ts_min" not in checked:
            raise ValueError("data.prepare.split.kind=time needs a time column: map data.events.columns.ts, or use split.kind=random")
        span = checked["ts_max"] - checked["ts_min"]
        cutoffs = (checked["ts_min"] + int(span * s.train), checked["ts_min"] + int(span * (s.train + s.validation)))
        if s.cutoffs_ms:
            cutoffs = s.cutoffs_ms
        if s.replay_before_ms is not None:
            replay = {"replay_before_ms": s.replay_before_ms, "replay": s.replay}
    elif s.cutoffs_ms or s.replay_before_ms is not None:
        raise ValueError(f"data.prepare.split.cutoffs_ms and replay_before_ms apply to split.kind=time, not {s.kind}")
    folds = {"folds": s.folds, "fold": s.fold} if s.kind == "kfold" else {}
    return SplitRule(kind=s.kind, train=s.train, validation=s.validation, cutoffs_ms=cutoffs, **folds, **replay)


def side_table(data: DataOptions, table: str, key: bytes | None) -> tuple[pa.Table | None, dict]:
    """A side table (users, ads) read on the driver, keyed by user_id / ad_id, with its own counts."""
    section = data.sources.get(table)
    if not section:
        return None, {}
    role = {"users": "user_id", "ads": "ad_id"}[table]
    columns = {role: section["key"]}
    if table == "ads" and section.get("bid"):
        columns["bid"] = section["bid"]
    spec = data.source(table)
    rules = data.rules(table, {role: section["key"]})
    raw = read_table(spec, list(columns.values()) + list(rules.features), f"{table} table at {spec.paths}")
    rows = ingest(raw, rules, key if table == "users" else None, spec.format == "json")
    if "bid" in columns:
        rows = rows.append_column("bid", pc.cast(raw[section["bid"]], pa.float32()))
    counts = dict(zip(*np.unique(rows[REASON].drop_null().to_numpy(zero_copy_only=False), return_counts=True), strict=True))
    report = {"rows_read": rows.num_rows, "rows_quarantined": int(sum(counts.values())), "by_reason": {k: int(v) for k, v in counts.items()}}
    return valid_rows(rows), report


def labelled_examples(
    kept, by_user: bool, p: PrepareOptions, rule: SplitRule, label_rule: LabelRule | None, seed: int, partitions: int, users, ads, path: Path
) -> Path:
    """One raw example per impression or labelled row, with history, split and side attributes, staged at ``path``.

    ``by_user``: the log has users, so each block must hold every event of its users."""
    kwargs = {"history_length": p.history_length, "history_scope": p.history_scope, "split": rule, "label_rule": label_rule, "seed": seed}
    if by_user:
        examples = kept.repartition(partitions, keys=["user_id"], sort=True).map_batches(
            build_examples,
            batch_size=None,
            batch_format="pyarrow",
            fn_kwargs=kwargs,  # whole blocks: every event of a user
        )
    else:
        examples = kept.map_batches(build_examples, batch_size=BATCH_ROWS, batch_format="pyarrow", fn_kwargs=kwargs)
    if users is not None:
        examples = examples.join(ray.data.from_arrow(users), "left_outer", partitions, on=("user_id",))
    if ads is not None:
        attributes = ads.drop_columns([c for c in ("bid",) if c in ads.column_names])
        examples = examples.join(ray.data.from_arrow(attributes), "left_outer", partitions, on=("ad_id",))
    return stage(examples, path, p.rows_per_file)


def fit_feature_map(
    examples: Path,
    specs: list[FeatureSpec],
    min_count: Mapping[str, int],
    quantiles: Mapping[str, int],
    base: FeatureMap | None,
    seed: int,
    metadata: dict,
) -> FeatureMap:
    """Vocabularies and quantile boundaries from the training split (distributed per block, merged here).

    ``min_count``: per vocabulary; ``quantiles``: buckets per numeric column. With ``base`` (a serving
    model's map, for retraining), vocabularies grow from it, old values keeping their indices, and
    bucket boundaries stay its own.
    """
    vocab_columns = sorted({s.vocabulary for s in specs if s.vocabulary and s.kind in ("categorical", "sequence")})
    numeric = [s.column for s in specs if s.kind == "bucket"]
    train = staged(examples, ["split", *vocab_columns, *numeric]).map_batches(
        partial(rows_where, column="split", value="train"), batch_size=BATCH_ROWS, batch_format="pyarrow"
    )
    counts = (
        merge_counts(train.map_batches(count_values, batch_size=BATCH_ROWS, batch_format="pyarrow", fn_kwargs={"columns": vocab_columns}))
        if vocab_columns
        else {}
    )
    vocabularies = {
        name: base.vocabularies[name].extend(counts.get(name, {}), min_count[name])
        if base is not None and name in base.vocabularies
        else Vocabulary.fit(counts.get(name, {}), min_count[name])
        for name in vocab_columns
    }
    if numeric:
        samples = ray.get(
            train.map_batches(
                sample_numbers, batch_size=BATCH_ROWS, batch_format="pyarrow", fn_kwargs={"columns": numeric, "seed": seed}
            ).to_arrow_refs()
        )
        pooled = pa.concat_tables(samples)
        fitted = []
        for spec in specs:
            if spec.kind == "bucket" and base is not None and spec.name in {f.name for f in base.features}:
                spec = FeatureSpec(**{**vars(spec), "boundaries": base.spec(spec.name).boundaries})  # bucket ids must not move
            elif spec.kind == "bucket":
                values = pooled.filter(pc.equal(pooled["feature"], spec.column))["value"].to_numpy()
                edges = np.unique(np.quantile(values, np.linspace(0, 1, quantiles[spec.column] + 1)[1:-1])) if len(values) else np.array([])
                spec = FeatureSpec(**{**vars(spec), "boundaries": tuple(float(e) for e in edges)})
            fitted.append(spec)
        specs = fitted
    return FeatureMap(specs, vocabularies, metadata=metadata)


def write_splits(examples: Path, feature_map: FeatureMap, lookups: dict, out: Path, rows_per_file: int, seed: int) -> dict:
    """Encode and write ``out/{train,validation,test}/`` (rows shuffled, seeded); return examples and clicks per split."""
    used = staged(examples).map_batches(drop_unused, batch_size=BATCH_ROWS, batch_format="pyarrow")
    encoded = used.map_batches(
        encode_examples, batch_size=BATCH_ROWS, batch_format="pyarrow", fn_kwargs={"feature_map": feature_map, "lookups": lookups, "seed": seed}
    )
    # One streaming pass writes all three splits (hive folders split=train, ...), so the encoded
    # examples never sit in the object store; the folders are then renamed to plain split names.
    encoded.write_parquet(str(out / "_encoded"), partition_cols=["split"], max_rows_per_file=rows_per_file, row_group_size=ROW_GROUP_ROWS)
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


def write_serving_tables(
    kept, label_rule: LabelRule | None, history_length: int, feature_map: FeatureMap, out: Path, partitions: int, users, ads
) -> None:
    """``users.parquet`` (features + latest history) and ``ads.parquet`` (encoded catalog), when the log has them."""
    if "history" in {f.name for f in feature_map.features}:
        positives = kept.map_batches(positive_rows, batch_size=BATCH_ROWS, batch_format="pyarrow", fn_kwargs={"label_rule": label_rule})
        latest = positives.repartition(partitions, keys=["user_id"], sort=True).map_batches(
            latest_history, batch_size=None, batch_format="pyarrow", fn_kwargs={"history_length": history_length}
        )
        latest_table = pa.concat_tables(ray.get(latest.to_arrow_refs()), promote_options="default")
        pq.write_table(serving_users(users, latest_table, feature_map), out / "users.parquet")
    if ads is not None:
        pq.write_table(serving_ads(ads, feature_map), out / "ads.parquet")


def prepare(data: Mapping, out: Path, seed: int, *, grow_from: Path | None = None, split: dict | None = None) -> PrepareReport:
    """Prepare the logs that ``data`` describes into ``out`` (replaced if it exists); write and return the report.

    ``data``: the ``data`` config group as plain values (``OmegaConf.to_container(cfg.data, resolve=True)``),
    checked before any work starts. ``grow_from``: a feature map (the serving model's, when retraining)
    whose vocabularies grow, old values keeping their indices, and whose bucket boundaries stay;
    it replaces ``data.prepare.base_feature_map``. ``split``: keys of ``data.prepare.split`` to
    override (retraining: kind=time, cutoffs_ms, replay_before_ms, replay).
    """
    started = time.time()
    options = DataOptions.parse(data, grow_from=grow_from, split=split)
    p = options.prepare
    out = Path(resolve(out))
    # Ray batches up to 1 GiB of input per shuffle-map task by default, so a task's memory grew
    # with the log until that cap; a smaller batch keeps it flat (more, smaller shards).
    DataContext.get_current().shuffle_input_batch_bytes = p.shuffle_batch_mb * 2**20
    key = pseudonym_key(options.pseudonym_key) if options.pseudonymize else None
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    validated, checked = validate(options, out, key)
    rule = split_rule(p.split, checked)
    # Blocks of about rows_per_partition events each keep per-task memory flat as the log grows.
    partitions = p.num_partitions or max(2, math.ceil(checked["rows_read"] / p.rows_per_partition))
    users, users_report = side_table(options, "users", key)
    ads, ads_report = side_table(options, "ads", key)
    kept = staged(validated).map_batches(valid_rows, batch_size=BATCH_ROWS, batch_format="pyarrow")
    examples = labelled_examples(
        kept, "user_id" in options.columns, p, rule, options.label_rule, seed, partitions, users, ads, out / "_stage" / "examples"
    )
    metadata = {
        "dataset": options.name,
        "split": {
            "kind": rule.kind,
            "cutoffs_ms": rule.cutoffs_ms,
            **({"replay_before_ms": rule.replay_before_ms, "replay": rule.replay} if rule.replay_before_ms is not None else {}),
        },
        "pseudonymized": key is not None,
    }
    specs = feature_specs(options)
    base = FeatureMap.load(resolve(p.base_feature_map)) if p.base_feature_map else None
    min_count = {s.vocabulary: options.min_count(s.vocabulary) for s in specs if s.vocabulary}
    quantiles = {n: o.quantiles for n, o in options.features.items() if o.quantiles}
    feature_map = fit_feature_map(examples, specs, min_count, quantiles, base, seed, metadata)
    feature_map.save(out / "feature_map.json")
    lookups = history_lookups(ads, p.history_attributes)
    splits = write_splits(examples, feature_map, lookups, out, p.rows_per_file, seed)
    write_serving_tables(kept, options.label_rule, p.history_length, feature_map, out, partitions, users, ads)
    shutil.rmtree(out / "_stage")

    report = PrepareReport(
        dataset=options.name,
        rows_read=checked["rows_read"],
        rows_kept=checked["rows_read"] - checked["rows_quarantined"],
        rows_quarantined=checked["rows_quarantined"],
        quarantined_by_reason=checked["by_reason"],
        side_tables={"users": users_report, "ads": ads_report},
        splits=splits,
        split=metadata["split"],
        ts_range_ms=[checked["ts_min"], checked["ts_max"]] if "ts_min" in checked else None,  # retraining: what is new after this
        vocabulary_sizes={name: v.cardinality for name, v in feature_map.vocabularies.items()},
        partitions=partitions,
        seconds=round(time.time() - started, 1),
    )
    report.save(out)
    return report


def run(cfg) -> dict:
    """jobs/prepare.py: ``cfg.data`` into ``cfg.paths.prepared_dir``; the report as the job prints it."""
    init_ray_from(cfg)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    return prepare(data, Path(resolve(cfg.paths.prepared_dir)), int(cfg.seed)).to_json()
