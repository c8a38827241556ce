"""SLERP between base and one fine-tuned model, per tensor; plain lerp when nearly colinear.

The angle is measured between the flattened tensors' directions; the interpolation is
applied to the raw tensors (as mergekit does), so norms are interpolated too.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from merging.methods.base import MergeMethod, finish
from merging.methods.wise_ft import interpolate

if TYPE_CHECKING:
    import torch

COLINEAR_COS = 0.9995


def slerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    n0, n1 = v0.norm(), v1.norm()
    if n0 == 0 or n1 == 0:
        return interpolate(v0, v1, t)
    cos = float(v0.reshape(-1).dot(v1.reshape(-1)) / (n0 * n1))
    if abs(cos) > COLINEAR_COS:
        return interpolate(v0, v1, t)
    theta = math.acos(max(-1.0, min(1.0, cos)))
    sin_theta = math.sin(theta)
    return (math.sin((1 - t) * theta) / sin_theta) * v0 + (math.sin(t * theta) / sin_theta) * v1


class Slerp(MergeMethod):
    def merge(self, key, base, finetuned, strength, params, out=None) -> torch.Tensor:
        return finish(slerp(base, finetuned[0], strength), out)


METHOD = Slerp(
    "slerp",
    "spherical interpolation per tensor between base and one fine-tuned model (--alpha is t)",
    1,
    1,
    ("strength",),
)
