"""`--allow-pickle` reads tensors out of foreign pickles and must never run code from them.

Every pickle that torch reads goes through `pickle_module`: the zip format through
`pickle_module.Unpickler`, the legacy (pre-zip) format first through three `pickle_module.load`
calls (magic number, protocol version, system info) and then the Unpickler. A plain pickle that
is no torch file at all reaches that first `load`. Each payload below is placed where one of
those readers meets it; each would run with the standard unpickler (checked first, so the test
proves the payload is live), and must leave no trace through micromerge.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from micromerge.core.errors import MicromergeError
from micromerge.merging.sources import open_source
from tests.helpers import write_checkpoint


class _Reduce:
    """Pickles as `callable(*args)`: the shape of every code-running payload."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _payloads(marker: Path) -> dict[str, bytes]:
    """Each payload creates `marker` when unpickled by the standard unpickler."""
    shell = f"touch {marker}"
    # torch._utils._import_dotted_name looks like a harmless torch helper, but it resolves any
    # dotted name: the pickle imports os.system through it and then calls the result.
    dotted = b"ctorch._utils\n_import_dotted_name\n(Vos.system\ntR(V" + shell.encode() + b"\ntR."
    return {
        "os.system": pickle.dumps(_Reduce(os.system, shell), protocol=2),
        "builtins.eval": pickle.dumps(_Reduce(eval, f"__import__('os').system({shell!r})"), protocol=2),
        "subprocess.Popen": pickle.dumps(_Reduce(subprocess.Popen, ["touch", str(marker)]), protocol=2),
        "torch._utils._import_dotted_name": dotted,
    }


