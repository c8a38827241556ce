"""The results store: one JSON row per (run, alpha, task, caption key, split, metric), appended
atomically per unit of work.

A JSONL file survives `kill -9` and concurrent writers: a unit's rows go out in one write
followed by fsync, under an exclusive lock held while the file's existing rows are read, so an
append skips every row whose identity is already there (two identical sweeps, or two processes
finishing the same alpha, write each row once). A torn last line (a killed writer: the start of a
row, or NULs) is cut off before the next append; any other last line is kept and given its
newline. A file whose first line is neither a JSON object nor crash NULs (a checkpoint, a notes
file or an indented JSON manifest given as --store by mistake) is refused, untouched, and so is
reading one as a store (`check_readable`). Lines that are not rows of this version (another
schema, valid JSON of the wrong shape, non-finite alpha, undecodable bytes) are skipped and
counted with the first line number, never fatal; readers de-duplicate by identity. Non-finite metric values are stored as null (JSON has no NaN).

A store grows to hundreds of MB on a paper-size ablation (about 1.4 kB a row), so a store object
reads only what was written since it last read (by any process), and keeps where each run's lines
lie: a run's rows are read from its own lines, and an append decodes only the rows of its own runs.
Reading the whole file at every append was quadratic (8.5 s of the demo's 66 s of sweeps, and hours
on the paper grid's 192 sweeps; bench/store_bench.py), and at every sweep's resume check and rows
back, 5.9 minutes for a re-run of a finished grid (BENCHMARKS.md, "One reader for a grid"). The
sweeps of one preparation share one store object.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from micromerge.core.collector import cycle_collection_paused
from micromerge.core.errors import MicromergeError
from micromerge.core.json_text import parse_json

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
    alpha = row.get("alpha")  # present, null for a reference evaluation: every key reads it
    alpha_ok = "alpha" in row and (
        alpha is None
        or (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha))
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


_FIRST_BYTES = 32
"""Bytes read to tell a store from another file: a checkpoint's magic is in the first 9, a row's
`{` is first, and a crash's NULs fill whole blocks."""

# a run id as this module writes it (json.dumps, sort_keys, default separators)
_RUN_ID_KEY = b'"run_id": "'
_RUN_ID = re.compile(rb'"run_id": "(?:[^"\\\n]|\\.)*"')  # on its line


@dataclass
class _RunLines:
    """Where each run's lines lie in the file up to `end` (an offset at a line's end), and the line
    that ends there. One run's rows are then read without reading every other run's: a paper-size
    ablation's store is 500 MB, and finding a sweep's rows by scanning all of it took 1.3 to 1.8 s
    at its resume check, its first append and its rows back (the checks and rows back alone: 5.9
    minutes for a re-run of a finished grid of 192 sweeps).

    A file that is still that file (the same inode, the same line at `end`: a shorter file reads
    short) has only been appended to since, by this process or another, and only the bytes past
    `end` are read. A line whose run id is not written as this module writes it is kept in `other`
    and read for every run (its run checked when decoded), never lost."""

    device: int
    inode: int
    end: int = 0
    last_line: bytes = b""
    spans: dict[str, list[list[int]]] = field(default_factory=dict)  # run id -> [start, stop] of lines
    other: list[list[int]] = field(default_factory=list)

    def still_holds(self, fd: int, stat: os.stat_result) -> bool:
        if (stat.st_dev, stat.st_ino) != (self.device, self.inode):
            return False
        return os.pread(fd, len(self.last_line), self.end - len(self.last_line)) == self.last_line

    def take_in(
        self, start: int, data: bytes, lines: list[tuple[str | None, int, int]] | None = None
    ) -> None:
        """Index the complete lines of `data`, read from offset `start`; each line added is also put
        in `lines`, when given, as (run id or None, start, stop) offsets in the file. The ids are
        found by bytes.find and sliced to their closing quote (a regex search over all of it, or a
        loop over its lines, took up to twice as long): 392,832 lines (500 MB) in about 1.3 s."""
        complete = data[: data.rfind(b"\n") + 1]
        find, rfind, width = complete.find, complete.rfind, len(_RUN_ID_KEY)
        position = 0  # where the next line not yet indexed begins
        hit = find(_RUN_ID_KEY)
        while hit >= 0:
            close = find(b'"', hit + width)
            sliced = complete[hit + width : close]
            if sliced.isascii() and b"\\" not in sliced and b"\n" not in sliced:
                run_id: str | None = sliced.decode("ascii")
            else:  # an escape, UTF-8 written as such, or no closing quote on its line
                match = _RUN_ID.match(complete, hit)
                run_id, close = (_decoded(match.group(0)), match.end() - 1) if match else (None, hit + width)
            begin = rfind(b"\n", 0, hit) + 1
            stop = find(b"\n", close) + 1
            if begin > position and complete[position:begin].strip():
                self._add(None, start + position, start + begin, lines)  # lines naming no run
            self._add(run_id, start + begin, start + stop, lines)
            if stop > position:
                position = stop
            hit = find(_RUN_ID_KEY, close)
        if complete[position:].strip():
            self._add(None, start + position, start + len(complete), lines)
        if complete:
            cut = len(complete) - 1
            self.end, self.last_line = start + cut + 1, complete[rfind(b"\n", 0, cut) + 1 :]

    def _add(
        self, run_id: str | None, begin: int, stop: int, lines: list[tuple[str | None, int, int]] | None
    ) -> None:
        spans = self.other if run_id is None else self.spans.setdefault(run_id, [])
        if spans and spans[-1][1] >= begin:  # a sweep's rows lie together: a span an append
            if stop > spans[-1][1]:
                spans[-1][1] = stop
        else:
            spans.append([begin, stop])
        if lines is not None:
            lines.append((run_id, begin, stop))

    def of(self, run_id: str) -> list[list[int]]:
        """The spans that may hold `run_id`'s rows, in file order."""
        return sorted(self.spans.get(run_id, []) + self.other)


