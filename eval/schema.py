"""μ-Bench's features as published (`jnirschl/uBench`, `perception/0.1.0`), for everything that
writes or checks benchmark files: the synthetic generator, the test fixtures and the loader.

Source of every fact: ../shared/ubench/SCHEMA.md (the Hub file listing, the authors' eVLLM code
and rows dumped from the real shards). Where that file is silent, the choice made here is said:
the element types of `tags` and of annotation `points` (lists of strings and of [x, y] float
pairs) and the string type of `pmid`/`ncbitaxon_id` are this project's reading, not confirmed.
"""

from __future__ import annotations

from datasets import ClassLabel, Features, Image, Sequence, Value

NONE_OF_THE_ABOVE = "none of the above"
# The caption keys seen in the real rows; a `subdomain_*` pair may exist for some sources
# (not confirmed), and the task registry reads whatever `<kind>_<n>` keys the data holds.
CAPTION_KINDS = ("modality", "submodality", "domain", "stain", "classification")
CAPTION_KEYS = tuple(f"{kind}_{variant}" for kind in CAPTION_KINDS for variant in (0, 1))
QUESTION_KEYS = ("classification", "domain", "modality", "stain", "subdomain", "submodality")
REQUIRED_STRING_COLUMNS = ("image_id", "label_name", "domain")
# The nullable text columns that tasks and their groups read, so a loader checks their type. The
# other metadata columns (institution, license, ncbitaxon_*, pmid, split) are read by nothing here,
# and the types of pmid and ncbitaxon_id are not confirmed (numbers are as likely as text): a copy
# is not refused over them.
TASK_METADATA_COLUMNS = ("dataset", "modality", "stain", "subdomain", "submodality")


def caption_feature() -> dict:
    """One caption question: the template, the per-image options and the answer index
    (a string in the real rows, e.g. "2")."""
    return {
        "id": Value("string"),
        "name": Value("string"),
        "question": Value("string"),
        "answer_idx": Value("string"),
        "options": Sequence(Value("string")),
        "tags": Sequence(Value("string")),
    }


def question_feature() -> dict:
    """One question for generative models: short options, the answer and its index (an int)."""
    return {
        "answer": Value("string"),
        "answer_idx": Value("int64"),
        "id": Value("string"),
        "name": Value("string"),
        "options": Sequence(Value("string")),
        "question": Value("string"),
        "tags": Sequence(Value("string")),
    }


def annotation_feature() -> list:
    """`bbox` / `polygon`: lists of {className, points}."""
    return [{"className": Value("string"), "points": Sequence(Sequence(Value("float64")))}]


def ubench_features(label_names: list[str], caption_keys: tuple[str, ...] = CAPTION_KEYS) -> Features:
    """Every column of the real dataset, in the Hub's order."""
    return Features(
        {
            "image_id": Value("string"),
            "image": Image(),
            "label": ClassLabel(names=label_names),
            "label_name": Value("string"),
            "dataset": Value("string"),
            "domain": Value("string"),
            "institution": Value("string"),
            "license": Value("string"),
            "microns_per_pixel": Value("float64"),
            "modality": Value("string"),
            "ncbitaxon_id": Value("string"),
            "ncbitaxon_name": Value("string"),
            "pmid": Value("string"),
            "split": Value("string"),
            "stain": Value("string"),
            "subdomain": Value("string"),
            "submodality": Value("string"),
            "synthetic": Value("bool"),
            "captions": {key: caption_feature() for key in caption_keys},
            "questions": {key: question_feature() for key in QUESTION_KEYS},
            "bbox": annotation_feature(),
            "polygon": annotation_feature(),
        }
    )
