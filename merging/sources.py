"""Resolve what the user names (zoo name, hf-hub id, file, folder) into a TensorSource.

Every format a microscopy researcher holds ends up as open_clip keys: safetensors (single or
sharded), `.pt`/`.bin` state dicts and open_clip training checkpoints (weights_only), open_clip
hub folders, transformers CLIP folders (keys converted), and legacy whole-module pickles (only
with allow_pickle, read by the restricted unpickler).

Safetensors tensors are read as torch tensors, or with `arrays="numpy"` as numpy arrays for
the torch-free merge engine; a checkpoint that only torch can read then raises NeedsTorch.
This module imports torch only on the paths that need it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from micromerge.core.config_schema import is_finite_number
from micromerge.core.errors import MicromergeError, first_line
from micromerge.core.hub_download import hf_download_command, offline_setting
from micromerge.core.json_text import parse_json
from micromerge.core.suggest import meant
from micromerge.merging import hf_clip
from micromerge.merging.arch_names import require_known_architecture
from micromerge.merging.numpy_backend import NumpyBackend
from micromerge.merging.openai_release import CLIP_CACHE, cached_release, release_digest
from micromerge.merging.tensor_source import ArchInfo, ArrayView, SafetensorsSource, TensorSource
from micromerge.merging.zoo import ZooEntry, load_zoo

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
CHECKPOINT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
ArrayKind = Literal["torch", "numpy"]


@dataclass(frozen=True)
class CheckpointAccess:
    """How a run opens its checkpoints: whether the restricted pickle reader may read files that
    hold Python objects, and the architecture for files that do not name theirs."""

    allow_pickle: bool = False
    arch: str | None = None

    def open(self, spec: str, arrays: ArrayKind = "torch") -> TensorSource:
        return open_source(spec, allow_pickle=self.allow_pickle, arch=self.arch, arrays=arrays)


def checkpoint_name(spec: str) -> str:
    """A checkpoint as people call it (a model card's title, a run's label): a checkpoint file by its
    stem, a run folder's model.safetensors or open_clip_model.safetensors by its folder, anything
    else (a zoo name, an hf-hub: id, a folder) by its last part, where a dot is no suffix."""
    path = Path(spec)
    if path.suffix in CHECKPOINT_SUFFIXES:
        return (
            path.parent.name if path.stem in ("model", "open_clip_model") and path.parent.name else path.stem
        )
    return path.name or spec


class NeedsTorch(MicromergeError):
    """A checkpoint asked for as numpy arrays that only torch can read (the message says why)."""


def open_source(
    spec: str, *, allow_pickle: bool = False, arch: str | None = None, arrays: ArrayKind = "torch"
) -> TensorSource:
    """Open a checkpoint by zoo name, `hf-hub:org/repo`, file or folder; `arch` overrides detection."""
    if not spec.strip():  # Path("") is the working folder: a run folder there would be opened
        raise MicromergeError(
            f"checkpoint {spec!r}: empty (an unset variable?); give a zoo name, hf-hub: id, file or folder"
        )
    path = Path(spec)
    if path.exists():
        source = _open_path(path, allow_pickle, arrays)
    elif spec.startswith("hf-hub:"):
        _require_torch(arrays, f"{spec}: hub checkpoints are fetched through open_clip")
        source = _open_openclip_hub(spec[len("hf-hub:") :], spec, allow_pickle)
    else:
        zoo = load_zoo()
        if spec in zoo:
            _require_torch(arrays, f"{spec}: zoo checkpoints are fetched through open_clip")
            source = _open_zoo(zoo[spec], allow_pickle)
        elif any(ch in spec for ch in "/\\.") or spec.endswith(PICKLE_SUFFIXES):
            raise MicromergeError(f"{spec}: no such file or folder")
        else:
            raise MicromergeError(
                f"{spec}: not a file, folder, hf-hub: id or zoo name{meant(spec, zoo)} (see `micromerge zoo`)"
            )
    if arch:
        require_known_architecture(arch)
        if source.arch.name and source.arch.name != arch:
            # the weights then failed to fit with only "check --arch" to go on
            warnings.warn(
                f"{source.label}: --arch {arch} replaces the architecture the checkpoint names "
                f"({source.arch.name})",
                stacklevel=2,
            )
        source.arch = ArchInfo(name=arch)
    return source


def _require_torch(arrays: ArrayKind, reason: str) -> None:
    """Refuse a checkpoint only torch can read when numpy arrays were asked for."""
    if arrays != "torch":
        raise NeedsTorch(reason)


def _array_view(arrays: ArrayKind) -> ArrayView:
    if arrays == "numpy":
        return NumpyBackend().view
    from micromerge.merging.torch_backend import torch_view

    return torch_view


def _open_path(path: Path, allow_pickle: bool, arrays: ArrayKind = "torch") -> TensorSource:
    if path.is_dir():
        return _open_folder(path, allow_pickle, arrays)
    if path.exists() and not path.is_file():  # a FIFO or device would block or stream forever
        raise MicromergeError(f"{path}: not a regular file (a pipe or device); pass a checkpoint file")
    if not os.access(path, os.R_OK):
        raise MicromergeError(f"{path}: file is not readable (check its permissions)")
    if path.name.endswith(".safetensors.index.json"):
        return _open_sharded(path, arrays)
    if path.suffix == ".safetensors":
        return _maybe_transformers(_open_safetensors([path], str(path), arrays), path.parent, arrays)
    if path.suffix in PICKLE_SUFFIXES:
        _require_torch(arrays, f"{path}: pickled checkpoints are read with torch.load")
        from micromerge.merging.torch_sources import open_pickle

        return _maybe_transformers(open_pickle(path, allow_pickle), path.parent)
    raise MicromergeError(
        f"{path}: unknown checkpoint format; expected .safetensors, .pt/.pth/.bin/.ckpt or a folder"
    )


def _open_safetensors(files: list[Path], label: str, arrays: ArrayKind) -> SafetensorsSource:
    source = SafetensorsSource(files, label=label, view=_array_view(arrays))
    if arrays == "numpy":
        bfloat16 = [key for key in source.keys() if source.meta(key).dtype == "BF16"]
        if bfloat16:
            source.close()
            raise NeedsTorch(f"{label}: holds bfloat16 tensors (first {bfloat16[0]!r}), which numpy lacks")
    return source


def _read_json_object(path: Path, fix: str) -> dict:
    """A checkpoint's JSON side file as a dict, or one line naming it and `fix`."""
    try:
        value = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MicromergeError(f"{path}: unreadable ({first_line(exc)[:100]}); {fix}") from exc
    if not isinstance(value, dict):
        raise MicromergeError(f"{path}: holds a JSON {type(value).__name__}, not an object; {fix}")
    return value


