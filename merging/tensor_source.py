"""Uniform, lazy access to the tensors of a checkpoint, one tensor at a time.

Merging streams: only one tensor per input is resident at once, so a source exposes
key -> (shape, dtype) metadata up front and reads a tensor on demand. Safetensors files
are read with plain `readinto` into a reused buffer instead of mmap: mmap'd pages count
against RSS until the file is closed, which would hold every input in memory.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from micromerge.errors import MicromergeError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class ArchInfo:
    """What architecture a checkpoint is: an open_clip model name and/or its full config."""

    name: str | None = None
    model_config: dict[str, Any] | None = None


class TensorSource:
    """A checkpoint's tensors by open_clip key. `read` returns a tensor valid until the next read."""

    label: str
    files: list[Path]
    arch: ArchInfo
    metadata: dict[str, str]

    def keys(self) -> list[str]:
        raise NotImplementedError

    def meta(self, key: str) -> TensorMeta:
        raise NotImplementedError

    def read(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        """Release file handles; sources are also context managers."""

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def load_all(self) -> dict[str, torch.Tensor]:
        """Materialise every tensor (for small models and for building a resident model)."""
        return {key: self.read(key).clone() for key in self.keys()}


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
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MicromergeError(
            f"{path}: corrupt safetensors header (not JSON); re-download or re-export it"
        ) from exc
    if not isinstance(header, dict):
        raise MicromergeError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    entries: dict[str, _Entry] = {}
    data_end = 0
    for key, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise MicromergeError(
                f"{path}: tensor {key!r} has an unsupported or malformed header entry"
            ) from exc
        meta = TensorMeta(shape, dtype)
        if end - begin != meta.nbytes or begin < 0:
            raise MicromergeError(
                f"{path}: tensor {key!r} header offsets do not match its shape {list(shape)}"
            )
        entries[key] = _Entry(0, data_start + begin, data_start + end, meta)
        data_end = max(data_end, data_start + end)
    if data_end > size:
        raise MicromergeError(
            f"{path}: truncated safetensors file ({size} bytes, header needs {data_end}); re-download or re-export it"
        )
    return entries, {str(k): str(v) for k, v in metadata.items()}, size


class SafetensorsSource(TensorSource):
    """One safetensors file or a sharded set (the shards named by an index JSON)."""

    def __init__(self, files: Sequence[Path], label: str, arch: ArchInfo | None = None):
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
        self.arch = arch or arch_from_metadata(self.metadata)
        self._handles: list[Any] = [None] * len(self.files)
        self._buffer = torch.empty(0, dtype=torch.uint8)

    def keys(self) -> list[str]:
        return list(self._entries)

    def meta(self, key: str) -> TensorMeta:
        return self._entries[key].meta

    def read(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        nbytes = entry.end - entry.start
        if self._buffer.numel() < nbytes:
            self._buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        handle = self._handles[entry.file_index]
        if handle is None:
            handle = open(self.files[entry.file_index], "rb", buffering=0)  # noqa: SIM115 (closed in close())
            self._handles[entry.file_index] = handle
        view = self._buffer[:nbytes]
        if nbytes:
            got = os.preadv(handle.fileno(), [memoryview(view.numpy())], entry.start)
            if got != nbytes:
                raise MicromergeError(
                    f"{self.files[entry.file_index]}: file changed or truncated while reading {key!r}"
                )
        return view.view(entry.meta.dtype).reshape(entry.meta.shape)

    def close(self) -> None:
        for handle in self._handles:
            if handle is not None:
                handle.close()
        self._handles = [None] * len(self.files)


class DictSource(TensorSource):
    """Tensors already in memory (from a .pt/.bin state dict, a legacy pickle or a model)."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        label: str,
        files: Sequence[Path] = (),
        arch: ArchInfo | None = None,
        metadata: dict[str, str] | None = None,
    ):
        self._tensors = tensors
        self.label = label
        self.files = [Path(f) for f in files]
        self.arch = arch or ArchInfo()
        self.metadata = metadata or {}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def meta(self, key: str) -> TensorMeta:
        tensor = self._tensors[key]
        return TensorMeta(tuple(tensor.shape), tensor.dtype)

    def read(self, key: str) -> torch.Tensor:
        return self._tensors[key]


@dataclass(frozen=True)
class Recipe:
    """How one output key is made from source keys (e.g. q, k, v concatenated into in_proj)."""

    source_keys: tuple[str, ...]
    combine: str = "copy"  # copy | transpose | cat0


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


def arch_from_metadata(metadata: dict[str, str]) -> ArchInfo:
    config = metadata.get("micromerge.model_config")
    return ArchInfo(
        name=metadata.get("micromerge.arch") or None,
        model_config=json.loads(config) if config else None,
    )