def _legacy_file(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def _first_pickle_length(data: bytes) -> int:
    stream = io.BytesIO(data)
    pickle.load(stream)
    return stream.tell()


def _legacy_with_payload_as_magic(payload: bytes) -> bytes:
    """A real legacy-format state dict whose first pickle (the magic number) is the payload."""
    legit = _legacy_file({"weight": torch.ones(2)})
    return payload + legit[_first_pickle_length(legit) :]


def _placements(payload: bytes) -> dict[str, bytes]:
    return {
        "plain pickle": payload,
        "legacy magic number": _legacy_with_payload_as_magic(payload),
        "legacy object": _legacy_file({"weight": torch.ones(2), "payload": _Stash(payload)}),
    }


class _Stash:
    """Embeds raw payload bytes as an object inside a torch pickle."""

    def __init__(self, payload: bytes):
        self.payload = payload

    def __reduce__(self):
        return (pickle.loads, (self.payload,))


def _wait_for(process_marker: Path) -> bool:
    """Popen/`touch` run asynchronously for a moment; give them time before judging."""
    import time

    for _ in range(20):
        if process_marker.exists():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("payload_name", list(_payloads(Path("x"))))
def test_payloads_are_live_with_the_standard_unpickler(tmp_path, payload_name):
    marker = tmp_path / "ran"
    pickle.loads(_payloads(marker)[payload_name])
    assert _wait_for(marker), "the payload should run under pickle.loads, or the test proves nothing"


@pytest.mark.parametrize("payload_name", list(_payloads(Path("x"))))
@pytest.mark.parametrize("placement", ["plain pickle", "legacy magic number", "legacy object"])
def test_no_pickle_placement_runs_its_payload(tmp_path, payload_name, placement):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    path.write_bytes(_placements(_payloads(marker)[payload_name])[placement])
    try:
        with open_source(str(path), allow_pickle=True) as source:
            if placement == "legacy object":  # the tensors around the payload are still read
                assert torch.equal(source.read("weight"), torch.ones(2))
    except MicromergeError as error:
        assert "evil.pt" in str(error)
    assert not _wait_for(marker), f"{payload_name} ran from a {placement}"


def test_merge_cli_refuses_a_legacy_magic_payload_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    base = tmp_path / "base.safetensors"
    write_checkpoint(base, 0)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(_legacy_with_payload_as_magic(_payloads(marker)["os.system"]))
    result = subprocess.run(
        [sys.executable, "-m", "micromerge.cli", "merge", "--base", str(base), "--ft", str(evil)]
        + ["--alpha", "0.5", "--allow-pickle", "--out", str(tmp_path / "out.safetensors")],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2, result.stderr
    assert "evil.pt" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.safetensors").exists()
    assert not _wait_for(marker)


class _ExpandedBuffer(torch.nn.Module):
    def __init__(self, elements: int):
        super().__init__()
        self.register_buffer("weight", torch.ones(1).expand(elements))
        self.ok = torch.nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.ok


def _expanded_view_file(path: Path, reader: str, elements: int) -> Path:
    """`weight`: a view of `elements` over a 1-element storage, in the file `reader` reads."""
    if reader == "weights_only":
        torch.save({"weight": torch.ones(1).expand(elements), "ok": torch.ones(3)}, path)
    elif reader == "restricted":  # a legacy file with an object only --allow-pickle reads
        path.write_bytes(_legacy_file({"weight": torch.ones(1).expand(elements), "x": _Reduce(print)}))
    else:  # torch.jit.save keeps the view as torch.save does, as (storage, size, stride)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.script is deprecated in torch 2.14
            torch.jit.script(_ExpandedBuffer(elements)).save(str(path))
    return path


@pytest.mark.parametrize("reader", ["weights_only", "restricted", "torchscript"])
def test_a_view_claiming_more_elements_than_its_storage_is_refused(tmp_path, reader):
    """torch.save keeps an expanded view as (4-byte storage, size 10^10, stride 0); reading it as
    weights would allocate 40 GB. Refused by every reader (weights_only, the restricted unpickler,
    the TorchScript archive reader), from one element more than the storage holds."""
    allow_pickle = reader != "weights_only"
    path = _expanded_view_file(tmp_path / "bomb.pt", reader, 10**10)
    with pytest.raises(MicromergeError, match=r"bomb.pt: tensor 'weight' claims 10,000,000,000 elements"):
        open_source(str(path), allow_pickle=allow_pickle)
    path = _expanded_view_file(tmp_path / "two.pt", reader, 2)
    with pytest.raises(
        MicromergeError, match=r"two.pt: tensor 'weight' claims 2 elements over a storage of 1 "
    ):
        open_source(str(path), allow_pickle=allow_pickle)


def _interrupted_run(tmp_path: Path, monkeypatch) -> tuple[Path, Path, Path]:
    """(base, data, run): a contrastive run killed right after its step-2 state was saved."""
    from tests.test_finetune import write_csv_folder
    from tests.test_hardening_finetune import _killed_after_step_two

    tmp_path.mkdir(parents=True, exist_ok=True)
    base = tmp_path / "base.safetensors"
    write_checkpoint(base, 0)
    data = write_csv_folder(tmp_path / "pairs")
    _killed_after_step_two(tmp_path, base, data, monkeypatch)
    return base, data, tmp_path / "run"


def test_resuming_a_run_never_unpickles_a_state_file_with_code_in_it(tmp_path, monkeypatch):
    """accelerate saved the registered LR scheduler as `custom_checkpoint_0.pkl` and loads it with
    `torch.load(weights_only=False)`: a run folder handed over with a payload in that file ran it on
    `finetune --resume` (checked by hand: a `touch` ran). The schedule is now in trainer_state.json;
    an earlier micromerge's state (its schedule only in the pickle) has it read with
    weights_only=True and moved there, and resumes to the same weights as a run never stopped; a
    payload in its place, or a pickle beside a JSON schedule, is refused and never runs."""
    from safetensors.torch import load_file

    from micromerge.finetune.trainer import run_finetune
    from tests.test_finetune import config

    base, data, run = _interrupted_run(tmp_path, monkeypatch)
    state = run / "state" / "step-00000002"
    saved = json.loads((state / "trainer_state.json").read_text())
    assert "scheduler" in saved and not list(state.glob("custom_checkpoint_*")), "no pickled scheduler"
    marker = tmp_path / "ran"
    payload = pickle.dumps(_Reduce(os.system, f"touch {marker}"))
    (state / "custom_checkpoint_0.pkl").write_bytes(payload)
    resume = config(base, data, run, max_steps=4, save_every=2, resume=True)
    with pytest.raises(
        MicromergeError, match="holds custom_checkpoint_0.pkl, which no micromerge run writes"
    ):
        run_finetune(resume)
    assert not marker.exists()
    # the state as an earlier micromerge wrote it, the payload where its schedule was
    old_format = {k: v for k, v in saved.items() if k != "scheduler"}
    (state / "trainer_state.json").write_text(json.dumps(old_format))
    with pytest.raises(
        MicromergeError, match="is not a learning-rate schedule torch reads without running code"
    ):
        run_finetune(resume)
    assert not marker.exists()
    # the same, as accelerate saved a real schedule: resumes, exactly
    torch.save(saved["scheduler"], state / "custom_checkpoint_0.pkl")
    resumed = load_file(str(run_finetune(resume)))
    straight = load_file(
        str(run_finetune(config(base, data, tmp_path / "straight", max_steps=4, save_every=2)))
    )
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl", "model.safetensors"])
def test_a_payload_or_damage_in_the_saved_tensors_never_runs_and_is_one_line(tmp_path, monkeypatch, name):
    """accelerate reads the optimizer and random states with torch.load(weights_only=True) and the
    model with safetensors: a payload in any of them runs nothing. The optimizer's or the model's
    was torch's multi-line traceback; it is one line. (accelerate itself skips random states it
    cannot read, with a warning: the data order and augmentation do not depend on them.)"""
    from micromerge.finetune.trainer import run_finetune
    from tests.test_finetune import config

    base, data, run = _interrupted_run(tmp_path, monkeypatch)
    marker = tmp_path / "ran"
    (run / "state" / "step-00000002" / name).write_bytes(pickle.dumps(_Reduce(os.system, f"touch {marker}")))
    resume = config(base, data, run, max_steps=4, save_every=2, resume=True)
    if name == "random_states_0.pkl":
        run_finetune(resume)
    else:
        with pytest.raises(
            MicromergeError,
            match=r"state/step-00000002 could not be loaded \(\w+: \w.*start over with --force",
        ):  # the reason: the error's type and its first line
            run_finetune(resume)
    assert not marker.exists()
