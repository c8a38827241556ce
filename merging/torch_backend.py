"""The torch engine: every method, on the CPU or a GPU, and the torch view of safetensors bytes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from micromerge.merging.tensor_source import TensorMeta

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype ("F32" for torch.float32)."""
    return _NAMES[dtype]


def torch_view(raw: np.ndarray, meta: TensorMeta) -> torch.Tensor:
    return torch.from_numpy(raw).view(TORCH_DTYPES[meta.dtype]).reshape(meta.shape)


@dataclass(frozen=True)
class TorchBackend:
    torch_device: torch.device
    name: str = "torch"

    @property
    def device(self) -> str:
        return str(self.torch_device)

    def view(self, raw: np.ndarray, meta: TensorMeta) -> torch.Tensor:
        return torch_view(raw, meta)

    def all_finite(self, tensor: torch.Tensor) -> bool:
        """One reduction instead of isfinite's full-size mask: a finite sum proves every element finite
        (NaN and Inf propagate through a sum); only a non-finite sum, rarely an overflow, needs the exact check."""
        if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
            return True
        return bool(torch.isfinite(tensor).all())

    def to_float32(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=self.torch_device, dtype=torch.float32)

    def empty_float32(self, numel: int) -> torch.Tensor:
        return torch.empty(numel, dtype=torch.float32, device=self.torch_device)

    def clamp_max_(self, tensor: torch.Tensor, value: float) -> None:
        tensor.clamp_(max=value)

    def host_bytes(self, tensor: torch.Tensor, dtype: str) -> memoryview:
        data = tensor.detach().to("cpu", TORCH_DTYPES[dtype]).contiguous().reshape(-1)
        return data.view(torch.uint8).numpy().data
