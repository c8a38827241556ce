"""Write the synthetic benchmark (μ-Bench schema, save_to_disk) and its image-caption corpora.

Every image has its own seed derived from (seed, split, source, class, index), so the output
is the same on every run and machine, and the benchmark never shares an image with a corpus.
"""

from __future__ import annotations

import io
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from eval.prompts import class_text
from eval.schema import ubench_features
from eval.synthetic.spec import SOURCES, SyntheticSource, all_label_names
from micromerge.errors import MicromergeError

_SPLIT_CODES = {"benchmark": 0, "general": 1, "pathology": 2}


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _render_png(job: tuple[int, int, int, int, int]) -> bytes:
    seed, split, source_index, class_index, index = job
    source = SOURCES[source_index]
    rng = np.random.default_rng([seed, split, source_index, class_index, index])
    return _png(source.render(rng, source.classes[class_index]))


def _render_all(jobs: list[tuple[int, int, int, int, int]], workers: int) -> list[bytes]:
    if workers <= 1:
        return [_render_png(job) for job in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_render_png, jobs, chunksize=64))


def _stain_phrase(source: SyntheticSource) -> str:
    return "" if source.stain == "none" else source.stain


def _captions(source: SyntheticSource, label: str) -> dict[str, str]:
    stain = _stain_phrase(source)
    return {
        "modality": f"A {source.modality} image.",
        "submodality": f"A {source.submodality} {source.modality.split()[0]} micrograph.",
        "domain": f"A microscopy image from {source.domain}.",
        "stain": f"A section stained with {stain}." if stain else "",
        "label": f"{source.modality.capitalize()} of {source.subject} showing {class_text(label)}.",
    }


def _questions(source: SyntheticSource) -> dict[str, str]:
    return {
        "modality": "Which microscopy modality acquired this image?",
        "domain": "Is this image from pathology or biology?",
        "label": f"Which class of {source.subject} does this image show?",
    }


def write_benchmark(out_dir: Path, seed: int = 0, per_class: int = 40, workers: int = 2) -> datasets.Dataset:
    """The synthetic μ-Bench test split: every required column plus captions and questions."""
    if per_class < 2:
        raise MicromergeError(f"--per-class {per_class}: need at least 2 images per class")
    jobs, meta = [], []
    for s_index, source in enumerate(SOURCES):
        for c_index, label in enumerate(source.classes):
            for i in range(per_class):
                jobs.append((seed, _SPLIT_CODES["benchmark"], s_index, c_index, i))
                meta.append((source, label, i))
    images = _render_all(jobs, workers)
    names = all_label_names()
    rows = {column: [] for column in ubench_features(names)}
    for (source, label, i), png in zip(meta, images, strict=True):
        rows["image_id"].append(f"{source.dataset}-{label}-{i:04d}")
        rows["image"].append({"bytes": png, "path": None})
        rows["label"].append(names.index(label))
        rows["label_name"].append(label)
        rows["dataset"].append(source.dataset)
        rows["domain"].append(source.domain)
        rows["institution"].append("micromerge synthetic")
        rows["license"].append("CC0-1.0")
        rows["pmid"].append("")
        rows["modality"].append(source.modality)
        rows["submodality"].append(source.submodality)
        rows["stain"].append(source.stain)
        rows["scale"].append(source.scale)
        rows["captions"].append(_captions(source, label))
        rows["questions"].append(_questions(source))
    dataset = datasets.Dataset.from_dict(rows, features=ubench_features(names))
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
    rng = np.random.default_rng([seed, _SPLIT_CODES[kind]])
    jobs, captions, labels = [], [], []
    for s_index, source in enumerate(SOURCES):
        if kind == "pathology" and source.domain != "pathology":
            continue
        for c_index, label in enumerate(source.classes):
            for i in range(per_class):
                jobs.append((seed, _SPLIT_CODES[kind], s_index, c_index, i))
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
