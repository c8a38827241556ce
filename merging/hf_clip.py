"""Transformers-format CLIP (e.g. PLIP, PubMedCLIP) <-> open_clip keys and configs.

Our own mapping, verified numerically in the tests against transformers' CLIPModel: the
q/k/v projections are concatenated into open_clip's fused `in_proj`, the projections are
transposed, and the layer names are renamed. Only ViT-based CLIPs exist in this format.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from micromerge.core.errors import MicromergeError
from micromerge.merging.tensor_source import Recipe

if TYPE_CHECKING:
    import torch

_LAYER_RENAMES = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_FIXED = {
    "logit_scale": "logit_scale",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
}
_TRANSPOSED = {"text_projection.weight": "text_projection", "visual_projection.weight": "visual.proj"}
_LAYER = re.compile(r"^(text|vision)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_IGNORED = re.compile(r"position_ids$")  # a buffer of older transformers versions, not a weight


TOWERS = ("vision_model", "text_model")
"""The prefixes of transformers' CLIPModel towers; CLIPVisionModelWithProjection and
CLIPTextModelWithProjection (and transformers 4's CLIPVisionModel and CLIPTextModel) hold one alone."""


def transformers_towers(keys: list[str]) -> list[str]:
    """Which of transformers' CLIP towers the keys hold (both for a CLIPModel, none for open_clip)."""
    return [tower for tower in TOWERS if any(k.startswith(f"{tower}.") for k in keys)]


def hf_to_openclip_recipes(hf_keys: list[str]) -> dict[str, Recipe]:
    """Recipes that turn transformers CLIP keys into open_clip keys (q, k, v fused into in_proj)."""
    recipes: dict[str, Recipe] = {}
    unknown: list[str] = []
    for key in hf_keys:
        if _IGNORED.search(key):
            continue
        if key in _FIXED:
            recipes[_FIXED[key]] = Recipe((key,))
        elif key in _TRANSPOSED:
            recipes[_TRANSPOSED[key]] = Recipe((key,), "transpose")
        elif match := _LAYER.match(key):
            tower, index, module, kind = match.groups()
            prefix = f"{'visual.' if tower == 'vision' else ''}transformer.resblocks.{index}."
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                if module == "self_attn.q_proj":
                    base = key.rsplit(".", 2)[0]
                    sources = tuple(f"{base}.{p}_proj.{kind}" for p in "qkv")
                    recipes[f"{prefix}attn.in_proj_{kind}"] = Recipe(sources, "cat0")
            elif module in _LAYER_RENAMES:
                recipes[f"{prefix}{_LAYER_RENAMES[module]}.{kind}"] = Recipe((key,))
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise MicromergeError(
            f"transformers CLIP checkpoint has keys with no open_clip equivalent: {unknown[:3]} "
            f"(+{max(0, len(unknown) - 3)} more); only ViT CLIP checkpoints are supported"
        )
    return recipes


def openclip_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Export an open_clip ViT CLIP state dict with transformers' CLIPModel key names."""
    inverse_fixed = {v: k for k, v in _FIXED.items()}
    inverse_transposed = {v: k for k, v in _TRANSPOSED.items()}
    inverse_layer = {v: k for k, v in _LAYER_RENAMES.items()}
    pattern = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(attn\.in_proj|.+)[._](weight|bias)$")
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in inverse_fixed:
            out[inverse_fixed[key]] = value
        elif key in inverse_transposed:
            out[inverse_transposed[key]] = value.t().contiguous()
        elif match := pattern.match(key):
            visual, index, module, kind = match.groups()
            base = f"{'vision' if visual else 'text'}_model.encoder.layers.{index}."
            if module == "attn.in_proj":
                for name, chunk in zip("qkv", value.chunk(3, dim=0), strict=True):
                    out[f"{base}self_attn.{name}_proj.{kind}"] = chunk.contiguous()
            else:
                out[f"{base}{inverse_layer[module]}.{kind}"] = value
        elif key == "attn_mask":
            continue
        else:
            raise MicromergeError(
                f"cannot export key {key!r} to transformers CLIP format (only ViT CLIPs are supported)"
            )
    return out


def _sub_config(config: dict[str, Any], tower: str, label: str) -> dict[str, Any]:
    """A tower's settings as transformers' CLIPConfig resolves them: `<tower>_config`, unless the
    config also carries the `<tower>_config_dict` of older transformers versions, which then is
    the whole of it (CLIPConfig completes it with its defaults and writes every key over
    `<tower>_config`, those the dict left out included)."""
    for name in (f"{tower}_config_dict", f"{tower}_config"):
        part = config.get(name)
        if part is not None and not isinstance(part, dict):
            raise MicromergeError(f"{label}: {name} must be an object, not {part!r}")
        if part is not None:
            return part
    return {}


OPENCLIP_ACTIVATIONS = ("quick_gelu", "gelu")
"""The MLP activations open_clip's CLIP builds (its `quick_gelu` flag), one for both towers."""


def _activation(text: dict[str, Any], vision: dict[str, Any], label: str) -> str:
    """The one activation both towers use. Another (transformers' gelu_new, relu) or one per tower
    loaded anyway, with open_clip computing a different function in every MLP than the checkpoint
    was trained with: every embedding changed, silently."""
    acts = {
        tower: part.get("hidden_act", "quick_gelu") for tower, part in (("text", text), ("vision", vision))
    }
    for tower, act in acts.items():
        if act not in OPENCLIP_ACTIVATIONS:
            raise MicromergeError(
                f"{label}: {tower}_config.hidden_act {act!r} has no open_clip equivalent "
                f"(open_clip builds {' or '.join(OPENCLIP_ACTIVATIONS)})"
            )
    if acts["text"] != acts["vision"]:
        raise MicromergeError(
            f"{label}: text_config.hidden_act {acts['text']!r} and vision_config.hidden_act "
            f"{acts['vision']!r} differ; open_clip builds one activation for both towers"
        )
    return acts["vision"]


TORCH_LAYER_NORM_EPS = 1e-5
"""torch's LayerNorm default, which open_clip builds unless a tower's `norm_kwargs` says otherwise,
and transformers' CLIPTextConfig/CLIPVisionConfig default `layer_norm_eps`."""


def _norm_kwargs(section: dict[str, Any], name: str, label: str) -> dict[str, Any]:
    """A tower's LayerNorm epsilon as open_clip's `norm_kwargs` (none for torch's default): a config
    with another `layer_norm_eps` was loaded with 1e-5, every normalisation off by the difference."""
    eps = section.get("layer_norm_eps", TORCH_LAYER_NORM_EPS)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise MicromergeError(f"{label}: {name}.layer_norm_eps must be a number in (0, 1), not {eps!r}")
    return {} if eps == TORCH_LAYER_NORM_EPS else {"norm_kwargs": {"eps": float(eps)}}


def hf_config_to_openclip(config: dict[str, Any], label: str = "config.json") -> dict[str, Any]:
    """open_clip model config (the dict `open_clip.model.CLIP(**cfg)` takes) from a CLIPConfig dict;
    a key a config leaves out takes transformers' CLIPTextConfig/CLIPVisionConfig default."""
    text, vision = _sub_config(config, "text", label), _sub_config(config, "vision", label)

    def number(section: dict[str, Any], name: str, key: str, default: int) -> int:
        value = section.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise MicromergeError(f"{label}: {name}.{key} must be a positive integer, not {value!r}")
        return value

    act = _activation(text, vision, label)
    channels = vision.get("num_channels", 3)
    if channels != 3:  # open_clip's patch embedding takes RGB; the weights' shape would say it later
        raise MicromergeError(
            f"{label}: vision_config.num_channels {channels!r}: open_clip's CLIP takes 3-channel (RGB) images"
        )
    v_width, t_width = (
        number(vision, "vision_config", "hidden_size", 768),
        number(text, "text_config", "hidden_size", 512),
    )
    v_heads = number(vision, "vision_config", "num_attention_heads", 12)
    t_heads = number(text, "text_config", "num_attention_heads", 8)
    for name, width, heads in (("vision_config", v_width, v_heads), ("text_config", t_width, t_heads)):
        if width % heads:  # transformers refuses it too; open_clip's message would not name the file
            raise MicromergeError(
                f"{label}: {name}.hidden_size {width} is not divisible by num_attention_heads {heads}"
            )
    return {
        "embed_dim": number(config, "config", "projection_dim", 512),
        "quick_gelu": act == "quick_gelu",
        "vision_cfg": {
            "image_size": number(vision, "vision_config", "image_size", 224),
            "layers": number(vision, "vision_config", "num_hidden_layers", 12),
            "width": v_width,
            "head_width": v_width // v_heads,
            "mlp_ratio": number(vision, "vision_config", "intermediate_size", 3072) / v_width,
            "patch_size": number(vision, "vision_config", "patch_size", 32),
            **_norm_kwargs(vision, "vision_config", label),
        },
        "text_cfg": {
            "context_length": number(text, "text_config", "max_position_embeddings", 77),
            "vocab_size": number(text, "text_config", "vocab_size", 49408),
            "width": t_width,
            "heads": t_heads,
            "layers": number(text, "text_config", "num_hidden_layers", 12),
            "mlp_ratio": number(text, "text_config", "intermediate_size", 2048) / t_width,
            **_norm_kwargs(text, "text_config", label),
        },
    }


def openclip_config_to_hf(model_config: dict[str, Any]) -> dict[str, Any]:
    """A transformers CLIPConfig dict for an open_clip ViT CLIP config (for export)."""
    vision, text = model_config["vision_cfg"], model_config["text_cfg"]
    act = "quick_gelu" if model_config.get("quick_gelu") else "gelu"
    v_width, t_width = int(vision["width"]), int(text["width"])
    return {
        "model_type": "clip",
        "architectures": ["CLIPModel"],
        "projection_dim": int(model_config["embed_dim"]),
        "logit_scale_init_value": 2.6592,
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": int(text.get("vocab_size", 49408)),
            "hidden_size": t_width,
            "intermediate_size": int(t_width * float(text.get("mlp_ratio", 4.0))),
            "num_hidden_layers": int(text["layers"]),
            "num_attention_heads": int(text.get("heads", 8)),
            "max_position_embeddings": int(text.get("context_length", 77)),
            "hidden_act": act,
            "projection_dim": int(model_config["embed_dim"]),
            # open_clip's tokenizers put start/end of text at the top of the vocabulary
            "bos_token_id": int(text.get("vocab_size", 49408)) - 2,
            "eos_token_id": int(text.get("vocab_size", 49408)) - 1,
            "pad_token_id": 0,
            "layer_norm_eps": float((text.get("norm_kwargs") or {}).get("eps", TORCH_LAYER_NORM_EPS)),
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": v_width,
            "intermediate_size": int(v_width * float(vision.get("mlp_ratio", 4.0))),
            "num_hidden_layers": int(vision["layers"]),
            "num_attention_heads": v_width // int(vision.get("head_width", 64)),
            "image_size": int(vision["image_size"]),
            "patch_size": int(vision["patch_size"]),
            "hidden_act": act,
            "projection_dim": int(model_config["embed_dim"]),
            "layer_norm_eps": float((vision.get("norm_kwargs") or {}).get("eps", TORCH_LAYER_NORM_EPS)),
        },
    }
