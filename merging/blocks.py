"""Where a parameter sits in its tower's stack of blocks: the depth LiNeS scales a task vector by,
and the unit the learned merges' `block` granularity gives one coefficient.

open_clip names the blocks of a tower after the module that builds it, so one pattern is not
enough. Until 0.1.7 the two had a pattern each, for open_clip's transformer blocks (LiNeS's took
timm's ViT blocks too): BiomedCLIP's BERT layers (`text.transformer.encoder.layer.3.`) all took
LiNeS's alpha, its 24 blocks shared two learned coefficients, and RN50's bottlenecks
(`visual.layer2.3.`) were scaled by no depth and took one coefficient per stage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BLOCK_PATTERNS = (
    # stages of blocks: timm's ConvNeXt (`visual.trunk.stages.1.blocks.2.`) and Swin (`layers.1.blocks.2.`)
    re.compile(r"^(?P<tower>.*?)(?:stages|layers)\.(?P<stage>\d+)\.blocks\.(?P<index>\d+)\."),
    # stages of ResNet bottlenecks: open_clip's ModifiedResNet and timm's ResNet (`visual.layer2.3.`)
    re.compile(r"^(?P<tower>.*?)layer(?P<stage>\d+)\.(?P<index>\d+)\."),
    # one stack: open_clip (`visual.transformer.resblocks.3.`, `transformer.resblocks.3.`), timm's
    # ViT (`visual.trunk.blocks.3.`), Hugging Face encoders (BERT's `text.transformer.encoder.layer.3.`,
    # transformers' CLIP `vision_model.encoder.layers.3.`, T5's `encoder.block.3.`)
    re.compile(r"^(?P<tower>.*?)(?:resblocks|blocks|layers|layer|block)\.(?P<index>\d+)\."),
)
"""Tried in this order: a stage's blocks are found before the stage would be taken for a block."""


@dataclass(frozen=True)
class Block:
    """One block of a tower: `tower` is the key prefix its stack hangs from, `position` its
    (stage, index) in forward order, `name` the key prefix that ends with its index."""

    tower: str
    position: tuple[int, int]
    name: str


def block_of(key: str) -> Block | None:
    """The block a parameter belongs to, or None outside every block (embeddings, stems, final
    norms, projections, pooling heads, the logit scale)."""
    for pattern in BLOCK_PATTERNS:
        match = pattern.match(key)
        if match:
            stage = int(match["stage"]) if "stage" in pattern.groupindex else 0
            return Block(match["tower"], (stage, int(match["index"])), key[: match.end() - 1])
    return None


def block_depths(keys: tuple[str, ...]) -> dict[str, float]:
    """(l - 1) / (L - 1) in [0, 1] for every key inside a block, L counted per tower. In one stack l
    is the block's index, L one more than the highest (the authors' rule); across stages (a ResNet,
    a ConvNeXt) it is the block's place in forward order, stage then index, so depth runs across
    the stages instead of starting again at each."""
    found = {key: block for key in keys if (block := block_of(key)) is not None}
    towers: dict[str, set[tuple[int, int]]] = {}
    for block in found.values():
        towers.setdefault(block.tower, set()).add(block.position)
    place = {tower: _places(positions) for tower, positions in towers.items()}
    last = {tower: max(places.values()) for tower, places in place.items()}
    return {
        key: place[block.tower][block.position] / last[block.tower] if last[block.tower] else 0.0
        for key, block in found.items()
    }


def _places(positions: set[tuple[int, int]]) -> dict[tuple[int, int], int]:
    """Each block's l - 1: its index in a single stack, its rank across several stages."""
    if len({stage for stage, _ in positions}) == 1:
        return {position: position[1] for position in positions}
    return {position: rank for rank, position in enumerate(sorted(positions))}
