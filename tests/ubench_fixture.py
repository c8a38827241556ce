"""A small μ-Bench written by the tests themselves, in the real structure.

Every fact comes from ../shared/ubench/SCHEMA.md (itself from the Hub file listing, the authors'
eVLLM code and rows dumped from the real shards):
- columns and their types, including `microns_per_pixel`, `synthetic`, `bbox`/`polygon` and no
  `scale` column ("Columns");
- captions as structs {id, name, question, answer_idx (a string), options, tags} under the keys
  modality_0/1, submodality_0/1, domain_0/1, stain_0/1, classification_0/1, null where a
  question does not apply (stain for fluorescence sources); options are the template filled with a
  few candidates, some of which occur in no row (domains cytology/radiology, stains Gram/Congo
  Red), then "none of the above" ("`captions`"); their number varies from image to image within
  a caption key ("a few candidate values (at most about 5)", "a per-image subset"): every other
  image here has one distractor fewer, so the evaluation pads shorter option lists end to end;
- questions as structs {answer, answer_idx (an int), id, name, options, question, tags} ("`questions`");
- Held et al. 2010 rows with a null `dataset`, source-specific classification template and
  `H2B-mCherry` polygons; `opencell` on the Hub but not in the paper; `image_id` not unique
  ("Facts that break naive loaders", "Rows");
- the Hub layout: Arrow stream shards `ubench-test-0000i-of-0000N.arrow` + `dataset_info.json`,
  no `state.json` ("Files on the Hub").
One extra column (`annotator_notes`) stands for columns a later release may add, and one image's
bytes are corrupt. `subdomain_sources` adds the `subdomain_0/1` caption pair that "may exist for
some sources; not confirmed" (SCHEMA.md, "`captions`"): filled for those sources, null for the rest.
"""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from micromerge.eval.hub_layout import write_hub_layout
from micromerge.eval.schema import CAPTION_KEYS, NONE_OF_THE_ABOVE, QUESTION_KEYS, ubench_features

TEMPLATES = {
    "modality": ("A micrograph acquired through {class}.", "A microscopy image obtained through {class}."),
    "submodality": ("A {class} image.", "An image captured with {class}."),
    "domain": ("A micrograph, typically studied in {class}.", "A microscopy image used in {class}."),
    "stain": ("A micrograph stained with {class}.", "A specimen prepared with {class} staining."),
}
SUBDOMAIN_TEMPLATES = ("A micrograph from {class}.", "A microscopy image studied in {class}.")
SUBDOMAIN_CAPTION_KEYS = ("subdomain_0", "subdomain_1")
DISTRACTORS = {  # candidate values, some of which occur in no row
    "modality": ["light microscopy", "fluorescence microscopy", "electron microscopy", "X-ray imaging"],
    "submodality": [
        "brightfield microscopy",
        "darkfield microscopy",
        "epifluorescence microscopy",
        "cryo-electron tomography",
        "ultrasound",
    ],
    "domain": ["pathology", "biology", "cytology", "radiology", "dermatology"],
    "stain": ["H&E", "Gram", "Congo Red", "Giemsa", "PAS"],
    "subdomain": ["gastrointestinal pathology", "cardiovascular pathology", "cell biology", "neuropathology"],
}
# dataset: (domain, subdomain, modality, submodality, stain, microns/pixel, classes, templates, polygon class)
SOURCES = {
    "kather_et_al_2016": (
        "pathology",
        "gastrointestinal pathology",
        "light microscopy",
        "brightfield microscopy",
        "H&E",
        0.5,
        ["adipose", "stroma", "tumor"],
        ("An H&E micrograph of colorectal {class}.", "A colorectal tissue tile showing {class}."),
        "tissue",
    ),
    "nirschl_et_al_2018": (
        "pathology",
        "cardiovascular pathology",
        "light microscopy",
        "brightfield microscopy",
        "H&E",
        0.5,
        ["chronic_heart_failure", "not_chronic_heart_failure"],
        ("An H&E micrograph of {class}.", "A micrograph of cardiac tissue from a patient with {class}."),
        "myocyte",
    ),
    None: (  # Held et al. 2010 (CellCognition): the dataset value is null on the Hub
        "biology",
        "cell biology",
        "fluorescence microscopy",
        "epifluorescence microscopy",
        None,
        0.2,
        ["anaphase", "interphase", "metaphase"],
        (
            "H2B-mCherry labelled chromatin in {class}.",
            "HeLa cell nuclei imaged live during {class}.",
        ),
        "H2B-mCherry",
    ),
    "eulenberg_et_al_2017_darkfield": (
        "biology",
        "cell biology",
        "light microscopy",
        "darkfield microscopy",
        None,
        0.3,
        ["g1", "g2", "prophase"],
        (
            "A darkfield image of a cell in {class}.",
            "A flow cytometry image of a cell in {class}.",
        ),
        "cell",
    ),
    "opencell": (
        "biology",
        "cell biology",
        "fluorescence microscopy",
        "epifluorescence microscopy",
        None,
        0.2,
        ["mitochondria", "nucleolus"],
        ("A fluorescence image of a protein localised to the {class}.", "OpenCell: {class} localisation."),
        "protein",
    ),
}
ALL_CLASSES = sorted({c for spec in SOURCES.values() for c in spec[6]} | {"unused_class"})


