"""Load μ-Bench (hub id `jnirschl/uBench`, or a local copy) and validate its schema on load.

Follows ../shared/ubench/SCHEMA.md: required columns are checked by name and type; every
other column (institution, license, pmid, captions, questions, modality, ...) is optional
and kept. A local copy may be a `save_to_disk` folder (Dataset or DatasetDict) or a folder
of parquet/arrow files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
from datasets import ClassLabel, Image, Value

from micromerge.errors import MicromergeError
from micromerge.hashing import sha256_json

HUB_ID = "jnirschl/uBench"
HUB_ALIASES = ("ubench", HUB_ID)
REQUIRED_STRING_COLUMNS = ("image_id", "label_name", "dataset", "domain")


@dataclass
class Benchmark:
    dataset: datasets.Dataset
    source: str
    fingerprint: str


def column_values(dataset: datasets.Dataset, name: str) -> list:
    """A whole column as a list, read in one slice. In datasets >= 4, `dataset[name]` is a lazy
    Column whose item indexing reads one row at a time (~0.5 ms each: minutes for μ-Bench's 17k
    rows when a loop indexes it); older versions already return a list, which the slice copies."""
    return dataset[name][:]


def load_benchmark(source: str, split: str = "test") -> Benchmark:
    """Open μ-Bench from the hub/cache (`ubench`) or a local folder, then validate it."""
    if source in HUB_ALIASES:
        try:
            dataset = datasets.load_dataset(HUB_ID, split=split)
        except Exception as exc:
            raise MicromergeError(
                f"--data {source}: cannot load {HUB_ID} from the hub or its cache ({type(exc).__name__}); with no "
                "network, copy it where there is one (`datasets.load_dataset('jnirschl/uBench', split='test')"
                ".save_to_disk(DIR)`) and pass --data DIR (HF_DATASETS_OFFLINE=1 fails fast)"
            ) from exc
    else:
        dataset = _load_local(Path(source), split)
    validate_schema(dataset, source)
    fingerprint = sha256_json(
        {"fingerprint": getattr(dataset, "_fingerprint", ""), "rows": len(dataset), "split": split}
    )
    return Benchmark(dataset, source, fingerprint[:16])


def _load_local(path: Path, split: str) -> datasets.Dataset:
    if not path.exists():
        raise MicromergeError(f"--data {path}: no such folder (use 'ubench' for the hub copy)")
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise MicromergeError(f"--data {path}: has splits {sorted(loaded)}, not {split!r}")
            loaded = loaded[split]
        return loaded
    for kind, pattern in (("parquet", "**/*.parquet"), ("arrow", "**/*.arrow")):
        files = sorted(str(p) for p in path.glob(pattern))
        if files:
            return datasets.load_dataset(kind, data_files={split: files}, split=split)
    raise MicromergeError(f"--data {path}: not a save_to_disk folder and holds no .parquet or .arrow files")


def validate_schema(dataset: datasets.Dataset, source: str) -> None:
    features = dataset.features
    missing = [c for c in ("image", "label", *REQUIRED_STRING_COLUMNS) if c not in features]
    if missing:
        raise MicromergeError(
            f"--data {source}: missing required column(s) {missing} (μ-Bench schema: see shared/ubench/SCHEMA.md)"
        )
    if not isinstance(features["image"], Image):
        raise MicromergeError(
            f"--data {source}: column 'image' must be a datasets Image, not {features['image']}"
        )
    label = features["label"]
    if not (isinstance(label, ClassLabel) or (isinstance(label, Value) and label.dtype.startswith("int"))):
        raise MicromergeError(
            f"--data {source}: column 'label' must be a ClassLabel (or integer), not {label}"
        )
    for column in REQUIRED_STRING_COLUMNS:
        feature = features[column]
        if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
            raise MicromergeError(f"--data {source}: column {column!r} must be a string, not {feature}")
    if len(dataset) == 0:
        raise MicromergeError(f"--data {source}: the split has no rows")
