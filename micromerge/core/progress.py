"""Progress bars that suit where they are shown: live in a terminal, a few lines in a log.

tqdm redraws its line with carriage returns several times a second; in a log (CI, `make demo >
log`) that is thousands of updates. Off a terminal, each bar here writes a line when it starts,
one every LOG_INTERVAL seconds while it runs, and one when it ends.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

from tqdm import tqdm

LOG_INTERVAL = 30.0


class _LogLines:
    """A stream for tqdm in a log: every refresh becomes one plain line."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


class _LogBar(tqdm):
    """A bar in a log: a new postfix (a loss, a rate) waits for the next timed line."""

    def set_postfix(
        self, ordered_dict: Mapping[str, object] | None = None, refresh: bool | None = True, **kwargs: Any
    ) -> None:  # noqa: ARG002 (tqdm's signature)
        super().set_postfix(ordered_dict, refresh=False, **kwargs)


def progress_bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> tqdm:
    """tqdm with its keyword arguments (desc, total, unit, disable, leave, initial ...)."""
    stream = kwargs.pop("file", None) or sys.stderr
    if stream.isatty():
        return tqdm(iterable, file=stream, **kwargs)
    kwargs.update(leave=True, mininterval=LOG_INTERVAL, maxinterval=LOG_INTERVAL, ascii=True, ncols=100)
    return _LogBar(iterable, file=_LogLines(stream), **kwargs)
