"""Atomic file output: write to a temporary file beside the target, then rename.

A crash, a full disk or Ctrl-C never leaves a half-written artefact under the final name,
and the temporary file is removed on any failure. Contents reach the disk (fsync) before the
rename and the rename before the call returns, so a power loss cannot leave an empty or torn
file under the final name either (ext4's delayed allocation, XFS and btrfs may otherwise commit
the rename before the data).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from micromerge.core.errors import FolderInUse, MicromergeError


@contextlib.contextmanager
def atomic_output(path: str | Path, mode: str = "wb", force: bool = True) -> Iterator[IO[Any]]:
    """Yield a file object whose contents replace `path` only if the block succeeds.

    Without `force` the existence check and the rename are one atomic step (a hard link, which
    fails if the name exists), so of two writers racing for one name the second gets the one-line
    "exists" error instead of silently replacing the first. With `force` only a regular file (or
    nothing) is replaced: a device, a folder or a FIFO under that name is refused. Temporary files
    carry the writer's pid, so the next writer of the same name removes those a killed writer left."""
    target = Path(path)
    _refuse_unreplaceable(target, force)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(target)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent
        )
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide every output from the group
    except OSError as exc:
        raise MicromergeError(
            f"{target}: cannot write here ({exc.strerror or exc}); choose another --out"
        ) from exc
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if force:
            os.replace(tmp_name, target)
        else:
            _publish_without_replacing(tmp_name, target)
        sync_folder(target.parent)
    except OSError as exc:
        _remove_quietly(tmp_name)
        raise MicromergeError(
            f"{target}: could not write ({exc.strerror or exc}); no file was left behind"
        ) from exc
    except BaseException:
        _remove_quietly(tmp_name)
        raise


def _umask() -> int:
    """The process umask, read without changing it where Linux says it (os.umask sets as it reads,
    which would race with threads creating files meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _exists_error(target: Path) -> MicromergeError:
    return MicromergeError(f"{target}: output exists; pass --force to overwrite or choose another --out")


def _refuse_unreplaceable(target: Path, force: bool) -> None:
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise MicromergeError(
            f"{target}: cannot write here ({exc.strerror or exc}); choose another --out"
        ) from exc
    if not force:
        raise _exists_error(target)
    if not stat.S_ISREG(mode):
        raise MicromergeError(
            f"{target}: exists and is not a regular file; --force only replaces files: choose another --out"
        )


def _publish_without_replacing(tmp_name: str, target: Path) -> None:
    try:
        os.link(tmp_name, target)
    except FileExistsError:
        raise _exists_error(target) from None
    except OSError as exc:  # a file system without hard links: check, then rename
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if os.path.lexists(target):
            raise _exists_error(target) from None
        os.rename(tmp_name, target)
        return
    os.unlink(tmp_name)


def _fsync_path(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_folder(folder: Path) -> None:
    """Make the renames into `folder` durable. Best effort: some network and FUSE file systems
    refuse fsync on a folder (EINVAL), and there the files' own fsync is all that can be done."""
    with contextlib.suppress(OSError):
        _fsync_path(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def sync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then the folders themselves: files a library wrote (an
    accelerate state, a saved tokenizer, a figure) before a pointer to them is published."""
    folders = [folder]
    for path in sorted(folder.rglob("*")):
        if path.is_dir():
            folders.append(path)
        elif path.is_file():
            _fsync_path(path)
    for each in folders:
        sync_folder(each)


def _remove_stale_temporaries(target: Path) -> None:
    """Remove `.NAME.PID.XXXX.tmp` files of this target whose writer is no longer running."""
    prefix = f".{target.name}."
    for candidate in target.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid_text = candidate.name[len(prefix) :].split(".", 1)[0]
        if pid_text.isdigit() and not _running(int(pid_text)):
            _remove_quietly(str(candidate))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_quietly(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)


@contextlib.contextmanager
def staged_files(folder: Path, superseded: Callable[[str], bool] = lambda name: False) -> Iterator[Path]:
    """Yield a hidden folder inside `folder` to write a set of files that belong together (an
    export's weights, configs, tokenizer and card; a report's pages, figures/ and tables/); they
    are renamed into `folder` only once the block succeeds, so a failure or Ctrl-C half-way leaves
    none of them. Files already in `folder` that this set did not write, and that
    `superseded(relative path)` says an earlier set of the same kind wrote, are then removed (a
    report of fewer runs leaves no figure of an earlier run behind); every other file stays (a
    `figures/` of the user's own). Staging folders carry the writer's pid: the next writer removes
    those a killed writer left (a push would upload them)."""
    for stale in folder.glob(".staging.*"):
        pid_text = stale.name.split(".")[2]
        if stale.is_dir() and pid_text.isdigit() and not _running(int(pid_text)):
            shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging.{os.getpid()}.", dir=folder))
    published: list[Path] = []
    try:
        yield staging
        sync_tree(staging)
        written = sorted(p.relative_to(staging) for p in staging.rglob("*") if not p.is_dir())
        for name in written:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, folder / name)
            published.append(name)
        for each in sorted({(folder / name).parent for name in written}):
            sync_folder(each)
        subfolders = {name.parts[0] for name in written if len(name.parts) > 1}
        for old in sorted(p for sub in subfolders for p in (folder / sub).rglob("*") if not p.is_dir()):
            name = old.relative_to(folder)
            if name not in written and superseded(name.as_posix()):
                old.unlink()
    except OSError as exc:
        # renames are one at a time: a failure among them leaves the ones done (the set cannot be
        # published in one step), and the message must not promise otherwise
        left = (
            f"{len(published)} of its files were already in place ({published[0]}, ...): write it again"
            if published
            else "no file was left behind"
        )
        raise MicromergeError(f"{folder}: could not write ({exc.strerror or exc}); {left}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def same_file(a: Path, b: Path) -> bool:
    """Whether writing `a` would replace `b` (the same path, or a link to the same file): an
    output is never one of its inputs."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Write canonical JSON (sorted keys, fixed indent) so equal payloads give equal bytes."""
    with atomic_output(path, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_output(path, "w") as handle:
        handle.write(text)


@contextlib.contextmanager
def output_folder(path: str | Path, flag: str = "--out") -> Iterator[Path]:
    """`path` as a folder that outputs can be written into: created if missing; a file or an
    unwritable place under that name is a one-line error before any work. Folders it created are
    removed again when the block fails with them still empty: a report of the wrong store, an export
    of a folder holding no checkpoint, a refused fine-tune each left an empty --out behind."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise MicromergeError(f"{flag} {folder}: is a file, not a folder; choose a folder")
    created = [] if folder.exists() else [folder, *(up for up in folder.parents if not up.exists())]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MicromergeError(f"{flag} {folder}: cannot create this folder ({exc.strerror or exc})") from exc
    try:
        if not os.access(folder, os.W_OK):
            raise MicromergeError(f"{flag} {folder}: not writable; choose another folder")
        yield folder
    except FolderInUse:
        raise  # another run's folder now, though this one made it a moment before
    except BaseException:
        for made in created:  # innermost first; one holding files (another process's, a saved state) stays
            try:
                made.rmdir()
            except OSError:
                break
        raise
