"""RegMean (Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models").

For every linear map W (out x in) whose inputs' Gram matrix G_i = mean x x^T each model recorded
on its data, the merge is the least-squares solution of matching every model's outputs:

    W = ( sum_i l_i W_i G~_i ) ( sum_i l_i G~_i )^-1,   G~ = r G + (1 - r) diag(G)

(off-diagonals scaled by r = --offdiag-scale, FusionBench's 0.95 for CLIP), with model weights
l = (1 - alpha, alpha / T, ...) for the base and T specialists: alpha 0 gives the base exactly,
alpha 1 the specialists' RegMean. Every tensor without a Gram gets the l-weighted mean, as
FusionBench gives non-linear parameters the plain mean. Grams come from `eval.statistics`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from micromerge.core.errors import MicromergeError
from micromerge.merging.methods.base import Array, MergeMethod, MethodParams, ModelScan, finish
from micromerge.merging.methods.fisher import model_weights, require_statistics, weighted_mean

if TYPE_CHECKING:
    import torch


def scale_off_diagonal(gram: torch.Tensor, ratio: float) -> torch.Tensor:
    import torch

    diagonal = torch.diag(torch.diagonal(gram))
    return ratio * gram + (1.0 - ratio) * diagonal


class RegMean(MergeMethod):
    def prepare(self, scan: ModelScan, params: MethodParams) -> Any:
        return {"grams": require_statistics(scan, self.name)}

    def conventions(self, params: MethodParams) -> dict[str, str]:
        return {
            "model_weights": "(1 - alpha) base, alpha / T each specialist",
            "linear_maps": "nn.Linear weights and attention in_proj; out_proj, projections and the rest: weighted mean",
            "solve": "torch.linalg.solve on the summed Gram (FusionBench: explicit inverse)",
        }

    def merge(self, key, base, finetuned, strength, params: MethodParams, out=None, context=None) -> Array:
        import torch

        if context is None:
            raise MicromergeError(
                "regmean needs the models' Gram matrices (prepare it from a scan with statistics)"
            )
        models = [base, *finetuned]
        weights = model_weights(strength, len(finetuned))
        grams = [g.get(key) for g in context["grams"]]
        if base.dim() != 2 or any(g is None for g in grams):
            return finish(weighted_mean(weights, models), out)
        total = torch.zeros(base.shape[1], base.shape[1], dtype=base.dtype, device=base.device)
        target = torch.zeros(base.shape[1], base.shape[0], dtype=base.dtype, device=base.device)
        for weight, model, gram in zip(weights, models, grams, strict=True):
            scaled = (
                scale_off_diagonal(gram.to(device=base.device, dtype=base.dtype), params.offdiag_scale)
                * weight
            )
            total += scaled
            target += scaled @ model.T
        return finish(torch.linalg.solve(total, target).T.contiguous(), out)


METHOD = RegMean(
    "regmean",
    "RegMean: per linear layer, the least-squares merge from each model's input Gram matrix on the select half "
    "(--data, --samples, --offdiag-scale; --alpha weighs the models)",
    1,
    None,
    ("strength", "samples", "seed", "offdiag_scale"),
    statistics="gram",
)
