"""Device choice in one place: 'auto' means CUDA when present, else CPU."""

from __future__ import annotations

import re

import torch

from micromerge.core.errors import MicromergeError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = re.fullmatch(r"cuda(?::(\d+))?", name)
    if name != "cpu" and cuda is None:
        # `cuda:x` reached torch.device (a RuntimeError traceback on a GPU machine)
        raise MicromergeError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if cuda is not None and not torch.cuda.is_available():
        raise MicromergeError(f"--device {name}: no CUDA device is available here; use --device cpu or auto")
    if cuda is not None and cuda.group(1) is not None and int(cuda.group(1)) >= torch.cuda.device_count():
        # an ordinal past the last GPU failed later, deep in torch ("invalid device ordinal")
        count = torch.cuda.device_count()
        raise MicromergeError(
            f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
        )
    return torch.device(name)
