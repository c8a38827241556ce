"""Pausing Python's cycle collector while millions of acyclic objects are built.

Every 700 new containers the collector runs, and every so often it walks every object alive:
decoding a 500 MB results store (392,832 rows of nested dicts) took 27 s, of which 21 s were the
collector looking for cycles that JSON cannot make (BENCHMARKS.md, "Reports at the paper grid's
size"). Reference counting still frees everything; only cycle detection waits until the block ends.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def cycle_collection_paused() -> Iterator[None]:
    """The collector off inside the block and back as it was after it, even on an exception."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
