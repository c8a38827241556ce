"""Procedural micrographs, one renderer per synthetic source dataset.

Classes differ in visible structure (counts, sizes, shapes, textures, arrangement) under
random stain colour, position and noise jitter, never in a single pixel cue.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from micromerge.eval.synthetic.draw import (
    SIZE,
    Color,
    add_light,
    canvas,
    ellipse_mask,
    finish,
    grid,
    line_mask,
    paint,
    smooth_noise,
)

Renderer = Callable[[np.random.Generator, str], np.ndarray]

EOSIN = (0.93, 0.62, 0.78)
HEMATOXYLIN = (0.33, 0.18, 0.52)


def _jitter(rng: np.random.Generator, color: Color, amount: float = 0.06) -> np.ndarray:
    return np.clip(np.asarray(color) + rng.normal(0, amount, 3), 0, 1)


def _pos(rng: np.random.Generator, margin: float = 4) -> np.ndarray:
    return rng.uniform(margin, SIZE - margin, 2)


def colorectal_tissue(rng: np.random.Generator, label: str) -> np.ndarray:
    """H&E colorectal tissue: adipose, tumor, stroma, lymphocytes, mucus."""
    pink, purple = _jitter(rng, EOSIN), _jitter(rng, HEMATOXYLIN)
    texture = smooth_noise(rng, 2.0)[..., None] * 0.04
    if label == "adipose":
        image = canvas(pink, rng)
        for _ in range(rng.integers(5, 9)):
            cy, cx = _pos(rng, 0)
            r = rng.uniform(8, 14)
            paint(
                image,
                ellipse_mask(cy, cx, r, r * rng.uniform(0.8, 1.2), rng.uniform(0, 3)),
                (0.97, 0.95, 0.97),
            )
        for _ in range(rng.integers(1, 4)):
            cy, cx = _pos(rng)
            paint(image, ellipse_mask(cy, cx, 1.2, 3.0, rng.uniform(0, 3)), purple)
    elif label == "tumor":
        image = canvas(pink * 0.9 + purple * 0.1, rng)
        for _ in range(rng.integers(28, 45)):
            cy, cx = _pos(rng, 0)
            r = rng.uniform(2.5, 4.5)
            paint(
                image,
                ellipse_mask(cy, cx, r, r * rng.uniform(1.0, 1.8), rng.uniform(0, 3), soft=1.5),
                purple * rng.uniform(0.7, 1.0),
                0.9,
            )
    elif label == "stroma":
        image = canvas(pink, rng)
        angle = rng.uniform(0, np.pi)
        for _ in range(rng.integers(14, 22)):
            cy, cx = _pos(rng, 0)
            dy, dx = np.sin(angle) * 30, np.cos(angle) * 30
            paint(
                image, line_mask(cy - dy, cx - dx, cy + dy, cx + dx, rng.uniform(0.4, 1.0)), pink * 0.8, 0.6
            )
        for _ in range(rng.integers(4, 9)):
            cy, cx = _pos(rng)
            paint(image, ellipse_mask(cy, cx, 0.9, rng.uniform(3.5, 6), angle, soft=0.8), purple)
    elif label == "lymphocytes":
        image = canvas(pink, rng)
        for _ in range(rng.integers(55, 90)):
            cy, cx = _pos(rng, 0)
            r = rng.uniform(1.3, 2.2)
            paint(image, ellipse_mask(cy, cx, r, r, 0, soft=0.7), purple * 0.75)
    elif label == "mucus":
        image = canvas((0.82, 0.78, 0.92), rng)
        yy, xx = grid()
        wisps = np.sin((xx * np.cos(rng.uniform(0, 3)) + yy) / rng.uniform(3, 6) + smooth_noise(rng, 4) * 2)
        paint(image, np.clip(wisps, 0, 1) * 0.5, (0.7, 0.6, 0.85), 0.6)
        for _ in range(rng.integers(0, 4)):
            cy, cx = _pos(rng)
            paint(image, ellipse_mask(cy, cx, 1.8, 2.2, 0), purple)
    else:
        raise ValueError(label)
    return finish(image + texture, rng, 0.02, blur=0.5)


def blood_cells(rng: np.random.Generator, label: str) -> np.ndarray:
    """Wright-Giemsa blood smear with red cells and one white cell: lymphocyte, neutrophil, eosinophil, monocyte."""
    image = canvas((0.94, 0.88, 0.86), rng)
    rbc = _jitter(rng, (0.88, 0.55, 0.58), 0.04)
    for _ in range(rng.integers(14, 22)):
        cy, cx = _pos(rng, 0)
        r = rng.uniform(4.5, 6.0)
        paint(image, ellipse_mask(cy, cx, r, r), rbc, 0.9)
        paint(image, ellipse_mask(cy, cx, r * 0.4, r * 0.4), rbc * 0.6 + 0.4, 0.5)
    cy, cx = rng.uniform(24, 40, 2)
    nucleus = _jitter(rng, (0.35, 0.15, 0.5), 0.05)
    if label == "lymphocyte":
        paint(image, ellipse_mask(cy, cx, 10, 10), (0.62, 0.7, 0.9))
        paint(image, ellipse_mask(cy, cx, 8.5, 8.5), nucleus)
    elif label == "neutrophil":
        paint(image, ellipse_mask(cy, cx, 12, 12), (0.9, 0.82, 0.86))
        lobes = rng.integers(3, 5)
        start = rng.uniform(0, 6.28)
        for k in range(lobes):
            lobe = float(start + k * 2 * np.pi / lobes)
            paint(image, ellipse_mask(cy + 5 * np.sin(lobe), cx + 5 * np.cos(lobe), 2.8, 3.2, lobe), nucleus)
    elif label == "eosinophil":
        paint(image, ellipse_mask(cy, cx, 12, 12), (0.95, 0.7, 0.55))
        for _ in range(70):
            a, d = rng.uniform(0, 6.28), rng.uniform(0, 11)
            paint(
                image, ellipse_mask(cy + d * np.sin(a), cx + d * np.cos(a), 0.9, 0.9), (0.9, 0.35, 0.2), 0.8
            )
        for side in (-1, 1):
            paint(image, ellipse_mask(cy, cx + side * 4.5, 4, 3.2), nucleus)
    elif label == "monocyte":
        paint(image, ellipse_mask(cy, cx, 14, 13), (0.7, 0.72, 0.82))
        paint(image, ellipse_mask(cy, cx, 8, 10, rng.uniform(0, 3)), nucleus * 1.3)
        a = rng.uniform(0, 6.28)
        paint(image, ellipse_mask(cy + 7 * np.sin(a), cx + 7 * np.cos(a), 4.5, 4.5), (0.7, 0.72, 0.82))
    else:
        raise ValueError(label)
    return finish(image, rng, 0.02, blur=0.4)


def ihc_staining(rng: np.random.Generator, label: str) -> np.ndarray:
    """IHC (DAB) staining intensity: very_weak, weak, moderate, strong (fraction and darkness of brown cells)."""
    levels = {"very_weak": (0.05, 0.25), "weak": (0.3, 0.45), "moderate": (0.6, 0.7), "strong": (0.9, 1.0)}
    if label not in levels:
        raise ValueError(label)
    image = canvas((0.93, 0.93, 0.95), rng)
    fraction, darkness = levels[label]
    blue = _jitter(rng, (0.45, 0.5, 0.75), 0.05)
    brown = np.array([0.55, 0.35, 0.15]) * (1.4 - 0.6 * darkness)
    for _ in range(rng.integers(30, 45)):
        cy, cx = _pos(rng, 0)
        r = rng.uniform(2.5, 4.0)
        if rng.random() < fraction:
            paint(image, ellipse_mask(cy, cx, r + 2, r + 2, soft=2), brown, 0.35 + 0.6 * darkness)
        paint(image, ellipse_mask(cy, cx, r * 0.6, r * 0.7, rng.uniform(0, 3)), blue, 0.8)
    return finish(image, rng, 0.02, blur=0.5)


def cell_cycle(rng: np.random.Generator, label: str) -> np.ndarray:
    """Widefield fluorescence nuclei (H2B): g1, g2, prophase, metaphase, anaphase."""
    image = canvas((0.02, 0.02, 0.04), rng, 0.01)
    color = _jitter(rng, (0.2, 0.9, 0.35), 0.08)
    cy, cx = rng.uniform(22, 42, 2)
    angle = rng.uniform(0, np.pi)
    if label == "g1":
        for _ in range(rng.integers(3, 6)):
            y, x = _pos(rng, 8)
            add_light(image, ellipse_mask(y, x, 4.5, 5.0, rng.uniform(0, 3), soft=3), color, 0.55)
    elif label == "g2":
        add_light(image, ellipse_mask(cy, cx, 11, 12, angle, soft=4), color, 0.9)
    elif label == "prophase":
        add_light(image, ellipse_mask(cy, cx, 11, 11, angle, soft=4), color, 0.25)
        for _ in range(22):
            a, d = rng.uniform(0, 6.28), rng.uniform(0, 9)
            add_light(
                image,
                ellipse_mask(cy + d * np.sin(a), cx + d * np.cos(a), 1.0, 2.2, rng.uniform(0, 3), soft=1),
                color,
                0.8,
            )
    elif label == "metaphase":
        add_light(image, ellipse_mask(cy, cx, 2.2, 11, angle, soft=1.5), color, 1.0)
    elif label == "anaphase":
        for side in (-1, 1):
            off = 7 * side
            add_light(
                image,
                ellipse_mask(cy + off * np.cos(angle), cx - off * np.sin(angle), 2.0, 9, angle, soft=1.5),
                color,
                1.0,
            )
    else:
        raise ValueError(label)
    return finish(image, rng, 0.015, blur=1.0)


def golgi(rng: np.random.Generator, label: str) -> np.ndarray:
    """Confocal fluorescence of Golgi (magenta) and nucleus (blue): diffuse, golgi_twin, partly_disassembled, interphase."""
    image = canvas((0.01, 0.01, 0.02), rng, 0.005)
    cy, cx = rng.uniform(24, 40, 2)
    add_light(image, ellipse_mask(cy, cx, 9, 8, rng.uniform(0, 3), soft=2), (0.15, 0.25, 0.95), 0.8)
    golgi_color = _jitter(rng, (0.95, 0.2, 0.75), 0.06)
    a = rng.uniform(0, 6.28)
    gy, gx = cy + 11 * np.sin(a), cx + 11 * np.cos(a)
    if label == "diffuse":
        add_light(image, ellipse_mask(cy, cx, 22, 22, soft=14), golgi_color, 0.45)
    elif label == "golgi_twin":
        for side in (-1, 1):
            add_light(
                image,
                ellipse_mask(gy + 6 * side * np.cos(a), gx - 6 * side * np.sin(a), 2.5, 3.5, a, soft=1),
                golgi_color,
                1.0,
            )
    elif label == "partly_disassembled":
        for _ in range(rng.integers(18, 30)):
            b, d = rng.uniform(0, 6.28), rng.uniform(6, 22)
            add_light(
                image,
                ellipse_mask(cy + d * np.sin(b), cx + d * np.cos(b), 1.0, 1.0, soft=0.7),
                golgi_color,
                0.9,
            )
    elif label == "interphase":
        add_light(image, ellipse_mask(gy, gx, 3, 8, a + np.pi / 2, soft=1.2), golgi_color, 1.0)
    else:
        raise ValueError(label)
    return finish(image, rng, 0.01, blur=0.4)


def em_ultrastructure(rng: np.random.Generator, label: str) -> np.ndarray:
    """Transmission EM ultrastructure: mitochondria, tobacco_leaf_chloroplast, cardiac_muscle, hela_metaphase."""
    grey = rng.uniform(0.55, 0.7)
    image = canvas((grey, grey, grey), rng, 0.0)
    image += smooth_noise(rng, 0.8)[..., None] * 0.05
    dark = (0.15, 0.15, 0.15)
    if label == "mitochondria":
        for _ in range(rng.integers(3, 6)):
            cy, cx = _pos(rng, 8)
            angle, ry, rx = rng.uniform(0, np.pi), rng.uniform(4, 6), rng.uniform(8, 12)
            paint(image, ellipse_mask(cy, cx, ry, rx, angle, soft=0.8), dark, 0.8)
            paint(image, ellipse_mask(cy, cx, ry - 1.2, rx - 1.2, angle, soft=0.8), (0.6, 0.6, 0.6))
            for k in np.linspace(-rx + 3, rx - 3, 4):
                y, x = cy + k * np.sin(angle), cx + k * np.cos(angle)
                paint(
                    image,
                    line_mask(
                        y - (ry - 1.5) * np.cos(angle),
                        x + (ry - 1.5) * np.sin(angle),
                        y + (ry - 1.5) * np.cos(angle),
                        x - (ry - 1.5) * np.sin(angle),
                        0.4,
                    ),
                    dark,
                    0.7,
                )
    elif label == "tobacco_leaf_chloroplast":
        cy, cx = rng.uniform(26, 38, 2)
        angle = rng.uniform(0, np.pi)
        paint(image, ellipse_mask(cy, cx, 16, 28, angle, soft=1), (0.75, 0.75, 0.75))
        for k in np.linspace(-10, 10, 7):
            y, x = cy + k * np.cos(angle), cx - k * np.sin(angle)
            paint(
                image,
                line_mask(
                    y - 14 * np.sin(angle),
                    x - 14 * np.cos(angle),
                    y + 14 * np.sin(angle),
                    x + 14 * np.cos(angle),
                    0.9,
                ),
                dark,
                0.8,
            )
    elif label == "cardiac_muscle":
        period, angle = rng.uniform(7, 10), rng.uniform(-0.3, 0.3)
        yy, xx = grid()
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) / period * 2 * np.pi
        bands = 0.5 + 0.5 * np.cos(phase)
        paint(image, bands * 0.6, dark, 0.7)
        paint(image, (np.cos(phase) > 0.97).astype(np.float32), (0.05, 0.05, 0.05), 0.9)
    elif label == "hela_metaphase":
        cy, cx = rng.uniform(24, 40, 2)
        for _ in range(rng.integers(12, 20)):
            a, d = rng.uniform(0, 6.28), rng.uniform(0, 12)
            paint(
                image,
                ellipse_mask(
                    cy + d * np.sin(a),
                    cx + d * np.cos(a),
                    1.3,
                    rng.uniform(3, 5),
                    rng.uniform(0, 3),
                    soft=0.6,
                ),
                (0.08, 0.08, 0.08),
                0.9,
            )
    else:
        raise ValueError(label)
    return finish(image, rng, 0.03, blur=0.3)
