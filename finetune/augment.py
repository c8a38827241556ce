"""Augmentation of streamed training images, drawn from a seed per sample: open_clip's random
resized crop and the microscopy extras a config can name (flips, 90° turns, stain jitter). The
seed of a sample depends only on (run seed, pass, sample), never on which worker or process reads
it, so a resumed run ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from micromerge.core.errors import MicromergeError
from micromerge.eval.images import UNREADABLE_IMAGE, decode_one


def _crop(size: int) -> Callable:
    """open_clip's training crop: RandomResizedCrop to the input size, scale (0.9, 1), bicubic."""
    from torchvision.transforms import InterpolationMode, RandomResizedCrop

    return RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=InterpolationMode.BICUBIC)


def _flips(_size: int) -> Callable:
    from torchvision.transforms import Compose, RandomHorizontalFlip, RandomVerticalFlip

    return Compose([RandomHorizontalFlip(), RandomVerticalFlip()])


def _rot90(_size: int) -> Callable:
    def rotate(image: Image.Image) -> Image.Image:
        turns = int(torch.randint(0, 4, (1,)))
        return image.rotate(90 * turns) if turns else image

    return rotate


def _stain_jitter(_size: int) -> Callable:
    """Small colour jitter, the usual stand-in for stain variation between pathology labs."""
    from torchvision.transforms import ColorJitter

    return ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02)


AUGMENTATIONS: dict[str, Callable[[int], Callable]] = {
    "crop": _crop,
    "flip": _flips,
    "rot90": _rot90,
    "stain-jitter": _stain_jitter,
}
"""Augmentations by name (config `augment = ["crop", "flip", ...]`), applied in the order named."""


def check_augment(names: tuple[str, ...]) -> None:
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise MicromergeError(f"--augment {unknown[0]}: choose from {sorted(AUGMENTATIONS)}")


def augmented_pixels(payload: dict, size: int, augment: tuple[str, ...], seed: int) -> np.ndarray | None:
    """One image through the named augmentations, drawn from `seed` alone; uint8 [3, S, S] or None."""
    try:
        source = io.BytesIO(payload["bytes"]) if payload.get("bytes") else payload["path"]
        if source is None:  # a null image cell: no bytes and no path
            return None
        image = Image.open(source).convert("RGB")
    except UNREADABLE_IMAGE:  # a decompression bomb's header was a worker's traceback
        return None
    # this worker's CPU generator, for this sample only (torchvision's random transforms draw from it).
    # Not torch.manual_seed: on a CUDA build it also queues a seeding of every GPU, formatting a stack
    # trace for each call (measured: 1.3 ms a sample, more than decoding and cropping it)
    torch.random.default_generator.manual_seed(seed)
    for name in augment:
        image = AUGMENTATIONS[name](size)(image)
    if image.size != (size, size):  # no crop named: fit as the in-memory path does
        return decode_one({"bytes": _png(image), "path": None}, size)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def sample_seed(seed: int, epoch: int, i: int) -> int:
    digest = hashlib.sha256(f"{seed}|{epoch}|{i}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def named_sample_seed(seed: int, current: int, name: str) -> int:
    """The augmentation seed of a streamed sample known by a name rather than an index."""
    return sample_seed(seed, current, int.from_bytes(hashlib.sha256(name.encode()).digest()[:6], "little"))


def sample_pixels(payload: dict, size: int, augment: tuple[str, ...], seed: int) -> np.ndarray | None:
    """One streamed image, uint8 [3, S, S] or None: through the augmentations drawn from `seed`, or,
    without augmentation, exactly the in-memory path's decode (so the two paths then train alike)."""
    return augmented_pixels(payload, size, augment, seed) if augment else decode_one(payload, size)
