"""Atomic file output: write to a temporary file beside the target, then rename.

A crash, a full disk or Ctrl-C never leaves a half-written artefact under the final name,
and the temporary file is removed on any failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from micromerge.errors import MicromergeError


@contextlib.contextmanager
def atomic_output(path: str | Path, mode: str = "wb", force: bool = True) -> Iterator[IO[Any]]:
    """Yield a file object whose contents replace `path` only if the block succeeds."""
    target = Path(path)
    if not force and target.exists():
        raise MicromergeError(f"{target}: output exists; pass --force to overwrite or choose another --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
        os.replace(tmp_name, target)
    except OSError as exc:
        _remove_quietly(tmp_name)
        raise MicromergeError(
            f"{target}: could not write ({exc.strerror or exc}); no file was left behind"
        ) from exc
    except BaseException:
        _remove_quietly(tmp_name)
        raise


def _remove_quietly(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Write canonical JSON (sorted keys, fixed indent) so equal payloads give equal bytes."""
    with atomic_output(path, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_output(path, "w") as handle:
        handle.write(text)
