"""One door to build a CLIP model: the model-config registry, shape inference, tokenizer, transform.

Configs come from `merging/model_configs/*.json` (this project's, e.g. `micro-clip`) and then
from open_clip's own registry. Models are built with `open_clip.model.CLIP(**config)` so that
nothing is registered globally and nothing is downloaded (random init, then our weights).
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, Any, TypeAlias

import torch

from micromerge.core.errors import MicromergeError
from micromerge.merging.arch_names import CONFIG_DIR, project_model_names
from micromerge.merging.hf_clip import TOWERS, transformers_towers
from micromerge.merging.tensor_source import ArchInfo, TensorMeta, TensorSource, describe_key_mismatch

if TYPE_CHECKING:
    from open_clip.model import CLIP, CustomTextCLIP

    ClipModel: TypeAlias = CLIP | CustomTextCLIP
    """What `build_model` makes: an nn.Module with encode_image, encode_text and logit_scale."""

Tokenizer = Callable[[str | list[str]], torch.Tensor]
"""open_clip's tokenizer for a model: text or texts -> [N, context length] token ids."""

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def image_size(model_config: dict[str, Any]) -> int:
    """The square input size the model's vision tower takes."""
    return int(model_config.get("vision_cfg", {}).get("image_size", 224))


def normalisation(model_config: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) the model's images are normalised with (OpenAI CLIP's unless its config says)."""
    preprocess = model_config.get("preprocess_cfg", {})
    return torch.tensor(preprocess.get("mean", OPENAI_MEAN)), torch.tensor(preprocess.get("std", OPENAI_STD))


@cache
def _project_config(name: str) -> str | None:
    path = CONFIG_DIR / f"{name}.json"
    return path.read_text() if path.is_file() else None


def get_model_config(name: str) -> dict[str, Any]:
    """The open_clip model config for a name: this project's configs first, then open_clip's."""
    text = _project_config(name)
    if text is not None:
        return json.loads(text)
    import open_clip

    config = open_clip.get_model_config(name)
    if not config:
        raise MicromergeError(
            f"unknown architecture {name!r}: use an open_clip model name (e.g. ViT-B-32) or one of {project_model_names()}"
        )
    return copy.deepcopy(config)


def infer_model_config(metas: dict[str, TensorMeta]) -> dict[str, Any] | None:
    """Read a ViT CLIP's config off its tensor shapes (for checkpoints that do not name one)."""
    try:
        conv = metas["visual.conv1.weight"].shape
        width, patch = conv[0], conv[2]
        grid = int(round((metas["visual.positional_embedding"].shape[0] - 1) ** 0.5))
        v_layers = 1 + max(
            int(m.group(1)) for k in metas if (m := re.match(r"visual\.transformer\.resblocks\.(\d+)\.", k))
        )
        t_layers = 1 + max(
            int(m.group(1)) for k in metas if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))
        )
        t_width = metas["ln_final.weight"].shape[0]
        v_mlp = metas["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width
        t_mlp = metas["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / t_width
    except (KeyError, ValueError):
        return None
    return {
        "embed_dim": metas["text_projection"].shape[1],
        "quick_gelu": False,
        "vision_cfg": {
            "image_size": grid * patch,
            "layers": v_layers,
            "width": width,
            "head_width": 64 if width % 64 == 0 else width // max(1, width // 32),
            "mlp_ratio": v_mlp,
            "patch_size": patch,
        },
        "text_cfg": {
            "context_length": metas["positional_embedding"].shape[0],
            "vocab_size": metas["token_embedding.weight"].shape[0],
            "width": t_width,
            "heads": max(1, t_width // 64),
            "layers": t_layers,
            "mlp_ratio": t_mlp,
        },
    }


def resolve_model_config(
    arch: ArchInfo, metas: dict[str, TensorMeta] | None = None, label: str = "the checkpoint"
) -> dict[str, Any]:
    """The config a checkpoint names, else the one its shapes describe. Shapes cannot show the
    MLP activation nor the attention heads' width, so that guess (GELU, 64-wide heads: OpenAI's
    and open_clip's widths) is said: OpenAI CLIP and every model fine-tuned from it use QuickGELU,
    and evaluated with GELU they score lower with nothing else to show it."""
    if arch.model_config:
        return copy.deepcopy(arch.model_config)
    if arch.name:
        return get_model_config(arch.name)
    inferred = infer_model_config(metas or {})
    if inferred is None:
        raise MicromergeError(f"{label}: {_no_architecture(list(metas or {}))}")
    warnings.warn(
        f"{label}: names no architecture; read from its tensor shapes with GELU and 64-wide attention heads, "
        "which shapes do not show: pass --arch NAME if it was trained otherwise (OpenAI CLIP and models "
        "fine-tuned from it, such as PLIP and QuiltNet: ViT-B-32-quickgelu, ViT-B-16-quickgelu)",
        stacklevel=2,
    )
    return inferred


def _no_architecture(keys: list[str]) -> str:
    """Why no model can be built, and what would mend it: `--arch` names an open_clip architecture,
    which cannot mend a transformers tower saved alone (`hf_clip.TOWERS`)."""
    towers = transformers_towers(keys)
    if len(towers) == 1:
        lacking = next(t for t in TOWERS if t not in towers)
        kind = towers[0].removesuffix("_model")
        return (
            f"transformers-format weights of the {kind} tower alone ({towers[0]}.* keys, no {lacking}.*: a "
            f"CLIP{kind.title()}Model's, not a CLIPModel's); zero-shot evaluation needs both towers: pass the "
            "whole CLIPModel's weights"
        )
    return "cannot tell its architecture; pass --arch NAME (an open_clip model name)"


def build_model(model_config: dict[str, Any]) -> ClipModel:
    """A randomly initialised open_clip model for a config; never downloads anything."""
    from open_clip.model import CLIP, CustomTextCLIP

    config = copy.deepcopy(model_config)
    for key in ("custom_text", "preprocess_cfg"):
        config.pop(key, None)
    text_cfg = config.get("text_cfg", {})
    if text_cfg.get("hf_model_name"):
        text_cfg["hf_model_pretrained"] = False
        vision_cfg = config.get("vision_cfg", {})
        if vision_cfg.get("timm_model_name"):
            vision_cfg["timm_model_pretrained"] = False
        return CustomTextCLIP(**config)
    return CLIP(**config)


def load_model(
    source: TensorSource, model_config: dict[str, Any] | None = None
) -> tuple[ClipModel, dict[str, Any]]:
    """Build the model a source describes and load its weights (strict: every key must match)."""
    metas = {key: source.meta(key) for key in source.keys()}
    config = model_config or resolve_model_config(source.arch, metas, source.label)
    try:
        model = build_model(config)
    except (TypeError, ValueError, KeyError, AttributeError, AssertionError, RuntimeError) as exc:
        raise MicromergeError(
            f"{source.label}: its model config does not build an open_clip model "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); pass --arch NAME"
        ) from exc
    expected = model.state_dict()
    problem = describe_key_mismatch(
        {k: tuple(v.shape) for k, v in expected.items()},
        {k: m.shape for k, m in metas.items()},
        "model",
        "checkpoint",
    )
    if problem:
        raise MicromergeError(f"{source.label}: weights do not fit the architecture: {problem}; check --arch")
    state = {key: source.read(key).to(tensor.dtype).clone() for key, tensor in expected.items()}
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, config


def tokenizer_for(model_config: dict[str, Any]) -> Tokenizer:
    """open_clip's tokenizer for a config; the BPE vocabulary ships in its wheel (no network)."""
    import open_clip

    text_cfg = model_config.get("text_cfg", {})
    context_length = int(text_cfg.get("context_length", 77))
    if text_cfg.get("hf_tokenizer_name"):
        return open_clip.tokenizer.HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length)
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
