"""One fine-tune per --out at a time. The folder check came seconds before a run's first write, so
two runs started a second apart both passed it and wrote one folder's state, log and model over
each other (seen in the forty-sixth session). A run now holds an flock on --out for its whole
length; a second run, plain, --resume or --force, is refused before it reads or deletes a file.
Each test fails without the lock."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from micromerge.cli import cli
from micromerge.core.errors import FolderInUse, MicromergeError
from micromerge.core.folder_lock import sole_writer
from micromerge.finetune import trainer
from micromerge.finetune.trainer import run_finetune
from tests.helpers import launch_failure, run_two_processes, write_checkpoint
from tests.test_finetune import _contrastive_args, config, write_csv_folder

HOLD = "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)"


@pytest.fixture
def base(tmp_path):
    write_checkpoint(tmp_path / "base.safetensors", 0)
    return tmp_path / "base.safetensors"


@pytest.fixture
def held_by_another_process(tmp_path):
    """A folder another process holds the flock of, as a running fine-tune does; killed at the end."""
    folder = tmp_path / "running"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    yield folder, holder
    holder.kill()
    holder.wait()


@pytest.mark.parametrize("flag", [None, "--resume", "--force"])
def test_a_fine_tune_into_a_folder_another_run_is_writing_is_refused_and_changes_nothing(
    tmp_path, base, held_by_another_process, flag
):
    """Plain, --resume and --force alike: without the lock the plain run trained into the other
    run's folder, --resume loaded its half-written state, --force deleted that state."""
    folder, holder = held_by_another_process
    (folder / "state").mkdir()
    (folder / "state" / "LATEST").write_text("step-00000002\n")  # the running run's own files
    (folder / "train_log.jsonl").write_text('{"step": 1}\n')
    before = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    data = write_csv_folder(tmp_path / "pairs")
    args = _contrastive_args(base, data, folder, steps=2)
    result = CliRunner().invoke(cli, [*args, *([flag] if flag else [])])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert len(line.splitlines()) == 1
    assert f"--out {folder}: another run (process {holder.pid}) is writing into this folder now" in line
    assert {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()} == before


def test_a_folder_the_refused_run_made_itself_stays_for_the_run_that_holds_it(tmp_path, base, monkeypatch):
    """Two runs into a new --out started together both see it missing and both make it; the one
    that loses the lock must not remove it again as a refused run's empty folder (the winner has
    yet to write its first file, and would find its --out gone)."""
    out = tmp_path / "new" / "run"
    holding = []
    real_accelerator = trainer._accelerator

    def winner_takes_the_folder_first(cfg):
        holding.append(sole_writer(out, "--out"))
        holding[0].__enter__()  # the other run, which made the folder at the same moment
        return real_accelerator(cfg)

    monkeypatch.setattr(trainer, "_accelerator", winner_takes_the_folder_first)
    with pytest.raises(FolderInUse, match="another run .*is writing into this folder now"):
        run_finetune(config(base, write_csv_folder(tmp_path / "pairs"), out))
    assert out.is_dir()
    holding[0].__exit__(None, None, None)


def test_a_run_killed_while_it_held_the_folder_leaves_no_lock_behind(tmp_path, base, held_by_another_process):
    """Refused while the other run lives; once it is killed (`kill -9`: no code of its runs) the
    kernel has dropped its flock, and the next run goes ahead. A lock file left behind would
    refuse every later run into the folder, the resume of the killed run among them."""
    folder, holder = held_by_another_process
    cfg = config(base, write_csv_folder(tmp_path / "pairs"), folder)
    with pytest.raises(FolderInUse, match=f"another run \\(process {holder.pid}\\)"):
        run_finetune(cfg)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert run_finetune(cfg).is_file()
    written = sorted(path.name for path in folder.iterdir())
    assert written == ["README.md", "manifest.json", "model.safetensors", "train_log.jsonl"]


