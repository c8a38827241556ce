"""A small μ-Bench written by the tests themselves: every column, real PNG bytes, one corrupt image."""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from eval.schema import ubench_features

SOURCES = {
    "fix-tissue": (
        "pathology",
        "light microscopy",
        "brightfield",
        "H&E",
        "tissue",
        ["tumor", "stroma", "adipose"],
    ),
    "fix-cells": ("biology", "fluorescence microscopy", "confocal", "none", "cell", ["g1", "metaphase"]),
    "fix-em": (
        "biology",
        "electron microscopy",
        "transmission electron",
        "uranyl acetate",
        "subcellular",
        ["mitochondria", "cardiac_muscle"],
    ),
}
LABELS = [c for spec in SOURCES.values() for c in spec[5]]


def _png(rng: np.random.Generator, shade: int, size: int = 40) -> bytes:
    pixels = np.clip(rng.normal(shade, 40, (size, size + 8, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def fixture_rows(per_class: int = 6, seed: int = 0, corrupt: int = 1) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {name: [] for name in ubench_features(LABELS)}
    for source, (domain, modality, submodality, stain, scale, classes) in SOURCES.items():
        for c_index, label in enumerate(classes):
            for i in range(per_class):
                rows["image_id"].append(f"{source}-{label}-{i}")
                rows["image"].append({"bytes": _png(rng, 40 + 40 * c_index + 10 * len(source)), "path": None})
                rows["label"].append(LABELS.index(label))
                rows["label_name"].append(label)
                rows["dataset"].append(source)
                rows["domain"].append(domain)
                rows["institution"].append("test lab")
                rows["license"].append("CC-BY-SA-4.0")
                rows["pmid"].append("12345")
                rows["modality"].append(modality)
                rows["submodality"].append(submodality)
                rows["stain"].append(stain)
                rows["scale"].append(scale)
                rows["captions"].append(
                    {
                        "modality": f"A {modality} image.",
                        "submodality": submodality,
                        "domain": domain,
                        "stain": stain,
                        "label": f"An image of {label}.",
                    }
                )
                rows["questions"].append(
                    {"modality": "Which modality?", "domain": "Which domain?", "label": "Which class?"}
                )
    for k in range(corrupt):
        rows["image"][k * 5 + 1] = {"bytes": b"\x89PNG\r\n\x1a\n this is not an image", "path": None}
    return rows


def write_fixture(
    folder: Path, per_class: int = 6, seed: int = 0, corrupt: int = 1, fmt: str = "save_to_disk"
) -> Path:
    dataset = datasets.Dataset.from_dict(
        fixture_rows(per_class, seed, corrupt), features=ubench_features(LABELS)
    )
    if fmt == "save_to_disk":
        dataset.save_to_disk(str(folder))
    else:
        folder.mkdir(parents=True, exist_ok=True)
        dataset.to_parquet(str(folder / "test-00000-of-00001.parquet"))
    return folder
