"""The results store: one JSON row per (run, alpha, task, caption key, split, metric), appended
atomically per unit of work.

A JSONL file survives `kill -9` and concurrent writers: a unit's rows go out in one write
followed by fsync, under an exclusive lock held while the file's existing rows are read, so an
append skips every row whose identity is already there (two identical sweeps, or two processes
finishing the same alpha, write each row once). A torn last line (a killed writer) is cut off
before the next append; a last line that parses is kept and given its newline. Lines that are
not rows of this version (another schema, valid JSON of the wrong shape, non-finite alpha,
undecodable bytes) are skipped and counted with the first line number, never fatal; readers
de-duplicate by identity. Non-finite metric values are stored as null (JSON has no NaN).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from micromerge.core.errors import MicromergeError

SCHEMA_VERSION = 1


def coefficients_file(store: str | Path, described: dict[str, Any]) -> Path:
    """Where a sweep keeps the coefficients a learned merge used, beside its store (the rows carry
    only their sha256): `<store>.coefficients/<sha256[:16]>.json`."""
    store = Path(store)
    return store.with_name(store.name + ".coefficients") / f"{described['coefficients_sha256'][:16]}.json"


def _is_row(row: Any) -> bool:
    """The shape every reader relies on."""
    if not isinstance(row, dict) or row.get("schema") != SCHEMA_VERSION:
        return False
    alpha = row.get("alpha")
    alpha_ok = alpha is None or (
        isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha)
    )
    strings = all(isinstance(row.get(k), str) for k in ("run_id", "task", "metric"))
    value = row.get("value")
    value_ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
    groups_ok = isinstance(row.get("groups", {}), dict)
    return alpha_ok and strings and value_ok and groups_ok and isinstance(row.get("split", "all"), str)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class ResultStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @staticmethod
    def identity(row: dict[str, Any]) -> tuple[float | None, str, str | None, str, str]:
        """What makes a row one result of its run: (alpha, task, caption key, split, metric)."""
        return (row["alpha"], row["task"], row.get("caption_key"), row.get("split", "all"), row["metric"])

    def check_writable(self) -> None:
        """Fail before any work when results could not be saved (a folder, a read-only file, a path
        through a file), and leave nothing behind: a run refused for a mistyped --data made an
        empty store (and its folder) where the user never meant one."""
        if self.path.is_dir():
            raise MicromergeError(f"--store {self.path}: is a folder; pass a .jsonl file path")
        try:
            if self.path.exists():
                with open(self.path, "rb") as handle:
                    self._refuse_other_files(handle.read(4096))
                os.close(os.open(self.path, os.O_WRONLY | os.O_APPEND))
                return
            nearest = next(p for p in self.path.parents if p.exists())
            # its folders are made when rows are written; a file on the way is NotADirectoryError
            with tempfile.TemporaryFile(dir=nearest):
                pass
        except OSError as exc:
            raise MicromergeError(f"--store {self.path}: cannot write ({exc.strerror or exc})") from exc

    def _refuse_other_files(self, start: bytes) -> None:
        """Rows are never appended to a checkpoint given as --store (its tail was cut as a torn
        row, then rows appended). Told by its first bytes, not by unreadable lines: a store whose
        first line a crash filled with NULs is still a store, its junk skipped as before."""
        if _is_checkpoint(start):
            raise MicromergeError(
                f"--store {self.path}: is a checkpoint, not a results store (JSON lines); pass a .jsonl path"
            )

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as handle:
            data = handle.read()
        rows, _ = self._parse(data, warn=True)
        return rows

    def _parse(self, data: bytes, warn: bool) -> tuple[list[dict[str, Any]], set[tuple]]:
        rows: list[dict[str, Any]] = []
        seen: set[tuple] = set()
        skipped, first_bad = 0, None
        lines = data.split(b"\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                row = None
            if not _is_row(row):
                if number == len(lines) and not data.endswith(b"\n"):
                    continue  # the torn tail of an interrupted append
                skipped += 1
                first_bad = first_bad or number
                continue
            key = (row["run_id"], *self.identity(row))
            if key not in seen:
                seen.add(key)
                rows.append(row)
        if skipped and warn:
            warnings.warn(
                f"{self.path}: skipped {skipped} line(s) that are not rows of this version (first: line {first_bad})",
                stacklevel=3,
            )
        return rows, seen

    def done(self, run_id: str) -> set[tuple[float | None, str, str | None, str, str]]:
        """The identity of every finished row of a run."""
        return {self.identity(row) for row in self.rows() if row["run_id"] == run_id}

    def append(self, rows: list[dict[str, Any]]) -> int:
        """Append the rows not already in the store; returns how many were written."""
        if not rows:
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.lseek(fd, 0, os.SEEK_END)
            data = os.pread(fd, size, 0) if size else b""
            self._refuse_other_files(data)
            _, seen = self._parse(data, warn=False)
            fresh = []
            for row in rows:
                key = (row["run_id"], *self.identity(row))
                if key not in seen:
                    seen.add(key)
                    fresh.append(row)
            if not fresh:
                return 0
            prefix = b""
            if data and not data.endswith(b"\n"):
                tail = data[data.rfind(b"\n") + 1 :]
                if _parses(tail):
                    prefix = b"\n"  # a complete last row missing its newline: keep it
                else:
                    os.ftruncate(fd, len(data) - len(tail))  # a torn tail left by a killed writer
            payload = (
                prefix
                + "".join(
                    json.dumps(_json_safe({"schema": SCHEMA_VERSION, **row}), sort_keys=True, allow_nan=False)
                    + "\n"
                    for row in fresh
                ).encode()
            )
            os.lseek(fd, 0, os.SEEK_END)
            os.write(fd, payload)
            os.fsync(fd)
            return len(fresh)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _is_checkpoint(start: bytes) -> bool:
    """The first bytes of a checkpoint file: torch's zip (PK 03 04), a pickle (protocol 2 and
    later start with 0x80), or safetensors (a little-endian u64 header length, then its JSON)."""
    if start.startswith((b"PK\x03\x04", b"\x80")):
        return True
    return len(start) >= 9 and start[8:9] == b"{" and 0 < int.from_bytes(start[:8], "little") < 1 << 30


def _parses(line: bytes) -> bool:
    try:
        return _is_row(json.loads(line.decode("utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
