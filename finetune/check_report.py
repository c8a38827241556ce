"""`data check --out`: the report of a corpus check, kept up to date as its parts are finished, so
that a check of hours stopped by Ctrl-C, a lost session or a damaged shard goes on from there.

The report holds what the check has finished (its parts, the samples read in them, the unreadable
ones' names), how the corpus was cut (parts sized for how many workers, so a check resumed with
other --workers reads the same parts) and the corpus's cheap fingerprint (the one a fine-tune's
manifest records). Run again with the same --out, an unfinished check of the same corpus goes on;
a finished one, or one of a corpus that has changed, is checked again from the start (a user who
runs a finished check again has usually fixed the corpus); a report of another --data, or a file
that is no report, is refused rather than replaced. No timestamps or host names: the same corpus,
parts and fraction give the same bytes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from micromerge.core.atomic import atomic_output
from micromerge.core.config_schema import is_count
from micromerge.core.errors import MicromergeError
from micromerge.core.json_text import parse_json
from micromerge.core.provenance import provenance
from micromerge.finetune.corpus_check import CheckProgress, CorpusParts, check_corpus, corpus_parts
from micromerge.finetune.unreadable import too_many

REPORT = "micromerge data check"
SAVE_EVERY_S = 10.0
"""Seconds between two writes of an unfinished report: a write rewrites every name found so far,
so it is not made after every part; an interrupt or an error writes what is finished at once."""


def check_with_report(
    spec: str,
    workers: int,
    max_fraction: float,
    path: Path,
    progress: bool,
    found: Callable[[str], None],
    say: Callable[[str], None],
) -> CheckProgress:
    """Check the corpus `spec`, keeping the report at `path` and going on from the one there: `found`
    is told every unreadable sample, those an earlier run found first; `say`, where it started."""
    earlier = earlier_check(path, spec)
    # an unfinished report's parts are cut as it cut them, whatever --workers is now
    per_part = earlier.per_part if earlier and not earlier.complete else max(1, workers)
    parts = corpus_parts(spec, per_part)
    done, why = resume_point(earlier, parts)
    if why:
        say(f"--out {path}: {why}")
    for name in done.unreadable:
        found(name)
    with ReportWriter(path, spec, parts, per_part, max_fraction, done) as writer:
        checked = check_corpus(parts, workers, progress, done, found, writer.kept)
        if checked.read:  # none: an error for the caller to raise, not a report
            writer.finish(checked)
    return checked


@dataclass(frozen=True)
class EarlierCheck:
    """A report found at --out: how its corpus was cut, and what it had finished."""

    fingerprint: str
    per_part: int
    parts: int
    complete: bool
    progress: CheckProgress


def earlier_check(path: Path, spec: str) -> EarlierCheck | None:
    """The report at `path` of a check of `spec`, or None when there is none yet."""
    if not path.exists():
        return None
    refuse = f"--out {path}: not a data check report ({{}}); choose another --out, or delete the file"
    try:
        report = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MicromergeError(refuse.format(exc)) from None
    if not isinstance(report, dict) or report.get("report") != REPORT:
        raise MicromergeError(refuse.format(f'no "report": "{REPORT}" in it'))
    if report.get("data") != spec:
        raise MicromergeError(
            f"--out {path}: the report of a check of --data {report.get('data')}; choose another --out, "
            "or delete it to check this corpus"
        )
    try:
        fields = {key: report[key] for key in (*COUNTS, "unreadable", "complete", "data_fingerprint")}
    except KeyError as exc:
        raise MicromergeError(refuse.format(f"no {exc.args[0]!r} in it")) from None
    why = _not_a_report(fields)
    if why:
        raise MicromergeError(refuse.format(why))
    earlier = EarlierCheck(
        str(fields["data_fingerprint"]),
        fields["parts_sized_for_workers"],
        fields["parts"],
        fields["complete"],
        CheckProgress(fields["parts_checked"], fields["read"], tuple(fields["unreadable"])),
    )
    if earlier.per_part < 1 or earlier.progress.parts_done > earlier.parts:
        raise MicromergeError(refuse.format("its parts do not add up"))
    return earlier


COUNTS = ("parts_checked", "read", "parts_sized_for_workers", "parts")
"""The report's fields that count something: whole numbers, as the check writes them."""


