"""Pick the engine for a merge job and open its inputs for it.

The numpy engine runs when nothing in the job needs torch: an elementwise method (linear,
WiSE-FT, task arithmetic), the CPU (`--device auto` or `cpu`), and local safetensors inputs
with open_clip keys and no bfloat16. Everything else runs on torch, on the device that
`--device` resolves to. Why `auto` means the CPU for numpy-eligible jobs even when a GPU is present:
a single streaming merge reads and writes each tensor once, and on an H100 machine the CUDA
path was slower end to end than the CPU one (BENCHMARKS.md); the GPU pays off in sweeps.
`--engine torch|numpy` overrides the choice (numpy fails with the reason when it cannot run).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from micromerge.core.errors import MicromergeError
from micromerge.merging.backend import ArrayBackend
from micromerge.merging.methods import get_method
from micromerge.merging.numpy_backend import NumpyBackend
from micromerge.merging.sources import ArrayKind, CheckpointAccess, NeedsTorch
from micromerge.merging.tensor_source import TensorSource

ENGINES = ("auto", "numpy", "torch")


@dataclass(frozen=True)
class EngineRequest:
    """What the job says about where and how to merge, and which checkpoints it reads."""

    engine: str
    device: str
    method: str
    out_dtype: str | None
    checkpoints: tuple[str, ...]
    access: CheckpointAccess = CheckpointAccess()


def _why_not_numpy(request: EngineRequest) -> str | None:
    """Why the job's settings (before opening any file) need torch; None when they do not."""
    if not get_method(request.method).elementwise:
        return f"--method {request.method} is not elementwise"
    if request.device not in ("auto", "cpu"):
        return f"--device {request.device} is a torch device"
    if request.out_dtype == "bfloat16":
        return "numpy has no bfloat16 (--dtype bfloat16)"
    return None


def _open_all(request: EngineRequest, arrays: ArrayKind) -> list[TensorSource]:
    opened: list[TensorSource] = []
    try:
        for checkpoint in request.checkpoints:
            opened.append(request.access.open(checkpoint, arrays))
    except BaseException:
        for source in opened:
            with contextlib.suppress(Exception):
                source.close()
        raise
    return opened


def open_inputs(request: EngineRequest) -> tuple[ArrayBackend, list[TensorSource]]:
    """The backend to merge with and the checkpoints opened for it (the caller closes them)."""
    if request.engine not in ENGINES:
        raise MicromergeError(f"--engine {request.engine}: choose one of {list(ENGINES)}")
    reason = "--engine torch" if request.engine == "torch" else _why_not_numpy(request)
    if reason is None:
        try:
            return NumpyBackend(), _open_all(request, "numpy")
        except NeedsTorch as exc:
            reason = str(exc)
    if request.engine == "numpy":
        raise MicromergeError(f"--engine numpy cannot run this merge: {reason}; use --engine auto or torch")
    from micromerge.core.devices import resolve_device
    from micromerge.merging.torch_backend import TorchBackend

    return TorchBackend(resolve_device(request.device)), _open_all(request, "torch")
