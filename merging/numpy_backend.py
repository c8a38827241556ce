"""The torch-free engine: safetensors in, numpy float32 arithmetic, safetensors out.

numpy has no bfloat16, so checkpoints holding bfloat16 tensors (or `--dtype bfloat16`) go
to the torch engine; so does every method that is not elementwise (see merging.engines).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from micromerge.merging.tensor_source import TensorMeta

NUMPY_DTYPES: dict[str, type[np.generic]] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


@dataclass(frozen=True)
class NumpyBackend:
    name: str = "numpy"
    device: str = "cpu"

    def view(self, raw: np.ndarray, meta: TensorMeta) -> np.ndarray:
        return raw.view(NUMPY_DTYPES[meta.dtype]).reshape(meta.shape)

    def all_finite(self, array: np.ndarray) -> bool:
        """A finite sum proves every element finite; only a non-finite sum (rarely an overflow) needs the full check."""
        if array.dtype.kind != "f":
            return True
        with np.errstate(over="ignore", invalid="ignore"):
            total = array.sum(dtype=np.float64 if array.dtype == np.float64 else np.float32)
        return bool(np.isfinite(total)) or bool(np.isfinite(array).all())

    def to_float32(self, array: np.ndarray) -> np.ndarray:
        return array.astype(np.float32, copy=False)

    def empty_float32(self, numel: int) -> np.ndarray:
        return np.empty(numel, dtype=np.float32)

    def clamp_max_(self, array: np.ndarray, value: float) -> None:
        np.minimum(array, value, out=array)

    def host_bytes(self, array: np.ndarray, dtype: str) -> memoryview:
        with np.errstate(over="ignore"):  # an overflow to Inf is checked (and refused) by the caller
            data = np.ascontiguousarray(array, dtype=NUMPY_DTYPES[dtype]).reshape(-1)
        return data.view(np.uint8).data
