"""Load μ-Bench however a user holds it, and validate it against the real schema on load.

One door for: the Hub id (`ubench`, `jnirschl/uBench`, optionally `@REVISION`) fetched into the
Hugging Face cache (eval.hub_layout); a copy of the Hub's `perception/0.1.0` folder or of its
parent (Arrow stream shards + `dataset_info.json`, no `state.json`); a `save_to_disk` folder; a
folder of parquet/arrow files, or one such file. The schema check follows
../shared/ubench/SCHEMA.md: nested caption structs, nullable `dataset`/`stain`, unknown extra
columns kept.

The fingerprint that keys the image cache and run ids is the sha256 of the files the rows come
from (cached by path, size and mtime), so a dataset changed in place is never mistaken for the
old one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow
import pyarrow.ipc
import pyarrow.parquet
from datasets import ClassLabel, Image, Value

from micromerge.core.errors import MicromergeError, first_line
from micromerge.core.hashing import default_cache_dir, sha256_files, sha256_json
from micromerge.eval.hub_layout import (
    HUB_ID,
    HUB_REVISION,
    column_difference,
    fetch_from_hub,
    find_hub_layout,
    read_hub_layout,
)
from micromerge.eval.schema import REQUIRED_STRING_COLUMNS, TASK_METADATA_COLUMNS

HUB_ALIASES = ("ubench", HUB_ID)


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


def hub_revision(source: str) -> str | None:
    """The revision a Hub spec asks for (`ubench`, `ubench@REV`), or None for a local path."""
    name, _, revision = source.partition("@")
    return (revision or HUB_REVISION) if name in HUB_ALIASES else None


def load_benchmark(
    source: str, split: str = "test", cache_dir: Path | None = None, progress: bool = True
) -> Benchmark:
    """Open μ-Bench from the Hub cache or a local copy, validate it, fingerprint its files."""
    if not source.strip():  # Path("") is the working folder, and its shards would be searched for under it
        raise MicromergeError(f"--data {source!r}: empty; give 'ubench' (the Hub copy) or a μ-Bench folder")
    revision = hub_revision(source)
    dataset = (
        read_hub_layout(fetch_from_hub(revision), split) if revision else _load_local(Path(source), split)
    )
    validate_schema(dataset, source)
    files = sorted({f["filename"] for f in dataset.cache_files})
    _refuse_damaged_contents(dataset, files, source)
    digests = sha256_files(
        files, cache_dir or default_cache_dir(), "sha256 of the benchmark's files", progress
    )
    fingerprint = sha256_json({"files": digests, "rows": len(dataset), "split": split})
    return Benchmark(dataset, source, fingerprint[:16])


def _refuse_damaged_contents(dataset: datasets.Dataset, files: list[str], source: str) -> None:
    """Arrow's full validation (offsets in bounds, UTF-8 text) of the memory-mapped rows: a copy
    with garbage in the middle of a shard (a bad disk, an interrupted rsync that kept the size)
    opens, and then failed in pyarrow's UnicodeDecodeError deep inside `tasks`, or read out of
    bounds. It reads the text and the offsets, not the image bytes: about 1 ms a demo shard. A
    failure names the file, found by validating each one alone."""
    try:
        dataset.data.table.validate(full=True)
    except pyarrow.ArrowException as exc:
        damaged, why = source, _validation_error(dataset.data.table.schema, exc)
        for file in files:
            table = datasets.Dataset.from_file(file).data.table
            try:
                table.validate(full=True)
            except pyarrow.ArrowException as its:
                damaged, why = file, _validation_error(table.schema, its)
                break
        raise MicromergeError(
            f"--data {damaged}: damaged contents ({why}); copy it again (`micromerge data verify` checks "
            "a copy of the Hub's folder against the published checksums)"
        ) from exc


def _validation_error(schema: pyarrow.Schema, error: Exception) -> str:
    """`column captions: Invalid UTF8 sequence at string index 307` from Arrow's nested "Column 18:
    In chunk 0: Invalid: Struct child array #1 invalid: ... Invalid: Invalid UTF8 ..." message."""
    text = first_line(error)
    column = re.match(r"Column (\d+):", text)
    detail = text.rsplit("Invalid: ", 1)[-1][:120]
    return f"column {schema.names[int(column.group(1))]}: {detail}" if column else detail


def _load_local(path: Path, split: str) -> datasets.Dataset:
    if not path.exists():
        raise MicromergeError(f"--data {path}: no such file or folder (use 'ubench' for the Hub copy)")
    if path.is_file() and path.suffix in (".parquet", ".arrow"):  # one file, e.g. a parquet export
        return _load_files([path], path.suffix[1:], path, split)
    if not path.is_dir():
        raise MicromergeError(
            f"--data {path}: not a folder (pass the folder holding the shards, or one .parquet/.arrow file)"
        )
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        return _load_saved(path, split)
    hub_folder = find_hub_layout(path)
    if hub_folder is not None:
        return read_hub_layout(hub_folder, split)
    for kind, pattern in (("parquet", "**/*.parquet"), ("arrow", "**/*.arrow")):
        files = sorted(path.glob(pattern))
        if files:
            return _load_files(files, kind, path, split)
    raise MicromergeError(
        f"--data {path}: not a μ-Bench copy (no perception/0.1.0 shards, no save_to_disk folder, "
        "no .parquet or .arrow files)"
    )


