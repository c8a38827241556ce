"""Every offline error names a download command the installed huggingface_hub can run.

Facts: huggingface_hub added the `hf` CLI in 0.34.0 and removed `huggingface-cli` in 1.0
(huggingface.co/blog/hf-cli; the v1.0 release notes, "Goodbye huggingface-cli"), so a message
naming `huggingface-cli` cannot be pasted. The command's flags are checked against the installed
`hf download --help`, not against a list kept here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from micromerge.core.errors import MicromergeError
from micromerge.eval.data import load_benchmark
from micromerge.finetune.hub_stream import _open_streaming
from micromerge.merging.sources import open_source


@pytest.fixture(scope="module")
def download_help() -> str:
    assert "hf" in {entry.name for entry in entry_points(group="console_scripts")}
    executable = shutil.which("hf", path=str(Path(sys.executable).parent)) or shutil.which("hf")
    assert executable, "huggingface_hub's `hf` CLI is not installed beside this Python"
    return subprocess.run(
        [executable, "download", "--help"], capture_output=True, text=True, check=True
    ).stdout


def _offline_message(open_it) -> str:
    with pytest.raises(MicromergeError) as info:
        open_it()
    return str(info.value)


@pytest.mark.parametrize(
    "open_it, expected",
    [
        (lambda: open_source("plip"), "hf download vinid/plip --local-dir DIR"),
        (
            lambda: load_benchmark("ubench"),
            "hf download jnirschl/uBench --repo-type dataset --revision 3f2c5b590bc7a208d5b60f3527ce4c76a331aa2b"
            " --include 'perception/0.1.0/*' --local-dir DIR",
        ),
        (
            lambda: _open_streaming("someone/quilt-like@v2"),
            "hf download someone/quilt-like --repo-type dataset --revision v2 --local-dir DIR",
        ),
    ],
    ids=["checkpoint", "ubench", "hub-corpus"],
)
def test_offline_errors_name_a_download_command_the_installed_cli_takes(
    open_it, expected, download_help, monkeypatch
):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    message = _offline_message(open_it)
    assert "\n" not in message and "huggingface-cli" not in message
    command = re.search(r"`(hf download [^`]+)`", message)
    assert command and command.group(1) == expected, message
    for flag in re.findall(r"(--[a-z-]+)", command.group(1)):
        assert flag in download_help, f"`hf download` has no {flag}"
