"""The generalised task-arithmetic core: task arithmetic, TIES, DARE and DARE-TIES are one function.

theta = theta_base + lambda * combine(sparsify(tau_i)), tau_i = theta_i - theta_base, where
  task-arithmetic: no sparsification, plain sum (a negative lambda negates a task);
  TIES (Yadav et al., NeurIPS 2023): keep the top-k% magnitudes of each tau_i, elect a sign per
         entry (sign of the sum of trimmed tau_i), average only the entries agreeing with it;
  DARE (Yu et al., ICML 2024): drop each entry of tau_i with probability p, rescale survivors
         by 1/(1-p) (the paper, FusionBench; `--rescale l1` restores each tensor's L1 norm
         instead, as mergekit 0.1.4 and later do), sum;
  DARE-TIES (mergekit's `dare_ties`): DARE's drop and rescale, then a sign elected per entry
         (the sign of the sum; exactly zero counts as +1, mergekit's `>= 0`) and the agreeing
         entries summed, not averaged (mergekit's default `normalize: false`). With one fine-tuned
         model the election keeps every entry, so it is DARE.

TIES follows its authors' code (and FusionBench) by default: the top-k is taken over the
whole task vector (`--topk-scope model`; `tensor` is mergekit's per-tensor choice), and an
entry whose elected sign is exactly zero takes the majority sign of all elected signs in the
scope (their `resolve_zero_signs`), rather than being dropped. k = ceil(density * n): the
authors keep every entry >= their (n - floor(density * n))-th smallest, floor(density * n) + 1
entries without ties; the two agree whenever density * n is not an integer.

Task arithmetic is elementwise (it also runs on numpy arrays); TIES and DARE need torch, which
their helpers import where they use it so that the method registry loads without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from micromerge.merging.methods.base import (
    Array,
    MergeMethod,
    MethodParams,
    ModelScan,
    finish,
    key_seed,
    single_tensor_scan,
)
from micromerge.merging.methods.topk import TopSet, select_top

if TYPE_CHECKING:
    import torch

RESCALE_CONVENTIONS = {
    "inverse": "each kept entry divided by its keep probability (the DARE and DELLA papers)",
    "l1": "each tensor's L1 norm restored (mergekit 0.1.4+ rescale)",
}
"""How DARE and DELLA rescale the entries they keep (`--rescale`): divided by each one's keep
probability (the DARE and DELLA papers; FusionBench's DARE), or the tensor's L1 norm restored
(mergekit 0.1.4 and later). The two agree in expectation, not per tensor."""
RESCALES = tuple(RESCALE_CONVENTIONS)
DARE_RESCALE = "inverse"
"""DARE's rescale when none is chosen: its paper's."""
L1_FLOOR = 1e-7
TIE_BREAK = (
    "equal magnitudes at the cut-off: lower position first (keys in checkpoint order, then flat index)"
)


def dare_mask(shape: torch.Size, drop_rate: float, seed: int, key: str, index: int) -> torch.Tensor:
    """The keep-mask DARE uses for model `index` at `key`: drawn on the CPU, so any device agrees."""
    import torch

    generator = torch.Generator().manual_seed(key_seed(seed, key, index))
    return torch.rand(shape, generator=generator) >= drop_rate


def disjoint_merge(taus: list[torch.Tensor], zero_sign: float, *, average: bool = True) -> torch.Tensor:
    """TIES's disjoint merge: per entry, the mean of the task vectors whose sign agrees with the
    elected sign (their sum with `average=False`, mergekit's `normalize: false`).

    The elected sign is the sign of the sum; where that sum is exactly zero, `zero_sign` is used
    (TIES: the majority sign of the scope; mergekit: +1; 0 leaves the entry at the base).
    """
    import torch

    stacked = torch.stack(taus)
    elected = torch.sign(stacked.sum(dim=0))
    if zero_sign:
        elected = torch.where(elected == 0, torch.full_like(elected, zero_sign), elected)
    agree = (torch.sign(stacked) == elected) & (stacked != 0)
    zero = torch.zeros((), dtype=stacked.dtype, device=stacked.device)
    total = torch.where(agree, stacked, zero).sum(dim=0)
    return total / agree.sum(dim=0).clamp(min=1) if average else total


def l1_restored(tau: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """`kept` (a sparsified `tau`) scaled back to `tau`'s L1 norm: mergekit's `rescale` (RescaleNorm.l1),
    left as it is where either norm is below L1_FLOOR, as mergekit leaves it."""
    before, after = float(tau.abs().sum()), float(kept.abs().sum())
    if before < L1_FLOOR or after < L1_FLOOR:
        return kept
    return kept * (before / after)


def scale_and_add(combined: Array, strength: float, base: Array) -> Array:
    combined *= strength
    combined += base
    return combined


def summed(tensors: list[Array]) -> Array:
    """Their sum in model order, accumulated into the first (which the caller hands over): the
    same float32 operations in the same order on numpy and torch."""
    total = tensors[0]
    for tensor in tensors[1:]:
        total += tensor
    return total


def combine_task_vectors(base: Array, finetuned: list[Array], strength: float) -> Array:
    """base + strength * sum of task vectors; the sum runs in model order (same bytes on any engine)."""
    return scale_and_add(summed([ft - base for ft in finetuned]), strength, base)


def keep_count(density: float, numel: int) -> int:
    """TIES's k: ceil(density * n), at most n."""
    return min(numel, math.ceil(density * numel))


@dataclass(frozen=True)
class TiesContext:
    """What TIES decides once per scope: each task vector's kept set and the majority sign."""

    kept: tuple[TopSet, ...]
    majority_sign: float


def trimmed(scan: ModelScan, key: str, kept: tuple[TopSet, ...]) -> list[torch.Tensor]:
    import torch

    return [
        torch.where(top.mask(key, tau), tau, torch.zeros((), dtype=tau.dtype, device=tau.device))
        for top, tau in zip(kept, scan.task_vectors(key), strict=True)
    ]


def ties_context(scan: ModelScan, density: float) -> TiesContext:
    """Top-k per task vector over the scan, then the sign of the sum of all elected signs."""
    import torch

    total = sum(scan.numel(key) for key in scan.merged_keys)
    count = len(scan.read(scan.merged_keys[0])[1])
    kept = tuple(row[0] for row in select_top(scan, [[keep_count(density, total)]] * count))
    votes = 0.0
    for key in scan.merged_keys:
        votes += float(torch.sign(torch.stack(trimmed(scan, key, kept)).sum(dim=0)).sum(dtype=torch.float64))
    return TiesContext(kept, math.copysign(1.0, votes) if votes else 0.0)


class TaskArithmetic(MergeMethod):
    def merge(self, key, base, finetuned, strength, params: MethodParams, out=None, context=None) -> Array:
        return finish(combine_task_vectors(base, finetuned, strength), out)


class Ties(MergeMethod):
    def prepare(self, scan: ModelScan, params: MethodParams) -> Any:
        return ties_context(scan, params.density) if params.topk_scope == "model" else None

    def conventions(self, params: MethodParams) -> dict[str, str]:
        return {
            "topk_scope": params.topk_scope,
            "topk_count": "ceil(density * n) per task vector, n = entries in the scope",
            "tie_break": TIE_BREAK,
            "zero_elected_sign": "majority sign of all elected signs in the scope (TIES authors' code)",
        }

    def merge(self, key, base, finetuned, strength, params: MethodParams, out=None, context=None) -> Array:
        scan = single_tensor_scan(key, base, finetuned)
        context = context or ties_context(scan, params.density)
        combined = disjoint_merge(trimmed(scan, key, context.kept), context.majority_sign)
        return finish(scale_and_add(combined, strength, base), out)


class Dare(MergeMethod):
    def conventions(self, params: MethodParams) -> dict[str, str]:
        return {
            "mask_rng": "torch CPU generator seeded by sha256(seed|key|model index), then moved to the device",
            "rescale": RESCALE_CONVENTIONS[params.rescale or DARE_RESCALE],
        }

    def dropped(self, key: str, base: Array, finetuned: list[Array], params: MethodParams) -> list[Array]:
        """Each task vector with its entries dropped (probability --drop-rate) and the survivors
        rescaled, one model at a time (a second list of every model's masked tensor would double
        the peak on the largest key)."""
        taus = [ft - base for ft in finetuned]
        if params.drop_rate == 0:
            return taus

        def drop(index: int, tau: torch.Tensor) -> torch.Tensor:
            kept = tau * dare_mask(tau.shape, params.drop_rate, params.seed, key, index).to(tau.device)
            if (params.rescale or DARE_RESCALE) == "l1":
                return l1_restored(tau, kept)
            return kept / (1.0 - params.drop_rate)

        return [drop(index, tau) for index, tau in enumerate(taus)]

    def merge(self, key, base, finetuned, strength, params: MethodParams, out=None, context=None) -> Array:
        return finish(scale_and_add(summed(self.dropped(key, base, finetuned, params)), strength, base), out)


class DareTies(Dare):
    def conventions(self, params: MethodParams) -> dict[str, str]:
        return {
            **super().conventions(params),
            "zero_elected_sign": "+1 (mergekit)",
            "combine": "agreeing entries summed, not averaged (mergekit dare_ties: normalize false)",
        }

    def merge(self, key, base, finetuned, strength, params: MethodParams, out=None, context=None) -> Array:
        combined = disjoint_merge(self.dropped(key, base, finetuned, params), 1.0, average=False)
        return finish(scale_and_add(combined, strength, base), out)


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
    "trim to the top --density of each task vector (--topk-scope), elect sign, disjoint mean, scale by lambda",
    1,
    None,
    ("strength", "density", "topk_scope"),
)
DARE = Dare(
    "dare",
    "drop task-vector entries with prob. p (--drop-rate), rescale 1/(1-p) (--rescale), sum, scale",
    1,
    None,
    ("strength", "drop_rate", "rescale", "seed"),
    stochastic=True,
    param_defaults=(("rescale", DARE_RESCALE),),
)
DARE_TIES = DareTies(
    "dare-ties",
    "DARE's drop and rescale, then elect a sign per entry and sum the agreeing entries, scale (mergekit dare_ties)",
    1,
    None,
    ("strength", "drop_rate", "rescale", "seed"),
    stochastic=True,
    param_defaults=(("rescale", DARE_RESCALE),),
    same_with_one_finetuned="dare",
)
