"""Decode and resize every image once per (dataset, size) into a uint8 cache reused by every alpha and run.

The cache holds images after open_clip's eval resize and centre crop, before normalisation
(normalising is a cheap per-batch op), as a memory-mapped .npy beside a JSON index. Corrupt
image bytes are skipped and recorded, never crashing a sweep.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import CenterCrop, InterpolationMode, Resize
from tqdm import tqdm

from micromerge.atomic import atomic_output, write_json_atomic


@dataclass
class ImageCache:
    pixels: np.ndarray  # [N, 3, S, S] uint8, memory-mapped
    valid: np.ndarray  # [N] bool: False where the bytes would not decode

    def batch(
        self, rows: np.ndarray, mean: torch.Tensor, std: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        """Normalised float32 pixels for `rows`, as open_clip's ToTensor + Normalize would give."""
        data = torch.from_numpy(np.ascontiguousarray(self.pixels[rows])).to(device)
        return (data.float().div_(255.0) - mean.to(device).view(1, 3, 1, 1)) / std.to(device).view(1, 3, 1, 1)


def _decode(payload: dict | None, size: int) -> np.ndarray | None:
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
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None
    image = CenterCrop(size)(Resize(size, interpolation=InterpolationMode.BICUBIC)(image))
    return np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)


def decode_payloads(
    payloads: list[dict | None], size: int, progress: bool = True, desc: str = "decode images"
) -> tuple[np.ndarray, np.ndarray]:
    """Decode, resize and crop image payloads ({'bytes'} or {'path'}) into uint8 [N, 3, S, S] plus a valid mask."""
    n = len(payloads)
    pixels = np.zeros((n, 3, size, size), dtype=np.uint8)
    valid = np.zeros(n, dtype=bool)
    chunk = 256
    with (
        ThreadPoolExecutor(max_workers=2) as pool,
        tqdm(total=n, desc=f"{desc} ({size}px)", unit="img", disable=not progress, leave=False) as bar,
    ):
        for start in range(0, n, chunk):
            batch = payloads[start : start + chunk]
            for offset, decoded in enumerate(pool.map(lambda p: _decode(p, size), batch)):
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
    if index_path.is_file() and pixels_path.is_file():
        index = json.loads(index_path.read_text())
        if index.get("rows") == len(dataset):
            return ImageCache(np.load(pixels_path, mmap_mode="r"), np.array(index["valid"], dtype=bool))
    payloads = dataset.cast_column(column, datasets.Image(decode=False))[column]
    pixels, valid = decode_payloads(payloads, size, progress)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_output(pixels_path, "wb") as handle:
        np.save(handle, pixels)
    write_json_atomic(
        index_path,
        {"rows": len(payloads), "size": size, "valid": valid.tolist(), "corrupt": int((~valid).sum())},
    )
    return ImageCache(np.load(pixels_path, mmap_mode="r"), valid)
