"""WiSE-FT: theta = (1 - alpha) * theta_base + alpha * theta_ft (alpha=0 base, alpha=1 fine-tuned)."""

from __future__ import annotations

import torch

from merging.methods.base import MergeMethod


class WiseFT(MergeMethod):
    def merge(self, key, base, finetuned, strength, params, out=None) -> torch.Tensor:
        if out is None:
            return torch.lerp(base, finetuned[0], strength)
        return torch.lerp(base, finetuned[0], strength, out=out)


METHOD = WiseFT(
    "wise-ft",
    "weight-space interpolation between base and one fine-tuned model (--alpha)",
    1,
    1,
    ("strength",),
)