def _decoded(pair: bytes) -> str | None:
    """The id of a `"run_id": "..."` pair, as JSON reads it (None where it is no JSON string)."""
    try:
        value = parse_json(b"{" + pair + b"}")["run_id"]
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, str) else None


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
        self._index: _RunLines | None = None
        # the identities of the rows of each run read so far, up to the index's end
        self._keys: dict[str, set[tuple]] = {}

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
                    self._refuse_other_files(handle.read(_FIRST_BYTES))
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
                try:
                    self._check_lockable(fd)
                finally:
                    os.close(fd)
                return
            nearest = next(p for p in self.path.parents if p.exists())
            # its folders are made when rows are written; a file on the way is NotADirectoryError
            with tempfile.TemporaryFile(dir=nearest) as probe:
                self._check_lockable(probe.fileno())
        except OSError as exc:
            raise MicromergeError(f"--store {self.path}: cannot write ({exc.strerror or exc})") from exc

    def check_readable(self, flag: str) -> None:
        """Fail in one line, naming `flag`, when the path holds no store to read: missing, a folder,
        or another file (a checkpoint's 49,294 "lines" and a manifest's 60 were each skipped with a
        warning, then "no rows" or "no eval of it in it" was said of a file that was never a store)."""
        named = f"{flag} {self.path}".lstrip()
        if self.path.is_dir():
            raise MicromergeError(f"{named}: is a folder; pass a results store (a .jsonl file)")
        if not self.path.is_file():
            raise MicromergeError(
                f"{named}: results store not found (run `micromerge sweep` or `eval` first)"
            )
        with open(self.path, "rb") as handle:
            self._refuse_other_files(handle.read(_FIRST_BYTES), flag)

    def _refuse_other_files(self, start: bytes, flag: str = "--store") -> None:
        """Rows are never appended to a checkpoint or a document given as --store (a checkpoint's
        tail was cut as a torn row, a notes file got rows after its text). Told by its first bytes: a
        store's first line is a row (or a torn one, or another version's: a JSON object either
        way), blank, or NULs where a crash zeroed its first block, its junk skipped as before. A
        first line of `{` alone is an indented JSON document (a manifest), never a row."""
        named = f"{flag} {self.path}".lstrip()
        if _is_checkpoint(start):
            raise MicromergeError(
                f"{named}: is a checkpoint, not a results store (JSON lines); pass a .jsonl path"
            )
        first = start.lstrip(b"\x00 \t\r")
        if first[:1] not in (b"", b"{", b"\n") or re.match(rb"\{[ \t\r]*\n", first):
            raise MicromergeError(
                f"{named}: not a results store (its first line is not a JSON row); pass "
                "another .jsonl path, or delete that line if it is a store whose first line was damaged"
            )

    def rows(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Every row, or one run's. Lines that are no rows are counted in a warning when every row
        is read; one run's reader skips other lines undecoded, and does not count them."""
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as handle:
            if run_id is None:
                data = handle.read()
            else:
                fd = handle.fileno()
                data, start = self._catch_up(fd)
                data = self._read(fd, self._index_now().of(run_id)) + data[self._index_now().end - start :]
        rows, _ = self._parse(data, warn=run_id is None, runs=None if run_id is None else frozenset([run_id]))
        return rows

    def first_rows(self) -> dict[str, dict[str, Any]] | None:
        """Each run's first row, runs in the order their first rows lie in the file, read from the
        start of each run's lines only: a report of a few runs of a grid finds them (by label or
        method) without decoding every run. None when a line does not name its run as this module
        writes it (only reading every row tells whose it is)."""
        if not self.path.is_file():
            return {}
        with open(self.path, "rb") as handle:
            fd = handle.fileno()
            data, start = self._catch_up(fd)
            index = self._index_now()
            if index.other:
                return None
            found = {run_id: self._first_row(fd, spans, run_id) for run_id, spans in index.spans.items()}
            tail = _row_of(data[index.end - start :])  # a last row without its newline
        if tail is not None and found.get(tail["run_id"]) is None:
            found[tail["run_id"]] = (index.end, tail)
        return {
            run_id: first[1]
            for run_id, first in sorted(
                ((r, f) for r, f in found.items() if f is not None), key=lambda item: item[1][0]
            )
        }

    @staticmethod
    def _first_row(fd: int, spans: list[list[int]], run_id: str) -> tuple[int, dict[str, Any]] | None:
        """The offset and row of `run_id`'s first row in its spans (a line there may be another
        run's, naming this one in a nested field, or no row at all)."""
        for begin, stop in spans:
            position = begin
            while position < stop:
                chunk = os.pread(fd, min(stop - position, 1 << 16), position)
                cut = chunk.find(b"\n")
                if cut < 0:  # a line longer than the chunk: read it whole
                    cut = os.pread(fd, stop - position, position).find(b"\n")
                    chunk = os.pread(fd, cut + 1, position)
                for line in chunk[: chunk.rfind(b"\n") + 1].split(b"\n")[:-1]:
                    row = _row_of(line)
                    if row is not None and row["run_id"] == run_id:
                        return position, row
                    position += len(line) + 1
        return None

    def _index_now(self) -> _RunLines:
        assert self._index is not None, "read after _catch_up"
        return self._index

    def _catch_up(self, fd: int) -> tuple[bytes, int]:
        """Bring the index of run lines up to date with what was appended since (or build it anew
        for a file that is no longer the one indexed), and the keys of the runs read so far with
        the rows added; returns the bytes read and the offset they were read from."""
        stat = os.fstat(fd)
        index = self._index
        if index is None or not index.still_holds(fd, stat):
            index, self._keys = _RunLines(stat.st_dev, stat.st_ino), {}
            self._index = index
        start = index.end
        data = os.pread(fd, stat.st_size - start, start) if stat.st_size > start else b""
        if not self._keys:
            index.take_in(start, data)
            return data, start
        added: list[tuple[str | None, int, int]] = []
        index.take_in(start, data, added)
        for run_id, begin, stop in added:  # rows of runs whose keys are kept, written since
            if run_id is None or run_id in self._keys:
                runs = frozenset(self._keys) if run_id is None else frozenset([run_id])
                self._remember(self._parse(data[begin - start : stop - start], warn=False, runs=runs)[0])
        return data, start

    def _remember(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            if row["run_id"] in self._keys:
                self._keys[row["run_id"]].add(self.identity(row))

    def _read(self, fd: int, spans: list[list[int]]) -> bytes:
        return b"".join(os.pread(fd, stop - start, start) for start, stop in spans)

    def _keys_of(self, fd: int, run_id: str) -> set[tuple]:
        """The identities of `run_id`'s rows up to the index's end (read once, then kept up to date)."""
        if run_id not in self._keys:
            self._keys[run_id] = set()
            self._remember(
                self._parse(self._read(fd, self._index_now().of(run_id)), False, frozenset([run_id]))[0]
            )
        return self._keys[run_id]

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
                    row = parse_json(line.decode("utf-8"))
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
        made = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                self._lock(fd, fcntl.LOCK_EX)
            except MicromergeError:
                if made and os.fstat(fd).st_size == 0:  # no rows can go there: no empty store either
                    self.path.unlink(missing_ok=True)
                raise
            try:
                return self._append_locked(fd, rows)
            except BaseException:
                self._index = None  # the kept keys may name rows that are not there
                raise
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _check_lockable(self, fd: int) -> None:
        """Whether the store's filesystem gives locks, asked before any work. Held by a writer now
        (another sweep appending) is an answer too: it does."""
        try:
            self._lock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        fcntl.flock(fd, fcntl.LOCK_UN)

    def _lock(self, fd: int, operation: int) -> None:
        """flock, or one line where the filesystem gives no locks (some NFS, Lustre or GPFS mounts
        answer ENOLCK, ENOSYS or EOPNOTSUPP). Rows go where the file ended when it was last read,
        which only the lock keeps true: two sweeps appending there at once would write their rows
        over each other's, or cut one's half-written row off as a killed writer's."""
        try:
            fcntl.flock(fd, operation)
        except BlockingIOError:
            raise
        except OSError as exc:
            raise MicromergeError(
                f"--store {self.path}: this filesystem gives no file locks ({exc.strerror or exc}), "
                "which the store's writers need; keep the store on a local disk, or on a mount with "
                "locks (NFS with lockd, Lustre with -o flock)"
            ) from exc

    def _append_locked(self, fd: int, rows: list[dict[str, Any]]) -> int:
        self._refuse_other_files(os.pread(fd, _FIRST_BYTES, 0))  # a reader finds no rows there
        data, start = self._catch_up(fd)
        index = self._index_now()
        tail = data[index.end - start :]  # a torn line, or a last row without its newline
        tail_row = _row_of(tail) if tail else None
        seen = {run: self._keys_of(fd, run) for run in {row["run_id"] for row in rows}}
        if tail_row is not None:
            self._remember([tail_row])
        fresh = []
        for row in rows:
            key = self.identity(row)
            if key not in seen[row["run_id"]]:
                seen[row["run_id"]].add(key)
                fresh.append(row)
        if not fresh:
            return 0
        written = index.end
        if tail_row is not None:
            tail += b"\n"  # a complete last row missing its newline: keep it
        elif _is_torn_row(tail):
            os.ftruncate(fd, written)  # a torn tail left by a killed writer
            tail = b""
        elif tail:
            tail += b"\n"  # not ours (a line added by hand): kept, and skipped by readers
        payload = (
            tail
            + "".join(
                json.dumps(_json_safe({"schema": SCHEMA_VERSION, **row}), sort_keys=True, allow_nan=False)
                + "\n"
                for row in fresh
            ).encode()
        )
        os.lseek(fd, written, os.SEEK_SET)
        os.write(fd, payload)
        os.fsync(fd)
        index.take_in(written, payload)  # our own rows: their keys are kept above, not read back
        return len(fresh)


def _row_of(line: bytes) -> dict[str, Any] | None:
    try:
        row = parse_json(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return row if _is_row(row) else None


def _is_torn_row(tail: bytes) -> bool:
    """What a writer killed mid-append leaves: the start of a row, or the NULs a crash left where
    its bytes were to be. Only that is cut; any other last line is someone's text."""
    return tail.lstrip(b"\x00").startswith(b"{") or not tail.strip(b"\x00 \t\r")


def _is_checkpoint(start: bytes) -> bool:
    """The first bytes of a checkpoint file: torch's zip (PK 03 04), a pickle (protocol 2 and
    later start with 0x80), or safetensors (a little-endian u64 header length, then its JSON)."""
    if start.startswith((b"PK\x03\x04", b"\x80")):
        return True
    return len(start) >= 9 and start[8:9] == b"{" and 0 < int.from_bytes(start[:8], "little") < 1 << 30
