"""Export a checkpoint in the layouts other CLIP tools open directly.

  transformers  config.json + model.safetensors (the reverse key mapping), plus the tokenizer
                (vocab.json, merges.txt: open_clip's own BPE vocabulary, the one OpenAI CLIP and
                transformers' CLIPTokenizer share, with transformers' names for the two special
                tokens) and preprocessor_config.json, so CLIPModel, CLIPProcessor and the
                zero-shot-image-classification pipeline load the folder as it is.
  open_clip     open_clip_config.json ({"model_cfg", "preprocess_cfg"}) + open_clip_model.safetensors,
                what open_clip's `local-dir:` and `hf-hub:` loaders read.

Every export folder gets a model card (README.md, `merging.model_card`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import micromerge
from micromerge.core.atomic import (
    output_folder,
    same_file,
    staged_files,
    write_json_atomic,
    write_text_atomic,
)
from micromerge.core.errors import MicromergeError
from micromerge.merging import hf_clip
from micromerge.merging.execute import input_hashes
from micromerge.merging.model_card import checkpoint_provenance, write_model_card
from micromerge.merging.models import image_size, normalisation, resolve_model_config
from micromerge.merging.sources import CheckpointAccess
from micromerge.merging.torch_save import save_tensors
from micromerge.merging.torch_sources import load_all

FORMATS = ("transformers", "open_clip")
FILES = {
    "transformers": ("model.safetensors", "config.json"),
    "open_clip": ("open_clip_model.safetensors", "open_clip_config.json"),
}
CLIP_VOCABULARY = 49408
START, END = "<|startoftext|>", "<|endoftext|>"  # transformers' names for open_clip's two special tokens


def export_checkpoint(
    checkpoint: str,
    out: str | Path,
    fmt: str = "transformers",
    access: CheckpointAccess = CheckpointAccess(),
    force: bool = False,
    evaluation: list[dict[str, Any]] | None = None,
) -> Path:
    """Write `checkpoint` into the folder `out` in `fmt`, with its model card; returns the folder."""
    if fmt not in FORMATS:
        raise MicromergeError(f"--format {fmt!r}: choose one of {list(FORMATS)}")
    with output_folder(out) as folder:  # removed again if nothing could be written into it
        existing = [name for name in (*FILES[fmt], "README.md") if (folder / name).exists()]
        if existing and not force:
            raise MicromergeError(
                f"{folder}: already holds {' and '.join(existing)}; pass --force to overwrite"
            )
        with access.open(checkpoint) as source:
            metas = {k: source.meta(k) for k in source.keys()}
            config = resolve_model_config(source.arch, metas, source.label)
            tensors = load_all(source)
            files = list(source.files)
            metadata = _export_metadata(fmt, files, input_hashes([source]))
        with staged_files(folder) as staging:  # all of the export's files, or none of them
            if fmt == "transformers":
                _write_transformers(checkpoint, config, tensors, staging, metadata)
            else:
                _write_open_clip(config, tensors, staging, metadata)
            write_model_card(staging, checkpoint, files, fmt, evaluation)
            _refuse_replacing_inputs(staging, folder, files)
        return folder


def _refuse_replacing_inputs(staging: Path, folder: Path, inputs: list[Path]) -> None:
    """`--out` the checkpoint's own folder with --force replaced a run's open_clip
    model.safetensors with the transformers-keyed one (its manifest's sha256 then named weights
    that no longer existed): an input is never an output, as in `merge`."""
    for written in staging.iterdir():
        target = folder / written.name
        if any(same_file(target, f) for f in inputs):
            raise MicromergeError(
                f"--out {folder}: the export would replace {target.name}, the checkpoint being exported; "
                "choose another --out"
            )


def _export_metadata(fmt: str, files: list[Path], digests: dict[str, str]) -> dict[str, str]:
    """The exported weights carry their provenance in the safetensors header, as merged and
    fine-tuned checkpoints do: the record of how the model was made (if micromerge made it) plus
    what was exported from what, so the exported file is an artefact with a history of its own."""
    record = checkpoint_provenance(files) or {"micromerge_version": micromerge.__version__, "kind": "export"}
    record = {
        **record,
        "export": {
            "format": fmt,
            "source_sha256": {Path(name).name: digest for name, digest in digests.items()},
            "micromerge_version": micromerge.__version__,
        },
    }
    return {"format": "pt", "micromerge.core.provenance": json.dumps(record, sort_keys=True)}


def _write_open_clip(
    config: dict[str, Any], tensors: dict, folder: Path, metadata: dict[str, str] | None = None
) -> None:
    mean, std = normalisation(config)
    preprocess = {"size": image_size(config), "mean": mean.tolist(), "std": std.tolist()}
    model_cfg = {k: v for k, v in config.items() if k != "preprocess_cfg"}
    save_tensors(folder / "open_clip_model.safetensors", tensors, metadata or {"format": "pt"})
    write_json_atomic(
        folder / "open_clip_config.json", {"model_cfg": model_cfg, "preprocess_cfg": preprocess}
    )


def _write_transformers(
    checkpoint: str,
    config: dict[str, Any],
    tensors: dict,
    folder: Path,
    metadata: dict[str, str] | None = None,
) -> None:
    text = config.get("text_cfg", {})
    if "vision_cfg" not in config or config["vision_cfg"].get("timm_model_name") or text.get("hf_model_name"):
        raise MicromergeError(
            f"{checkpoint}: only ViT CLIPs with the CLIP text tower export to transformers format "
            "(use --format open_clip)"
        )
    save_tensors(folder / "model.safetensors", hf_clip.openclip_to_hf(tensors), metadata or {"format": "pt"})
    write_json_atomic(folder / "config.json", hf_clip.openclip_config_to_hf(config))
    if not text.get("hf_tokenizer_name") and int(text.get("vocab_size", 49408)) == CLIP_VOCABULARY:
        _write_clip_tokenizer(folder, int(text.get("context_length", 77)))
    else:
        warnings.warn(
            f"{checkpoint}: its text tower does not use CLIP's BPE vocabulary ({CLIP_VOCABULARY} tokens): "
            "no tokenizer written beside the weights",
            stacklevel=2,
        )
    _write_image_processor(folder, config)


def _write_clip_tokenizer(folder: Path, context_length: int) -> None:
    """vocab.json and merges.txt from open_clip's tokenizer tables, and the tokenizer configs."""
    import open_clip

    tokenizer = open_clip.tokenizer.SimpleTokenizer()
    renamed = {"<start_of_text>": START, "<end_of_text>": END}
    vocab = {renamed.get(token, token): index for token, index in tokenizer.encoder.items()}
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.__getitem__)
    write_text_atomic(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    write_text_atomic(
        folder / "merges.txt", "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    )
    special = {"bos_token": START, "eos_token": END, "unk_token": END, "pad_token": END}
    write_json_atomic(folder / "special_tokens_map.json", special)
    write_json_atomic(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": context_length,
            "do_lower_case": True,
            **special,
        },
    )


def _write_image_processor(folder: Path, config: dict[str, Any]) -> None:
    """CLIP's preprocessing: bicubic resize of the shorter side, centre crop, normalise."""
    size = image_size(config)
    mean, std = normalisation(config)
    write_json_atomic(
        folder / "preprocessor_config.json",
        {
            "image_processor_type": "CLIPImageProcessor",
            "processor_class": "CLIPProcessor",
            "do_resize": True,
            "size": {"shortest_edge": size},
            "resample": 3,
            "do_center_crop": True,
            "crop_size": {"height": size, "width": size},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": mean.tolist(),
            "image_std": std.tolist(),
            "do_convert_rgb": True,
        },
    )
