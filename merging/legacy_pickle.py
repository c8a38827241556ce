"""Read tensors out of whole-module pickles (wise-ft, task_vectors) without running their code.

Those checkpoints pickle `ImageEncoder`/`ImageClassifier` objects holding old open_clip classes
(`VisualTransformer`, ...) that no longer exist, so a plain `torch.load` fails with "Can't get
attribute 'VisualTransformer'". Here every class the pickle names is replaced by an inert
stand-in that only records its state; the only real callables are torch's tensor rebuilders.
Nothing from the file is imported or executed.
"""

from __future__ import annotations

import pickle
import types
import warnings
from pathlib import Path
from typing import Any

import torch

from micromerge.core.errors import MicromergeError

_WRAPPER_PREFIXES = ("module.", "image_encoder.", "model.")


class StandIn:
    """An inert object standing for a class the pickle named; it records args and state only."""

    stand_in_for = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> StandIn:
        instance = object.__new__(cls)
        instance.__dict__["_args"] = args
        instance.__dict__["_state"] = {}
        return instance

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            merged = dict(state[0] or {})
            merged.update(state[1] or {})
            state = merged
        self.__dict__["_state"] = state if isinstance(state, dict) else {"_value": state}

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEMS on dict subclasses
        self.__dict__["_state"][key] = value

    def append(self, value: Any) -> None:  # APPENDS on list subclasses
        self.__dict__["_state"].setdefault("_items", []).append(value)

    def extend(self, values: Any) -> None:
        for value in values:
            self.append(value)


def _safe_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    return cls.__new__(cls) if isinstance(cls, type) and issubclass(cls, StandIn) else StandIn()


def _safe_rebuild_from_type(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    return func(*args)  # drop the (unknown) tensor subclass, keep the data


def _plain_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_ignored: Any) -> torch.Tensor:
    """torch's `_rebuild_tensor_v2` minus the parts a file could abuse: backward hooks (callables
    that would run later) and metadata are dropped, and only a real storage is accepted."""
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
    return torch._utils._rebuild_tensor(storage, storage_offset, size, stride)


def _plain_parameter(data: Any, *_ignored: Any) -> torch.Tensor:
    """A parameter is read as its data: requires_grad, hooks and extra state carry no weights."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError(f"parameter rebuilt from a {type(data).__name__}, not a tensor")
    return data


class _OrderedDict(dict):
    """What an `OrderedDict` is read as. A plain `dict` would do but for `state_dict()`'s: it
    carries a `_metadata` attribute (per-module versions, no weights) that the pickle restores with
    BUILD, which needs an instance `__dict__` a plain `dict` lacks."""


# Only what weights need is real: tensor rebuilders, dicts, and the set of non-persistent buffer
# names; every other name (torch.Size, dtypes, slices, ...) is a StandIn, which holds no weights.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _plain_tensor,
    ("torch._utils", "_rebuild_tensor"): _plain_tensor,
    ("torch._utils", "_rebuild_parameter"): _plain_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _plain_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _safe_rebuild_from_type,
    ("collections", "OrderedDict"): _OrderedDict,
    ("copyreg", "_reconstructor"): _safe_reconstructor,
    ("builtins", "set"): set,
}


_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves torch's tensor rebuilders for real and every other name to a StandIn subclass."""

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)  # protocol-2 pickles name Python 2 modules
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        if name == "UntypedStorage" and module in ("torch", "torch.storage"):  # newer dtypes
            raise pickle.UnpicklingError(
                "it holds uint16/uint32/uint64/float8 tensors, which the restricted reader does not "
                "rebuild; save the model's state_dict() and pass that file without --allow-pickle"
            )
        return type(name, (StandIn,), {"stand_in_for": f"{module}.{name}"})


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    """`pickle.load` for torch's legacy (pre-zip) format, which reads its magic number, protocol and
    system info with `pickle_module.load` before the main unpickler: every one of those pickles
    goes through the restricted unpickler too, so a payload placed there (or a plain pickle that
    is no torch file at all) resolves to inert stand-ins instead of running."""
    return RestrictedUnpickler(file, **kwargs).load()


_PICKLE_MODULE = types.SimpleNamespace(
    Unpickler=RestrictedUnpickler, load=_restricted_load, __name__="restricted_pickle"
)


def collect_tensors(
    obj: Any, prefix: str = "", out: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Walk the unpickled object graph the way nn.Module.state_dict names things."""
    out = {} if out is None else out
    if isinstance(obj, torch.Tensor):
        out[prefix.rstrip(".")] = obj.detach()
    elif isinstance(obj, StandIn):
        state = obj.__dict__["_state"]
        if "_parameters" in state or "_modules" in state:  # an nn.Module: its state_dict's entries
            skip = set(state.get("_non_persistent_buffers_set") or ())
            buffers = {k: v for k, v in (state.get("_buffers") or {}).items() if k not in skip}
            for group in (state.get("_parameters") or {}, buffers, state.get("_modules") or {}):
                for name, value in group.items():
                    collect_tensors(value, f"{prefix}{name}.", out)
        else:  # any other object: its public attributes, and what stands for its own contents
            for name, value in state.items():
                if name in ("_value", "_items"):  # a non-dict state; a list subclass's items
                    collect_tensors(value, prefix, out)
                elif isinstance(name, str) and not name.startswith("_"):
                    collect_tensors(value, f"{prefix}{name}.", out)
    elif isinstance(obj, dict):
        for name, value in obj.items():
            collect_tensors(value, f"{prefix}{name}.", out)
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            collect_tensors(value, f"{prefix}{index}.", out)
    return out


def to_openclip_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the wrappers wise-ft/task_vectors put around the CLIP model (`image_encoder.model.`)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        stripped = key
        changed = True
        while changed:
            changed = False
            for wrapper in _WRAPPER_PREFIXES:
                if stripped.startswith(wrapper):
                    stripped, changed = stripped[len(wrapper) :], True
        out[stripped] = value
    return out


def load_legacy_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a whole-module pickle, by open_clip key, with no code from the file run."""
    try:
        with warnings.catch_warnings():  # the legacy format compares each module's source with
            # its class's, which a stand-in has none of: one warning per module class, all noise
            warnings.filterwarnings("ignore", message="Couldn't retrieve source code for container")
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PICKLE_MODULE)
    except Exception as exc:  # any failure of a foreign pickle is the file's problem
        raise MicromergeError(
            f"{path}: not a readable torch pickle ({type(exc).__name__}: {exc})".splitlines()[0]
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # a trainer checkpoint whose other entries (args, ...) need pickle
    tensors = to_openclip_keys(collect_tensors(obj))
    if not tensors:
        raise MicromergeError(f"{path}: the pickle holds no tensors")
    return tensors
