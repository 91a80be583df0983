"""Reading users' logs as they are: Parquet, CSV/TSV or JSON lines, local or any pyarrow URI.

A source is a few lines of config (see conf/data/*.yaml)::

    path: s3://bucket/logs/       # file, directory, or list; any pyarrow filesystem URI
    format: csv                   # parquet | csv | json (JSON lines)
    csv: {delimiter: "\\t", header: false, column_names: [...], encoding: utf8}

Text formats are read line by line and parsed per batch, so a malformed line becomes a
quarantined row (reason ``malformed_row``, its text kept) instead of a crash, and every
column arrives as a string, to be cast and checked by validation. A file that is not what
its format says is reported by name before any work starts.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from adrec.data.schema import check_columns
from adrec.runtime import resolve

RAW_LINE = "raw_line"  # text of a line that could not be parsed; null on parsed rows
# Rows per batch for row-wise steps: Ray Data's default batch is a whole block, so without a
# bound a task's memory would grow with block size, that is with the log.
BATCH_ROWS = 65_536
PEEK_BYTES = 1 << 16


@dataclass
class SourceSpec:
    path: str | list[str]
    format: str = "parquet"
    delimiter: str = ","
    header: bool = True
    column_names: list[str] | None = None
    encoding: str = "utf8"
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: dict) -> SourceSpec:
        csv = dict(cfg.get("csv") or {})
        fmt = cfg.get("format", "parquet")
        if fmt not in ("parquet", "csv", "json"):
            raise ValueError(f"source format {fmt!r} is not supported: use parquet, csv or json")
        return cls(
            path=cfg["path"],
            format=fmt,
            delimiter=csv.get("delimiter", ","),
            header=csv.get("header", True),
            column_names=list(csv["column_names"]) if csv.get("column_names") else None,
            encoding=csv.get("encoding", "utf8"),
        )

    @property
    def paths(self) -> list[str]:
        return [resolve(p) for p in ([self.path] if isinstance(self.path, str) else self.path)]


def list_files(paths: list[str]) -> list[tuple[pafs.FileSystem, str]]:
    """Every file under ``paths`` (files or directories), skipping hidden and ``_`` files."""
    files = []
    for path in paths:
        fs, inner = pafs.FileSystem.from_uri(path)
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"source path {path} does not exist")
        if info.type == pafs.FileType.File:
            files.append((fs, inner))
            continue
        for entry in fs.get_file_info(pafs.FileSelector(inner, recursive=True)):
            name = entry.base_name
            if entry.type == pafs.FileType.File and not name.startswith((".", "_")):
                files.append((fs, entry.path))
    if not files:
        raise FileNotFoundError(f"no data files under {paths}")
    return sorted(files, key=lambda f: f[1])


def check_files(spec: SourceSpec) -> None:
    """Fail fast, naming the file, on a Parquet file without a valid footer or a text file that is binary."""
    for fs, path in list_files(spec.paths):
        if spec.format == "parquet":
            try:
                with fs.open_input_file(path) as f:
                    pq.read_metadata(f)
            except (pa.ArrowInvalid, OSError) as error:
                raise ValueError(f"{path} is not a readable Parquet file ({error}); remove or replace it") from None
        else:
            with fs.open_input_stream(path) as f:
                head = f.read(PEEK_BYTES)
            if b"\x00" in head:
                raise ValueError(f"{path} holds binary data, not {spec.format} text; remove or replace it")
            try:
                head.decode(spec.encoding, errors="strict")
            except UnicodeDecodeError as error:
                if error.start < len(head) - 4:  # a cut multi-byte character at the end is fine
                    raise ValueError(f"{path} is not {spec.encoding} text ({error}); set csv.encoding") from None


def header_names(spec: SourceSpec) -> list[str]:
    """Column names: configured, or the first line of the first file."""
    if spec.column_names:
        return spec.column_names
    if spec.format != "csv" or not spec.header:
        raise ValueError("a CSV source without a header needs csv.column_names")
    fs, path = list_files(spec.paths)[0]
    with fs.open_input_stream(path) as f:
        first = f.read(PEEK_BYTES).decode(spec.encoding, errors="replace").splitlines()[0]
    parsed = pacsv.read_csv(
        io.BytesIO((first + "\n").encode()),
        read_options=pacsv.ReadOptions(autogenerate_column_names=True),
        parse_options=pacsv.ParseOptions(delimiter=spec.delimiter),
        convert_options=pacsv.ConvertOptions(strings_can_be_null=False),
    )
    return [str(column[0].as_py()) for column in parsed.columns]


def parse_csv_lines(batch: pa.Table, names: list[str], delimiter: str) -> pa.Table:
    """Lines of text -> string columns ``names`` plus RAW_LINE for lines that did not parse."""
    lines = batch["text"].to_pylist()
    header = delimiter.join(names)
    lines = [line for line in lines if line and line != header]
    bad: list[str] = []

    def keep_bad(row) -> str:
        bad.append(row.text)
        return "skip"

    table = (
        pacsv.read_csv(
            io.BytesIO("\n".join(lines).encode()),
            read_options=pacsv.ReadOptions(column_names=names),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=keep_bad, newlines_in_values=False),
            # Only an empty field is missing: "nan", "NULL" or "N/A" reach validation as written.
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=True, null_values=[""]),
        )
        if lines
        else pa.table({n: pa.array([], pa.string()) for n in names})
    )
    table = table.append_column(RAW_LINE, pa.nulls(table.num_rows, pa.string()))
    if bad:
        rejected = pa.table({**{n: pa.nulls(len(bad), pa.string()) for n in names}, RAW_LINE: pa.array(bad, pa.string())})
        table = pa.concat_tables([table, rejected])
    return table


def parse_json_lines(batch: pa.Table) -> pa.Table:
    """JSON objects, one per line -> string columns (union of keys) plus RAW_LINE for bad lines."""
    rows, bad = [], []
    for line in batch["text"].to_pylist():
        if not line.strip():
            continue
        try:
            value = json.loads(line)
            if not isinstance(value, dict):
                raise ValueError
            rows.append({k: None if v is None else (v if isinstance(v, str) else json.dumps(v)) for k, v in value.items()})
        except ValueError:
            bad.append(line)
    names = sorted({k for row in rows for k in row})
    columns = {n: pa.array([row.get(n) for row in rows] + [None] * len(bad), pa.string()) for n in names}
    columns[RAW_LINE] = pa.array([None] * len(rows) + bad, pa.string())
    return pa.table(columns)


def column_names(spec: SourceSpec) -> list[str] | None:
    """The source's columns: a Parquet footer, the CSV header or configured names; None for JSON lines."""
    if spec.format == "parquet":
        fs, path = list_files(spec.paths)[0]
        with fs.open_input_file(path) as f:
            return pq.read_schema(f).names
    return header_names(spec) if spec.format == "csv" else None


