"""Builders the tests share: tiny open_clip checkpoints written in real formats."""

from __future__ import annotations

import ast
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from micromerge.merging.models import build_model, get_model_config


def random_state_dict(seed: int, arch: str = "nano-clip") -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_model(get_model_config(arch))
    with torch.no_grad():
        for param in model.parameters():  # spread weights so merges are far from trivial
            param.add_(torch.randn_like(param) * 0.02)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def write_checkpoint(path: Path, seed: int, arch: str = "nano-clip") -> dict[str, torch.Tensor]:
    tensors = random_state_dict(seed, arch)
    save_file(tensors, str(path), metadata={"micromerge.arch": arch})
    return tensors


def two_process_launch(*cli_args: str) -> list[str]:
    """`accelerate launch` of the micromerge CLI on two CPU processes (gloo), as users split work,
    on a port free now: accelerate's default 29500 would be taken by a launch of another test worker."""
    import socket
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launcher = Path(sys.executable).with_name("accelerate")
    return [
        str(launcher),
        "launch",
        "--main_process_port",
        str(port),
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "micromerge.cli",
        *cli_args,
    ]


def run_two_processes(*cli_args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`two_process_launch(*cli_args)` run to its end on the CPU (no process sees a GPU), its output
    kept for `launch_failure`. A launch still running after 300 s is killed whole: a rank hung in
    torch's destroy_process_group (pytorch/pytorch#75097; seen at the floors' torch 2.6, about one
    launch in twenty on a loaded machine) outlived the launcher that subprocess.run killed."""
    command = two_process_launch(*cli_args)
    launched = subprocess.Popen(
        command,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    try:
        stdout, stderr = launched.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        kill_whole(launched)
        raise
    return subprocess.CompletedProcess(command, launched.returncode, stdout, stderr)


def kill_whole(launched: subprocess.Popen) -> None:
    """Kill a process and every process under it at once, by pid: torch's elastic agent starts
    each rank in a session of its own, so killing a launcher's process group leaves its ranks."""
    import signal

    import psutil

    root = psutil.Process(launched.pid)
    everyone = [root, *root.children(recursive=True)]
    for process in everyone:
        process.send_signal(signal.SIGKILL)
    launched.communicate()
    psutil.wait_procs(everyone, timeout=30)


def kill_at_step(command: list[str], out: Path, step: int) -> None:
    """Start `command` (a fine-tune writing to `out`: one process, or `two_process_launch(...)`) and
    kill it whole (every process at once, as a lost node or a scheduler's preemption does) once it
    has saved the state of `step`: the run a `--resume` must finish. Killed by `kill_whole`: killing
    the launcher's process group left the ranks running to the end, and the `--resume` that followed
    found a finished run (it passed whether or not resuming worked)."""
    import time

    started = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    latest, deadline = out / "state" / "LATEST", time.time() + 120
    while time.time() < deadline and not (
        latest.is_file() and latest.read_text().strip() >= f"step-{step:08d}"
    ):
        time.sleep(0.02)
    kill_whole(started)
    assert not (out / "model.safetensors").exists(), "the kill must land mid-run"
    assert (out / "state" / "LATEST").is_file(), "the killed run must leave a state to resume from"


def straight_and_resumed_launches(arguments: Callable[[Path], list[str]], folder: Path) -> tuple[Path, Path]:
    """One fine-tune (`arguments(out)`: its CLI arguments, writing to `out`) launched twice on two
    processes: straight through into `folder/straight`, and into `folder/killed` killed whole once
    it has saved step 6, then launched again with --resume. Both launches must succeed; the
    caller compares the two folders."""
    straight, killed = folder / "straight", folder / "killed"
    finished = run_two_processes(*arguments(straight))
    assert finished.returncode == 0, launch_failure(finished)
    kill_at_step(two_process_launch(*arguments(killed)), killed, 6)
    resumed = run_two_processes(*arguments(killed), "--resume")
    assert resumed.returncode == 0, launch_failure(resumed)
    return straight, killed


def launch_failure(result: subprocess.CompletedProcess) -> str:
    """What a failed `accelerate launch` said: its own traceback (the last 2,000 characters) hides
    why a rank died (a rank's SIGABRT in a CI run said nothing more), so the ranks' output before
    it comes first."""
    ranks, _, launcher = result.stderr.partition("Traceback (most recent call last)")
    return f"ranks' output:\n{ranks[-4000:]}\nlauncher:\n{launcher[-1500:]}"


def deny_access(monkeypatch, path: Path, mode: int) -> None:
    """Make `os.access(path, mode)` answer False, as for a file or folder the user may not read or
    write. The suite runs as root, whom permission bits never stop, so chmod cannot show it."""
    real_access = os.access

    def access(candidate, asked, **kwargs):
        if Path(candidate) == Path(path) and asked & mode:
            return False
        return real_access(candidate, asked, **kwargs)

    monkeypatch.setattr(os, "access", access)


def absolute_imports(source: str | bytes) -> list[tuple[str, int]]:
    """(module, line) of every absolute import in `source` (`import a.b`, `from a.b import c`),
    at module level or inside a function alike: what the layer and packaging checks read."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
    return found


def descendants() -> set[int]:
    """The pids of this process's descendants now: what `descendants_left` compares with."""
    import psutil

    return {child.pid for child in psutil.Process().children(recursive=True)}


def descendants_left(before: set[int]) -> list[str]:
    """The names of this process's live descendants that were not there `before` (a run's DataLoader
    workers it should have stopped); zombies, already ended, are not counted."""
    import psutil

    left = [c for c in psutil.Process().children(recursive=True) if c.pid not in before and c.is_running()]
    return [child.name() for child in left if child.status() != psutil.STATUS_ZOMBIE]


def stop_at_the_next_save(monkeypatch) -> None:
    """The next fine-tune saves its state, then stops as Ctrl-C stops it; the run after it (a
    resume) saves and goes on as usual."""
    from micromerge.finetune import trainer

    save = trainer._save_state

    def save_then_stop(*args):
        monkeypatch.setattr(trainer, "_save_state", save)
        save(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_save_state", save_then_stop)
