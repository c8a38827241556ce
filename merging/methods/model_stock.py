"""Model Stock (Jang et al., ECCV 2024, "Model Stock: All we need is just a few fine-tuned models").

Per tensor, from the angle between k >= 2 fine-tuned models of the same base:

    cos = mean over pairs i < j of cos(tau_i, tau_j),   t = k cos / (1 + (k - 1) cos)
    theta = theta_base + strength * t * (mean_i theta_i - theta_base)

strength 1 (the default) is the paper's theta = t * theta_avg + (1 - t) * theta_base; a sweep
over strength scales the whole step. As in mergekit's model_stock (not filter-wise): the angle
is taken over the flattened tensor, norms products are clamped at 1e-6 and cosines to [-1, 1].
CLIP -> PLIP and CLIP -> QuiltNet are such a pair.
"""

from __future__ import annotations

from micromerge.merging.methods.base import Array, MergeMethod, MethodParams, finish
from micromerge.merging.methods.task_vectors import summed

NORM_FLOOR = 1e-6


def interpolation_ratio(taus: list) -> float:
    """t from the mean pairwise cosine of the task vectors (flattened)."""
    flat = [tau.reshape(-1) for tau in taus]
    cosines = []
    for i, first in enumerate(flat):
        for second in flat[i + 1 :]:
            norms = max(float(first.norm() * second.norm()), NORM_FLOOR)
            cosines.append(min(1.0, max(-1.0, float(first.dot(second)) / norms)))
    cos = sum(cosines) / len(cosines)
    count = len(taus)
    denominator = 1 + (count - 1) * cos
    return count * cos / denominator if denominator else 0.0  # two exactly opposite task vectors: the base


class ModelStock(MergeMethod):
    def conventions(self, params: MethodParams) -> dict[str, str]:
        return {"angle": "per tensor, mean of pairwise cosines (mergekit model_stock, filter_wise=false)"}

    def merge(self, key, base, finetuned, strength, params: MethodParams, out=None, context=None) -> Array:
        taus = [ft - base for ft in finetuned]
        ratio = interpolation_ratio(taus)
        mean = summed(taus)
        mean /= len(taus)
        mean *= strength * ratio
        mean += base
        return finish(mean, out)


METHOD = ModelStock(
    "model-stock",
    "Model Stock: per-tensor ratio t from the angle between >= 2 fine-tuned models; theta_0 + alpha * t * (avg - theta_0)",
    2,
    None,
    ("strength",),
    default_strength=1.0,
)