def read_row_groups(fs: pafs.FileSystem, path: str, columns: list[str] | None) -> Iterator[pa.Table]:
    """Each row group of one Parquet file, projected to ``columns``."""
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        for group in range(parquet.num_row_groups):
            yield parquet.read_row_group(group, columns=columns)


def read_row_group(fs: pafs.FileSystem, path: str, group: int, columns: list[str] | None) -> Iterator[pa.Table]:
    """Row group ``group`` of one Parquet file, projected to ``columns``."""
    with fs.open_input_file(path) as f:
        yield pq.ParquetFile(f).read_row_group(group, columns=columns)


def row_groups(files: list[tuple[pafs.FileSystem, str]]) -> list[tuple[pafs.FileSystem, str, int]]:
    """Every (filesystem, path, row group) of ``files``, from their footers."""
    pieces = []
    for fs, path in files:
        with fs.open_input_file(path) as f:
            pieces += [(fs, path, group) for group in range(pq.ParquetFile(f).num_row_groups)]
    return pieces


class ParquetFiles(Datasource):
    """Parquet files on any pyarrow filesystem as a Datasource: one read task per file, one
    block per row group, so a task's memory is bounded by the file's row groups, not the log."""

    def __init__(self, files: list[tuple[pafs.FileSystem, str]], columns: list[str] | None) -> None:
        super().__init__()
        self.files = files
        self.columns = columns

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        tasks = []
        for fs, path in self.files:
            metadata = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=(path,))
            tasks.append(ReadTask(partial(read_row_groups, fs, path, self.columns), metadata))
        return tasks


class ParquetRowGroups(ParquetFiles):
    """Row groups of Parquet files as a Datasource, in the order given: one read task (and one
    block) per (filesystem, path, row group), so a stream can take a file's groups apart and
    interleave them with other files' (the training stream's per-epoch order). ``files`` holds
    those (filesystem, path, row group) pieces, as ``row_groups`` lists them."""

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        return [
            ReadTask(
                partial(read_row_group, fs, path, group, self.columns),
                BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=(path,)),
            )
            for fs, path, group in self.files
        ]


def read_source(spec: SourceSpec, required: list[str], what: str) -> ray.data.Dataset:
    """The source as a Dataset; text formats come as all-string columns plus RAW_LINE.

    Files are checked, and ``required`` columns looked for, before any work starts.
    """
    check_files(spec)
    names = column_names(spec)
    if names is not None:  # JSON lines: an absent key is a null value, checked row by row
        check_columns(names, required, what)
    if spec.format == "parquet":
        wanted = set(required)  # only the mapped and feature columns are read
        return ray.data.read_datasource(ParquetFiles(list_files(spec.paths), [n for n in names if n in wanted]))
    lines = ray.data.read_text(spec.paths, encoding=spec.encoding)
    if spec.format == "csv":
        return lines.map_batches(
            parse_csv_lines,
            batch_size=BATCH_ROWS,
            batch_format="pyarrow",
            fn_kwargs={"names": header_names(spec), "delimiter": spec.delimiter},
        )
    return lines.map_batches(parse_json_lines, batch_size=BATCH_ROWS, batch_format="pyarrow")


def read_table(spec: SourceSpec, required: list[str], what: str) -> pa.Table:
    """A small side table (ads, users) on the driver, read with the same parsers."""
    return pa.concat_tables(ray.get(read_source(spec, required, what).to_arrow_refs()), promote_options="permissive")
