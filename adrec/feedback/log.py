"""The durable feedback log: append-only JSON-lines segment files, fsync'd before any answer.

Each writer (one per Serve replica) appends to its own segments, so writers never share a
file and need no lock. A segment is closed for good once it passes ``max_bytes``. Compaction
reads segments while they grow, remembering how many bytes of each it has consumed. A crash
can leave a last line half written: that append never returned, so its request got no
answer and the client retries; readers skip it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SUFFIX = ".jsonl"


def fsync_directory(directory: Path) -> None:
    """Make a new file's directory entry durable too, not only its bytes."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SegmentLog:
    """Appends batches of records to ``directory/<writer>-<n>.jsonl``; ``append`` returns once they are on disk."""

    def __init__(self, directory: str | Path, writer: str, max_bytes: int = 64 * 2**20) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.writer = writer
        self.max_bytes = max_bytes
        existing = sorted(self.directory.glob(f"{writer}-*{SUFFIX}"))
        self.sequence = int(existing[-1].stem.rsplit("-", 1)[1]) + 1 if existing else 0  # never append to an old file
        self.file = None

    def append(self, records: list[dict]) -> None:
        """Write every record as one JSON line, flush and fsync: durable when this returns."""
        if self.file is None or self.file.tell() >= self.max_bytes:
            self._open_next()
        self.file.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
        self.file.flush()
        os.fsync(self.file.fileno())

    def _open_next(self) -> None:
        if self.file is not None:
            self.file.close()
        path = self.directory / f"{self.writer}-{self.sequence:06d}{SUFFIX}"
        self.sequence += 1
        self.file = open(path, "a", encoding="utf-8")
        fsync_directory(self.directory)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def segments(directory: str | Path) -> list[Path]:
    return sorted(Path(directory).glob(f"*{SUFFIX}"))


def read_new_records(paths: list[Path], offsets: dict[str, int]) -> tuple[list[dict], dict[str, int]]:
    """Complete records after each segment's offset (bytes already read), and the offsets after them.

    Segments are append-only and may still be growing: a line without its newline (being
    written, or torn by a crash) is left for later; it was not acknowledged yet.
    """
    records, after = [], dict(offsets)
    for path in paths:
        with open(path, "rb") as f:
            f.seek(offsets.get(path.name, 0))
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        records += [json.loads(line) for line in complete.splitlines()]
        after[path.name] = offsets.get(path.name, 0) + len(complete)
    return records, after
