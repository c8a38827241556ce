"""DELLA (Deep, Bhat et al., 2024, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling"), as mergekit 0.1.4 defines it (`della`).

Per output row of each task vector (a 1-D tensor is one row), entries are ranked by magnitude
(rank 1 the smallest); the keep probability rises linearly with rank from density - epsilon
to density + epsilon:  p = (density - epsilon) + 2 epsilon (rank - 1) / (n_row - 1).
Survivors of the Bernoulli draw are rescaled so the tensor keeps its L1 norm (mergekit's
`rescale`), signs are elected as in TIES and the agreeing entries averaged (mergekit's
`normalize`; an elected sign of exactly zero counts as +1, as mergekit's `>= 0`), and the
result is scaled by lambda (`--alpha`).

Reproducible where mergekit is not: the draw uses a CPU generator seeded by (seed, key, model),
and ranks come from a stable sort, so equal magnitudes rank by index on every device. A row of
one entry has no rank spread: it keeps with probability `density`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from micromerge.merging.methods.base import Array, MergeMethod, MethodParams, finish, key_seed
from micromerge.merging.methods.task_vectors import disjoint_mean, scale_and_add

if TYPE_CHECKING:
    import torch

L1_FLOOR = 1e-7


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
    before, after = float(tau.abs().sum()), float(kept.abs().sum())
    if before < L1_FLOOR or after < L1_FLOOR:
        return kept
    return kept * (before / after)


class Della(MergeMethod):
    def conventions(self, params: MethodParams) -> dict[str, str]:
        return {
            "ranks": "per output row, stable sort (equal magnitudes by index)",
            "rescale": "L1 norm of each tensor restored (mergekit rescale)",
            "zero_elected_sign": "+1 (mergekit)",
            "mask_rng": "torch CPU generator seeded by sha256(seed|key|model index)",
        }

    def merge(self, key, base, finetuned, strength, params: MethodParams, out=None, context=None) -> Array:
        taus = [ft - base for ft in finetuned]
        if params.density < 1:
            taus = [magnitude_sample(tau, params, key, index) for index, tau in enumerate(taus)]
        return finish(scale_and_add(disjoint_mean(taus, 1.0), strength, base), out)


METHOD = Della(
    "della",
    "sample task-vector entries with magnitude-ranked keep probabilities (--density +/- --epsilon), "
    "rescale, elect sign, mean, scale",
    1,
    None,
    ("strength", "density", "epsilon", "seed"),
    stochastic=True,
)
