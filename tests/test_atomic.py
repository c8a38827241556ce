"""Atomic outputs (`core.atomic`): the cases the merge, report and export tests do not reach."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from micromerge.core.atomic import atomic_output, same_file, staged_files
from micromerge.core.errors import MicromergeError


def test_a_staged_set_removes_only_what_an_earlier_set_of_its_kind_wrote(tmp_path):
    """A report of fewer runs leaves no figure of an earlier run behind, but a file of the user's
    own in the same subfolder stays: only what `superseded` names is removed."""
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "run-old.png").write_text("an earlier report's")
    (tmp_path / "figures" / "mine.png").write_text("the user's")
    with staged_files(tmp_path, superseded=lambda name: name.startswith("figures/run-")) as staging:
        (staging / "figures").mkdir()
        (staging / "figures" / "run-new.png").write_text("this report's")
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["mine.png", "run-new.png"]
    assert not list(tmp_path.glob(".staging.*"))


def test_a_staged_set_removes_the_staging_of_a_dead_writer_only(tmp_path):
    """Staging folders carry their writer's pid: one whose writer is gone (a killed export) is
    removed, one whose writer still runs (two reports into one folder at once) is that writer's
    work in progress and stays, and a plain file of that name is not ours to remove."""
    dead = tmp_path / ".staging.999999999.abc"  # no such pid runs
    alive = tmp_path / f".staging.{os.getpid()}.def"
    for folder in (dead, alive):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    not_a_folder = tmp_path / ".staging.999999998.ghi"
    not_a_folder.write_text("a file")
    with staged_files(tmp_path) as staging:
        (staging / "report.md").write_text("x")
    assert not dead.exists() and (alive / "model.safetensors").read_bytes() == b"half"
    assert not_a_folder.read_text() == "a file" and (tmp_path / "report.md").read_text() == "x"


def test_a_hard_link_to_an_input_is_that_input(tmp_path):
    """`--out` naming another path to the same file (a hard link) would overwrite the input."""
    original, linked, other = tmp_path / "ft.safetensors", tmp_path / "link.safetensors", tmp_path / "o"
    original.write_bytes(b"weights")
    other.write_bytes(b"weights")
    os.link(original, linked)
    assert same_file(linked, original) and not same_file(other, original)


def test_without_hard_links_an_output_that_appeared_meanwhile_is_not_replaced(tmp_path, monkeypatch):
    """On a file system without hard links (some network and FUSE mounts) publishing falls back to
    check-then-rename: an output another writer made meanwhile is still refused, and kept."""

    def no_links(*_args):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    target = tmp_path / "merged.safetensors"
    with atomic_output(target, "w", force=False) as handle:
        handle.write("first")
    assert target.read_text() == "first"
    second = tmp_path / "second.safetensors"
    refused = pytest.raises(MicromergeError, match="second.safetensors: output exists")
    with refused, atomic_output(second, "w", force=False) as handle:
        handle.write("mine")
        second.write_text("another writer's")
    assert second.read_text() == "another writer's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.safetensors", "second.safetensors"]


class _DiskLog:
    """What reached the disk, in order: each fsync (by the path its descriptor names) and each
    rename. Power loss after a rename must find the renamed file's contents on the disk."""

    def __init__(self, monkeypatch):
        self.events: list[tuple[str, str]] = []
        fsync = os.fsync

        def logged_fsync(fd):
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            fsync(fd)

        monkeypatch.setattr(os, "fsync", logged_fsync)
        for name in ("replace", "rename"):
            monkeypatch.setattr(os, name, self._logged(getattr(os, name)))

    def _logged(self, move):
        def logged_move(src, dst, **kwargs):
            move(src, dst, **kwargs)
            self.events.append(("rename", str(dst)))

        return logged_move

    def index(self, kind: str, path) -> int:
        return self.events.index((kind, str(path)))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names descriptors through /proc")
def test_an_outputs_contents_reach_the_disk_before_its_name_does(tmp_path, monkeypatch):
    """Without the fsync before the rename, ext4's delayed allocation, XFS and btrfs may commit
    the rename first: a power loss then leaves an empty file under the final name."""
    log = _DiskLog(monkeypatch)
    target = tmp_path / "merged.safetensors"
    with atomic_output(target, "w") as handle:
        handle.write("weights")
    synced = [path for kind, path in log.events[: log.index("rename", target)] if kind == "fsync"]
    assert len(synced) == 1 and Path(synced[0]).name.startswith(".merged.safetensors."), synced
    assert log.events[log.index("rename", target) + 1] == ("fsync", str(tmp_path))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names descriptors through /proc")
def test_a_staged_sets_files_reach_the_disk_before_they_are_published(tmp_path, monkeypatch):
    """A report or an export is written by libraries (matplotlib, transformers) that do not
    fsync: each of its files is synced before the first rename, and its folders after the last."""
    log = _DiskLog(monkeypatch)
    with staged_files(tmp_path) as staging:
        (staging / "figures").mkdir()
        (staging / "figures" / "a.png").write_text("figure")
        (staging / "report.md").write_text("report")
    first_rename = min(i for i, (kind, _) in enumerate(log.events) if kind == "rename")
    synced = {Path(path).name for kind, path in log.events[:first_rename] if kind == "fsync"}
    assert {"a.png", "report.md"} <= synced
    after = log.events[max(i for i, (kind, _) in enumerate(log.events) if kind == "rename") :]
    assert ("fsync", str(tmp_path)) in after and ("fsync", str(tmp_path / "figures")) in after
