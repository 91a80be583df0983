"""The ``data`` config group, read into checked, typed options: what preparation reads of it.

    data.prepare                  -> PrepareOptions, its ``split`` -> SplitOptions
    data.<table>.features.<name>  -> FeatureOptions (table: events, users or ads)
    the whole group               -> DataOptions, which derives the validation Rules of each
                                     source and the FeatureSpecs of the model's inputs

Each section is checked against its dataclass: a misspelt key (``min_cout: 3``) is an error
naming the key, its section and the known keys, never silently ignored. Defaults have one home,
conf/data/prepare/default.yaml: every PrepareOptions field is required, and a feature's
``min_count``, and a text feature's ``max_len`` and ``hash_buckets``, default to the section's
``min_count``, ``text_max_len`` and ``text_hash_buckets``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from adrec.data.history import LabelRule
from adrec.data.sources import SourceSpec
from adrec.data.validate import Rules
from adrec.features import FeatureSpec

TABLE_GROUPS = {"events": "context", "users": "user", "ads": "ad"}  # a declared feature's tower by default
KINDS = ("categorical", "numeric", "text")
ROLES = ("event_id", "ts", "user_id", "ad_id", "event", "impression_id", "label", "true_pctr")  # data.events.columns
SOURCE_KEYS = {
    "events": ("path", "format", "csv", "columns", "features"),
    "users": ("path", "format", "csv", "key", "features"),
    "ads": ("path", "format", "csv", "key", "bid", "features"),
}
CSV_KEYS = ("delimiter", "header", "column_names", "encoding")


def check_keys(section: Mapping, known: Iterable[str], where: str) -> None:
    """A ValueError naming each key of ``section`` that is not ``known``, the closest known one, and all known."""
    known = list(known)
    unknown = [k for k in section if k not in known]
    if not unknown:
        return
    close = [m for k in unknown for m in difflib.get_close_matches(str(k), known, n=1)]
    hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
    raise ValueError(f"{where}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}{hint}; known: {', '.join(known)}")


def complete_section(cls, section: Mapping, where: str) -> dict:
    """``section`` checked to hold exactly ``cls``'s fields (conf/data/prepare/default.yaml sets each one)."""
    names = [f.name for f in fields(cls)]
    check_keys(section, names, where)
    missing = [n for n in names if n not in section]
    if missing:
        raise ValueError(
            f"{where}: missing option(s) {missing}; conf/data/prepare/default.yaml sets every one "
            "(is `prepare: default` in the data config's defaults?)"
        )
    return dict(section)


def _int_or_none(value) -> int | None:
    return None if value is None else int(value)


@dataclass(frozen=True)
class SplitOptions:
    """``data.prepare.split``: how examples are split (kinds as in adrec.data.history.SplitRule)."""

    kind: str  # time | random | kfold | per_user_random | leave_last_out
    train: float
    validation: float
    folds: int
    fold: int
    cutoffs_ms: tuple[int, int] | None  # time: [validation from, test from] instead of shares of the span
    replay_before_ms: int | None  # time (retraining): rows before it were learned already
    replay: float  # the share of those rows trained on again

    @classmethod
    def parse(cls, section: Mapping, where: str = "data.prepare.split") -> SplitOptions:
        s = complete_section(cls, section, where)
        cutoffs = s["cutoffs_ms"]
        if cutoffs is not None and len(cutoffs) != 2:
            raise ValueError(f"{where}.cutoffs_ms must be [validation from, test from] in epoch ms, got {cutoffs}")
        return cls(
            kind=str(s["kind"]),
            train=float(s["train"]),
            validation=float(s["validation"]),
            folds=int(s["folds"]),
            fold=int(s["fold"]),
            cutoffs_ms=tuple(int(c) for c in cutoffs) if cutoffs else None,
            replay_before_ms=_int_or_none(s["replay_before_ms"]),
            replay=float(s["replay"]),
        )


