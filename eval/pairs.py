"""Image-caption corpora: what `finetune` trains on and what Fisher/RegMean estimate a model's own
statistics on (`eval.corpus_questions`). Every reader yields image payloads ({'bytes'} or {'path'})
plus captions or labels.

Image-caption pairs come from a caption table (.csv/.tsv/.jsonl, or a folder with captions.csv,
.tsv or .jsonl), a Hugging Face dataset (a save_to_disk folder or a hub id), or webdataset tar
shards (`key.png` + `key.txt` per sample, read with the standard tarfile module). Supervised data
is one task of a μ-Bench-schema dataset. Images are decoded once (see eval.images) and corrupt
ones are skipped and counted. A table or dataset written for another tool names its columns
after `#` in the spec (`CorpusSpec`).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from micromerge.core.errors import MicromergeError, first_line
from micromerge.core.json_text import parse_json
from micromerge.eval.data import STRING_DTYPES, column_values, is_nullable
from micromerge.eval.hub_layout import HUB_FOLDER, is_hub_layout
from micromerge.eval.images import decode_payloads

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
# The usual names, looked for in this order. open_clip_train's CSV defaults (`--csv-img-key filepath
# --csv-caption-key title`, params.py) and Quilt-1M's quilt_1M_lookup.csv (`image_path`, `caption`)
# are among them.
# the last names are webdataset's member extensions, the columns of a hub dataset kept as tar
# shards (datasets' webdataset builder: jpg, txt, json, __key__, __url__)
IMAGE_COLUMNS = ("image", "file", "filepath", "path", "filename", "image_path", "jpg", "jpeg", "png", "webp")
CAPTION_COLUMNS = ("caption", "text", "captions", "title", "txt")
CAPTION_TABLES = ("captions.csv", "captions.tsv", "captions.jsonl")
"""A folder's caption table, by the names looked for (the first one present is read)."""
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl")
DATA_FILE_SUFFIXES = (*TABLE_SUFFIXES, ".json", ".tar", ".parquet", ".arrow")
"""What a missing data file is named: such a name is no hub id, however it is spelled."""
SEPARATORS = {"comma": ",", "tab": "\t", "semicolon": ";", "pipe": "|"}
"""A delimited table's field separators, by the names `#sep=` takes, in the order a header's tie
is broken (open_clip_train writes tab by default; `csv` and pandas, comma)."""
SPEC_OPTIONS = ("image", "caption", "sep", "root")
CAPTION_SUFFIXES = (".txt", ".json")
"""A webdataset sample's caption members: `.txt`, else the `caption` of `.json`."""
TAR_SHARDS = "webdataset shards (a sample's image and caption are its files)"


@dataclass
class PairData:
    payloads: list[dict]
    captions: list[str]
    source: str

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for payload, caption in zip(self.payloads, self.captions, strict=True):
            data = payload.get("bytes")
            if data is None:
                data = Path(payload["path"]).read_bytes() if Path(payload["path"]).is_file() else b""
            digest.update(hashlib.sha256(data).digest())
            digest.update(caption.encode())
        return digest.hexdigest()


@dataclass
class DecodedData:
    pixels: np.ndarray  # [N, 3, S, S] uint8
    targets: list  # captions (contrastive) or class indices (supervised)
    n_corrupt: int
    dropped: tuple[str, ...] = ()  # the unreadable images left out, by name


