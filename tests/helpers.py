"""Builders the tests share: tiny open_clip checkpoints written in real formats."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from merging.models import build_model, get_model_config


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
