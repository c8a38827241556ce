"""Linear: a weighted average of the base and every fine-tuned model, theta = sum_i w_i theta_i.

Weights are used as given (no silent normalisation, unlike mergekit's default): the planner
warns when they do not sum to 1. Without weights every model gets 1/N.
"""

from __future__ import annotations

from micromerge.merging.methods.base import Array, MergeMethod, MethodParams


class Linear(MergeMethod):
    def merge(self, key, base, finetuned, strength, params: MethodParams, out=None, context=None) -> Array:
        models = [base, *finetuned]
        weights = params.weights or tuple(1.0 / len(models) for _ in models)
        if out is None:
            out = models[0] * weights[0]
        else:
            out[...] = models[0]
            out *= weights[0]
        for weight, tensor in zip(weights[1:], models[1:], strict=True):
            out += tensor * weight
        return out


METHOD = Linear(
    "linear",
    "weighted average of base and fine-tuned models (--weights, default uniform)",
    1,
    None,
    ("weights",),
    elementwise=True,
)
