"""What an array backend gives the streaming merge: the few array operations outside the methods.

Two engines run a file merge. `TorchBackend` (merging.torch_backend) runs every method on the
CPU or a GPU. `NumpyBackend` (merging.numpy_backend) runs the elementwise methods (linear,
WiSE-FT, task arithmetic) on safetensors inputs without importing torch at all: a one-off
merge is bound by reading and writing the checkpoints, and importing torch's CUDA build costs
more than the merge itself (BENCHMARKS.md). The methods are written with arithmetic operators
only, so both engines run the same float32 operations in the same order and write the same
tensor bytes; tests/test_engines.py holds them to that.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from micromerge.merging.tensor_source import TensorMeta


class ArrayBackend(Protocol):
    @property
    def name(self) -> str:
        """The engine's name, recorded in the manifest and naming the array library in provenance."""

    @property
    def device(self) -> str: ...

    def view(self, raw: np.ndarray, meta: TensorMeta) -> Any:
        """A tensor's raw bytes as this backend's typed array (no copy)."""

    def all_finite(self, array: Any) -> bool: ...

    def to_float32(self, array: Any) -> Any:
        """The compute copy on the device; may alias `array` when it already is float32 there."""

    def empty_float32(self, numel: int) -> Any: ...

    def clamp_max_(self, array: Any, value: float) -> None: ...

    def host_bytes(self, array: Any, dtype: str) -> memoryview:
        """The array converted to safetensors dtype `dtype`, as contiguous bytes in host memory."""
