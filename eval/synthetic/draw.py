"""Small numpy drawing primitives for procedural micrographs (float RGB canvases in [0, 1])."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

SIZE = 64
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


def canvas(color, rng: np.random.Generator, jitter: float = 0.04) -> np.ndarray:
    base = np.clip(np.asarray(color, np.float32) + rng.normal(0, jitter, 3), 0, 1)
    return np.broadcast_to(base, (SIZE, SIZE, 3)).copy()


def ellipse_mask(cy, cx, ry, rx, angle=0.0, soft=1.0) -> np.ndarray:
    cos, sin = np.cos(angle), np.sin(angle)
    dy, dx = _YY - cy, _XX - cx
    u = (dx * cos + dy * sin) / max(rx, 0.3)
    v = (-dx * sin + dy * cos) / max(ry, 0.3)
    dist = np.sqrt(u * u + v * v)
    edge = soft / max(min(rx, ry), 0.5)
    return np.clip((1.0 - dist) / max(edge, 1e-3), 0, 1)


def paint(image: np.ndarray, mask: np.ndarray, color, opacity: float = 1.0) -> None:
    alpha = (mask * opacity)[..., None]
    image *= 1 - alpha
    image += alpha * np.asarray(color, np.float32)


def add_light(image: np.ndarray, mask: np.ndarray, color, gain: float = 1.0) -> None:
    """Additive emission (fluorescence)."""
    image += gain * mask[..., None] * np.asarray(color, np.float32)


def smooth_noise(rng: np.random.Generator, sigma: float) -> np.ndarray:
    field = gaussian_filter(rng.normal(size=(SIZE, SIZE)).astype(np.float32), sigma)
    return field / (field.std() + 1e-6)


def line_mask(y0, x0, y1, x1, width=1.0) -> np.ndarray:
    py, px = _YY - y0, _XX - x0
    dy, dx = y1 - y0, x1 - x0
    length2 = dy * dy + dx * dx + 1e-6
    t = np.clip((py * dy + px * dx) / length2, 0, 1)
    dist = np.hypot(py - t * dy, px - t * dx)
    return np.clip(width - dist + 0.5, 0, 1)


def finish(image: np.ndarray, rng: np.random.Generator, noise: float = 0.02, blur: float = 0.0) -> np.ndarray:
    if blur:
        image = gaussian_filter(image, (blur, blur, 0))
    image = image + rng.normal(0, noise, image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def grid() -> tuple[np.ndarray, np.ndarray]:
    return _YY, _XX
