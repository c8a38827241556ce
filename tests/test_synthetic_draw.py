"""The synthetic micrographs' drawing primitives paint a window, not the whole canvas: the same
bytes as the whole-canvas formulas, which the demo's numbers (README, BENCHMARKS.md) rest on."""

import numpy as np
import pytest

from micromerge.eval.synthetic.draw import SIZE, add_light, ellipse_mask, line_mask, paint

YY, XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


def _whole_ellipse(cy, cx, ry, rx, angle, soft):
    """The formula over every pixel of the canvas."""
    dy, dx = YY - cy, XX - cx
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / max(rx, 0.3)
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / max(ry, 0.3)
    edge = soft / max(min(rx, ry), 0.5)
    return np.clip((1.0 - np.sqrt(u * u + v * v)) / max(edge, 1e-3), 0, 1)


def _whole_line(y0, x0, y1, x1, width):
    py, px = YY - y0, XX - x0
    dy, dx = y1 - y0, x1 - x0
    t = np.clip((py * dy + px * dx) / (dy * dy + dx * dx + 1e-6), 0, 1)
    return np.clip(width - np.hypot(py - t * dy, px - t * dx) + 0.5, 0, 1)


def _shapes(rng):
    """Ellipses and lines of every size, rotated, on the canvas, across its edges and beyond them."""
    for _ in range(300):
        cy, cx = rng.uniform(-20, SIZE + 20, 2)
        ry, rx = rng.uniform(0.1, 25, 2)
        angle, soft = rng.uniform(0, 6.3), rng.uniform(0.5, 14)
        yield ellipse_mask(cy, cx, ry, rx, angle, soft), _whole_ellipse(cy, cx, ry, rx, angle, soft)
        y0, x0, y1, x1 = rng.uniform(-10, SIZE + 10, 4)
        width = rng.uniform(0.2, 3)
        yield line_mask(y0, x0, y1, x1, width), _whole_line(y0, x0, y1, x1, width)


@pytest.mark.parametrize("draw", [paint, add_light])
def test_a_window_paints_the_same_bytes_as_the_whole_canvas(draw):
    rng = np.random.default_rng(0)
    windowed = rng.uniform(0, 1, (SIZE, SIZE, 3)).astype(np.float32)
    whole = windowed.copy()
    for mask, reference in _shapes(rng):
        outside = np.ones_like(reference, dtype=bool)
        outside[mask.rows, mask.cols] = False
        assert not reference[outside].any(), "the formula is zero outside the window"
        color, strength = rng.uniform(0, 1, 3), rng.uniform(0.2, 1)
        draw(windowed, mask, color, strength)
        draw(whole, reference, color, strength)  # a whole-canvas array, as the band renderers pass
        assert np.array_equal(windowed, whole)
