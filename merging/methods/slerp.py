"""SLERP between base and one fine-tuned model; plain lerp when the two are nearly colinear.

Two scopes for the angle, because the two mergekit releases people compare with differ:
  tensor (default): one angle between the flattened tensors, as mergekit <= 0.1.4; a zero
          tensor on either side falls back to lerp;
  row:    one angle per output row (the leading axis; a 1-D tensor's rows are its entries, so
          it is lerped), as mergekit 0.1.5; norms at or below 1e-8 count as 1, as there.
Either way the coefficients apply to the raw tensors, so norms are interpolated too.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from micromerge.merging.methods.base import MergeMethod, MethodParams, finish
from micromerge.merging.methods.wise_ft import interpolate

if TYPE_CHECKING:
    import torch

COLINEAR_COS = 0.9995
ROW_NORM_FLOOR = 1e-8


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


def slerp_rows(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """One angle per row of the leading axis."""
    import torch

    rows = v0.shape[0] if v0.dim() else 1
    a, b = v0.reshape(rows, -1), v1.reshape(rows, -1)
    norm_a = torch.linalg.vector_norm(a, dim=1, keepdim=True)
    norm_b = torch.linalg.vector_norm(b, dim=1, keepdim=True)
    one = torch.ones((), dtype=a.dtype, device=a.device)
    norm_a = torch.where(norm_a > ROW_NORM_FLOOR, norm_a, one)
    norm_b = torch.where(norm_b > ROW_NORM_FLOOR, norm_b, one)
    cos = ((a / norm_a) * (b / norm_b)).sum(dim=1, keepdim=True).clamp(-1, 1)
    linear = cos.abs() > COLINEAR_COS
    theta = torch.acos(torch.where(linear, torch.zeros_like(cos), cos))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, torch.full_like(cos, t), torch.sin(t * theta) / sin_theta)
    return (coef_a * a + coef_b * b).reshape(v0.shape)


class Slerp(MergeMethod):
    def conventions(self, params: MethodParams) -> dict[str, str]:
        return {"slerp_scope": params.slerp_scope, "colinear_cos": str(COLINEAR_COS)}

    def merge(
        self, key, base, finetuned, strength, params: MethodParams, out=None, context=None
    ) -> torch.Tensor:
        blend = slerp_rows if params.slerp_scope == "row" else slerp
        return finish(blend(base, finetuned[0], strength), out)


METHOD = Slerp(
    "slerp",
    "spherical interpolation between base and one fine-tuned model, one angle per tensor or per row "
    "(--slerp-scope; --alpha is t)",
    1,
    1,
    ("strength", "slerp_scope"),
)
