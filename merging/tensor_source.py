"""Uniform, lazy access to the tensors of a checkpoint, one tensor at a time.

Merging streams: only one tensor per input is resident at once, so a source exposes
key -> (shape, dtype) metadata up front and reads a tensor on demand. Safetensors files
are read with plain `preadv` into a reused buffer instead of mmap: mmap'd pages count
against RSS until the file is closed, which would hold every input in memory.

This module imports neither torch nor any model code: a safetensors source hands its raw
bytes to the `view` of the array backend it was opened for (torch tensors or numpy arrays),
which is what lets an elementwise merge of safetensors files run without importing torch.
Sources that can only exist as torch tensors (state-dict pickles, transformers key
mappings) live in `merging.torch_sources`.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from micromerge.core.config_schema import is_count
from micromerge.core.errors import MicromergeError
from micromerge.core.json_text import parse_json
from micromerge.merging.dtypes import ITEM_SIZES

_MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class TensorMeta:
    """Shape and safetensors dtype name ("F32", "BF16", ...) of one tensor."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def nbytes(self) -> int:
        return self.numel * ITEM_SIZES[self.dtype]


@dataclass
class ArchInfo:
    """What architecture a checkpoint is: an open_clip model name and/or its full config."""

    name: str | None = None
    model_config: dict[str, Any] | None = None


class TensorSource:
    """A checkpoint's tensors by open_clip key. `read` returns an array valid until the next read."""

    label: str
    files: list[Path]
    arch: ArchInfo
    metadata: dict[str, str]

    def keys(self) -> list[str]:
        raise NotImplementedError

    def meta(self, key: str) -> TensorMeta:
        raise NotImplementedError

    def read(self, key: str) -> Any:
        """The tensor `key` as the backend's array. It may be a view of a buffer the source reuses
        for its next read (the streaming merge holds one tensor per input): copy what you keep."""
        raise NotImplementedError

    def close(self) -> None:
        """Release file handles; sources are also context managers."""

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _Entry:
    file_index: int
    start: int
    end: int
    meta: TensorMeta


def parse_safetensors_header(path: Path) -> tuple[dict[str, _Entry], dict[str, str], int]:
    """Validate and parse a safetensors header; a truncated or corrupt file is a one-line error."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            raw_len = handle.read(8)
            if len(raw_len) < 8:
                raise MicromergeError(
                    f"{path}: not a safetensors file (shorter than its 8-byte header length)"
                )
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise MicromergeError(
                    f"{path}: corrupt or truncated safetensors header (declares {header_len} bytes)"
                )
            header_bytes = handle.read(header_len)
    except OSError as exc:
        raise MicromergeError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        header = parse_json(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MicromergeError(
            f"{path}: corrupt safetensors header (not JSON); re-download or re-export it"
        ) from exc
    if not isinstance(header, dict):
        raise MicromergeError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise MicromergeError(
            f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)"
        )
    data_start = 8 + header_len
    entries = {key: _parse_entry(path, key, info, data_start) for key, info in header.items()}
    previous_end, previous_key = data_start, None
    for key, entry in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        if not entry.meta.nbytes:  # a zero-size tensor takes no bytes: it overlaps nothing, ends nothing
            continue
        if entry.start < previous_end:
            raise MicromergeError(f"{path}: tensors {previous_key!r} and {key!r} overlap in the data section")
        previous_end, previous_key = entry.end, key
    if previous_end > size:
        raise MicromergeError(
            f"{path}: truncated safetensors file ({size} bytes, header needs {previous_end}); re-download or re-export it"
        )
    return entries, dict(metadata), size


def _parse_entry(path: Path, key: str, info: object, data_start: int) -> _Entry:
    """One tensor's header entry, strictly: a known dtype, non-negative integer dimensions and
    offsets (2.5 or -1 are refused, not rounded), offsets spanning exactly the tensor's bytes."""
    if not isinstance(info, dict):
        raise MicromergeError(f"{path}: tensor {key!r} has a malformed header entry (not an object)")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEM_SIZES:
        raise MicromergeError(f"{path}: tensor {key!r} has an unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(is_count(d) for d in shape):
        raise MicromergeError(
            f"{path}: tensor {key!r} has a malformed shape {shape!r} (non-negative integers)"
        )
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_count(o) for o in offsets):
        raise MicromergeError(f"{path}: tensor {key!r} has malformed data_offsets {offsets!r}")
    meta = TensorMeta(tuple(shape), dtype)
    begin, end = offsets
    if end - begin != meta.nbytes:
        raise MicromergeError(f"{path}: tensor {key!r} header offsets do not match its shape {list(shape)}")
    return _Entry(0, data_start + begin, data_start + end, meta)


