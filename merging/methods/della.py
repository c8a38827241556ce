"""DELLA (Deep, Bhat et al., 2024, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling"), as mergekit 0.1.4 defines it (`della`, and `della-linear`, mergekit's
`della_linear`: the same sampling and rescale, the task vectors summed without a sign election).

Per output row of each task vector (a 1-D tensor is one row), entries are ranked by magnitude
(rank 1 the smallest); the keep probability rises linearly with rank from density - epsilon
to density + epsilon:  p = (density - epsilon) + 2 epsilon (rank - 1) / (n_row - 1).
Survivors of the Bernoulli draw are rescaled so the tensor keeps its L1 norm (mergekit's
`rescale`; `--rescale inverse` divides each survivor by its keep probability instead, as the
DELLA paper's MagPrune does), signs are elected as in TIES and the agreeing entries averaged
(mergekit's `normalize`; an elected sign of exactly zero counts as +1, as mergekit's `>= 0`),
and the result is scaled by lambda (`--alpha`).

Reproducible where mergekit is not: the draw uses a CPU generator seeded by (seed, key, model),
and ranks come from a stable sort, so equal magnitudes rank by index on every device. A row of
one entry has no rank spread: it keeps with probability `density`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from micromerge.merging.methods.base import Array, MergeMethod, MethodParams, finish, key_seed
from micromerge.merging.methods.task_vectors import (
    RESCALE_CONVENTIONS,
    disjoint_merge,
    l1_restored,
    scale_and_add,
    summed,
)

if TYPE_CHECKING:
    import torch

DELLA_RESCALE = "l1"
"""DELLA's rescale when none is chosen: mergekit's, which this implementation follows."""


def keep_probabilities(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """The per-entry keep probability, shaped like tau."""
    import torch

    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(tau.shape[0], -1)
    width = rows.shape[1]
    if width < 2:
        return torch.full_like(tau, density)
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(width, device=tau.device).expand_as(order)
    ranks.scatter_(1, order, positions)
    spread = ranks.to(torch.float32) / (width - 1)
    return ((density - epsilon) + spread * (2 * epsilon)).reshape(tau.shape)


def magnitude_sample(tau: torch.Tensor, params: MethodParams, key: str, index: int) -> torch.Tensor:
    import torch

    probabilities = keep_probabilities(tau, params.density, params.epsilon)
    generator = torch.Generator().manual_seed(key_seed(params.seed, key, index))
    draws = torch.rand(tau.shape, generator=generator).to(tau.device)
    kept = torch.where(draws < probabilities, tau, torch.zeros((), dtype=tau.dtype, device=tau.device))
    if (params.rescale or DELLA_RESCALE) == "inverse":
        return kept / probabilities
    return l1_restored(tau, kept)


class Della(MergeMethod):
    def conventions(self, params: MethodParams) -> dict[str, str]:
        return {
            "ranks": "per output row, stable sort (equal magnitudes by index)",
            "rescale": RESCALE_CONVENTIONS[params.rescale or DELLA_RESCALE],
            "zero_elected_sign": "+1 (mergekit)",
            "mask_rng": "torch CPU generator seeded by sha256(seed|key|model index)",
        }

    def sampled(self, key: str, base: Array, finetuned: list[Array], params: MethodParams) -> list[Array]:
        taus = [ft - base for ft in finetuned]
        if params.density >= 1:
            return taus
        return [magnitude_sample(tau, params, key, index) for index, tau in enumerate(taus)]

    def merge(self, key, base, finetuned, strength, params: MethodParams, out=None, context=None) -> Array:
        combined = disjoint_merge(self.sampled(key, base, finetuned, params), 1.0)
        return finish(scale_and_add(combined, strength, base), out)


class DellaLinear(Della):
    def conventions(self, params: MethodParams) -> dict[str, str]:
        conventions = super().conventions(params)
        del conventions["zero_elected_sign"]
        return {**conventions, "combine": "plain sum, no sign election (mergekit della_linear)"}

    def merge(self, key, base, finetuned, strength, params: MethodParams, out=None, context=None) -> Array:
        return finish(scale_and_add(summed(self.sampled(key, base, finetuned, params)), strength, base), out)


METHOD = Della(
    "della",
    "sample task-vector entries with magnitude-ranked keep probabilities (--density +/- --epsilon), "
    "rescale (--rescale), elect sign, mean, scale",
    1,
    None,
    ("strength", "density", "epsilon", "rescale", "seed"),
    stochastic=True,
    param_defaults=(("rescale", DELLA_RESCALE),),
)
LINEAR = DellaLinear(
    "della-linear",
    "DELLA's magnitude-ranked sampling and rescale, task vectors summed without a sign election, scale "
    "(mergekit della_linear)",
    1,
    None,
    ("strength", "density", "epsilon", "rescale", "seed"),
    stochastic=True,
    param_defaults=(("rescale", DELLA_RESCALE),),
    same_with_one_finetuned="della",
)