def _load_files(files: list[Path], kind: str, path: Path, split: str) -> datasets.Dataset:
    """Parquet or Arrow files (IPC file or stream format) as one dataset, every file checked to be
    of the first one's dataset."""
    _refuse_files_of_other_datasets(files, kind)
    try:
        return datasets.load_dataset(kind, data_files={split: [str(f) for f in files]}, split=split)
    except Exception as exc:
        raise MicromergeError(
            f"--data {path}: the .{kind} data does not load ({type(exc).__name__}: {first_line(exc)[:100]})"
        ) from exc


def _refuse_files_of_other_datasets(files: list[Path], kind: str) -> None:
    """Every file must hold the first one's columns: `datasets` refuses a mismatch only as "An
    error occurred while generating the dataset", naming neither the file nor the columns. Types
    may differ (a column all null in one file): `datasets` casts each file to the first's."""
    first = _file_features(files[0], kind)
    for file in files[1:]:
        found = _file_features(file, kind)
        if set(found) != set(first):
            raise MicromergeError(
                f"--data {file}: not a file of the same dataset as {files[0].name} "
                f"({column_difference(first, found)}); remove it or copy the dataset again"
            )


def _file_features(file: Path, kind: str) -> datasets.Features:
    try:
        if kind == "parquet":
            return datasets.Features.from_arrow_schema(pyarrow.parquet.read_schema(file))
        with pyarrow.memory_map(str(file)) as source:  # `datasets` reads Arrow's file and stream formats
            try:
                schema = pyarrow.ipc.open_file(source).schema
            except pyarrow.ArrowInvalid:
                source.seek(0)
                schema = pyarrow.ipc.open_stream(source).schema
        return datasets.Features.from_arrow_schema(schema)
    except Exception as exc:  # pyarrow raises several types for a truncated or foreign file
        raise MicromergeError(
            f"--data {file}: not a readable .{kind} file ({type(exc).__name__}: "
            f"{first_line(exc)[:100]}); it may be truncated: copy it again"
        ) from exc


def _load_saved(path: Path, split: str) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise MicromergeError(
            f"--data {path}: a save_to_disk folder that does not load ({type(exc).__name__}: "
            f"{first_line(exc)[:100]})"
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise MicromergeError(f"--data {path}: has splits {sorted(loaded)}, not {split!r}")
        loaded = loaded[split]
    return loaded


STRING_DTYPES = ("string", "large_string")  # large_string: a copy re-written by polars or pandas


def _is_string(feature: object) -> bool:
    return isinstance(feature, Value) and feature.dtype in STRING_DTYPES


def is_nullable(feature: object, fits: Callable[[str], bool] = STRING_DTYPES.__contains__) -> bool:
    """Of the type `fits` accepts (text by default), or of Arrow's null type: a column that is null
    in every row (a parquet copy of only CellCognition's rows, whose `dataset` is null) is typed so."""
    return isinstance(feature, Value) and (feature.dtype == "null" or fits(feature.dtype))


def _option_list(feature: object) -> bool:
    inner = getattr(feature, "feature", feature[0] if isinstance(feature, list) and feature else None)
    return _is_string(inner)


def _looks_like_pairs(features: datasets.Features) -> bool:
    """Few columns, one of them captions: a fine-tuning corpus given to eval by mistake."""
    return len(features) <= 4 and any(name in features for name in ("caption", "text", "captions"))


def validate_schema(dataset: datasets.Dataset, source: str) -> None:
    """Required columns by name and type; the metadata columns tasks read and the captions, where
    present, as the real schema types them (captions as its nested structs). Other columns are kept
    unchecked: nothing reads them, and a copy is not refused for one of them (a numeric `pmid`)."""
    features = dataset.features
    missing = [c for c in ("image", "label", "dataset", *REQUIRED_STRING_COLUMNS) if c not in features]
    if missing:
        raise MicromergeError(
            f"--data {source}: missing required column(s) {missing}, so not a copy of μ-Bench (jnirschl/uBench)"
            + (
                "; a corpus of image-caption pairs goes to `finetune --data`"
                if _looks_like_pairs(features)
                else ""
            )
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
        if not _is_string(features[column]):
            raise MicromergeError(
                f"--data {source}: column {column!r} must be a string, not {features[column]}"
            )
    # `dataset` and the metadata columns tasks and reports read, where a copy has them (each may be
    # null): a mistyped one failed deep in task discovery ("'int' object has no attribute 'replace'")
    expected = {
        **{column: ("a string", STRING_DTYPES.__contains__) for column in TASK_METADATA_COLUMNS},
        "microns_per_pixel": ("a number", lambda dtype: dtype.startswith(("float", "int"))),
        "synthetic": ("a bool", lambda dtype: dtype == "bool"),
    }
    for column, (kind, fits) in expected.items():
        if column in features and not is_nullable(features[column], fits):
            raise MicromergeError(
                f"--data {source}: column {column!r} must be {kind} (or null), not {features[column]} "
                "(Dataset.cast_column converts a copy)"
            )
    captions = features.get("captions")
    if captions is not None:
        if not isinstance(captions, dict):
            raise MicromergeError(
                f"--data {source}: column 'captions' must be a struct of caption questions, not {captions}"
            )
        for key, entry in captions.items():
            if not (isinstance(entry, dict) and _option_list(entry.get("options")) and "answer_idx" in entry):
                raise MicromergeError(
                    f"--data {source}: captions.{key} must be a struct with 'options' (list of strings) and "
                    f"'answer_idx', not {entry}"
                )
    if len(dataset) == 0:
        raise MicromergeError(f"--data {source}: the split has no rows")