@dataclass(frozen=True)
class CorpusSpec:
    """A corpus as `--data` (or `--base-data`/`--ft-data`) names it: where it is and, after `#`,
    options for a table or dataset written for another tool: which columns hold the image and the
    caption, a table's field separator, and the folder a table's image paths are relative to (the
    table's own folder by default): `quilt_1M_lookup.csv#root=quilt_1m`,
    `train.csv#sep=tab,image=filepath,caption=title`. Without them the usual names are looked for
    and a delimited table's separator is read from its header. The options live in the one string
    so that everything that records or keys on the corpus (manifests, resume, the statistics
    cache) sees them, and each corpus of a merge has its own."""

    location: str
    image: str | None = None
    caption: str | None = None
    separator: str | None = None
    root: str | None = None

    @classmethod
    def parse(cls, spec: str) -> CorpusSpec:
        location, mark, options = spec.rpartition("#")
        if not mark or Path(spec).exists():  # a file whose name has a '#' is that file
            return cls(spec)
        values: dict[str, str] = {}
        for item in options.split(","):
            key, equals, value = (part.strip() for part in item.partition("="))
            if not equals or key not in SPEC_OPTIONS or not value or key in values:
                raise MicromergeError(
                    f"--data {spec}: {item.strip()!r} after '#': expected image=COLUMN, caption=COLUMN, "
                    f"sep={'|'.join(SEPARATORS)} and root=FOLDER, each at most once, separated by commas"
                )
            values[key] = value
        separator = values.get("sep")
        if separator is not None and separator not in SEPARATORS:
            raise MicromergeError(f"--data {spec}: sep={separator}: expected one of {', '.join(SEPARATORS)}")
        return cls(
            location,
            values.get("image"),
            values.get("caption"),
            SEPARATORS.get(separator or ""),
            values.get("root"),
        )

    def options(self) -> dict[str, str]:
        """The options given (for fingerprints: another column of the same bytes is another corpus)."""
        given = {"image": self.image, "caption": self.caption, "sep": self.separator, "root": self.root}
        return {key: value for key, value in given.items() if value is not None}

    def refuse(self, what: str, keys: tuple[str, ...] = SPEC_OPTIONS) -> None:
        """Stop when an option among `keys` was given for a corpus (`what`) that has no such thing."""
        given = {key: value for key, value in self.options().items() if key in keys}
        if given:
            named = ",".join(f"{key}={value!r}" for key, value in given.items())
            raise MicromergeError(f"--data {self.location}: #{named} does not apply to {what}")

    def columns(self, found: list[str], where: str) -> tuple[str, str]:
        """(image column, caption column): the ones named after `#`, else the first usual names."""
        return (
            self._column(found, self.image, IMAGE_COLUMNS, "image", where),
            self._column(found, self.caption, CAPTION_COLUMNS, "caption", where),
        )

    def _column(
        self, found: list[str], named: str | None, usual: tuple[str, ...], what: str, where: str
    ) -> str:
        if named is not None:
            if named not in found:
                raise MicromergeError(
                    f"{where}: no column {named!r} (#{what}={named}); found {found}{_separator_hint(found)}"
                )
            return named
        for name in usual:
            if name in found:
                return name
        raise MicromergeError(
            f"{where}: no {what} column (expected one of {list(usual)}; found {found}{_separator_hint(found)}); "
            f"name yours: --data '{self.location}#{what}=COLUMN'"
        )


def _separator_hint(found: list[str]) -> str:
    """A header read as one column that holds another separator: the table was split with the
    wrong one (`sep=comma` on a tab-separated file found ['file\ttext'])."""
    if len(found) != 1:
        return ""
    held = [name for name, separator in SEPARATORS.items() if separator in found[0]]
    return f" (one column whose name holds a {held[0]}: is the table sep={held[0]}?)" if held else ""


def table_separator(path: Path, header: str, corpus: CorpusSpec) -> str:
    """A delimited table's separator: the one named, tab for .tsv, else the one its header line
    holds most of (ties in SEPARATORS' order; none: comma, a one-column table)."""
    if corpus.separator is not None:
        return corpus.separator
    if path.suffix == ".tsv":
        return "\t"
    return max(SEPARATORS.values(), key=header.count)


def _separator_name(separator: str) -> str:
    return next(name for name, value in SEPARATORS.items() if value == separator)


