"""Streaming safetensors writer: header first, then each tensor as it is computed.

Only one output tensor is ever in memory. The file is written under a temporary name,
space is reserved up front (posix_fallocate) so a full disk fails before any data is
written, and it is renamed into place only when complete. Tensor order and header bytes
are canonical, so the same tensors and metadata always give the same file bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path
from types import TracebackType
from typing import IO

from micromerge.core.atomic import atomic_output
from micromerge.merging.dtypes import ITEM_SIZES
from micromerge.merging.tensor_source import TensorMeta


def canonical_order(metas: dict[str, TensorMeta]) -> list[str]:
    """Larger element sizes first, then by name: keeps every tensor naturally aligned."""
    return sorted(metas, key=lambda k: (-ITEM_SIZES[metas[k].dtype], k))


def build_header(
    metas: dict[str, TensorMeta], metadata: dict[str, str], length: int | None = None
) -> tuple[bytes, list[str], int]:
    """The header's bytes (length prefix, JSON, spaces to a multiple of 8), the tensor order and
    the data size. `length`: pad the JSON with spaces to this many bytes in all, as a header
    rewritten in place must keep its length (safetensors readers allow trailing spaces)."""
    order = canonical_order(metas)
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for key in order:
        meta = metas[key]
        header[key] = {
            "dtype": meta.dtype,
            "shape": list(meta.shape),
            "data_offsets": [offset, offset + meta.nbytes],
        }
        offset += meta.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    if length is not None:
        raw += b" " * (length - 8 - len(raw))
    return struct.pack("<Q", len(raw)) + raw, order, offset


class SafetensorsStreamWriter:
    """Use as a context manager; call `write` with every key's bytes, in `order`."""

    def __init__(
        self, path: str | Path, metas: dict[str, TensorMeta], metadata: dict[str, str], force: bool = False
    ):
        self.path = Path(path)
        self.metas = metas
        self.header, self.order, self.data_bytes = build_header(metas, metadata)
        self._force = force
        self._next = 0
        self._context: contextlib.AbstractContextManager[IO[bytes]] | None = None
        self._handle: IO[bytes] | None = None

    def __enter__(self) -> SafetensorsStreamWriter:
        self._context = atomic_output(self.path, "wb", force=self._force)
        self._handle = self._context.__enter__()
        try:
            os.posix_fallocate(self._handle.fileno(), 0, len(self.header) + self.data_bytes)
        except OSError as exc:
            if exc.errno not in (95,):  # EOPNOTSUPP: filesystem cannot reserve; fall back to plain writes
                self._context.__exit__(type(exc), exc, exc.__traceback__)
                raise
        self._handle.write(self.header)
        return self

    def write(self, key: str, data: memoryview) -> None:
        """`data`: the tensor's bytes in its header dtype (an array backend's `host_bytes`)."""
        expected = self.order[self._next]
        if key != expected:
            raise RuntimeError(f"writer expected {expected!r} next, got {key!r}")
        if data.nbytes != self.metas[key].nbytes:
            raise RuntimeError(
                f"writer got {data.nbytes} bytes for {key!r}, its header says {self.metas[key].nbytes}"
            )
        if data.nbytes:
            assert self._handle is not None
            self._handle.write(data)
        self._next += 1

    def replace_metadata(self, metadata: dict[str, str]) -> None:
        """Rewrite the header in place (e.g. input digests computed while tensors streamed): the
        same length, shorter metadata padded with spaces."""
        header, _, _ = build_header(self.metas, metadata, len(self.header))
        if len(header) != len(self.header):
            raise RuntimeError("replacement metadata must not be longer than the header it replaces")
        assert self._handle is not None
        self._handle.flush()
        os.pwrite(self._handle.fileno(), header, 0)
        self.header = header

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._context is not None
        if exc_type is None and self._next != len(self.order):
            exc = RuntimeError(f"writer closed after {self._next} of {len(self.order)} tensors")
            self._context.__exit__(RuntimeError, exc, None)
            raise exc
        self._context.__exit__(exc_type, exc, tb)