ArrayView = Callable[[np.ndarray, TensorMeta], Any]
"""Turns a tensor's raw bytes (a uint8 array) into the backend's typed array, without copying."""


class SafetensorsSource(TensorSource):
    """One safetensors file or a sharded set (the shards named by an index JSON)."""

    def __init__(
        self, files: Sequence[Path], label: str, view: ArrayView, arch: ArchInfo | None = None
    ) -> None:
        self.view = view
        self.files = [Path(f) for f in files]
        self.label = label
        self.metadata = {}
        self._entries: dict[str, _Entry] = {}
        for index, file in enumerate(self.files):
            entries, metadata, _ = parse_safetensors_header(file)
            for key, entry in entries.items():
                if key in self._entries:
                    raise MicromergeError(f"{file}: tensor {key!r} appears in two shards")
                entry.file_index = index
                self._entries[key] = entry
            self.metadata.update(metadata)
        names = without_ddp_prefix(list(self._entries))
        self._entries = {names[key]: entry for key, entry in self._entries.items()}
        self.arch = arch or arch_from_metadata(self.metadata, label)
        self._handles: list[Any] = [None] * len(self.files)
        self._buffer = np.empty(0, dtype=np.uint8)

    def keys(self) -> list[str]:
        return list(self._entries)

    def meta(self, key: str) -> TensorMeta:
        return self._entries[key].meta

    def read(self, key: str) -> Any:
        entry = self._entries[key]
        nbytes = entry.end - entry.start
        if self._buffer.size < nbytes:
            self._buffer = np.empty(nbytes, dtype=np.uint8)
        handle = self._handles[entry.file_index]
        if handle is None:
            handle = open(self.files[entry.file_index], "rb", buffering=0)  # noqa: SIM115 (closed in close())
            self._handles[entry.file_index] = handle
        view = self._buffer[:nbytes]
        if nbytes:
            got = os.preadv(handle.fileno(), [view.data], entry.start)
            if got != nbytes:
                raise MicromergeError(
                    f"{self.files[entry.file_index]}: file changed or truncated while reading {key!r}"
                )
        return self.view(view, entry.meta)

    def close(self) -> None:
        for handle in self._handles:
            if handle is not None:
                handle.close()
        self._handles = [None] * len(self.files)


DDP_PREFIX = "module."


def without_ddp_prefix(keys: list[str]) -> dict[str, str]:
    """Each key as the model names it: a state dict saved from a model wrapped for DDP or
    DataParallel (open_clip's training script saves so under a launch) prefixes every key with
    `module.`; only when every key has it is it the wrapper's, and dropped."""
    if keys and all(key.startswith(DDP_PREFIX) for key in keys):
        return {key: key[len(DDP_PREFIX) :] for key in keys}
    return {key: key for key in keys}


@dataclass(frozen=True)
class Recipe:
    """How one output key is made from source keys (e.g. q, k, v concatenated into in_proj)."""

    source_keys: tuple[str, ...]
    combine: str = "copy"  # copy | transpose | cat0


def describe_key_mismatch(
    reference: dict[str, tuple[int, ...]],
    other: dict[str, tuple[int, ...]],
    reference_name: str,
    other_name: str,
) -> str | None:
    """None when `other` has exactly `reference`'s keys and shapes; else the counts and first examples."""
    missing = sorted(k for k in reference if k not in other)
    extra = sorted(k for k in other if k not in reference)
    mismatched = sorted(k for k in reference if k in other and tuple(reference[k]) != tuple(other[k]))
    parts = []
    if missing:
        parts.append(f"{len(missing)} key(s) missing from the {other_name}, first {missing[:3]}")
    if extra:
        parts.append(f"{len(extra)} key(s) not in the {reference_name}, first {extra[:3]}")
    if mismatched:
        k = mismatched[0]
        parts.append(
            f"{len(mismatched)} shape mismatch(es), first {k}: {reference_name} {list(reference[k])} vs {other_name} {list(other[k])}"
        )
    return "; ".join(parts) or None


def arch_from_metadata(metadata: dict[str, str], label: str = "checkpoint") -> ArchInfo:
    config = metadata.get("micromerge.model_config")
    model_config = None
    if config:
        try:
            model_config = parse_json(config)
        except json.JSONDecodeError as exc:
            raise MicromergeError(f"{label}: its micromerge.model_config metadata is not JSON") from exc
        if not isinstance(model_config, dict):
            raise MicromergeError(f"{label}: its micromerge.model_config metadata is not a JSON object")
    return ArchInfo(name=metadata.get("micromerge.arch") or None, model_config=model_config)