def _png(rng: np.random.Generator, shade: int, size: int = 40) -> bytes:
    pixels = np.clip(rng.normal(shade, 40, (size, size + 8, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _pick(rng: np.random.Generator, answer: str, pool: list[str], distractors: int) -> list[str]:
    """A per-image subset: the answer and up to `distractors` others, shuffled."""
    others = [v for v in pool if v != answer]
    picked = [answer, *rng.choice(others, size=min(distractors, len(others)), replace=False).tolist()]
    rng.shuffle(picked)
    return picked


def _options(
    rng: np.random.Generator, template: str, answer: str, pool: list[str], fewer: bool
) -> tuple[list[str], int]:
    """The template filled with the answer and three distractors (two when `fewer`, where the pool
    allows), then none of the above. The dropped distractor is taken after the draw, so the
    random stream, and with it every image, is the same either way."""
    picked = _pick(rng, answer, pool, 3)
    if fewer and len(picked) > 2:
        picked.remove(next(v for v in reversed(picked) if v != answer))
    return [template.replace("{class}", v) for v in picked] + [NONE_OF_THE_ABOVE], picked.index(answer)


def _caption(rng, key: str, template: str, answer: str | None, pool: list[str], fewer: bool) -> dict | None:
    if answer is None:
        return None
    options, index = _options(rng, template, answer, pool, fewer)
    return {
        "id": f"{key}-{answer}",
        "name": key,
        "question": template,
        "answer_idx": str(index),
        "options": options,
        "tags": [key.rsplit("_", 1)[0]],
    }


def _question(rng, key: str, answer: str | None, pool: list[str]) -> dict | None:
    if answer is None:
        return None
    picked = _pick(rng, answer, pool, 2)
    return {
        "answer": answer,
        "answer_idx": picked.index(answer),
        "id": f"q-{key}",
        "name": key,
        "options": [*picked, NONE_OF_THE_ABOVE],
        "question": f"Which {key} best describes this image?",
        "tags": [key],
    }


def fixture_rows(
    per_class: int = 6, seed: int = 0, corrupt: int = 1, subdomain_sources: tuple[str | None, ...] = ()
) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {name: [] for name in ubench_features(ALL_CLASSES)}
    rows["annotator_notes"] = []
    for s_index, (source, spec) in enumerate(SOURCES.items()):
        domain, subdomain, modality, submodality, stain, mpp, classes, fine_templates, polygon_class = spec
        values = {"modality": modality, "submodality": submodality, "domain": domain, "stain": stain}
        for c_index, label in enumerate(classes):
            for i in range(per_class):
                shade = 40 + 45 * c_index + 12 * s_index
                rows["image_id"].append(f"{i:04d}.png")  # not unique, as on the Hub
                rows["image"].append({"bytes": _png(rng, shade), "path": None})
                rows["label"].append(ALL_CLASSES.index(label))
                rows["label_name"].append(label)
                rows["dataset"].append(source)
                rows["domain"].append(domain)
                rows["institution"].append("test lab")
                rows["license"].append("CC-BY-SA-4.0")
                rows["microns_per_pixel"].append(mpp)
                rows["modality"].append(modality)
                rows["ncbitaxon_id"].append("9606")
                rows["ncbitaxon_name"].append("Homo sapiens")
                rows["pmid"].append(None if source == "opencell" else "12345")
                rows["split"].append("test")
                rows["stain"].append(stain)
                rows["subdomain"].append(subdomain)
                rows["submodality"].append(submodality)
                rows["synthetic"].append(False)
                captions = {}
                fewer = i % 2 == 1
                for kind, templates in TEMPLATES.items():
                    for variant, template in enumerate(templates):
                        key = f"{kind}_{variant}"
                        captions[key] = _caption(rng, key, template, values[kind], DISTRACTORS[kind], fewer)
                for variant, template in enumerate(fine_templates):
                    key = f"classification_{variant}"
                    captions[key] = _caption(rng, key, template, label, classes, fewer)
                if subdomain_sources:  # drawn only then: the default fixture's stream is unchanged
                    for key, template in zip(SUBDOMAIN_CAPTION_KEYS, SUBDOMAIN_TEMPLATES, strict=True):
                        asked = source in subdomain_sources
                        pool = DISTRACTORS["subdomain"]
                        captions[key] = (
                            _caption(rng, key, template, subdomain, pool, fewer) if asked else None
                        )
                rows["captions"].append(captions)
                answers = {**values, "subdomain": subdomain, "classification": label}
                pools = {
                    **DISTRACTORS,
                    "subdomain": ["cell biology", "neuropathology"],
                    "classification": classes,
                }
                rows["questions"].append({k: _question(rng, k, answers[k], pools[k]) for k in QUESTION_KEYS})
                rows["bbox"].append([])
                rows["polygon"].append(
                    [{"className": polygon_class, "points": [[1.0, 2.0], [3.0, 4.0], [5.0, 1.0]]}]
                )
                rows["annotator_notes"].append(None)
    for k in range(corrupt):
        rows["image"][k * 5 + 1] = {"bytes": b"\x89PNG\r\n\x1a\n this is not an image", "path": None}
    return rows


def fixture_features(subdomain_captions: bool = False) -> datasets.Features:
    keys = CAPTION_KEYS + (SUBDOMAIN_CAPTION_KEYS if subdomain_captions else ())
    return datasets.Features(
        {**ubench_features(ALL_CLASSES, keys), "annotator_notes": datasets.Value("string")}
    )


def fixture_dataset(
    per_class: int = 6, seed: int = 0, corrupt: int = 1, subdomain_sources: tuple[str | None, ...] = ()
) -> datasets.Dataset:
    rows = fixture_rows(per_class, seed, corrupt, subdomain_sources)
    return datasets.Dataset.from_dict(rows, features=fixture_features(bool(subdomain_sources)))


def write_fixture(
    folder: Path,
    per_class: int = 6,
    seed: int = 0,
    corrupt: int = 1,
    fmt: str = "hub",
    shards: int = 7,
    subdomain_sources: tuple[str | None, ...] = (),
) -> Path:
    """Write the fixture as the Hub lays it out (`fmt="hub"`: FOLDER/perception/0.1.0/...,
    returns that inner folder), as a save_to_disk folder, or as a parquet file."""
    dataset = fixture_dataset(per_class, seed, corrupt, subdomain_sources)
    if fmt == "hub":
        return write_hub_layout(dataset, folder / "perception" / "0.1.0", shards)
    if fmt == "save_to_disk":
        dataset.save_to_disk(str(folder))
    else:
        folder.mkdir(parents=True, exist_ok=True)
        dataset.to_parquet(str(folder / "test-00000-of-00001.parquet"))
    return folder