def _read_utf8(path: Path) -> str:
    """The text, without the byte-order mark Excel's "CSV UTF-8" puts first (pandas, which
    open_clip_train reads tables with, drops it too; kept, it became part of the first column's name)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MicromergeError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc


def _csv_records(reader: csv.DictReader, path: Path) -> Iterator[dict[Any, Any]]:
    """The reader's records; what the csv module cannot read, one line naming where it stopped (a
    field over its 128 KiB limit is, in a caption table, a quote left open: the rest of the file)."""
    try:
        yield from reader
    except csv.Error as exc:  # the row that failed begins on the line after the last one read
        raise MicromergeError(
            f"{path}: the row from line {reader.line_num + 1}: not a table csv can read ({exc}); look there "
            "for a quote left open"
        ) from None


def _numbered_records(path: Path, corpus: CorpusSpec) -> list[tuple[int, dict]]:
    """A table's rows, each with the line of the file it ends on (what an editor shows: the CSV
    header is line 1, blank JSONL lines count), so an error names the line to fix."""
    if path.suffix != ".jsonl":
        text = _read_utf8(path)
        separator = table_separator(path, text.partition("\n")[0], corpus)
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=separator)
        header = reader.fieldnames or []
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise MicromergeError(f"{path}: column {repeated[0]!r} is named twice in the header; rename one")
        records = []
        for record in _csv_records(reader, path):
            if None in record:  # more fields than the header: an unquoted separator in a caption
                raise MicromergeError(
                    f"{path}: line {reader.line_num} has {len(header) + len(record[None])} fields, the header "
                    f'{len(header)}; quote a caption holding {_separator_name(separator)}s ("a, b")'
                )
            records.append((reader.line_num, record))
        return records
    corpus.refuse("a JSONL table (one object per line)", ("sep",))
    records = []
    for number, line in enumerate(_read_utf8(path).splitlines(), 1):
        if line.strip():
            try:
                record = parse_json(line)
            except json.JSONDecodeError as exc:
                raise MicromergeError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise MicromergeError(
                    f"{path}:{number}: a JSON object per line is expected, not {record!r}"[:200]
                )
            records.append((number, record))
    return records


def _from_table(path: Path, corpus: CorpusSpec) -> PairData:
    records = _numbered_records(path, corpus)
    if not records:
        raise MicromergeError(f"{path}: no rows")
    image_col, caption_col = corpus.columns(list(records[0][1]), str(path))
    folder = path.parent / corpus.root if corpus.root else path.parent
    if not folder.is_dir():
        raise MicromergeError(f"--data {path}: #root={corpus.root}: no folder {folder}")
    payloads, captions = [], []
    for number, record in records:
        name = str(record.get(image_col) or "").strip()
        caption = caption_text(record.get(caption_col), f"{path}: line {number}: column {caption_col!r}")
        if not name:
            raise MicromergeError(f"{path}: line {number} has a caption but no image")
        image_path = (folder / name).resolve()
        if not image_path.is_file():
            raise MicromergeError(
                f"{path}: line {number}: caption for image {name} but the file does not exist ({image_path})"
            )
        if not caption:
            raise MicromergeError(f"{path}: line {number}: image {name} has no caption")
        payloads.append({"path": str(image_path), "bytes": None})
        captions.append(caption)
    return PairData(payloads, captions, str(path))


def _from_tar(shards: list[Path]) -> PairData:
    payloads, captions = [], []
    for shard in shards:
        samples: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(shard) as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    key, _, ext = member.name.rpartition(".")
                    handle = archive.extractfile(member)
                    if handle is not None:
                        samples.setdefault(key, {})[f".{ext.lower()}"] = handle.read()
        except tarfile.TarError as exc:
            raise MicromergeError(f"{shard}: not a readable tar shard ({exc})") from exc
        for key, parts in sorted(samples.items()):
            image = next((parts[s] for s in IMAGE_SUFFIXES if s in parts), None)
            caption = tar_caption(shard, key, parts)
            if image is None:
                raise MicromergeError(f"{shard}: sample {key} has a caption but no image")
            if not caption:
                raise MicromergeError(f"{shard}: sample {key} has an image but no caption (.txt)")
            payloads.append({"bytes": image, "path": None})
            captions.append(caption)
    return PairData(payloads, captions, ",".join(str(s) for s in shards))


def tar_caption(shard: Path, key: str, parts: dict[str, Any]) -> str:
    """A sample's caption from `.txt`, else from the `caption` of its `.json`; bad bytes are one line."""
    try:
        caption = parts.get(".txt", b"").decode("utf-8").strip()
        if not caption and ".json" in parts:
            meta = parse_json(parts[".json"].decode("utf-8"))
            caption = caption_text(
                meta.get("caption") if isinstance(meta, dict) else None, f"{shard}: sample {key}"
            )
    except UnicodeDecodeError as exc:
        raise MicromergeError(f"{shard}: sample {key}: caption is not UTF-8 text") from exc
    except json.JSONDecodeError as exc:
        raise MicromergeError(f"{shard}: sample {key}: .json is not valid JSON ({exc.msg})") from exc
    return caption