def _weight_map(index_path: Path) -> dict[str, str]:
    weight_map = _read_json_object(index_path, "copy it again").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise MicromergeError(f"{index_path}: not a safetensors index (needs a 'weight_map' object)")
    return weight_map


def _open_sharded(index_path: Path, arrays: ArrayKind) -> TensorSource:
    weight_map = _weight_map(index_path)
    shards = sorted({index_path.parent / name for name in weight_map.values()})
    for shard in shards:
        if not shard.is_file():
            raise MicromergeError(f"{index_path}: shard {shard.name} is missing")
    return _maybe_transformers(_open_safetensors(shards, str(index_path), arrays), index_path.parent, arrays)


def _normalisation(preprocessing: dict, mean_key: str, std_key: str, file: Path) -> dict:
    """`{"preprocess_cfg": {"mean", "std"}}` from a preprocessing config that names them (open_clip's
    `preprocess_cfg`, transformers' `preprocessor_config.json`), else {}. The model config is where
    the evaluation, fine-tuning and exports read a checkpoint's image normalisation
    (`models.normalisation`), so a model trained with other statistics than OpenAI CLIP's keeps them.
    One of the two alone is kept, the other left to OpenAI CLIP's, as CLIPImageProcessor and
    open_clip's PreprocessCfg default each field on its own."""
    values = {}
    for name, key in (("mean", mean_key), ("std", std_key)):
        if key not in preprocessing:
            continue
        value = preprocessing[key]
        # one number stands for every channel (transformers allows it)
        channels = [value] * 3 if is_finite_number(value) else value
        if not (
            isinstance(channels, list)
            and len(channels) == 3
            and all(is_finite_number(v) for v in channels)
            and (name == "mean" or all(v > 0 for v in channels))
        ):
            raise MicromergeError(
                f"{file}: {key} must be three numbers (one per RGB channel) or one, not {value!r}"
            )
        values[name] = [float(v) for v in channels]
    return {"preprocess_cfg": values} if values else {}


