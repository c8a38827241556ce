"""Sources that only exist as torch tensors: state-dict pickles and transformers-format key mappings.

Opening either needs torch (torch.load, torch.cat), so a merge with such an input always runs
on the torch engine (merging.engines).
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from micromerge.core.errors import MicromergeError, first_line
from micromerge.merging.legacy_pickle import load_legacy_pickle
from micromerge.merging.models import infer_model_config
from micromerge.merging.openai_release import identify_release
from micromerge.merging.tensor_source import ArchInfo, Recipe, TensorMeta, TensorSource, without_ddp_prefix
from micromerge.merging.torch_backend import dtype_name
from micromerge.merging.torchscript_archive import (
    ArchiveContents,
    is_torchscript_archive,
    read_torchscript_archive,
)


class DictSource(TensorSource):
    """Tensors already in memory (from a .pt/.bin state dict, a legacy pickle or a model)."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        label: str,
        files: Sequence[Path] = (),
        arch: ArchInfo | None = None,
    ):
        self._tensors = tensors
        self.label = label
        self.files = [Path(f) for f in files]
        self.arch = arch or ArchInfo()
        self.metadata: dict[str, str] = {}  # safetensors' header metadata: these formats have none

    def keys(self) -> list[str]:
        return list(self._tensors)

    def meta(self, key: str) -> TensorMeta:
        tensor = self._tensors[key]
        return TensorMeta(tuple(tensor.shape), dtype_name(tensor.dtype))

    def read(self, key: str) -> torch.Tensor:
        return self._tensors[key]


@dataclass
class MappedSource(TensorSource):
    """A source seen through a key mapping, still lazy (used for transformers-format CLIP)."""

    inner: TensorSource
    recipes: dict[str, Recipe]
    arch: ArchInfo = field(default_factory=ArchInfo)

    def __post_init__(self) -> None:
        self.label = self.inner.label
        self.files = self.inner.files
        self.metadata = self.inner.metadata

    def keys(self) -> list[str]:
        return list(self.recipes)

    def meta(self, key: str) -> TensorMeta:
        recipe = self.recipes[key]
        metas = [self.inner.meta(k) for k in recipe.source_keys]
        first = metas[0]
        if recipe.combine == "transpose":
            return TensorMeta(tuple(reversed(first.shape)), first.dtype)
        if recipe.combine == "cat0":
            return TensorMeta((sum(m.shape[0] for m in metas), *first.shape[1:]), first.dtype)
        return first

    def read(self, key: str) -> torch.Tensor:
        recipe = self.recipes[key]
        if recipe.combine == "cat0":
            return torch.cat([self.inner.read(k).clone() for k in recipe.source_keys], dim=0)
        tensor = self.inner.read(recipe.source_keys[0])
        return tensor.t() if recipe.combine == "transpose" else tensor

    def close(self) -> None:
        self.inner.close()


def load_all(source: TensorSource) -> dict[str, torch.Tensor]:
    """Materialise every tensor of a torch-backed source (for export and small models)."""
    return {key: source.read(key).clone() for key in source.keys()}


def open_pickle(path: Path, allow_pickle: bool) -> TensorSource:
    """A `.pt`/`.bin` state dict or open_clip checkpoint (weights_only), or with `allow_pickle` a
    legacy whole-module pickle read by the restricted unpickler; a TorchScript archive is
    `open_torchscript`'s."""
    if is_torchscript_archive(path):
        return open_torchscript(path, allow_pickle)
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # pre-zip format; a plain pickle (protocol 4+) is read or refused here in one line,
            # without torch's warning about its protocol before it
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not allow_pickle:
            raise MicromergeError(
                f"{path}: this pickle holds Python objects, not just tensors; pass --allow-pickle to read its "
                "tensors with micromerge's restricted unpickler (no code from the file is run)"
            ) from exc
        tensors = load_legacy_pickle(path)
    except Exception as exc:  # a malformed pickle fails inside torch's rebuilders with any type
        raise MicromergeError(
            f"{path}: corrupt or truncated checkpoint ({type(exc).__name__}: {first_line(exc)[:120]})"
        ) from exc
    else:
        tensors = _unwrap_state_dict(obj, path)
    _refuse_views_beyond_storage(tensors, path)
    return DictSource(tensors, label=str(path), files=[path])


def open_torchscript(path: Path, allow_pickle: bool) -> TensorSource:
    """A TorchScript archive's weights (merging.torchscript_archive). OpenAI's own release files,
    known by their sha256, are read as they are and get their open_clip architecture; any other
    archive needs `allow_pickle`, and gets the architecture its shapes and modules describe."""
    release = identify_release(path)
    if release is None and not allow_pickle:
        raise MicromergeError(
            f"{path}: a TorchScript archive (torch.jit.save), which holds code besides its weights; pass "
            "--allow-pickle to read only its weights with micromerge's restricted reader (nothing from the "
            "file is compiled or run)"
        )
    contents = read_torchscript_archive(path)
    _refuse_views_beyond_storage(contents.tensors, path)
    source = DictSource(contents.tensors, label=str(path), files=[path])
    source.arch = ArchInfo(name=release) if release else _archive_architecture(source, contents)
    return source


def _archive_architecture(source: DictSource, contents: ArchiveContents) -> ArchInfo:
    """The model config a ViT CLIP archive describes: its shapes, plus what shapes cannot say and
    its modules do (the activation's class, each tower's head count). An archive whose modules do
    not name the activation gets none, and the shapes alone decide (with their warning)."""
    config = infer_model_config({key: source.meta(key) for key in source.keys()})
    if config is None or contents.activation is None:
        return ArchInfo()
    config["quick_gelu"] = contents.activation == "quick_gelu"
    vision, text = config["vision_cfg"], config["text_cfg"]
    if "visual" in contents.heads:
        vision["head_width"] = vision["width"] // contents.heads["visual"]
    if "text" in contents.heads:
        text["heads"] = contents.heads["text"]
    return ArchInfo(model_config=config)


def _refuse_views_beyond_storage(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A pickle stores a storage plus (size, stride): a stride-0 view of a 4-byte storage can
    claim 10^10 elements, and the first float32 copy of it allocates 40 GB. A checkpoint's weights
    never need more elements than their storage holds, so such views are refused up front."""
    for key, tensor in tensors.items():
        held = tensor.untyped_storage().nbytes() // max(tensor.element_size(), 1)
        if tensor.numel() > held:
            raise MicromergeError(
                f"{path}: tensor {key!r} claims {tensor.numel():,} elements over a storage of {held:,} "
                "(an expanded or overlapping view); re-save it with .contiguous() or .clone()"
            )


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or an open_clip/trainer checkpoint ({'state_dict': ...}, 'module.' prefixes)."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise MicromergeError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise MicromergeError(f"{path}: holds no tensors")
    names = without_ddp_prefix(list(tensors))
    return {names[k]: v for k, v in tensors.items()}
