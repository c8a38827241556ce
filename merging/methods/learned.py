"""Merges with learned coefficients: AdaMerging (Yang et al., ICLR 2024) and the supervised per-block α.

    theta = theta_0 + alpha * sum_i lambda[g(key), i] tau_i

lambda comes from `eval.coefficients` (learned on the select half: entropy without labels for
AdaMerging, select-half accuracy for the supervised α); --alpha scales the learned task vector
(1, the default, is the merge as learned; 0 the base), so a sweep draws the curve along it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from micromerge.merging.blocks import block_of
from micromerge.merging.methods.base import Array, MergeMethod, MethodParams, ModelScan, finish
from micromerge.merging.methods.fisher import require_statistics

_EMBEDDINGS = (
    # open_clip's ViT, and its ModifiedResNet's stem (RN50)
    "visual.conv1.",
    "visual.class_embedding",
    "visual.positional_embedding",
    "visual.ln_pre.",
    "visual.bn1.",
    "visual.conv2.",
    "visual.bn2.",
    "visual.conv3.",
    "visual.bn3.",
    # timm trunks (BiomedCLIP's ViT, ConvNeXt, ResNet)
    "visual.trunk.patch_embed.",
    "visual.trunk.cls_token",
    "visual.trunk.reg_token",
    "visual.trunk.pos_embed",
    "visual.trunk.stem.",
    "visual.trunk.conv1.",
    "visual.trunk.bn1.",
    # open_clip's text transformer, and a Hugging Face one (BiomedCLIP's BERT)
    "token_embedding.",
    "positional_embedding",
    "text.transformer.embeddings.",
)


def coefficient_group(key: str, granularity: str) -> str:
    """The group whose coefficient a parameter takes: `block`, each block of each tower
    (`merging.blocks`), each tower's embeddings or stem, and each tower's head (the rest)."""
    if granularity == "task":
        return "all"
    if granularity == "layer":
        return key
    block = block_of(key)
    if block is not None:
        return block.name
    tower = "visual" if key.startswith("visual.") else "text"
    return f"{tower}.{'embeddings' if key.startswith(_EMBEDDINGS) else 'head'}"


@dataclass(frozen=True)
class CoefficientTable:
    """lambda[group][task], the group of every learned key, in the model's parameter order."""

    groups: tuple[str, ...]
    key_groups: dict[str, int]
    values: tuple[tuple[float, ...], ...]

    def for_key(self, key: str) -> tuple[float, ...]:
        """A key's coefficients; a key the model has no parameter for (none in an open_clip CLIP)
        takes each task's mean coefficient over the groups."""
        index = self.key_groups.get(key)
        if index is not None:
            return self.values[index]
        return tuple(sum(column) / len(column) for column in zip(*self.values, strict=True))

    def to_json(self) -> dict[str, Any]:
        return {
            "groups": list(self.groups),
            "keys": self.key_groups,
            "values": [list(v) for v in self.values],
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> CoefficientTable:
        return CoefficientTable(
            tuple(data["groups"]),
            {str(k): int(v) for k, v in data["keys"].items()},
            tuple(tuple(float(x) for x in row) for row in data["values"]),
        )


LEARNING = ("strength", "samples", "seed", "granularity", "steps", "learning_rate", "init")


class LearnedMerge(MergeMethod):
    def prepare(self, scan: ModelScan, params: MethodParams) -> Any:
        (table,) = require_statistics(scan, self.name)
        return table

    def conventions(self, params: MethodParams) -> dict[str, str]:
        return {
            "formula": "base + alpha * sum_i lambda[group(key), i] * (specialist_i - base)",
            "unlearned_keys": "each task's mean coefficient over the groups",
        }

    def merge(self, key, base, finetuned, strength, params: MethodParams, out=None, context=None) -> Array:
        coefficients = context.for_key(key)
        result = base.clone()
        for weight, model in zip(coefficients, finetuned, strict=True):
            result += (strength * weight) * (model - base)
        return finish(result, out)


ADAMERGING = LearnedMerge(
    "adamerging",
    "AdaMerging: per-layer (or per-task/block) coefficients minimising prediction entropy on select-half "
    "images, no labels (--data, --granularity, --steps)",
    1,
    None,
    LEARNING,
    default_strength=1.0,
    statistics="adamerging",
)
SUPERVISED = LearnedMerge(
    "supervised-alpha",
    "per-block α maximising select-half accuracy (labels; --search gradient|grid), reported on the report half",
    1,
    None,
    (*LEARNING, "search"),
    default_strength=1.0,
    statistics="supervised",
    param_defaults=(("granularity", "block"),),
)
