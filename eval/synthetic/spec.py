"""The synthetic benchmark's sources, registered in one place, mirroring μ-Bench's structure."""

from __future__ import annotations

from dataclasses import dataclass

from micromerge.eval.synthetic import renderers
from micromerge.eval.synthetic.renderers import Renderer


@dataclass(frozen=True)
class SyntheticSource:
    dataset: str
    domain: str
    modality: str
    submodality: str
    stain: str  # "none": the benchmark's stain column and stain captions are null, as on the Hub
    subdomain: str
    microns_per_pixel: float
    classes: tuple[str, ...]
    render: Renderer
    subject: str
    null_dataset: bool = False  # written with a null `dataset`, like Held et al. 2010 on the Hub


SOURCES: tuple[SyntheticSource, ...] = (
    SyntheticSource(
        "synth-colorectal-tissue",
        "pathology",
        "light microscopy",
        "brightfield",
        "H&E",
        "gastrointestinal pathology",
        0.5,
        ("adipose", "tumor", "stroma", "lymphocytes", "mucus"),
        renderers.colorectal_tissue,
        "colorectal tissue",
    ),
    SyntheticSource(
        "synth-blood-cells",
        "pathology",
        "light microscopy",
        "brightfield",
        "Wright-Giemsa",
        "hematopathology",
        0.25,
        ("lymphocyte", "neutrophil", "eosinophil", "monocyte"),
        renderers.blood_cells,
        "a peripheral blood smear",
    ),
    SyntheticSource(
        "synth-ihc-intensity",
        "pathology",
        "light microscopy",
        "brightfield",
        "IHC DAB",
        "breast pathology",
        0.5,
        ("very_weak", "weak", "moderate", "strong"),
        renderers.ihc_staining,
        "immunohistochemistry staining",
    ),
    SyntheticSource(
        "synth-cell-cycle",
        "biology",
        "fluorescence microscopy",
        "widefield",
        "none",
        "cell biology",
        0.3,
        ("g1", "g2", "prophase", "metaphase", "anaphase"),
        renderers.cell_cycle,
        "a cell nucleus",
    ),
    SyntheticSource(
        "synth-golgi-phenotypes",
        "biology",
        "fluorescence microscopy",
        "confocal",
        "none",
        "cell biology",
        0.1,
        ("diffuse", "golgi_twin", "partly_disassembled", "interphase"),
        renderers.golgi,
        "the Golgi apparatus",
        null_dataset=True,
    ),
    SyntheticSource(
        "synth-em-ultrastructure",
        "biology",
        "electron microscopy",
        "transmission electron",
        "none",
        "ultrastructural biology",
        0.005,
        ("mitochondria", "tobacco_leaf_chloroplast", "cardiac_muscle", "hela_metaphase"),
        renderers.em_ultrastructure,
        "cell ultrastructure",
    ),
)


def all_label_names() -> list[str]:
    """The one global ClassLabel list spanning every source, as μ-Bench has."""
    return [c for source in SOURCES for c in source.classes]
