"""Write the synthetic benchmark (μ-Bench's real schema and Hub layout) and its image-caption corpora.

Every image has its own seed derived from (seed, split, source, class, index), so the output
is the same on every run and machine, and the benchmark never shares an image with a corpus.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from micromerge.core.errors import MicromergeError
from micromerge.eval.hub_layout import HUB_FOLDER, write_hub_layout
from micromerge.eval.prompts import class_text
from micromerge.eval.schema import NONE_OF_THE_ABOVE, QUESTION_KEYS, ubench_features
from micromerge.eval.synthetic import SYNTHETIC_INSTITUTION
from micromerge.eval.synthetic.spec import SOURCES, SyntheticSource, all_label_names

SPLIT_CODES = {"benchmark": 0, "general": 1, "pathology": 2}


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def render_pixels(seed: int, split: int, source_index: int, class_index: int, index: int) -> np.ndarray:
    """One image, drawn from its own seed alone (see the module's docstring); `split` is a
    value of SPLIT_CODES."""
    source = SOURCES[source_index]
    rng = np.random.default_rng([seed, split, source_index, class_index, index])
    return source.render(rng, source.classes[class_index])


def _render_png(job: tuple[int, int, int, int, int]) -> bytes:
    return _png(render_pixels(*job))


def _render_all(jobs: list[tuple[int, int, int, int, int]], workers: int) -> list[bytes]:
    if workers <= 1:
        return [_render_png(job) for job in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_render_png, jobs, chunksize=64))


def _stain_phrase(source: SyntheticSource) -> str:
    return "" if source.stain == "none" else source.stain


# Caption templates in μ-Bench's shape (shared/ubench/SCHEMA.md): two variants per coarse kind,
# `{class}` filled with each candidate; the classification pair is per source.
CAPTION_TEMPLATES = {
    "modality": ("A micrograph acquired through {class}.", "A microscopy image obtained through {class}."),
    "submodality": ("A micrograph taken with {class}.", "An image captured by {class}."),
    "domain": ("A micrograph, typically studied in {class}.", "A microscopy image from {class}."),
    "stain": ("A micrograph stained with {class}.", "A section prepared with {class} staining."),
}
# Candidate values per coarse kind; some occur in no row, as the real distractors do.
CAPTION_DISTRACTORS = {
    "modality": ("light microscopy", "fluorescence microscopy", "electron microscopy", "X-ray imaging"),
    "submodality": (
        "brightfield microscopy",
        "widefield microscopy",
        "confocal microscopy",
        "transmission electron microscopy",
        "phase contrast microscopy",
    ),
    "domain": ("pathology", "biology", "cytology", "radiology", "dermatology"),
    "stain": ("H&E", "Wright-Giemsa", "IHC DAB", "Gram", "Congo Red"),
}
OPTION_DISTRACTORS = 3  # candidates besides the answer, then "none of the above"


def classification_templates(source: SyntheticSource) -> tuple[str, str]:
    """The per-source classification pair; the null-dataset source's template names it for the
    source table's rule (eval/ubench_sources.toml: null_dataset_match)."""
    if source.null_dataset:
        return ("A synthetic organelle micrograph showing {class}.", "Organelle phenotype: {class}.")
    return (
        f"{source.modality.capitalize()} of {source.subject} showing {{class}}.",
        f"A {source.domain} micrograph of {{class}}.",
    )


def _column_values(source: SyntheticSource) -> dict[str, str | None]:
    return {
        "modality": source.modality,
        "submodality": f"{source.submodality} microscopy",
        "domain": source.domain,
        "stain": None if source.stain == "none" else source.stain,
    }


def _candidates(rng: np.random.Generator, answer: str, pool: Sequence[str]) -> list[str]:
    """The answer and up to OPTION_DISTRACTORS others from `pool`, shuffled (a per-image subset)."""
    others = [v for v in pool if v != answer]
    picked = [answer, *rng.choice(others, size=min(OPTION_DISTRACTORS, len(others)), replace=False).tolist()]
    rng.shuffle(picked)
    return picked


def _caption(rng: np.random.Generator, key: str, template: str, answer: str, pool: Sequence[str]) -> dict:
    picked = _candidates(rng, answer, pool)
    return {
        "id": f"{key}:{answer}",
        "name": key,
        "question": template,
        "answer_idx": str(picked.index(answer)),
        "options": [template.replace("{class}", class_text(v)) for v in picked] + [NONE_OF_THE_ABOVE],
        "tags": [key.rsplit("_", 1)[0]],
    }


def _question(rng: np.random.Generator, kind: str, answer: str, pool: Sequence[str]) -> dict:
    picked = _candidates(rng, answer, pool)
    return {
        "answer": answer,
        "answer_idx": picked.index(answer),
        "id": f"{kind}:{answer}",
        "name": kind,
        "options": [*picked, NONE_OF_THE_ABOVE],
        "question": f"Which {kind} best describes this image?",
        "tags": [kind],
    }


def _captions_and_questions(
    rng: np.random.Generator, source: SyntheticSource, label: str
) -> tuple[dict, dict]:
    values = _column_values(source)
    captions: dict[str, dict | None] = {}
    for kind, templates in CAPTION_TEMPLATES.items():
        for variant, template in enumerate(templates):
            key = f"{kind}_{variant}"
            answer = values[kind]
            captions[key] = (
                None if answer is None else _caption(rng, key, template, answer, CAPTION_DISTRACTORS[kind])
            )
    for variant, template in enumerate(classification_templates(source)):
        captions[f"classification_{variant}"] = _caption(
            rng, f"classification_{variant}", template, label, source.classes
        )
    subdomains = sorted({s.subdomain for s in SOURCES})
    answers = {**values, "subdomain": source.subdomain, "classification": label}
    pools = {**CAPTION_DISTRACTORS, "subdomain": subdomains, "classification": source.classes}
    questions = {
        kind: None if (answer := answers[kind]) is None else _question(rng, kind, answer, pools[kind])
        for kind in QUESTION_KEYS
    }
    return captions, questions


def write_benchmark(
    out_dir: Path, seed: int = 0, per_class: int = 40, workers: int = 2, layout: str = "hub", shards: int = 7
) -> datasets.Dataset:
    """The synthetic μ-Bench test split in the real schema, written as the Hub lays it out
    (`layout="hub"`: OUT/perception/0.1.0/ with Arrow stream shards) or with save_to_disk."""
    if per_class < 2:
        raise MicromergeError(f"--per-class {per_class}: need at least 2 images per class")
    jobs, meta = [], []
    for s_index, source in enumerate(SOURCES):
        for c_index, label in enumerate(source.classes):
            for i in range(per_class):
                jobs.append((seed, SPLIT_CODES["benchmark"], s_index, c_index, i))
                meta.append((s_index, c_index, source, label, i))
    images = _render_all(jobs, workers)
    names = all_label_names()
    rows: dict[str, list] = {column: [] for column in ubench_features(names)}
    for (s_index, c_index, source, label, i), png in zip(meta, images, strict=True):
        rng = np.random.default_rng([seed, SPLIT_CODES["benchmark"], s_index, c_index, i, 1])
        values = _column_values(source)
        captions, questions = _captions_and_questions(rng, source, label)
        rows["image_id"].append(f"{label}_{i:04d}.png")
        rows["image"].append({"bytes": png, "path": None})
        rows["label"].append(names.index(label))
        rows["label_name"].append(label)
        rows["dataset"].append(None if source.null_dataset else source.dataset)
        rows["domain"].append(source.domain)
        rows["institution"].append(SYNTHETIC_INSTITUTION)
        rows["license"].append("CC0-1.0")
        rows["microns_per_pixel"].append(source.microns_per_pixel)
        rows["modality"].append(values["modality"])
        rows["ncbitaxon_id"].append(None)
        rows["ncbitaxon_name"].append(None)
        rows["pmid"].append(None)
        rows["split"].append("test")
        rows["stain"].append(values["stain"])
        rows["subdomain"].append(source.subdomain)
        rows["submodality"].append(values["submodality"])
        rows["synthetic"].append(True)
        rows["captions"].append(captions)
        rows["questions"].append(questions)
        rows["bbox"].append([])
        marker = "synthetic organelle marker" if source.null_dataset else source.subject
        rows["polygon"].append([{"className": marker, "points": []}])
    dataset = datasets.Dataset.from_dict(rows, features=ubench_features(names))
    if layout == "hub":
        write_hub_layout(dataset, out_dir / HUB_FOLDER, shards)
    else:
        dataset.save_to_disk(str(out_dir))
    return dataset


GENERAL_TEMPLATES = (
    "{cls}, {subject}. {modality}, {submodality}.",
    "a {submodality} {modality} image of {subject} showing {cls}",
    "{domain} micrograph: {cls}{stain_paren}",
    "{modality} of {cls}",
    "{cls}",
    "example of {cls} from a {domain} study, imaged by {modality}",
    "{submodality} image, {domain}",
    "{modality}",
    "{stain_words}{domain} sample: {subject}",
)
GENERIC_TEMPLATES = (
    "{stain_words}{domain} slide of {subject}",
    "{modality}, {submodality}: {subject}",
    "a {domain} image ({stain})",
    "{subject} under {modality}",
)
# How often a general-corpus caption of a pathology image names its fine-grained class: like web
# data for OpenAI CLIP, the general corpus mostly describes pathology generically, which is what
# leaves room for a pathology specialist to gain.
GENERAL_PATHOLOGY_CLASS_RATE = 0.08
PATHOLOGY_TEMPLATES = (
    "#pathology {cls} seen in {stain}-stained {subject}",
    "{stain}: {cls}",
    "pathology case, {subject}, {cls} on {modality}",
    "look at this {cls} ({stain}, {submodality})",
    "{cls} in {subject}",
)


def caption_for(
    rng: np.random.Generator, source: SyntheticSource, label: str, templates: tuple[str, ...]
) -> str:
    stain = _stain_phrase(source)
    template = templates[rng.integers(len(templates))]
    return template.format(
        cls=class_text(label),
        subject=source.subject,
        modality=source.modality,
        submodality=source.submodality,
        domain=source.domain,
        stain=stain or source.modality,
        stain_paren=f" ({stain} stain)" if stain else "",
        stain_words=f"{stain} stained " if stain else "",
    ).strip()


def write_corpus(
    out_dir: Path, kind: str, seed: int = 0, per_class: int = 300, workers: int = 2
) -> datasets.Dataset:
    """Image-caption pairs: `general` spans every source (pretraining), `pathology` only pathology ones."""
    if kind not in ("general", "pathology"):
        raise MicromergeError(f"corpus kind {kind!r}: expected general or pathology")
    templates = GENERAL_TEMPLATES if kind == "general" else PATHOLOGY_TEMPLATES
    rng = np.random.default_rng([seed, SPLIT_CODES[kind]])
    jobs, captions, labels = [], [], []
    for s_index, source in enumerate(SOURCES):
        if kind == "pathology" and source.domain != "pathology":
            continue
        for c_index, label in enumerate(source.classes):
            for i in range(per_class):
                jobs.append((seed, SPLIT_CODES[kind], s_index, c_index, i))
                generic = (
                    kind == "general"
                    and source.domain == "pathology"
                    and rng.random() > GENERAL_PATHOLOGY_CLASS_RATE
                )
                captions.append(caption_for(rng, source, label, GENERIC_TEMPLATES if generic else templates))
                labels.append(f"{source.dataset}/{label}")
    images = _render_all(jobs, workers)
    features = datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Value("string"), "source": datasets.Value("string")}
    )
    dataset = datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in images], "caption": captions, "source": labels},
        features=features,
    )
    dataset.save_to_disk(str(out_dir))
    return dataset