@dataclass(frozen=True)
class PrepareOptions:
    """``data.prepare`` (documented in conf/data/prepare/default.yaml)."""

    history_length: int
    history_scope: str  # before | user (conf/data/prepare/default.yaml)
    history_attributes: tuple[str, ...]
    min_count: int
    id_hash_buckets: int
    text_max_len: int
    text_hash_buckets: int
    split: SplitOptions
    num_partitions: int | None
    rows_per_partition: int
    rows_per_file: int
    shuffle_batch_mb: int
    max_quarantine_fraction: float
    max_string_length: int
    min_ts_ms: int
    max_ts_ms: int
    base_feature_map: str | None

    @classmethod
    def parse(cls, section: Mapping, *, grow_from: str | Path | None = None, split: Mapping | None = None) -> PrepareOptions:
        """``grow_from`` replaces ``base_feature_map``; ``split`` overrides keys of ``split``."""
        p = complete_section(cls, section, "data.prepare")
        split_section = dict(p["split"] or {})
        if split:
            check_keys(split, [f.name for f in fields(SplitOptions)], "prepare(split=...)")
            split_section.update(split)
        base = str(grow_from) if grow_from is not None else p["base_feature_map"]
        return cls(
            history_length=int(p["history_length"]),
            history_scope=_history_scope(str(p["history_scope"]), str((p["split"] or {}).get("kind", "time"))),
            history_attributes=tuple(str(a) for a in p["history_attributes"] or ()),
            min_count=int(p["min_count"]),
            id_hash_buckets=int(p["id_hash_buckets"] or 0),
            text_max_len=int(p["text_max_len"]),
            text_hash_buckets=int(p["text_hash_buckets"]),
            split=SplitOptions.parse(split_section),
            num_partitions=_int_or_none(p["num_partitions"]),
            rows_per_partition=int(p["rows_per_partition"]),
            rows_per_file=int(p["rows_per_file"]),
            shuffle_batch_mb=int(p["shuffle_batch_mb"]),
            max_quarantine_fraction=float(p["max_quarantine_fraction"]),
            max_string_length=int(p["max_string_length"]),
            min_ts_ms=int(p["min_ts_ms"]),
            max_ts_ms=int(p["max_ts_ms"]),
            base_feature_map=str(base) if base else None,
        )


HISTORY_SCOPES = ("before", "user")
# Splits whose histories hold training clicks only (adrec.data.history.history_split_mask), so a
# history drawn from a user's whole log reveals no held-out row.
SET_HISTORY_SPLITS = ("random", "per_user_random", "kfold")


def _history_scope(scope: str, split_kind: str) -> str:
    if scope not in HISTORY_SCOPES:
        raise ValueError(f"data.prepare.history_scope={scope!r}: use one of {', '.join(HISTORY_SCOPES)}")
    if scope == "user" and split_kind not in SET_HISTORY_SPLITS:
        raise ValueError(
            f"data.prepare.history_scope=user with split.kind={split_kind}: a history from the user's whole log would show "
            f"training rows their own future; use it with split.kind {' | '.join(SET_HISTORY_SPLITS)}, or history_scope=before"
        )
    return scope


# Which kinds each option means something for; an option given to another kind is a mistake.
APPLIES_TO = {
    "hash_buckets": ("categorical", "text"),
    "min_count": ("categorical",),
    "max_len": ("text",),
    "log1p": ("numeric",),
    "quantiles": ("numeric",),
}