def _from_hf(dataset: datasets.Dataset, where: str, corpus: CorpusSpec) -> PairData:
    image_col, caption_col = dataset_columns(dataset.features, corpus, where)
    # images, paths, bytes or {bytes, path} structs, all as {bytes, path} (as the indexed path reads them)
    payloads = column_values(dataset.cast_column(image_col, datasets.Image(decode=False)), image_col)
    return PairData(payloads, dataset_captions(dataset, caption_col, where), where)


def dataset_columns(features: dict[str, Any], corpus: CorpusSpec, where: str) -> tuple[str, str]:
    """A dataset's (image, caption) columns, from its features (column name: type); `#sep=` and
    `#root=` are refused (a dataset has no separator, and where its images are is its own business).
    A caption column that does not hold text (a list of several captions per image, as caption
    datasets often have; a number), or an image column of neither images nor paths, is refused
    here, before a stream or a worker reads a row (an integer column failed in pyarrow's cast)."""
    corpus.refuse("a dataset (only image= and caption= name its columns)", ("sep", "root"))
    image, caption = corpus.columns(list(features), where)
    if not _holds_images(features[image]):
        raise MicromergeError(
            f"{where}: image column {image!r} holds {features[image]}, not images or their paths "
            "(or name the image column: #image=COLUMN)"
        )
    feature = features[caption]
    if not is_nullable(feature):
        raise MicromergeError(
            f"{where}: caption column {caption!r} holds {feature}, not text; {_ONE_CAPTION_HINT} "
            f"(or name a text column: #caption=COLUMN)"
        )
    return image, caption


def _holds_images(feature: Any) -> bool:
    """What `datasets.Image` casts from: images, their paths, their encoded bytes, or the
    {bytes, path} struct that parquet written without datasets' metadata holds."""
    if isinstance(feature, dict):
        return bool(feature) and set(feature) <= {"bytes", "path"}
    return isinstance(feature, datasets.Image) or (
        isinstance(feature, datasets.Value) and feature.dtype in (*STRING_DTYPES, "binary", "large_binary")
    )


_ONE_CAPTION_HINT = "give one caption per image (several of one image: one row each)"


def caption_text(value: Any, where: str) -> str:
    """A caption as stripped text ("" when missing). Anything else was turned into its Python repr
    and trained on, silently: `['a smear', 'blood cells']` as one caption."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    raise MicromergeError(
        f"{where}: the caption is not text but {type(value).__name__} {shown}; {_ONE_CAPTION_HINT}"
    )


def dataset_captions(dataset: datasets.Dataset, column: str, where: str) -> list[str]:
    """A dataset's captions, stripped; a null or blank one is a one-line error naming its row."""
    captions = [caption_text(c, f"{where}: row {i}") for i, c in enumerate(column_values(dataset, column))]
    for index, caption in enumerate(captions):
        if not caption:
            raise MicromergeError(f"{where}: row {index} has an image but no caption")
    return captions


