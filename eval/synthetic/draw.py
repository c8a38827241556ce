"""Small numpy drawing primitives for procedural micrographs (float RGB canvases in [0, 1])."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy.ndimage import gaussian_filter

SIZE = 64
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)

Color = Sequence[float] | np.ndarray
"""RGB in [0, 1]."""


def canvas(color: Color, rng: np.random.Generator, jitter: float = 0.04) -> np.ndarray:
    base = np.clip(np.asarray(color, np.float32) + rng.normal(0, jitter, 3), 0, 1)
    return np.broadcast_to(base, (SIZE, SIZE, 3)).copy()


class Mask(NamedTuple):
    """A mask's nonzero part: its values over the canvas window [rows, cols]; zero elsewhere.

    Painting only the window gives the same bytes as painting a whole-canvas mask (outside it the
    whole-canvas paint multiplies by 1 and adds 0) at a fraction of the cost: a cell is a few
    pixels of a 64 x 64 canvas, and the demo's data draws about 300,000 of them."""

    rows: slice
    cols: slice
    values: np.ndarray


def _window(low_y: float, high_y: float, low_x: float, high_x: float) -> tuple[slice, slice]:
    """The canvas pixels whose coordinates can lie inside these bounds (empty off the canvas)."""

    def span(low: float, high: float) -> slice:
        start = min(max(int(np.floor(low)), 0), SIZE)
        return slice(start, min(max(int(np.ceil(high)) + 1, start), SIZE))

    return span(low_y, high_y), span(low_x, high_x)


def ellipse_mask(cy: float, cx: float, ry: float, rx: float, angle: float = 0.0, soft: float = 1.0) -> Mask:
    cos, sin = np.cos(angle), np.sin(angle)
    rx, ry = max(rx, 0.3), max(ry, 0.3)
    # the mask is 0 where dist >= 1, which holds beyond max(rx, ry) from the centre at any angle
    reach = max(rx, ry)
    rows, cols = _window(cy - reach, cy + reach, cx - reach, cx + reach)
    dy, dx = _YY[rows, cols] - cy, _XX[rows, cols] - cx
    u = (dx * cos + dy * sin) / rx
    v = (-dx * sin + dy * cos) / ry
    dist = np.sqrt(u * u + v * v)
    edge = soft / max(min(rx, ry), 0.5)
    return Mask(rows, cols, np.clip((1.0 - dist) / max(edge, 1e-3), 0, 1))


def _as_mask(mask: Mask | np.ndarray) -> Mask:
    """A whole-canvas array (bands, wisps) as a Mask over the whole canvas."""
    return mask if isinstance(mask, Mask) else Mask(slice(None), slice(None), mask)


def paint(image: np.ndarray, mask: Mask | np.ndarray, color: Color, opacity: float = 1.0) -> None:
    rows, cols, values = _as_mask(mask)
    alpha = (values * opacity)[..., None]
    window = image[rows, cols]
    window *= 1 - alpha
    window += alpha * np.asarray(color, np.float32)


def add_light(image: np.ndarray, mask: Mask | np.ndarray, color: Color, gain: float) -> None:
    """Additive emission (fluorescence)."""
    rows, cols, values = _as_mask(mask)
    image[rows, cols] += gain * values[..., None] * np.asarray(color, np.float32)


def smooth_noise(rng: np.random.Generator, sigma: float) -> np.ndarray:
    field = gaussian_filter(rng.normal(size=(SIZE, SIZE)).astype(np.float32), sigma)
    return field / (field.std() + 1e-6)


def line_mask(y0: float, x0: float, y1: float, x1: float, width: float) -> Mask:
    reach = width + 0.5  # the mask is 0 where dist >= width + 0.5
    rows, cols = _window(min(y0, y1) - reach, max(y0, y1) + reach, min(x0, x1) - reach, max(x0, x1) + reach)
    py, px = _YY[rows, cols] - y0, _XX[rows, cols] - x0
    dy, dx = y1 - y0, x1 - x0
    length2 = dy * dy + dx * dx + 1e-6
    t = np.clip((py * dy + px * dx) / length2, 0, 1)
    dist = np.hypot(py - t * dy, px - t * dx)
    return Mask(rows, cols, np.clip(width - dist + 0.5, 0, 1))


def finish(image: np.ndarray, rng: np.random.Generator, noise: float, blur: float) -> np.ndarray:
    """Blur (the optics), sensor noise, then 8 bits."""
    image = gaussian_filter(image, (blur, blur, 0)) + rng.normal(0, noise, image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def grid() -> tuple[np.ndarray, np.ndarray]:
    return _YY, _XX