def _not_a_report(fields: dict[str, Any]) -> str | None:
    """What is wrong with a report's fields, if anything: an edited or damaged one is read exactly as
    written or refused (a count of Infinity was a traceback; "abc" for the names read as three)."""
    for key in COUNTS:
        if not is_count(fields[key]):
            return f"{key} is {json.dumps(fields[key])[:40]}, not a count"
    names = fields["unreadable"]
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        return "unreadable is not a list of names"
    if not isinstance(fields["complete"], bool):
        return "complete is neither true nor false"
    return None


def resume_point(earlier: EarlierCheck | None, parts: CorpusParts) -> tuple[CheckProgress, str | None]:
    """Where a check starts, and the line that says why when a report was found."""
    if earlier is None:
        return CheckProgress(), None
    if earlier.complete:
        return CheckProgress(), "it holds a finished check; checking the corpus again from the start"
    if earlier.fingerprint != parts.fingerprint or earlier.parts != len(parts):
        return CheckProgress(), "the corpus has changed since it was written; checking it from the start"
    done = earlier.progress
    return done, (
        f"going on after part {done.parts_done} of {len(parts)} ({done.read} samples read, "
        f"{len(done.unreadable)} unreadable)"
    )


class ReportWriter:
    """Writes the report of one check: where it starts before any sample is read (so an --out that
    cannot be written is an error now, not after hours), every SAVE_EVERY_S as parts finish, at once
    when the check stops early (the context's exit), and whole at the end (`finish`)."""

    def __init__(
        self,
        path: Path,
        spec: str,
        parts: CorpusParts,
        per_part: int,
        max_fraction: float,
        start: CheckProgress,
    ):
        self.path, self.spec, self.parts, self.per_part = path, spec, parts, per_part
        self.max_fraction, self.start = max_fraction, start
        self.latest: CheckProgress | None = None
        self.saved_at = time.monotonic()

    def __enter__(self) -> ReportWriter:
        self._write(self.start, complete=False)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if kind is not None and self.latest is not None:
            self._write(self.latest, complete=False)

    def kept(self, progress: CheckProgress) -> None:
        """A part is finished: write the report when the last write is SAVE_EVERY_S old."""
        self.latest = progress
        if time.monotonic() - self.saved_at >= SAVE_EVERY_S:
            self._write(progress, complete=False)

    def finish(self, progress: CheckProgress) -> None:
        self._write(progress, complete=True)

    def _write(self, progress: CheckProgress, complete: bool) -> None:
        bad, read = len(progress.unreadable), progress.read
        samples = self.parts.samples  # a shard stream's is known once it is read through
        report: dict[str, Any] = {
            "report": REPORT,
            "data": self.spec,
            "data_fingerprint": self.parts.fingerprint,
            "samples_in_corpus": read if samples is None and complete else samples,
            "parts": len(self.parts),
            "parts_sized_for_workers": self.per_part,
            "parts_checked": progress.parts_done,
            "complete": complete,
            "read": read,
            "unreadable_count": bad,
            "unreadable_fraction": bad / read if read else 0.0,
            "max_bad_fraction": self.max_fraction,
            "fine_tune_stops": too_many(bad, read, self.max_fraction) if complete else None,
            "unreadable": list(progress.unreadable),
            "provenance": provenance(
                method="data check",
                parameters={"max_bad_fraction": self.max_fraction, "parts_sized_for_workers": self.per_part},
                inputs={"data": self.parts.fingerprint},
                seed=None,
            ),
        }
        with atomic_output(self.path, "w") as handle:
            handle.write(json.dumps(report, indent=1) + "\n")
        self.latest, self.saved_at = None, time.monotonic()
