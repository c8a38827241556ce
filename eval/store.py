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

A store grows to hundreds of MB on a paper-size ablation (about 1.4 kB a row), so an append reads
only what was written since this object's last append, and a run's own rows are found by its id's
bytes before any line is decoded: reading the whole file at every append was quadratic (8.5 s of
the demo's 66 s of sweeps, and hours on the paper grid's 191 sweeps; bench/store_bench.py).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from micromerge.core.collector import cycle_collection_paused
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


@dataclass
class _Indexed:
    """What an append has read of the file: its identity, the offset (at a line's end) up to which
    the keys of the rows of `runs` are in `seen`, and the line that ends there. A file that is still
    that file (the same inode, the same line at that offset: a shorter file reads short) has only
    been appended to since, by this process or another, and only the bytes past `end` need reading."""

    device: int
    inode: int
    runs: frozenset[str]
    end: int = 0
    last_line: bytes = b""
    seen: set[tuple] = field(default_factory=set)

    def still_holds(self, fd: int, stat: os.stat_result) -> bool:
        if (stat.st_dev, stat.st_ino) != (self.device, self.inode):
            return False
        return os.pread(fd, len(self.last_line), self.end - len(self.last_line)) == self.last_line


def _run_needles(runs: frozenset[str] | None) -> tuple[bytes, ...] | None:
    """The bytes one of whose every line of these runs holds (each id as JSON writes it); None (decode
    every line) for every run, or for an id JSON would escape."""
    if runs is None or not all(
        r.isascii() and r.isprintable() and '"' not in r and "\\" not in r for r in runs
    ):
        return None
    return tuple(json.dumps(run_id).encode() for run_id in runs)


class ResultStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._indexed: _Indexed | None = None

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

    def rows(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Every row, or one run's. Lines that are no rows are counted in a warning when every row
        is read; one run's reader skips other lines undecoded, and does not count them."""
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as handle:
            data = handle.read()
        rows, _ = self._parse(data, warn=run_id is None, runs=None if run_id is None else frozenset([run_id]))
        return rows

    def _parse(
        self, data: bytes, warn: bool, runs: frozenset[str] | None = None
    ) -> tuple[list[dict[str, Any]], set[tuple]]:
        """The rows in `data` (of `runs` only, when given) and their keys."""
        rows: list[dict[str, Any]] = []
        seen: set[tuple] = set()
        skipped, first_bad = 0, None
        needles = _run_needles(runs)
        lines = data.split(b"\n")
        with cycle_collection_paused():
            for number, line in enumerate(lines, start=1):
                if (needles is not None and not any(n in line for n in needles)) or not line.strip():
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
                if runs is not None and row["run_id"] not in runs:
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
        return {self.identity(row) for row in self.rows(run_id)}

    def append(self, rows: list[dict[str, Any]]) -> int:
        """Append the rows not already in the store; returns how many were written."""
        if not rows:
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            stat = os.fstat(fd)
            runs = frozenset(row["run_id"] for row in rows)  # only their rows can be duplicates
            indexed = self._indexed
            if indexed is None or not runs <= indexed.runs or not indexed.still_holds(fd, stat):
                indexed = _Indexed(stat.st_dev, stat.st_ino, runs | (indexed.runs if indexed else runs))
            start = indexed.end
            data = os.pread(fd, stat.st_size - start, start) if stat.st_size > start else b""
            if start == 0:
                self._refuse_other_files(data)
            indexed.seen.update(self._parse(data, warn=False, runs=indexed.runs)[1])
            cut = data.rfind(b"\n")
            if cut >= 0:  # a complete last line without its newline is read again next time
                indexed.end, indexed.last_line = (
                    start + cut + 1,
                    data[data.rfind(b"\n", 0, cut) + 1 : cut + 1],
                )
            self._indexed, seen = indexed, indexed.seen
            written = start + len(data)
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
                    written -= len(tail)
                    os.ftruncate(fd, written)  # a torn tail left by a killed writer
            payload = (
                prefix
                + "".join(
                    json.dumps(_json_safe({"schema": SCHEMA_VERSION, **row}), sort_keys=True, allow_nan=False)
                    + "\n"
                    for row in fresh
                ).encode()
            )
            os.lseek(fd, 0, os.SEEK_END)
            try:
                os.write(fd, payload)
                os.fsync(fd)
            except OSError:
                self._indexed = None  # `seen` holds the keys of rows that may not be there
                raise
            indexed.end = written + len(payload)
            indexed.last_line = payload[payload.rfind(b"\n", 0, len(payload) - 1) + 1 :]
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
