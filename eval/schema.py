"""μ-Bench's features (datasets schema), for writers of benchmark files: the synthetic
generator and the test fixtures write exactly what the loader reads from the real dataset."""

from __future__ import annotations

from datasets import ClassLabel, Features, Image, Value

CAPTION_KEYS = ("modality", "submodality", "domain", "stain", "label")
QUESTION_KEYS = ("modality", "domain", "label")
OPTIONAL_STRING_COLUMNS = ("institution", "license", "pmid", "modality", "submodality", "stain", "scale")


def ubench_features(label_names: list[str]) -> Features:
    """Required columns, the optional ones we write, and the captions/questions dicts."""
    return Features(
        {
            "image_id": Value("string"),
            "image": Image(),
            "label": ClassLabel(names=label_names),
            "label_name": Value("string"),
            "dataset": Value("string"),
            "domain": Value("string"),
            **{column: Value("string") for column in OPTIONAL_STRING_COLUMNS if column != "domain"},
            "captions": {key: Value("string") for key in CAPTION_KEYS},
            "questions": {key: Value("string") for key in QUESTION_KEYS},
        }
    )