def _open_clip_model_config(config_file: Path) -> dict | None:
    """open_clip_config.json's `model_cfg`, with the normalisation its `preprocess_cfg` names."""
    config = _read_json_object(config_file, "copy it again, or remove it and pass --arch")
    model_config = config.get("model_cfg")
    if model_config is None:
        return None
    return {**model_config, **_normalisation(config.get("preprocess_cfg") or {}, "mean", "std", config_file)}


def _maybe_transformers(source: TensorSource, folder: Path, arrays: ArrayKind = "torch") -> TensorSource:
    keys = source.keys()
    if len(hf_clip.transformers_towers(keys)) < 2:  # a lone tower merges key by key, as open_clip keys do
        return source
    if arrays != "torch":
        source.close()
        raise NeedsTorch(f"{source.label}: transformers-format keys are converted with torch")
    from micromerge.merging.torch_sources import MappedSource

    config_path = folder / "config.json"
    arch = ArchInfo()
    if config_path.is_file():
        hf_config = _read_json_object(config_path, "copy it again")
        model_config = hf_clip.hf_config_to_openclip(hf_config, str(config_path))
        processor = folder / "preprocessor_config.json"
        if processor.is_file():
            preprocessing = _read_json_object(processor, "copy it again, or remove it for OpenAI CLIP's")
            model_config.update(_normalisation(preprocessing, "image_mean", "image_std", processor))
        arch = ArchInfo(model_config=model_config)
    return MappedSource(source, hf_clip.hf_to_openclip_recipes(keys), arch=arch)


def _open_folder(folder: Path, allow_pickle: bool, arrays: ArrayKind) -> TensorSource:
    """A transformers CLIP folder (config.json + weights) or an open_clip folder (open_clip_config.json).
    A transformers folder's weights are looked for in the order `from_pretrained` looks for them
    (transformers 5.x `modeling_utils`): a folder holding both model.safetensors and a stale sharded
    index (re-saved unsharded over a sharded save) is read as transformers reads it."""
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        if (folder / name).is_file():
            return _open_path(folder / name, allow_pickle, arrays)
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        if (folder / name).is_file():
            source = _open_path(folder / name, allow_pickle, arrays)
            config_file = folder / "open_clip_config.json"
            if config_file.is_file():
                source.arch = ArchInfo(model_config=_open_clip_model_config(config_file))
            return source
    raise MicromergeError(
        f"{folder}: no checkpoint found (expected model.safetensors, pytorch_model.bin, "
        "open_clip_model.safetensors or open_clip_pytorch_model.bin)"
    )


def _offline_error(what: str, repo: str, exc: Exception, release_url: str = "") -> MicromergeError:
    offline = offline_setting()
    why = f"{offline} and it is not in the Hugging Face cache" if offline else "the hub is unreachable"
    release = (
        f", or put OpenAI's {release_url.rsplit('/', 1)[-1]} in {CLIP_CACHE}"
        if release_digest(release_url)
        else ""
    )
    fast = "" if offline else ", or set HF_HUB_OFFLINE=1 to fail fast"
    return MicromergeError(
        f"{what}: cannot fetch {repo} ({why}); download it where there is a network "
        f"(`{hf_download_command(repo)}`) and pass DIR instead{release}{fast}"
    )