def is_saved_dataset(path: Path) -> bool:
    """A `save_to_disk` folder: of one Dataset (dataset_info.json) or of a DatasetDict
    (dataset_dict.json, one folder per split: what `load_dataset(...).save_to_disk` writes)."""
    return path.is_dir() and any((path / n).is_file() for n in ("dataset_info.json", "dataset_dict.json"))


def refuse_the_benchmark(path: Path) -> None:
    """A copy of μ-Bench given where image-caption pairs go (its Hub folder holds a dataset_info.json,
    so it was taken for a save_to_disk folder: datasets' FileNotFoundError traceback)."""
    if is_hub_layout(path) or is_hub_layout(path / HUB_FOLDER):
        raise MicromergeError(
            f"--data {path}: a copy of μ-Bench (the benchmark), not a corpus of image-caption pairs; pass "
            "a caption corpus here (μ-Bench is read by the --data of eval, sweep and data-aware merges, and "
            "by `finetune supervised --task`)"
        )


def load_saved_corpus(path: Path) -> datasets.Dataset:
    """A saved corpus, memory-mapped; of a DatasetDict, its training split (`training_split`)."""
    refuse_the_benchmark(path)
    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError) as exc:  # no state.json, a damaged or foreign folder
        raise MicromergeError(
            f"--data {path}: a save_to_disk folder that does not load ({type(exc).__name__}: "
            f"{(str(exc).splitlines() or [''])[0][:100]}); save it again"
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded[training_split(list(loaded), str(path))]
    return loaded


def training_split(splits: list[str], where: str) -> str:
    """The split a corpus is trained (or its statistics estimated) on: `train`, else the only one.
    A repository of several splits and none named train is refused rather than one of them taken
    silently (a `test` split trained on would be a leak nobody sees)."""
    if "train" in splits:
        return "train"
    if len(splits) == 1:
        return splits[0]
    if not splits:
        raise MicromergeError(
            f"--data {where}: no data files found (expected parquet files of a train split)"
        )
    raise MicromergeError(
        f"--data {where}: splits {', '.join(splits)} and none named train; keep the one to train on in a "
        "folder of its own (or name its files train-*.parquet)"
    )


def parquet_footer(file: str | Path, spec: str) -> Any:
    """A local parquet file's footer (pyarrow's FileMetaData), or one line naming the file: a copy
    cut short by an interrupted download ended the run in pyarrow's "magic bytes not found"."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(file).metadata
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise MicromergeError(
            f"--data {spec}: {file} is not a readable parquet file ({first_line(exc)}); download it again"
        ) from exc


def damaged_parquet(files: list[str], spec: str) -> str | None:
    """The one line naming the first local parquet file that fails when read whole, or None: a
    damaged page behind a valid footer fails only as it is read, and datasets' error names no
    file. Every page is read, so it is for a path where the run stops anyway."""
    import pyarrow
    import pyarrow.parquet as pq

    for file in files:
        try:
            for _ in pq.ParquetFile(file).iter_batches(batch_size=1024):
                pass
        except (OSError, pyarrow.ArrowException) as error:
            why = first_line(error)
            return f"--data {spec}: {file} is damaged ({why}); download or write it again"
    return None


def _load_split(location: str, spec: str) -> datasets.Dataset:
    """The training split of a hub dataset or of a local copy of its repository (parquet files)."""
    try:
        builder = datasets.load_dataset_builder(location)
    except Exception as exc:  # the hub's and fsspec's errors have no common base
        what = "the dataset" if Path(location).exists() else "not a local path, and the hub dataset"
        raise MicromergeError(
            f"--data {spec}: {what} could not be opened ({type(exc).__name__}); offline, pass a local copy"
        ) from exc
    split = training_split(list(builder.config.data_files or {}), spec)
    for file in builder.config.data_files[split]:
        if str(file).endswith(".parquet") and Path(file).is_file():
            parquet_footer(file, spec)  # a damaged local file named, not datasets' generation traceback
    try:
        builder.download_and_prepare()  # what load_dataset does, on the builder already resolved
    except datasets.exceptions.DatasetGenerationError as exc:
        local = [
            str(f)
            for f in builder.config.data_files[split]
            if str(f).endswith(".parquet") and Path(f).is_file()
        ]
        damaged = damaged_parquet(local, spec)
        if damaged is None:
            raise
        raise MicromergeError(damaged) from exc
    return builder.as_dataset(split=split)


def is_hub_id(location: str) -> bool:
    """`owner/name` (optionally `@revision`) as the hub spells repository ids (huggingface_hub's
    `validate_repo_id`): not a relative, absolute or home path, nor a brace pattern of shards or a
    data file that is missing (`shards/s-{000..003}.tar` and `pairs/data.csv` were looked up on
    the hub, and the user told to download them from there). Asked only of what is not a local
    file or folder."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    name = location.split("@", 1)[0]
    if name.count("/") != 1 or name.lower().endswith(DATA_FILE_SUFFIXES):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def load_pairs(spec: str) -> PairData:
    """Image-caption pairs from a CSV/TSV/JSONL file or folder, a save_to_disk folder, tar shards, or a
    hub id; `#options` as `CorpusSpec` says."""
    corpus = CorpusSpec.parse(spec)
    path = Path(corpus.location)
    if path.is_file():
        if path.suffix in TABLE_SUFFIXES:
            data = _from_table(path, corpus)
        elif path.suffix == ".tar":
            corpus.refuse(TAR_SHARDS)
            data = _from_tar([path])
        else:
            raise MicromergeError(
                f"--data {spec}: expected a .csv/.tsv/.jsonl of captions, a .tar shard, or a folder"
            )
    elif path.is_dir():
        tables = [path / name for name in CAPTION_TABLES if (path / name).is_file()]
        shards = sorted(path.glob("*.tar"))
        if is_saved_dataset(path):
            data = _from_hf(load_saved_corpus(path), spec, corpus)
        elif tables:
            data = _from_table(tables[0], corpus)
        elif shards:
            corpus.refuse(TAR_SHARDS)
            data = _from_tar(shards)
        elif any(path.rglob("*.parquet")):  # a local copy of a hub dataset repository
            data = _from_hf(_load_split(str(path), spec), spec, corpus)
        else:
            refuse_the_benchmark(path)
            raise MicromergeError(
                f"--data {spec}: folder has no captions.csv/.tsv/.jsonl, no .tar shards and is not a saved dataset"
            )
    elif is_hub_id(corpus.location):
        data = _from_hf(_load_split(corpus.location, spec), spec, corpus)
    else:
        raise MicromergeError(f"--data {spec}: no such file or folder")
    if not data.payloads:
        raise MicromergeError(f"--data {spec}: the dataset is empty")
    return data


def payload_name(payloads: list[dict], i: int) -> str:
    """Sample i by its image file where its payload names one, else by its row (from 0)."""
    path = payloads[i].get("path") if payloads[i] else None
    return repr(str(path)) if path else f"row {i}"


def decode_checked(
    payloads: list[dict],
    targets: list,
    size: int,
    max_bad_fraction: float,
    where: str,
    progress: bool,
    name: Callable[[int], str] | None = None,
) -> DecodedData:
    """Decode images; drop corrupt ones; stop with a clear error when too many are bad, naming the
    first few by `name` (by default `payload_name`): the error said how many, and a user cleaning a
    corpus of thousands had to find them."""
    pixels, valid = decode_payloads(payloads, size, progress, desc="decode training images")
    bad = int((~valid).sum())
    named = name or functools.partial(payload_name, payloads)
    dropped = tuple(named(int(i)) for i in np.flatnonzero(~valid))
    if bad > max_bad_fraction * len(payloads):
        raise MicromergeError(
            f"--data {where}: {bad} of {len(payloads)} images are unreadable (more than --max-bad-fraction "
            f"{max_bad_fraction}), the first {', '.join(dropped[:3])}; fix or remove them"
        )
    keep = np.flatnonzero(valid)
    return DecodedData(pixels[keep] if bad else pixels, [targets[i] for i in keep], bad, dropped)