FORK_WHILE_HOLDING = r"""
import os, sys, time
from pathlib import Path
from micromerge.core.folder_lock import sole_writer
with sole_writer(Path(sys.argv[1]), "--out"):
    if os.fork() == 0:  # a DataLoader worker, forked while the run holds --out
        os.write(1, f"child {os.getpid()}\n".encode())  # its fork hooks have run by now
        time.sleep(60)
        os._exit(0)
os.write(1, b"parent let go\n")  # one write each: print's text and newline could interleave
time.sleep(60)
"""


def test_a_process_forked_while_the_folder_is_held_does_not_hold_it(tmp_path):
    """A flock belongs to the open descriptor, and a forked child (a DataLoader worker) got a
    copy: after `kill -9` of a fine-tune, its workers held --out for the 5 s they took to notice,
    and a --resume then was refused, naming the dead process. Here a process forks a child while
    it holds the folder and then lets it go: the folder is free at once, the child still alive."""
    import psutil

    folder = tmp_path / "run"
    folder.mkdir()
    script = subprocess.Popen(
        [sys.executable, "-c", FORK_WHILE_HOLDING, str(folder)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert script.stdout is not None
        said = sorted(script.stdout.readline().split() for _ in range(2))  # either may come first
        assert said[1] == ["parent", "let", "go"]
        child = psutil.Process(int(said[0][1]))
        with sole_writer(folder, "--out"):
            assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE
    finally:
        for process in (psutil.Process(script.pid), *psutil.Process(script.pid).children()):
            process.kill()
        script.wait()


def test_the_folder_is_free_again_once_a_run_ends(tmp_path, base):
    """A run that ended, finished or refused, holds nothing: the next run into its folder in the
    same process (a script or notebook runs them so) goes ahead, while a lock taken in that
    process refuses it as another process's would."""
    data, out = write_csv_folder(tmp_path / "pairs"), tmp_path / "run"
    run_finetune(config(base, data, out))
    with pytest.raises(MicromergeError, match="holds manifest.json"):
        run_finetune(config(base, data, out))
    with sole_writer(out, "--out"), pytest.raises(FolderInUse, match=f"process {os.getpid()}"):
        run_finetune(config(base, data, out, force=True))
    assert run_finetune(config(base, data, out, force=True)).is_file()


def test_a_filesystem_without_locks_still_trains(tmp_path, base, monkeypatch):
    """Some NFS, Lustre and GPFS mounts answer flock with ENOLCK, ENOSYS or EOPNOTSUPP. A run
    there goes ahead unguarded (the folder check before its first write is what guarded it
    before), rather than failing on a lock that only catches a second run started by mistake.
    Simulated: every filesystem of this machine gives locks."""

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert run_finetune(config(base, write_csv_folder(tmp_path / "pairs"), tmp_path / "run")).is_file()


def test_a_folder_that_cannot_be_opened_to_lock_still_trains(tmp_path, base, monkeypatch):
    """A folder the user may write into but not list (mode -wx) cannot be opened, so not locked
    either: the run goes ahead as on a filesystem without locks, not with a PermissionError
    traceback. Simulated: the suite runs as root, whom permission bits never stop."""
    out, real_open = tmp_path / "run", os.open

    def cannot_list(path, flags, *args, **kwargs):
        if Path(path) == out and flags & os.O_DIRECTORY:
            raise PermissionError(13, os.strerror(13), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", cannot_list)
    assert run_finetune(config(base, write_csv_folder(tmp_path / "pairs"), out)).is_file()


@pytest.mark.slow
def test_every_process_of_a_launch_into_a_held_folder_is_refused(tmp_path, base, held_by_another_process):
    """Only the launch's main process locks --out; its refusal is broadcast, so the second
    process stops with it at once, with the same line. Without that, the second process went on
    past the folder check alone and waited for the first at the next collective."""
    folder, holder = held_by_another_process
    data = write_csv_folder(tmp_path / "pairs", n=16)
    result = run_two_processes(*_contrastive_args(base, data, folder, steps=2, batch_size=4))
    assert result.returncode != 0, launch_failure(result)
    said = [line for line in result.stderr.splitlines() if "is writing into this folder now" in line]
    assert len(said) == 2, launch_failure(result)
    assert all(f"another run (process {holder.pid})" in line for line in said)
    assert sorted(Path(folder).iterdir()) == []
