"""The generalised task-arithmetic core: task arithmetic, TIES and DARE are one function.

theta = theta_base + lambda * combine(sparsify(tau_i)), tau_i = theta_i - theta_base, where
  task-arithmetic: no sparsification, plain sum (a negative lambda negates a task);
  TIES:  keep the top-k% magnitudes of each tau_i (per tensor), elect a sign per entry
         (sign of the sum of trimmed tau_i), average only the entries agreeing with it;
  DARE:  drop each entry of tau_i with probability p, rescale survivors by 1/(1-p), sum.

Task arithmetic is elementwise (it also runs on numpy arrays); TIES and DARE need torch, which
their helpers import where they use it so that the method registry loads without torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from merging.methods.base import Array, MergeMethod, MethodParams, finish, key_seed

if TYPE_CHECKING:
    import torch

Sparsifier = Callable[[Array, str, int], Array]


def trim_top_magnitude(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ceil(density * n) largest-magnitude entries of tau, zero the rest."""
    import torch

    n = tau.numel()
    k = min(n, math.ceil(density * n))
    if k >= n:
        return tau
    if k == 0:
        return torch.zeros_like(tau)
    flat = tau.reshape(-1)
    keep = torch.zeros(n, dtype=torch.bool, device=tau.device)
    keep[flat.abs().topk(k, sorted=False).indices] = True
    return torch.where(keep.view_as(tau), tau, torch.zeros((), dtype=tau.dtype, device=tau.device))


def dare_mask(shape: torch.Size, drop_rate: float, seed: int, key: str, index: int) -> torch.Tensor:
    """The keep-mask DARE uses for model `index` at `key`: drawn on the CPU, so any device agrees."""
    import torch

    generator = torch.Generator().manual_seed(key_seed(seed, key, index))
    return torch.rand(shape, generator=generator) >= drop_rate


def elect_and_mean(taus: list[torch.Tensor]) -> torch.Tensor:
    """TIES: the per-entry mean over the task vectors whose sign agrees with the elected sign."""
    import torch

    stacked = torch.stack(taus)
    elected = torch.sign(stacked.sum(dim=0))
    agree = (torch.sign(stacked) == elected) & (stacked != 0)
    total = torch.where(agree, stacked, torch.zeros((), dtype=stacked.dtype, device=stacked.device)).sum(
        dim=0
    )
    count = agree.sum(dim=0).clamp(min=1)
    return total / count


def combine_task_vectors(
    key: str,
    base: Array,
    finetuned: list[Array],
    strength: float,
    *,
    sparsify: Sparsifier | None,
    sign_consensus: bool,
) -> Array:
    """base + strength * combined task vectors; the sum runs in model order (same bytes on any engine)."""
    taus = [ft - base for ft in finetuned]
    if sparsify is not None:
        taus = [sparsify(tau, key, index) for index, tau in enumerate(taus)]
    if sign_consensus:
        combined = elect_and_mean(taus)
    else:
        combined = taus[0]
        for tau in taus[1:]:
            combined += tau
    combined *= strength
    combined += base
    return combined


class TaskArithmetic(MergeMethod):
    def merge(self, key, base, finetuned, strength, params: MethodParams, out=None) -> Array:
        return finish(
            combine_task_vectors(key, base, finetuned, strength, sparsify=None, sign_consensus=False), out
        )


class Ties(MergeMethod):
    def merge(self, key, base, finetuned, strength, params: MethodParams, out=None) -> torch.Tensor:
        def trim(tau: torch.Tensor, _key: str, _index: int) -> torch.Tensor:
            return trim_top_magnitude(tau, params.density)

        return finish(
            combine_task_vectors(key, base, finetuned, strength, sparsify=trim, sign_consensus=True), out
        )


class Dare(MergeMethod):
    def merge(self, key, base, finetuned, strength, params: MethodParams, out=None) -> torch.Tensor:
        def drop(tau: torch.Tensor, tensor_key: str, index: int) -> torch.Tensor:
            if params.drop_rate == 0:
                return tau
            mask = dare_mask(tau.shape, params.drop_rate, params.seed, tensor_key, index).to(tau.device)
            return tau * mask / (1.0 - params.drop_rate)

        return finish(
            combine_task_vectors(key, base, finetuned, strength, sparsify=drop, sign_consensus=False), out
        )


TASK_ARITHMETIC = TaskArithmetic(
    "task-arithmetic",
    "theta_base + lambda * sum(theta_i - theta_base) (--alpha is lambda)",
    1,
    None,
    ("strength",),
    elementwise=True,
)
TIES = Ties(
    "ties",
    "trim top-k% (--density), elect sign, disjoint mean, scale by lambda",
    1,
    None,
    ("strength", "density"),
)
DARE = Dare(
    "dare",
    "drop task-vector entries with prob. p (--drop-rate), rescale 1/(1-p), sum, scale",
    1,
    None,
    ("strength", "drop_rate", "seed"),
    stochastic=True,
)
