"""Read the weights of a TorchScript archive (`torch.jit.save`) without loading or running it.

OpenAI released CLIP in this format: the files `clip.load` and open_clip before it took weights
from the Hugging Face Hub downloaded into `~/.cache/clip` (`ViT-B-32.pt`, ...) are TorchScript
archives, and `torch.load(weights_only=True)` refuses them. `torch.jit.load` would compile the
archive's code and run its `__setstate__` methods, so it is never called. Instead:

- `data.pkl`, the pickled module tree, goes through the restricted unpickler of
  `merging.legacy_pickle` (every class it names becomes an inert stand-in; tensors are rebuilt
  from the archive's `data/<key>` records, whose dtype the pickle's storage name gives);
- which attributes of a module are its weights is read from the class definitions the archive
  carries as text (`code/__torch__/<module>.py`: `__parameters__ = [...]`, `__buffers__ = [...]`),
  parsed as literals, never executed;
- the rest of what the stand-ins hold (attention head counts, activation classes) describes the
  architecture, which `archive_architecture` reads for the model config.

The state-dict names are those `torch.jit.load(path).state_dict()` gives, less what no loader
treats as a weight: the `input_resolution`, `context_length` and `vocab_size` scalars at the root
of OpenAI's archives (openai/CLIP's `build_model` and open_clip's
`build_model_from_openai_state_dict` delete them) and `attn_mask`, the causal mask open_clip
registers as a non-persistent buffer (TorchScript keeps no persistence flag, so a scripted
open_clip model lists it among its buffers).
"""

from __future__ import annotations

import ast
import io
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from micromerge.core.errors import MicromergeError
from micromerge.merging.legacy_pickle import RestrictedUnpickler, StandIn

_OPENAI_SCALARS = ("input_resolution", "context_length", "vocab_size")
_NOT_WEIGHTS = "attn_mask"

# The storage classes a TorchScript pickle names (`torch FloatStorage`, ...) and their dtypes.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}

_CLASS_LINE = re.compile(r"^class (\w+)\((\w+)\):")
_DECLARATION = re.compile(r"^  (?:__parameters__|__buffers__) = (\[.*\])\s*$")


def is_torchscript_archive(path: Path) -> bool:
    """A zip whose records include `<folder>/constants.pkl`: what torch itself checks before it
    hands a file to `torch.jit.load`."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return _record_folder(archive, "constants.pkl") is not None
    except (OSError, zipfile.BadZipFile):
        return False


@dataclass
class ArchiveContents:
    """The weights (state-dict names) and what the archive's modules say about the architecture."""

    tensors: dict[str, torch.Tensor]
    activation: str | None  # "quick_gelu" / "gelu" when the archive's module classes name one
    heads: dict[str, int]  # {"visual" / "text": attention heads}, where an attention module says


def read_torchscript_archive(path: Path) -> ArchiveContents:
    """The archive's weights, with no code from it compiled or run (module docstring)."""
    try:
        with zipfile.ZipFile(path) as archive:
            folder = _record_folder(archive, "data.pkl")
            if folder is None:
                raise MicromergeError(f"{path}: a TorchScript archive without data.pkl; save the model again")
            _check_byte_order(archive, folder, path)
            modules = _module_classes(archive, folder)
            unpickler = _ArchiveUnpickler(io.BytesIO(archive.read(folder + "data.pkl")), archive, folder)
            root = unpickler.load()
    except MicromergeError:
        raise
    except Exception as exc:  # any failure of a foreign archive is the file's problem
        raise MicromergeError(
            f"{path}: not a readable TorchScript archive ({type(exc).__name__}: {exc})".splitlines()[0][:200]
        ) from exc
    if _class_of(root) not in modules:
        raise MicromergeError(
            f"{path}: the TorchScript archive holds a {_class_of(root) or type(root).__name__}, not a module"
        )
    tensors: dict[str, torch.Tensor] = {}
    _collect(root, modules, "", tensors)
    for name in _OPENAI_SCALARS:
        tensors.pop(name, None)
    tensors = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[-1] != _NOT_WEIGHTS}
    if not tensors:
        raise MicromergeError(f"{path}: the TorchScript archive holds no weights")
    return ArchiveContents(tensors, _activation(modules), _heads(root, modules))


def _record_folder(archive: zipfile.ZipFile, record: str) -> str | None:
    """The folder (`archive/`, `ViT-B-32/`, ...) that holds `record` at the top of the zip."""
    for name in archive.namelist():
        folder, _, leaf = name.rpartition("/")
        if leaf == record and folder and "/" not in folder:
            return folder + "/"
    return None


