"""What a merge method is: a per-tensor function of the base and the fine-tuned tensors.

Methods see float32 arrays on the compute device, one key at a time, so the executor can
stream checkpoints and the sweep engine can write merged weights straight into a resident
model. `strength` is the method's scalar (WiSE-FT alpha, task-arithmetic lambda, SLERP t),
which per-key rules may override.

An `elementwise` method uses arithmetic operators and `out[...] =` only, so the same code runs
on torch tensors and numpy arrays with the same float32 operations in the same order: the
numpy engine (no torch import) and the torch engine write identical bytes. Methods that need
torch's functions (TIES, DARE, SLERP) import it inside those functions, so the registry
itself loads without torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

Array = Any
"""A torch.Tensor (torch engine, sweeps) or, for elementwise methods, a numpy.ndarray."""


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
    elementwise: bool = False

    def merge(
        self,
        key: str,
        base: Array,
        finetuned: list[Array],
        strength: float,
        params: MethodParams,
        out: Array | None = None,
    ) -> Array:
        raise NotImplementedError


def key_seed(seed: int, key: str, index: int) -> int:
    """A per-(seed, tensor, model) RNG seed, so stochastic merges do not depend on key order or device."""
    digest = hashlib.sha256(f"{seed}|{key}|{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def finish(result: Array, out: Array | None) -> Array:
    if out is None:
        return result
    out[...] = result
    return out
