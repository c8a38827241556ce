"""What a merge method is: a per-tensor function of the base and the fine-tuned tensors.

Methods see float32 tensors on the compute device, one key at a time, so the executor can
stream checkpoints and the sweep engine can write merged weights straight into a resident
model. `strength` is the method's scalar (WiSE-FT alpha, task-arithmetic lambda, SLERP t),
which per-key rules may override.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MethodParams:
    """Every knob any method reads; each method documents which ones it uses."""

    strength: float = 0.5
    weights: tuple[float, ...] | None = None
    density: float = 0.2
    drop_rate: float = 0.9
    seed: int = 0


@dataclass(frozen=True)
class MergeMethod:
    name: str
    summary: str
    min_finetuned: int
    max_finetuned: int | None
    uses: tuple[str, ...]
    stochastic: bool = False

    def merge(
        self,
        key: str,
        base: torch.Tensor,
        finetuned: list[torch.Tensor],
        strength: float,
        params: MethodParams,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError


def key_seed(seed: int, key: str, index: int) -> int:
    """A per-(seed, tensor, model) RNG seed, so stochastic merges do not depend on key order or device."""
    digest = hashlib.sha256(f"{seed}|{key}|{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def finish(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return result
    out.copy_(result)
    return out