@dataclass(frozen=True)
class FeatureOptions:
    """One declared feature column, ``data.<table>.features.<name>``, with its defaults filled in."""

    name: str
    table: str  # events | users | ads
    kind: str  # categorical | numeric | text
    group: str  # the tower it feeds: context | user | ad (by default its table's)
    hash_buckets: int  # > 0: hashed into this many buckets instead of a vocabulary (text: always hashed)
    min_count: int  # vocabulary: values seen fewer times in the training split are out-of-vocabulary
    max_len: int  # text: words kept
    log1p: bool  # numeric: sign(x) * log1p(|x|)
    quantiles: int  # numeric: > 0 adds ``<name>_q``, its quantile bucket among this many

    OPTIONS = ("kind", "group", "hash_buckets", "min_count", "max_len", "log1p", "quantiles")

    @classmethod
    def parse(cls, name: str, table: str, options: Mapping | None, prepare: PrepareOptions) -> FeatureOptions:
        where = f"data.{table}.features.{name}"
        o = dict(options or {})
        check_keys(o, cls.OPTIONS, where)
        kind = o.get("kind", "categorical")
        if kind not in KINDS:
            raise ValueError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
        for key, kinds in APPLIES_TO.items():
            if key in o and kind not in kinds:
                raise ValueError(f"{where}: {key} applies to kind {' or '.join(kinds)}, not {kind}")
        return cls(
            name=name,
            table=table,
            kind=kind,
            group=str(o.get("group", TABLE_GROUPS[table])),
            hash_buckets=int(o.get("hash_buckets") or (prepare.text_hash_buckets if kind == "text" else 0)),
            min_count=int(o.get("min_count", prepare.min_count)),
            max_len=int(o.get("max_len", prepare.text_max_len)),
            log1p=bool(o.get("log1p", False)),
            quantiles=int(o.get("quantiles") or 0),
        )


def event_columns(columns: Mapping) -> dict[str, str]:
    """``data.events.columns`` checked: role -> source column, the unmapped (null) roles left out."""
    check_keys(columns, ROLES, "data.events.columns")
    mapped = {k: str(v) for k, v in columns.items() if v}
    if "event" in mapped and "label" in mapped:
        raise ValueError("data.events.columns maps both event and label: a log is either an event log or labelled rows")
    if "event" not in mapped and "label" not in mapped:
        raise ValueError("data.events.columns must map event (impression/click/conversion rows) or label (labelled rows)")
    return mapped


def source_section(section: Mapping, table: str) -> dict:
    """``data.<table>`` checked: its keys, and its ``csv`` block's."""
    check_keys(section, SOURCE_KEYS[table], f"data.{table}")
    check_keys(section.get("csv") or {}, CSV_KEYS, f"data.{table}.csv")
    if table != "events" and not section.get("key"):
        raise ValueError(f"data.{table} needs a key: the column holding the {TABLE_GROUPS[table]} id")
    return dict(section)