def _hub_file(repo: str, filename: str) -> Path | None:
    """A file of a hub repo via the cache; None only when the hub says the repo lacks it, now or
    (offline) in the cache's record of an earlier look-up (`.no_exist/<revision>/<filename>`)."""
    from huggingface_hub import _CACHED_NO_EXIST, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename))
    except LocalEntryNotFoundError:
        if try_to_load_from_cache(repo, filename) is _CACHED_NO_EXIST:
            return None
        raise  # offline and not cached: not the same as "the repo has no such file"
    except EntryNotFoundError:
        return None


def _open_openclip_hub(
    repo: str, label: str, allow_pickle: bool, model_config: dict | None = None
) -> TensorSource:
    from open_clip.pretrained import download_pretrained_from_hf

    try:
        config_file = _hub_file(repo, "open_clip_config.json")
        weights = Path(download_pretrained_from_hf(repo))
    except Exception as exc:
        raise _offline_error(label, repo, exc) from exc
    source = _open_path(weights, allow_pickle)
    if model_config is None and config_file is not None:
        model_config = _open_clip_model_config(config_file)
    if model_config is not None:
        source.arch = ArchInfo(model_config=model_config)
    return source


def _open_transformers_hub(repo: str, label: str, allow_pickle: bool) -> TensorSource:
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        config_file = _hub_file(repo, "config.json")
    except Exception as exc:
        raise _offline_error(label, repo, exc) from exc
    weights, last_error = None, None
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        try:
            weights = _hub_file(repo, name)
        except LocalEntryNotFoundError as exc:  # offline: this form is not cached, another may be
            last_error = exc
            continue
        except Exception as exc:
            raise _offline_error(label, repo, exc) from exc
        if weights is not None:
            break
    if weights is None and last_error is not None:
        raise _offline_error(label, repo, last_error)
    if config_file is None or weights is None:
        raise MicromergeError(f"{label}: {repo} has no config.json with model weights in transformers format")
    try:  # into the snapshot beside config.json, where the folder reader finds the image normalisation
        _hub_file(repo, "preprocessor_config.json")
    except LocalEntryNotFoundError:  # offline and not cached: OpenAI CLIP's normalisation, as before
        pass
    except Exception as exc:
        raise _offline_error(label, repo, exc) from exc
    if weights.name.endswith(".index.json"):
        for shard in set(_weight_map(weights).values()):
            try:
                _hub_file(repo, shard)
            except Exception as exc:
                raise _offline_error(label, repo, exc) from exc
    return _open_path(weights, allow_pickle)


def _open_zoo(entry: ZooEntry, allow_pickle: bool) -> TensorSource:
    """A zoo checkpoint from the hub cache; `allow_pickle` as for a local file (a hub repo's `.bin`
    that holds Python objects is read by the restricted reader only when the user passed it)."""
    label = f"zoo:{entry.name}"
    if entry.format == "open_clip_tag":
        from open_clip.pretrained import download_pretrained, get_pretrained_cfg

        cfg = get_pretrained_cfg(entry.open_clip_name or "", entry.tag or "")
        if not cfg:
            raise MicromergeError(
                f"{label}: open_clip has no pretrained tag {entry.tag!r} for {entry.open_clip_name}"
            )
        try:
            weights = Path(download_pretrained(cfg))
        except Exception as exc:
            # OpenAI's own file, where the `clip` package or an older open_clip cached it
            url = cfg.get("url", "")
            release = cached_release(url)
            if release is None:
                raise _offline_error(label, cfg.get("hf_hub", "").rstrip("/"), exc, url) from exc
            weights = release
        source = _open_path(weights, allow_pickle)
    elif entry.format == "open_clip_hub":
        source = _open_openclip_hub(entry.repo or "", label, allow_pickle, entry.model_config())
    else:
        source = _open_transformers_hub(entry.repo or "", label, allow_pickle)
    if entry.arch and not (source.arch.name or source.arch.model_config):
        source.arch = ArchInfo(name=entry.arch)
    source.label = label
    return source
