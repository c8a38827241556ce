"""Device choice in one place: 'auto' means CUDA when present, else CPU."""

from __future__ import annotations

import torch

from micromerge.core.errors import MicromergeError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MicromergeError(f"--device {name}: no CUDA device is available here; use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise MicromergeError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    return torch.device(name)
