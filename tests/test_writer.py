"""The streaming safetensors writer (merging/writer.py) on its own: the file it writes is valid
safetensors whatever the dtypes, every tensor starts on a multiple of its element size, the bytes
depend only on the tensors and metadata (not the order they were handed over), and a write it
cannot finish leaves nothing under the output name.

Format facts (8-byte little-endian header length, JSON header with `__metadata__` of strings and
`data_offsets` relative to the end of the header, padding of the header with spaces to a multiple
of 8 so tensors can be memory-mapped aligned) are from the safetensors format description in the
huggingface/safetensors README."""

from __future__ import annotations

import errno
import json
import os
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file

from micromerge.core.errors import MicromergeError
from micromerge.merging.tensor_source import TensorMeta
from micromerge.merging.writer import SafetensorsStreamWriter

NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I8": np.int8, "U8": np.uint8}
SHAPES = {"b.f16": ((3,), "F16"), "a.i8": ((5,), "I8"), "z.f32": ((3,), "F32"), "c.f64": ((1,), "F64"),
          "a.f32": ((2, 1), "F32"), "m.u8": ((3,), "U8")}  # fmt: skip


def _arrays(keys) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: (rng.standard_normal(SHAPES[k][0]) * 50).astype(NUMPY[SHAPES[k][1]]) for k in sorted(keys)}


def _write(path, keys, metadata, arrays=None, force=False):
    arrays = arrays or _arrays(keys)
    metas = {k: TensorMeta(shape=SHAPES[k][0], dtype=SHAPES[k][1]) for k in keys}
    with SafetensorsStreamWriter(path, metas, metadata, force=force) as writer:
        for key in writer.order:
            writer.write(key, memoryview(np.ascontiguousarray(arrays[key]).tobytes()))
    return arrays


def _header(path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return length, json.loads(raw[8 : 8 + length])


def test_mixed_dtypes_give_valid_safetensors_with_every_tensor_aligned(tmp_path):
    path = tmp_path / "m.safetensors"
    arrays = _write(path, list(SHAPES), {"k": "v"})
    loaded = load_file(str(path))
    for key, array in arrays.items():
        np.testing.assert_array_equal(loaded[key], array)
    length, header = _header(path)
    assert length % 8 == 0  # header padded: the data block starts 8-aligned in the file
    for key, (_, dtype) in SHAPES.items():
        start = 8 + length + header[key]["data_offsets"][0]
        assert start % np.dtype(NUMPY[dtype]).itemsize == 0, key
    # largest element size first, names in order within a size: no gaps are ever needed
    by_offset = sorted(SHAPES, key=lambda k: header[k]["data_offsets"][0])
    assert by_offset == ["c.f64", "a.f32", "z.f32", "b.f16", "a.i8", "m.u8"]


def test_the_bytes_depend_on_the_tensors_and_metadata_not_their_order(tmp_path):
    keys = list(SHAPES)
    arrays = _arrays(keys)
    _write(tmp_path / "one.safetensors", keys, {"a": "1", "b": "2"}, arrays)
    _write(tmp_path / "two.safetensors", keys[::-1], {"b": "2", "a": "1"}, arrays)
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()


def _leftovers(tmp_path) -> list[str]:
    return sorted(os.listdir(tmp_path))


@pytest.mark.parametrize(
    "writes, message",
    [
        ([("z.f32", 12), ("a.f32", 8)], "expected 'a.f32' next"),
        ([("a.f32", 4), ("z.f32", 12)], "got 4 bytes for 'a.f32'"),
        ([("a.f32", 8)], "closed after 1 of 2"),
    ],
    ids=["out-of-order", "wrong-size", "too-few"],
)
def test_a_write_that_breaks_the_header_is_refused_and_leaves_no_file(tmp_path, writes, message):
    path = tmp_path / "m.safetensors"
    metas = {k: TensorMeta(shape=SHAPES[k][0], dtype=SHAPES[k][1]) for k in ("a.f32", "z.f32")}
    with pytest.raises(RuntimeError, match=message), SafetensorsStreamWriter(path, metas, {}) as writer:
        for key, size in writes:
            writer.write(key, memoryview(bytes(size)))
    assert _leftovers(tmp_path) == []


def test_a_disk_without_room_fails_before_any_data_and_leaves_no_file(tmp_path, monkeypatch):
    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    with pytest.raises(MicromergeError, match="No space left"):
        _write(tmp_path / "m.safetensors", list(SHAPES), {})
    assert _leftovers(tmp_path) == []


def test_the_whole_file_is_reserved_before_any_data_is_written(tmp_path, monkeypatch):
    """posix_fallocate is asked for the file's full size (header and every tensor) at offset 0, so
    a disk without room fails before the first byte, not part way through a merge."""
    asked = []
    reserve = os.posix_fallocate

    def recorded(fd, offset, length):
        asked.append((offset, length))
        reserve(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", recorded)
    _write(tmp_path / "m.safetensors", list(SHAPES), {"k": "v"})
    assert asked == [(0, (tmp_path / "m.safetensors").stat().st_size)]


def test_a_file_system_that_cannot_reserve_space_still_gets_the_file(tmp_path, monkeypatch):
    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    arrays = _write(tmp_path / "m.safetensors", list(SHAPES), {})
    loaded = load_file(str(tmp_path / "m.safetensors"))
    assert all(np.array_equal(loaded[k], arrays[k]) for k in arrays)


def test_the_header_rewritten_in_place_keeps_its_length_shorter_metadata_padded(tmp_path):
    """The merge writes its header first and its final provenance last (input digests, a lineage
    dropped when the output is the base): shorter metadata is padded with spaces, which the
    safetensors readers skip; longer metadata cannot fit before the tensors and is refused."""
    from safetensors import safe_open

    arrays = _arrays(SHAPES)
    metas = {k: TensorMeta(shape=SHAPES[k][0], dtype=SHAPES[k][1]) for k in SHAPES}
    path = tmp_path / "out.safetensors"
    with SafetensorsStreamWriter(path, metas, {"record": "x" * 40}) as writer:
        for key in writer.order:
            writer.write(key, memoryview(arrays[key].tobytes()))
        length = len(writer.header)
        with pytest.raises(RuntimeError, match="not be longer than the header it replaces"):
            writer.replace_metadata({"record": "x" * 48})
        writer.replace_metadata({"record": "short"})
        assert len(writer.header) == length
    with safe_open(str(path), "np") as handle:
        assert handle.metadata() == {"record": "short"}
    assert all(np.array_equal(load_file(path)[k], arrays[k]) for k in SHAPES)
