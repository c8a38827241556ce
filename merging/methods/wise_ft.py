"""WiSE-FT: theta = (1 - alpha) * theta_base + alpha * theta_ft (alpha=0 base, alpha=1 fine-tuned)."""

from __future__ import annotations

from micromerge.merging.methods.base import Array, MergeMethod


def interpolate(start: Array, end: Array, weight: float, out: Array | None = None) -> Array:
    """start + weight * (end - start), computed from the nearer endpoint (as torch.lerp does) so
    that weight 0 gives `start` and weight 1 gives `end` exactly; three separately rounded float32
    operations, identical on torch and numpy."""
    if weight >= 0.5:
        start, end, weight = end, start, 1.0 - weight
    if out is None:
        out = end - start
    else:
        out[...] = end
        out -= start
    out *= weight
    out += start
    return out


class WiseFT(MergeMethod):
    def merge(self, key, base, finetuned, strength, params, out=None, context=None) -> Array:
        return interpolate(base, finetuned[0], strength, out)


METHOD = WiseFT(
    "wise-ft",
    "weight-space interpolation between base and one fine-tuned model (--alpha)",
    1,
    1,
    ("strength",),
    elementwise=True,
)
