"""Decode and resize every image once per (dataset, size) into a uint8 cache reused by every alpha and run.

The cache holds images after open_clip's eval resize and centre crop, before normalisation
(normalising is a cheap per-batch op), as a memory-mapped .npy beside a JSON index. Corrupt
image bytes are skipped and recorded, never crashing a sweep.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import PIL
import torch
import torchvision
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import CenterCrop, InterpolationMode, Resize

from micromerge.core.atomic import atomic_output, write_json_atomic
from micromerge.core.json_text import parse_json
from micromerge.core.progress import progress_bar
from micromerge.eval.data import column_values

_UPLOAD_ROWS = 1024  # rows per host-to-device copy: bounds the extra host memory of the upload
DECODE_RULE = "bicubic resize + centre crop, RGB uint8 (v1)"  # bump when decode_one changes
DECODE_IDENTITY = f"{DECODE_RULE}; Pillow {PIL.__version__}; torchvision {torchvision.__version__}"
"""What decoded pixels depend on besides the bytes and the size: cached pixels (and statistics
computed from them) made under another rule or resampling library are made again, not reused."""


@dataclass
class ImageCache:
    pixels: np.ndarray  # [N, 3, S, S] uint8, memory-mapped
    valid: np.ndarray  # [N] bool: False where the bytes would not decode


def resident_on_device(pixels: np.ndarray, rows: np.ndarray, device: torch.device) -> torch.Tensor | None:
    """uint8 `pixels[rows]` uploaded once to a CUDA device, or None on CPU or where they would take
    more than half its free memory. Resident pixels spare every later pass (each alpha of a sweep,
    each training step) a host read and a blocking host-to-device copy."""
    if device.type != "cuda":
        return None
    shape = (len(rows), *pixels.shape[1:])
    if int(np.prod(shape)) > torch.cuda.mem_get_info(device)[0] // 2:
        return None
    resident = torch.empty(shape, dtype=torch.uint8, device=device)
    for start in range(0, len(rows), _UPLOAD_ROWS):
        chunk = np.ascontiguousarray(pixels[rows[start : start + _UPLOAD_ROWS]])
        resident[start : start + len(chunk)] = torch.from_numpy(chunk)
    return resident


class PixelFeed:
    """Normalised float32 pixels (open_clip's ToTensor + Normalize) for fixed cache rows, batch by batch.

    On a GPU the rows stay resident for every alpha of a sweep (all 17k μ-Bench images at 224 px
    are 2.6 GB) and are normalised on the device; on CPU they stream from the memory-mapped cache.
    """

    def __init__(
        self, cache: ImageCache, rows: np.ndarray, mean: torch.Tensor, std: torch.Tensor, device: torch.device
    ):
        self.cache, self.rows, self.device = cache, rows, device
        self.mean = mean.to(device).view(1, 3, 1, 1)
        self.std = std.to(device).view(1, 3, 1, 1)
        self.resident = resident_on_device(cache.pixels, rows, device)

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, start: int, stop: int) -> torch.Tensor:
        if self.resident is not None:
            data = self.resident[start:stop]
        else:
            data = torch.from_numpy(np.ascontiguousarray(self.cache.pixels[self.rows[start:stop]])).to(
                self.device
            )
        return (data.float().div_(255.0) - self.mean) / self.std

    def take(self, positions: np.ndarray) -> torch.Tensor:
        """The pixels at arbitrary positions (into `rows`), normalised like `batch`."""
        if self.resident is not None:
            data = self.resident[torch.from_numpy(positions).to(self.resident.device)]
        else:
            data = torch.from_numpy(np.ascontiguousarray(self.cache.pixels[self.rows[positions]])).to(
                self.device
            )
        return (data.float().div_(255.0) - self.mean) / self.std


UNREADABLE_IMAGE = (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError)
"""What Pillow raises for an image it cannot read: not an image, cut short, a broken chunk (some
plugins raise SyntaxError), or a header declaring over twice Image.MAX_IMAGE_PIXELS (179 million)."""


def decode_one(payload: dict | None, size: int) -> np.ndarray | None:
    """One image payload resized (shorter side, bicubic) and centre-cropped to uint8 [3, S, S]; None if unreadable."""
    if payload is None:
        return None
    try:
        if payload.get("bytes") is not None:
            image = Image.open(io.BytesIO(payload["bytes"]))
        elif payload.get("path"):
            image = Image.open(payload["path"])
        else:
            return None
        image.load()
    except UNREADABLE_IMAGE:
        return None  # corrupt, truncated, or declaring more pixels than any micrograph: counted, skipped
    image = CenterCrop(size)(Resize(size, interpolation=InterpolationMode.BICUBIC)(image))
    return np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)


def decode_payloads(
    payloads: Sequence[dict | None], size: int, progress: bool = True, desc: str = "decode images"
) -> tuple[np.ndarray, np.ndarray]:
    """Decode, resize and crop image payloads ({'bytes'} or {'path'}) into uint8 [N, 3, S, S] plus a valid mask."""
    n = len(payloads)
    pixels = np.zeros((n, 3, size, size), dtype=np.uint8)
    valid = np.zeros(n, dtype=bool)
    chunk = 256
    # Pillow releases the GIL while decoding and resizing, so threads scale with the cores.
    with (
        ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 2)) as pool,
        progress_bar(
            total=n, desc=f"{desc} ({size}px)", unit="img", disable=not progress, leave=False
        ) as bar,
    ):
        for start in range(0, n, chunk):
            batch = payloads[start : start + chunk]
            for offset, decoded in enumerate(pool.map(lambda p: decode_one(p, size), batch)):
                if decoded is not None:
                    pixels[start + offset] = decoded
                    valid[start + offset] = True
            bar.update(len(batch))
    return pixels, valid


def build_image_cache(
    dataset: datasets.Dataset,
    fingerprint: str,
    size: int,
    cache_dir: Path,
    progress: bool = True,
    column: str = "image",
) -> ImageCache:
    """Load the cache for (fingerprint, size) or build it (atomically, so an interrupted build is redone)."""
    folder = cache_dir / "images"
    stem = folder / f"{fingerprint}-{size}px"
    index_path, pixels_path = stem.with_suffix(".json"), stem.with_suffix(".npy")
    cached = _cached_pixels(index_path, pixels_path, len(dataset), size)
    if cached is not None:
        return cached
    payloads = column_values(dataset.cast_column(column, datasets.Image(decode=False)), column)
    pixels, valid = decode_payloads(payloads, size, progress)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_output(pixels_path, "wb") as handle:
        np.save(handle, pixels)
    write_json_atomic(
        index_path,
        {
            "rows": len(payloads),
            "size": size,
            "decode": DECODE_IDENTITY,
            "valid": valid.tolist(),
            "corrupt": int((~valid).sum()),
        },
    )
    return ImageCache(np.load(pixels_path, mmap_mode="r"), valid)


def _cached_pixels(index_path: Path, pixels_path: Path, rows: int, size: int) -> ImageCache | None:
    """The cache when whole and of this data; None (so it is built again) when missing, damaged on
    disk (a cut .npy, a bad index: numpy's and json's tracebacks), not of these rows and size, or
    decoded otherwise than this version decodes."""
    if not (index_path.is_file() and pixels_path.is_file()):
        return None
    try:
        index = parse_json(index_path.read_text())
        pixels = np.load(pixels_path, mmap_mode="r")
        valid = np.array(index["valid"], dtype=bool)
    except (OSError, ValueError, EOFError, KeyError, TypeError):
        return None
    if index.get("rows") != rows or pixels.shape != (rows, 3, size, size) or valid.shape != (rows,):
        return None
    if index.get("decode") != DECODE_IDENTITY:  # decoded by another rule or Pillow/torchvision
        return None
    return ImageCache(pixels, valid)