@dataclass(frozen=True)
class DataOptions:
    """What preparation reads of the ``data`` group, checked: ``DataOptions.parse(data)``."""

    name: str
    sources: dict[str, dict]  # events and, when configured, users / ads: source sections (path, format, csv, ...)
    columns: dict[str, str]  # event-log role -> its column, mapped roles only
    features: dict[str, FeatureOptions]  # every declared feature column, events' then users' then ads'
    prepare: PrepareOptions
    label_rule: LabelRule | None
    time_unit: str | None  # None: Rules' default
    time_format: str | None
    pseudonymize: bool
    pseudonym_key: str | None

    @classmethod
    def parse(cls, data: Mapping, *, grow_from: str | Path | None = None, split: Mapping | None = None) -> DataOptions:
        """``data``: the data config group as plain values (``OmegaConf.to_container(cfg.data, resolve=True)``;
        a DictConfig is converted here). ``grow_from``, ``split``: as PrepareOptions.parse."""
        if isinstance(data, DictConfig):
            data = OmegaConf.to_container(data, resolve=True)
        if not data.get("prepare"):
            raise ValueError("data.prepare is missing: list `prepare: default` in the data config's defaults")
        prepare = PrepareOptions.parse(data["prepare"], grow_from=grow_from, split=split)
        if not data.get("events"):
            raise ValueError("data.events is missing: the event log's path, format and columns")
        sources = {t: source_section(data[t], t) for t in TABLE_GROUPS if data.get(t)}
        features: dict[str, FeatureOptions] = {}
        for table, section in sources.items():
            for name, options in (section.get("features") or {}).items():
                if name in features:
                    raise ValueError(f"feature {name} is declared in both data.{features[name].table}.features and data.{table}.features")
                features[name] = FeatureOptions.parse(name, table, options, prepare)
        rule = data.get("label_rule")
        if rule:
            check_keys(rule, [f.name for f in fields(LabelRule)], "data.label_rule")
        options = cls(
            name=str(data["name"]),
            sources=sources,
            columns=event_columns(sources["events"].get("columns") or {}),
            features=features,
            prepare=prepare,
            label_rule=LabelRule(**rule) if rule else None,
            time_unit=data.get("time_unit"),
            time_format=data.get("time_format"),
            pseudonymize=bool(data.get("pseudonymize")),
            pseudonym_key=data.get("pseudonym_key"),
        )
        for attribute in prepare.history_attributes:
            if attribute not in features or features[attribute].table != "ads":
                raise ValueError(f"data.prepare.history_attributes: {attribute!r} is not a feature of data.ads.features")
        return options

    def source(self, table: str) -> SourceSpec:
        return SourceSpec.from_config(self.sources[table])

    def features_of(self, table: str) -> dict[str, FeatureOptions]:
        return {n: o for n, o in self.features.items() if o.table == table}

    def context_columns(self) -> list[str]:
        """The event log's own feature columns of group context, in order (what compaction writes)."""
        return [n for n, o in self.features_of("events").items() if o.group == "context"]

    def min_count(self, vocabulary: str) -> int:
        """The min_count of a vocabulary: its feature's own, else data.prepare.min_count (user and ad ids)."""
        return self.features[vocabulary].min_count if vocabulary in self.features else self.prepare.min_count

    def rules(self, table: str, columns: dict[str, str]) -> Rules:
        """What a valid row of source ``table`` is, with ``columns`` its role -> column mapping."""
        p = self.prepare
        time = {k: v for k, v in (("time_unit", self.time_unit), ("time_format", self.time_format)) if v is not None}
        return Rules(
            columns=columns,
            features={n: o.kind for n, o in self.features_of(table).items()},
            min_ts_ms=p.min_ts_ms,
            max_ts_ms=p.max_ts_ms,
            max_string_length=p.max_string_length,
            **time,
        )


def feature_specs(data: DataOptions) -> list[FeatureSpec]:
    """The model inputs this dataset yields, each tagged with its tower (boundaries fitted later)."""
    p, columns = data.prepare, data.columns
    specs = []
    if "user_id" in columns:
        specs.append(FeatureSpec("user_id", "user", "categorical", "user_id", hash_buckets=p.id_hash_buckets))
    if "ad_id" in columns:
        specs.append(FeatureSpec("ad_id", "ad", "categorical", "ad_id", hash_buckets=p.id_hash_buckets))
        if "user_id" in columns and "ts" in columns:
            specs.append(FeatureSpec("history", "user", "sequence", "ad_id", p.history_length, hash_buckets=p.id_hash_buckets))
            for attribute in p.history_attributes:
                hashed = data.features[attribute].hash_buckets
                specs.append(
                    FeatureSpec(f"history_{attribute}", "user", "sequence", None if hashed else attribute, p.history_length, hash_buckets=hashed)
                )
    for name, o in data.features.items():
        if o.kind == "categorical":
            specs.append(FeatureSpec(name, o.group, "categorical", None if o.hash_buckets else name, hash_buckets=o.hash_buckets))
        elif o.kind == "text":
            specs.append(FeatureSpec(name, o.group, "sequence", None, o.max_len, hash_buckets=o.hash_buckets, tokenize=True))
        else:  # numeric
            specs.append(FeatureSpec(name, o.group, "dense", log1p=o.log1p))
            if o.quantiles:
                specs.append(FeatureSpec(f"{name}_q", o.group, "bucket", boundaries=(), source=name))
    return specs
