"""Intermediates of preparation staged as compressed Parquet on local disk, not in the object store.

Validated rows and raw examples are read by several later steps. Materialised, they sit in the
object store and spill to disk as uncompressed Arrow, growing with the log (0.6 KB per event);
staged, they cost about a tenth of that on disk and each step reads back only its columns.

Reading back (and reading a Parquet source) uses ``ParquetFiles``: one read task per file and
one block per row group. Ray Data's own Parquet reader, and a ``from_items(paths).map_batches``
reader fused with the next step, both gave single tasks many files, so a task's heap grew with
the log (2.9 GB and 5.5 GB at 10M events).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from adrec.data.sources import BATCH_ROWS, ParquetFiles


def stage(ds: ray.data.Dataset, path: Path, rows_per_file: int) -> Path:
    """Write ``ds`` as zstd Parquet under ``path`` in one streaming pass; return the path.

    Row groups of BATCH_ROWS let a reader stream a file instead of decoding it whole.
    """
    ds.write_parquet(str(path), max_rows_per_file=rows_per_file, row_group_size=BATCH_ROWS, compression="zstd")
    return path


def staged_files(path: Path) -> list[str]:
    return sorted(str(f) for f in Path(path).glob("*.parquet"))


def parquet_rows(path: Path) -> int:
    """Rows of the Parquet files in a folder (a staged intermediate, a prepared split), from their footers."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in staged_files(path))


def staged(path: Path, columns: list[str] | None = None) -> ray.data.Dataset:
    """A staged intermediate read back lazily, projected to ``columns`` when given."""
    if not staged_files(path):
        raise ValueError(f"{path} holds no rows: the previous step produced nothing (see report.json and quarantine/)")
    local = pafs.LocalFileSystem()
    return ray.data.read_datasource(ParquetFiles([(local, f) for f in staged_files(path)], columns))
