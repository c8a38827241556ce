"""One writer per output folder: a second run into a folder another run is writing is refused.

A fine-tune checks that --out holds no run before its first write, but that write comes seconds
later (after the model and data load): two runs started a second apart both passed the check and
wrote one folder's state, log and model over each other. Two demos into one folder each replaced
the data under the other's training. The fine-tune and the demo hold this lock for their whole run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from micromerge.core.errors import FolderInUse


@contextlib.contextmanager
def sole_writer(folder: Path, flag: str) -> Iterator[None]:
    """Hold an exclusive flock on `folder` itself while the block runs, or refuse at once.

    The folder is locked rather than a lock file in it: a file would stay behind (in a finished
    run's folder, and in an empty refused one, which could then not be removed), and removing it
    on release lets a third process lock a new file while a second still holds the old one. The
    kernel drops the lock when the process ends, `kill -9` included, so no stale lock can refuse
    a later run. A filesystem without flock (some NFS, Lustre or GPFS mounts) gets no lock, nor
    does a folder that cannot be opened, and the folder check before the first write is the only
    guard there, as it was before.
    """
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # a folder the user may write but not list (mode -wx) cannot be opened to lock
        yield
        return
    held = _Held(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(os.fstat(fd))
            raise FolderInUse(
                f"{flag} {folder}: another run{holder} is writing into this folder now; wait for it "
                "to end, or choose another folder"
            ) from None
        except OSError:
            pass  # no flock here: see above
        os.register_at_fork(after_in_child=held.let_go_in_child)
        yield
    finally:
        held.fd = None
        os.close(fd)


@dataclass
class _Held:
    """The locked folder's descriptor, which a process forked while it is held (a DataLoader
    worker) closes at once. A flock belongs to the open descriptor, and a child's copy kept it
    held: after `kill -9` of a fine-tune, its workers held --out for the 5 s they took to notice
    (a --resume then was refused, naming the dead process). The hook stays registered for the
    process's life (fork hooks cannot be removed), so it does nothing once the lock is let go."""

    fd: int | None

    def let_go_in_child(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _lock_holder(folder: os.stat_result) -> str:
    """' (process N)' for the process holding the folder's flock, as Linux's /proc/locks names
    it; empty where that cannot be told (another OS, or the holder ended meanwhile)."""
    device = f"{os.major(folder.st_dev):02x}:{os.minor(folder.st_dev):02x}:{folder.st_ino}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            # "1: FLOCK  ADVISORY  WRITE 2118 fe:00:2146988 0 EOF"; a waiter's line has "->" second
            if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
                return f" (process {fields[4]})"
    return ""
