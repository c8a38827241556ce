"""Prompt templates per kind of task, in one place (CLIP-style ensembles, as μ-Bench scores them)."""

from __future__ import annotations

TEMPLATES: dict[str, tuple[str, ...]] = {
    "modality": ("a {} image.", "a microscopy image acquired with {}.", "an image taken by {}."),
    "submodality": ("a {} microscopy image.", "an image acquired with {}.", "a micrograph, {}."),
    "domain": ("a microscopy image from {}.", "a {} image.", "a micrograph used in {}."),
    "subdomain": ("a microscopy image from {}.", "a micrograph studied in {}.", "an image of {}."),
    "stain": ("a tissue section stained with {}.", "a {} stained image.", "microscopy with {} staining."),
    "fine_grained": ("a microscopy image of {}.", "an image showing {}.", "a micrograph of {}.", "{}."),
}


def class_text(label_name: str) -> str:
    """Turn a label name into readable words (`smooth_contours` -> `smooth contours`)."""
    return label_name.replace("_", " ").strip()
