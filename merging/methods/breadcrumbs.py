"""Model Breadcrumbs (Davari & Belilovsky, ECCV 2024), as mergekit defines it (`breadcrumbs`, and
`breadcrumbs-ties`, mergekit's `breadcrumbs_ties`: the same masks, then a sign elected per entry).

Each task vector drops its largest `gamma` fraction of magnitudes (outliers) and then its
smallest ones, keeping a `density` fraction: with n entries, int(density * n) are kept after
removing the int(gamma * n) largest (fewer when the two do not fit). The sparse task vectors
are summed without sign election, rescaling or normalisation (mergekit's defaults), and
scaled by lambda (`--alpha`). `--topk-scope model` ranks magnitudes over the whole task
vector, `tensor` (mergekit) per tensor; ties at either cut-off go to the lower position.
`breadcrumbs-ties` then elects a sign per entry (the sign of the sum, exactly zero counting as +1,
mergekit's `>= 0`) and sums the agreeing entries (mergekit's default `normalize: false`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from micromerge.merging.methods.base import (
    Array,
    MergeMethod,
    MethodParams,
    ModelScan,
    finish,
    single_tensor_scan,
)
from micromerge.merging.methods.task_vectors import TIE_BREAK, disjoint_merge, scale_and_add, summed
from micromerge.merging.methods.topk import TopSet, select_top


def outlier_and_kept_counts(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """(largest entries dropped, entries kept), mergekit's magnitude_outliers arithmetic."""
    kept = int(density * numel)
    top = int(gamma * numel)
    bottom = numel - kept - top
    if bottom < 0:
        top += bottom
    return top, kept


@dataclass(frozen=True)
class BreadcrumbsContext:
    """Per task vector: (the outliers plus the kept entries, the outliers)."""

    sets: tuple[tuple[TopSet, TopSet], ...]


def breadcrumbs_context(scan: ModelScan, params: MethodParams) -> BreadcrumbsContext:
    total = sum(scan.numel(key) for key in scan.merged_keys)
    top, kept = outlier_and_kept_counts(total, params.density, params.gamma)
    count = len(scan.read(scan.merged_keys[0])[1])
    rows = select_top(scan, [[top + kept, top]] * count)
    return BreadcrumbsContext(tuple((row[0], row[1]) for row in rows))


class Breadcrumbs(MergeMethod):
    def prepare(self, scan: ModelScan, params: MethodParams) -> Any:
        if params.density >= 1 or params.topk_scope != "model":
            return None
        return breadcrumbs_context(scan, params)

    def conventions(self, params: MethodParams) -> dict[str, str]:
        return {
            "topk_scope": params.topk_scope,
            "counts": "drop int(gamma * n) largest, keep int(density * n) (mergekit magnitude_outliers)",
            "tie_break": TIE_BREAK,
            "combine": "plain sum, no sign election, no rescale (mergekit breadcrumbs defaults)",
        }

    def kept(
        self, key: str, base: Array, finetuned: list[Array], params: MethodParams, context: Any
    ) -> list[Array]:
        """Each task vector without its --gamma largest magnitudes and its smallest (--density kept)."""
        import torch

        taus = [ft - base for ft in finetuned]
        if params.density >= 1:
            return taus
        context = context or breadcrumbs_context(single_tensor_scan(key, base, finetuned), params)
        zero = torch.zeros((), dtype=base.dtype, device=base.device)
        return [
            torch.where(outer.mask(key, tau) & ~inner.mask(key, tau), tau, zero)
            for (outer, inner), tau in zip(context.sets, taus, strict=True)
        ]

    def merge(self, key, base, finetuned, strength, params: MethodParams, out=None, context=None) -> Array:
        return finish(
            scale_and_add(summed(self.kept(key, base, finetuned, params, context)), strength, base), out
        )


class BreadcrumbsTies(Breadcrumbs):
    def conventions(self, params: MethodParams) -> dict[str, str]:
        return {
            **super().conventions(params),
            "zero_elected_sign": "+1 (mergekit)",
            "combine": "sign elected per entry, agreeing entries summed (mergekit breadcrumbs_ties)",
        }

    def merge(self, key, base, finetuned, strength, params: MethodParams, out=None, context=None) -> Array:
        combined = disjoint_merge(self.kept(key, base, finetuned, params, context), 1.0, average=False)
        return finish(scale_and_add(combined, strength, base), out)


METHOD = Breadcrumbs(
    "breadcrumbs",
    "drop the --gamma largest and the smallest magnitudes of each task vector (keep --density), sum, scale",
    1,
    None,
    ("strength", "density", "gamma", "topk_scope"),
)
TIES = BreadcrumbsTies(
    "breadcrumbs-ties",
    "Breadcrumbs' masks, then elect a sign per entry and sum the agreeing entries, scale (mergekit breadcrumbs_ties)",
    1,
    None,
    ("strength", "density", "gamma", "topk_scope"),
    same_with_one_finetuned="breadcrumbs",
)