def _check_byte_order(archive: zipfile.ZipFile, folder: str, path: Path) -> None:
    try:
        order = archive.read(folder + "byteorder").decode().strip()
    except KeyError:
        return  # archives older than the record are little-endian
    if order != "little":
        raise MicromergeError(f"{path}: its tensors are stored {order}-endian; only little-endian is read")


def _module_classes(archive: zipfile.ZipFile, folder: str) -> dict[str, set[str]]:
    """{qualified class name: the names of its parameters and buffers} of every Module class the
    archive's code defines (`__parameters__` and `__buffers__`: a state dict holds both alike),
    read line by line: the lists are literals, evaluated with `ast.literal_eval`."""
    modules: dict[str, set[str]] = {}
    code = folder + "code/"
    for name in archive.namelist():
        if not (name.startswith(code) and name.endswith(".py")):
            continue
        qualifier = name[len(code) : -len(".py")].replace("/", ".")
        current: set[str] | None = None
        for line in archive.read(name).decode("utf-8", "replace").splitlines():
            header = _CLASS_LINE.match(line)
            if header:
                current = set() if header.group(2) == "Module" else None
                if current is not None:
                    modules[f"{qualifier}.{header.group(1)}"] = current
                continue
            declared = _DECLARATION.match(line)
            if declared and current is not None:
                current.update(map(str, ast.literal_eval(declared.group(1))))
    return modules


class _ArchiveUnpickler(RestrictedUnpickler):
    """The restricted unpickler with the archive's storages: `('storage', <XStorage>, key, location,
    numel)` is the bytes of `data/<key>` as that dtype (shared between the tensors that view it)."""

    def __init__(self, file: io.BytesIO, archive: zipfile.ZipFile, folder: str):
        super().__init__(file)
        self._archive = archive
        self._folder = folder
        self._storages: dict[str, torch.TypedStorage] = {}

    def persistent_load(self, pid: Any) -> torch.TypedStorage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected record reference {str(pid)[:80]}")
        _, storage_type, key, _location, numel = pid
        dtype = _STORAGE_DTYPES.get(getattr(storage_type, "stand_in_for", "").rpartition(".")[2])
        if dtype is None or not isinstance(key, str) or not isinstance(numel, int):
            raise pickle.UnpicklingError(f"a storage of unsupported type {storage_type!r}")
        if key not in self._storages:
            raw = self._archive.read(f"{self._folder}data/{key}")
            if len(raw) < numel * torch.empty((), dtype=dtype).element_size():
                raise pickle.UnpicklingError(
                    f"record data/{key} holds {len(raw)} bytes, fewer than {numel} values"
                )
            untyped = (
                torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
            )
            self._storages[key] = torch.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        return self._storages[key]


def _class_of(obj: Any) -> str:
    return type(obj).stand_in_for if isinstance(obj, StandIn) else ""


def _collect(module: Any, modules: dict[str, set[str]], prefix: str, out: dict[str, torch.Tensor]) -> None:
    """A module's parameters and buffers (those that are tensors: an absent bias is None), then its
    submodules', in the order the pickle holds its attributes, as `state_dict()` names them."""
    weights = modules.get(_class_of(module), set())
    for name, value in module.__dict__["_state"].items():
        if name in weights and isinstance(value, torch.Tensor):
            out[prefix + name] = value.detach()
        elif _class_of(value) in modules:
            _collect(value, modules, f"{prefix}{name}.", out)


def _activation(modules: dict[str, set[str]]) -> str | None:
    """The MLP activation the archive's module classes name (QuickGELU is open_clip's and OpenAI's
    class for CLIP's x·σ(1.702x)); None when neither is there."""
    leaves = {name.rpartition(".")[2] for name in modules}
    if "QuickGELU" in leaves:
        return "quick_gelu"
    return "gelu" if "GELU" in leaves else None


def _heads(root: Any, modules: dict[str, set[str]]) -> dict[str, int]:
    """The head count of the first attention module of each tower (an `nn.MultiheadAttention`
    keeps `num_heads` among its attributes): under `visual.` the image tower, else the text's."""
    heads: dict[str, int] = {}

    def visit(module: Any, tower: str) -> None:
        state = module.__dict__["_state"]
        count = state.get("num_heads")
        if isinstance(count, int) and count > 0:
            heads.setdefault(tower, count)
        for name, value in state.items():
            if _class_of(value) in modules:
                visit(value, "visual" if name == "visual" else tower)

    visit(root, "text")
    return heads
