"""The results store: one JSON row per (run, alpha, task, metric), appended atomically per unit.

A JSONL file survives `kill -9`: a unit's rows go out in one write followed by fsync, a torn
last line is ignored on read and cut off before the next append, and several processes
(an accelerate launch) append under an exclusive lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import warnings
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


class ResultStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        rows, skipped = [], 0
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                if not line.endswith("\n"):
                    break  # torn last line of an interrupted append
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    skipped += 1
                    continue
                if row.get("schema") != SCHEMA_VERSION:
                    skipped += 1
                    continue
                rows.append(row)
        if skipped:
            warnings.warn(
                f"{self.path}: skipped {skipped} row(s) from another version or unreadable", stacklevel=2
            )
        return rows

    @staticmethod
    def identity(row: dict[str, Any]) -> tuple[float | None, str, str | None, str, str]:
        """What makes a row one result of its run: (alpha, task, caption key, split, metric)."""
        return (row["alpha"], row["task"], row.get("caption_key"), row.get("split", "all"), row["metric"])

    def done(self, run_id: str) -> set[tuple[float | None, str, str | None, str, str]]:
        """The identity of every finished row of a run."""
        return {self.identity(row) for row in self.rows() if row["run_id"] == run_id}

    def append(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = "".join(
            json.dumps({"schema": SCHEMA_VERSION, **row}, sort_keys=True) + "\n" for row in rows
        ).encode()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.lseek(fd, 0, os.SEEK_END)
            if size:
                os.lseek(fd, size - 1, os.SEEK_SET)
                if os.read(fd, 1) != b"\n":  # cut a torn tail left by a killed writer
                    data = os.pread(fd, size, 0)
                    os.ftruncate(fd, data.rfind(b"\n") + 1)
            os.lseek(fd, 0, os.SEEK_END)
            os.write(fd, payload)
            os.fsync(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
