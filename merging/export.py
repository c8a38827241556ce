"""Export to transformers CLIP format (config.json + model.safetensors), the reverse mapping."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save

from merging import hf_clip
from merging.models import resolve_model_config
from merging.sources import open_source
from merging.torch_sources import load_all
from micromerge.atomic import atomic_output, output_folder, write_json_atomic
from micromerge.errors import MicromergeError


def export_transformers(
    checkpoint: str, out: str | Path, arch: str | None = None, force: bool = False
) -> Path:
    folder = output_folder(out)
    existing = [name for name in ("model.safetensors", "config.json") if (folder / name).exists()]
    if existing and not force:
        raise MicromergeError(f"{folder}: already holds {' and '.join(existing)}; pass --force to overwrite")
    with open_source(checkpoint, arch=arch) as source:
        metas = {k: source.meta(k) for k in source.keys()}
        config = resolve_model_config(source.arch, metas)
        if (
            "vision_cfg" not in config
            or config["vision_cfg"].get("timm_model_name")
            or config["text_cfg"].get("hf_model_name")
        ):
            raise MicromergeError(
                f"{checkpoint}: only ViT CLIPs with the CLIP text tower export to transformers format"
            )
        tensors = hf_clip.openclip_to_hf(load_all(source))
    with atomic_output(folder / "model.safetensors", "wb") as handle:
        handle.write(save(tensors, metadata={"format": "pt"}))
    write_json_atomic(folder / "config.json", hf_clip.openclip_config_to_hf(config))
    return folder
