"""Fisher merging (Matena & Raffel, NeurIPS 2022, "Merging Models with Fisher-Weighted Averaging").

Each parameter is the Fisher-weighted mean of the models (base included, as a model of its own):

    theta = sum_i c_i (F_i + eps) theta_i / sum_i c_i (F_i + eps)

with model weights lambda = (1 - alpha, alpha / T, ..., alpha / T) for the base and T specialists
(alpha 0 is the base, alpha 1 the specialists' Fisher merge, and with one specialist alpha 1/2
weighs the two alike, FusionBench's default), and, as FusionBench does by default, each model's
weight divided by the L2 norm of its whole Fisher (normalised over models) so that models whose
Fishers differ in scale count alike: c_i = lambda_i (1 / |F_i|) / sum_j (1 / |F_j|); eps = 1e-6.
The Fishers come from `eval.statistics` (select half, the model's own predictions).
"""

from __future__ import annotations

import math
from typing import Any

from micromerge.core.errors import MicromergeError
from micromerge.merging.methods.base import Array, MergeMethod, MethodParams, ModelScan, finish

MINIMAL_FISHER = 1e-6


def model_weights(strength: float, count: int) -> list[float]:
    """(1 - alpha) for the base, alpha / T for each of the T specialists."""
    return [1.0 - strength] + [strength / count] * count


def weighted_mean(weights: list[float], models: list[Array]) -> Array:
    """What a data-aware method gives a tensor its statistics do not cover."""
    return sum(weight * model for weight, model in zip(weights, models, strict=True))


def require_statistics(scan: ModelScan, name: str) -> tuple[dict[str, Any], ...]:
    if scan.statistics is None:
        raise MicromergeError(f"--method {name} merges with data: give --data (a μ-Bench folder or 'ubench')")
    return scan.statistics


class FisherMerge(MergeMethod):
    def prepare(self, scan: ModelScan, params: MethodParams) -> Any:
        fishers = require_statistics(scan, self.name)
        norms = [
            math.sqrt(sum(float((f[key].double() ** 2).sum()) for key in scan.merged_keys if key in f))
            for f in fishers
        ]
        inverse = [1.0 / (norm + MINIMAL_FISHER) for norm in norms]
        return {"fishers": fishers, "scale": [value / sum(inverse) for value in inverse]}

    def conventions(self, params: MethodParams) -> dict[str, str]:
        return {
            "model_weights": "(1 - alpha) base, alpha / T each specialist",
            "normalisation": "each model's Fisher divided by its global L2 norm, normalised over models (FusionBench)",
            "minimal_fisher": str(MINIMAL_FISHER),
        }

    def merge(self, key, base, finetuned, strength, params: MethodParams, out=None, context=None) -> Array:
        if context is None:
            raise MicromergeError(
                "fisher merging needs the models' Fishers (prepare it from a scan with statistics)"
            )
        import torch

        models = [base, *finetuned]
        weights = model_weights(strength, len(finetuned))
        if not all(key in fisher for fisher in context["fishers"]):  # no Fisher (a buffer): the weighted mean
            return finish(weighted_mean(weights, models), out)
        numerator = torch.zeros_like(base)
        denominator = torch.zeros_like(base)
        for weight, scale, model, fisher in zip(
            weights, context["scale"], models, context["fishers"], strict=True
        ):
            importance = (fisher[key].to(base.device) + MINIMAL_FISHER) * (weight * scale)
            numerator += importance * model
            denominator += importance
        return finish(numerator / denominator, out)


METHOD = FisherMerge(
    "fisher",
    "Fisher-weighted mean of base and specialists (Fishers on the select half; --data, --samples; --alpha weighs them)",
    1,
    None,
    ("strength", "samples", "seed"),
    statistics="fisher",
)
