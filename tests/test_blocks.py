"""Blocks found in every tower open_clip builds: the depth LiNeS scales by, the learned merges' groups.

The key names come from the libraries themselves, built small here: timm's ViT and ConvNeXt
(`timm.create_model`), transformers' BERT (`BertModel`) and open_clip's ModifiedResNet (RN50's
tower). The prefixes are open_clip's: `TimmModel` holds its network as `trunk`, `HFTextEncoder`
its as `transformer`, and a `CustomTextCLIP` (BiomedCLIP) names its towers `visual` and `text`
(tests/test_sources.py builds BiomedCLIP from its config; its keys read `visual.trunk.blocks.0.`
and `text.transformer.encoder.layer.0.`). LiNeS's rule, λ = α + β l / (L - 1) for block l of L
(0-based) with keys outside the blocks at α, is its authors' `LiNeS_scaling`.
"""

from __future__ import annotations

import pytest
import timm
import torch
import transformers
from open_clip.modified_resnet import ModifiedResNet

from micromerge.merging.blocks import block_depths
from micromerge.merging.in_memory import merge_state_dicts
from micromerge.merging.methods import MethodParams
from micromerge.merging.methods.learned import coefficient_group


def _keys(prefix: str, module: torch.nn.Module) -> list[str]:
    return [prefix + k for k, v in module.state_dict().items() if v.is_floating_point()]


@pytest.fixture(scope="module")
def towers() -> dict[str, list[str]]:
    torch.manual_seed(0)
    return {
        "vit": _keys(
            "visual.trunk.",
            timm.create_model("vit_base_patch16_224", depth=3, embed_dim=32, num_heads=2, num_classes=0),
        ),
        "bert": _keys(
            "text.transformer.",
            transformers.BertModel(
                transformers.BertConfig(
                    num_hidden_layers=3, hidden_size=32, num_attention_heads=2, intermediate_size=64
                )
            ),
        ),
        "resnet": _keys("visual.", ModifiedResNet(layers=(1, 2, 1, 1), output_dim=16, heads=2, width=8)),
        "convnext": _keys(
            "visual.trunk.",
            timm.create_model("convnext_tiny", depths=(1, 2, 1, 1), dims=(8, 16, 32, 64), num_classes=0),
        ),
    }


def test_every_tower_kind_has_its_blocks_found_in_forward_order(towers):
    depths = {k: v for keys in towers.values() for k, v in block_depths(tuple(keys)).items()}
    expected = {
        "visual.trunk.blocks.1.attn.qkv.weight": 0.5,
        "visual.trunk.blocks.2.mlp.fc2.bias": 1.0,
        "text.transformer.encoder.layer.0.attention.self.query.weight": 0.0,
        "text.transformer.encoder.layer.1.output.dense.weight": 0.5,
        "text.transformer.encoder.layer.2.output.LayerNorm.bias": 1.0,
        # ResNet bottlenecks (stage, index): (1,0) (2,0) (2,1) (3,0) (4,0), depth across the stages
        "visual.layer1.0.conv1.weight": 0.0,
        "visual.layer2.1.conv3.weight": 0.5,
        "visual.layer4.0.bn3.bias": 1.0,
        # ConvNeXt (stage, index): (0,0) (1,0) (1,1) (2,0) (3,0), the same
        "visual.trunk.stages.1.blocks.0.conv_dw.weight": 0.25,
        "visual.trunk.stages.3.blocks.0.mlp.fc1.weight": 1.0,
    }
    assert {k: depths.get(k) for k in expected} == expected
    outside = [
        "visual.trunk.cls_token",
        "visual.trunk.patch_embed.proj.weight",
        "visual.trunk.norm.weight",
        "text.transformer.embeddings.word_embeddings.weight",
        "text.transformer.pooler.dense.weight",
        "visual.conv1.weight",
        "visual.attnpool.c_proj.weight",
        "visual.trunk.stem.0.weight",
        "visual.trunk.stages.1.downsample.1.weight",
    ]
    assert all(k in {x for keys in towers.values() for x in keys} for k in outside), "real names"
    assert [k for k in outside if k in depths] == []


def test_lines_scales_a_hugging_face_text_tower_by_depth(towers):
    """BiomedCLIP's text tower: before 0.1.7 its BERT layers all took α (none was found as a block)."""
    keys = towers["vit"] + towers["bert"]
    generator = torch.Generator().manual_seed(1)
    base = {k: torch.randn(3, generator=generator) for k in keys}
    fts = [{k: v + torch.randn(3, generator=generator) for k, v in base.items()} for _ in range(2)]
    alpha, beta = 0.2, 0.6
    merged = merge_state_dicts("lines", base, fts, MethodParams(beta=beta), strength=alpha)
    for key, layer in (
        ("text.transformer.encoder.layer.2.intermediate.dense.weight", 2),
        ("text.transformer.encoder.layer.1.attention.self.key.bias", 1),
        ("visual.trunk.blocks.2.norm1.weight", 2),
        ("text.transformer.embeddings.LayerNorm.weight", None),
    ):
        scale = alpha if layer is None else alpha + beta * layer / 2
        expected = base[key] + scale * sum(ft[key] - base[key] for ft in fts)
        torch.testing.assert_close(merged[key], expected, atol=1e-6, rtol=1e-6, msg=key)


def test_learned_block_groups_are_the_blocks_of_every_tower_kind(towers):
    """One coefficient per block, per tower's embeddings (or stem) and per tower's head, whatever
    library built the tower: BiomedCLIP's 24 blocks had two coefficients, `visual.head` and
    `text.head`, before 0.1.7."""
    every = [k for keys in towers.values() for k in keys]
    groups = {k: coefficient_group(k, "block") for k in every}
    assert {
        k: groups[k]
        for k in (
            "visual.trunk.blocks.2.attn.qkv.weight",
            "text.transformer.encoder.layer.1.output.dense.weight",
            "visual.layer2.1.conv3.weight",
            "visual.trunk.stages.1.blocks.1.conv_dw.weight",
            "visual.trunk.patch_embed.proj.weight",
            "visual.trunk.pos_embed",
            "text.transformer.embeddings.word_embeddings.weight",
            "visual.bn2.weight",
            "visual.trunk.norm.weight",
            "text.transformer.pooler.dense.weight",
            "visual.attnpool.q_proj.weight",
        )
    } == {
        "visual.trunk.blocks.2.attn.qkv.weight": "visual.trunk.blocks.2",
        "text.transformer.encoder.layer.1.output.dense.weight": "text.transformer.encoder.layer.1",
        "visual.layer2.1.conv3.weight": "visual.layer2.1",
        "visual.trunk.stages.1.blocks.1.conv_dw.weight": "visual.trunk.stages.1.blocks.1",
        "visual.trunk.patch_embed.proj.weight": "visual.embeddings",
        "visual.trunk.pos_embed": "visual.embeddings",
        "text.transformer.embeddings.word_embeddings.weight": "text.embeddings",
        "visual.bn2.weight": "visual.embeddings",
        "visual.trunk.norm.weight": "visual.head",
        "text.transformer.pooler.dense.weight": "text.head",
        "visual.attnpool.q_proj.weight": "visual.head",
    }
    blocks_per_tower = {
        name: len(
            {groups[k] for k in keys} - {"visual.embeddings", "visual.head", "text.embeddings", "text.head"}
        )
        for name, keys in towers.items()
    }
    assert blocks_per_tower == {"vit": 3, "bert": 3, "resnet": 5, "convnext": 5}
