"""LiNeS (Wang et al., ICLR 2025, "LiNeS: Post-training Layer Scaling Prevents Forgetting and
Enhances Model Merging"): scale the task vector by depth so shallow layers stay near the base.

    theta = theta_base + lambda(l) * tau(l),   lambda(l) = alpha + beta * (l - 1) / (L - 1)

for block l of L, counted per tower (CLIP's image and text towers each have their own L; the
blocks of every kind of tower are found by `merging.blocks`). Keys outside the blocks
(embeddings, final norms, projections, logit scale) get alpha, as in the authors' code.
`--alpha` is alpha and `--beta` beta; tau is the summed task vector (`lines`, task arithmetic)
or TIES's merged task vector (`lines-ties`), which is how the paper composes LiNeS with merging
methods. `lines` is elementwise: it runs on the numpy engine too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from micromerge.merging.blocks import block_depths
from micromerge.merging.methods.base import (
    Array,
    MergeMethod,
    MethodParams,
    ModelScan,
    finish,
    single_tensor_scan,
)
from micromerge.merging.methods.task_vectors import (
    TIES,
    combine_task_vectors,
    disjoint_merge,
    scale_and_add,
    ties_context,
    trimmed,
)


@dataclass(frozen=True)
class LinesContext:
    depth: dict[str, float]
    ties: Any = None

    def scale(self, key: str, alpha: float, beta: float) -> float:
        return alpha + beta * self.depth.get(key, 0.0)


CONVENTIONS = {
    "depth": "per tower, block index / highest index in one stack (authors' code), place in forward "
    "order (stage, then index) / (blocks - 1) across stages; open_clip, timm and Hugging Face blocks and "
    "ResNet bottlenecks; keys outside blocks get alpha",
}


class Lines(MergeMethod):
    def prepare(self, scan: ModelScan, params: MethodParams) -> Any:
        return LinesContext(block_depths(scan.all_keys))

    def conventions(self, params: MethodParams) -> dict[str, str]:
        return dict(CONVENTIONS)

    def merge(self, key, base, finetuned, strength, params: MethodParams, out=None, context=None) -> Array:
        context = context or self.prepare(single_tensor_scan(key, base, finetuned), params)
        scale = context.scale(key, strength, params.beta)
        return finish(combine_task_vectors(base, finetuned, scale), out)


class LinesTies(MergeMethod):
    def prepare(self, scan: ModelScan, params: MethodParams) -> Any:
        ties = ties_context(scan, params.density) if params.topk_scope == "model" else None
        return LinesContext(block_depths(scan.all_keys), ties)

    def conventions(self, params: MethodParams) -> dict[str, str]:
        return {**TIES.conventions(params), **CONVENTIONS}

    def merge(self, key, base, finetuned, strength, params: MethodParams, out=None, context=None) -> Array:
        scan = single_tensor_scan(key, base, finetuned)
        context = context or self.prepare(scan, params)
        ties = context.ties or ties_context(scan, params.density)
        combined = disjoint_merge(trimmed(scan, key, ties.kept), ties.majority_sign)
        return finish(scale_and_add(combined, context.scale(key, strength, params.beta), base), out)


LINES = Lines(
    "lines",
    "LiNeS: task arithmetic with lambda rising by depth from --alpha (first block) to --alpha + --beta (last)",
    1,
    None,
    ("strength", "beta"),
    elementwise=True,
)
LINES_TIES = LinesTies(
    "lines-ties",
    "LiNeS over TIES: TIES's merged task vector scaled by depth (--alpha, --beta, --density, --topk-scope)",
    1,
    None,
    ("strength", "beta", "density", "topk_scope"),
)
