"""Training data read as it is used, by index: memory that does not grow with the corpus.

The in-memory path decodes every image once into one uint8 array, which is the fastest for small
data (the demo, one μ-Bench task) and impossible for PLIP's 208 k or Quilt-1M's million pairs. Here
a corpus is an index of where each sample's bytes are — a CSV/JSONL table of image files, a
`save_to_disk` Arrow dataset (memory-mapped), or webdataset-style tar shards (each member's offset
read from the tar headers once, so any sample is one seek away) — and DataLoader workers read,
decode and augment only the samples of the current batches.

Random access keeps the trainer's data order (a seeded permutation per epoch, each rank its own
slice) identical on both paths: without augmentation the streamed run ends bit-identical to the
in-memory one, and resuming continues at the exact sample. Augmentation is drawn from a seed per
(run seed, epoch, sample) (finetune/augment.py), so a resumed run also ends bit-identical to an
uninterrupted one. Corpora read in order instead, without an index, are finetune/shard_stream.py
(webdataset shards, URLs, pipes) and finetune/hub_stream.py (a hub dataset).
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from micromerge.core.errors import MicromergeError
from micromerge.eval.data import column_values
from micromerge.eval.pairs import (
    CAPTION_SUFFIXES,
    CAPTION_TABLES,
    IMAGE_SUFFIXES,
    TAR_SHARDS,
    CorpusSpec,
    PairData,
    dataset_captions,
    dataset_columns,
    is_saved_dataset,
    load_pairs,
    load_saved_corpus,
    tar_caption,
)
from micromerge.finetune.augment import sample_pixels, sample_seed

if TYPE_CHECKING:
    import datasets

Sample = tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]
"""(pixels, target, readable, name): one sample as every streaming path hands it to the trainer's
loader. The name is given for an unreadable sample only (empty otherwise, and where a stream names
no sample): the run's note and its --max-bad-fraction error say which to fix."""

FINGERPRINTS = {
    "table": "the table's bytes, image file names and sizes",
    "arrow": "the dataset's Arrow fingerprint, file names and sizes",
    "tar": "shard names and sizes, every member's tar header",
    "bytes": "every byte",
}
"""What a streamed corpus's fingerprint is made of, by index kind (recorded in the manifest)."""

IN_MEMORY_BUDGET = 4 << 30
"""`--data-in-memory auto`: decode into memory when the decoded images take at most this many bytes."""


@dataclass(frozen=True)
class CorpusIndex:
    """Where every sample is: per sample a reader key (file path, Arrow row or tar member offsets)
    and its caption or label location, plus a cheap fingerprint of the whole corpus."""

    source: str
    kind: str  # table | arrow | tar | bytes
    images: list  # table: file paths; arrow: row numbers; tar: (shard, offset, size, key); bytes: payloads
    targets: list  # captions (str) or class indices (int)
    fingerprint: str
    arrow_layout: str = "save_to_disk"  # or "ubench": a μ-Bench copy, opened as `eval` opens it
    image_column: str = "image"  # arrow: the column the images are read from

    def __len__(self) -> int:
        return len(self.images)

    def sample_name(self, i: int) -> str:
        """Sample i as a user finds it to fix it: its image file, its tar member by key and shard,
        its Arrow row (of the whole dataset: a μ-Bench task's rows are the benchmark's), or its row."""
        location = self.images[i]
        if self.kind == "table":
            return repr(location)
        if self.kind == "tar":
            return f"{location[3]!r} of {location[0]!r}"
        return f"row {location if self.kind == 'arrow' else i}"


def _file_facts(paths: list[Path]) -> list[tuple[str, int]]:
    return [(path.name, path.stat().st_size) for path in paths]


def index_pairs(spec: str) -> CorpusIndex:
    """An image-caption corpus as an index: nothing but file names, offsets and captions is read.
    The `#options` (`eval.pairs.CorpusSpec`) are part of the fingerprint when given."""
    corpus = CorpusSpec.parse(spec)
    path = Path(corpus.location)
    shards = sorted(path.glob("*.tar")) if path.is_dir() else [path] if path.suffix == ".tar" else []
    if is_saved_dataset(path):
        return _index_arrow(spec, load_saved_corpus(path), corpus)
    if shards and not any((path / n).is_file() for n in CAPTION_TABLES):
        corpus.refuse(TAR_SHARDS)
        return _index_tar(spec, shards)
    pairs = load_pairs(spec)  # a table: paths and captions only (bytes are read per sample)
    if any(p.get("path") is None for p in pairs.payloads):  # a hub dataset: its bytes are in memory already
        return CorpusIndex(spec, "bytes", pairs.payloads, pairs.captions, pairs.fingerprint())
    files = [Path(p["path"]) for p in pairs.payloads]
    table = next(path / n for n in CAPTION_TABLES if (path / n).is_file()) if path.is_dir() else path
    facts = {"table": hashlib.sha256(table.read_bytes()).hexdigest(), "files": _file_facts(files)}
    fingerprint = corpus_fingerprint(facts, corpus)
    return CorpusIndex(spec, "table", [str(f) for f in files], pairs.captions, fingerprint)


def corpus_fingerprint(facts: dict, corpus: CorpusSpec) -> str:
    """The digest of a corpus's facts, and of its `#options` when any are given (the same bytes
    read by other columns are another corpus; a spec without options keeps its old digest)."""
    options = corpus.options()
    return hashlib.sha256(
        json.dumps({**facts, "options": options} if options else facts).encode()
    ).hexdigest()


def _index_arrow(spec: str, dataset: datasets.Dataset, corpus: CorpusSpec) -> CorpusIndex:
    image_col, caption_col = dataset_columns(dataset.features, corpus, f"--data {spec}")
    captions = dataset_captions(dataset, caption_col, f"--data {spec}")
    arrow_files = sorted({Path(f["filename"]) for f in dataset.cache_files})  # the split's own files
    facts = {"fingerprint": dataset._fingerprint, "files": _file_facts(arrow_files)}
    rows = list(range(len(dataset)))
    return CorpusIndex(
        spec, "arrow", rows, captions, corpus_fingerprint(facts, corpus), image_column=image_col
    )


def _index_tar(spec: str, shards: list[Path]) -> CorpusIndex:
    """Each sample's image member located from the tar headers (its data is read when the sample is
    drawn) and its caption read now: captions are small, and reading them here refuses an empty or
    undecodable one before training on either path, as for a table (streamed, an empty caption was
    trained on as empty text, since a worker cannot stop the run with one line)."""
    images, targets, headers = [], [], []
    for shard in shards:
        members: dict[str, dict[str, Any]] = {}
        try:
            with tarfile.open(shard) as archive:
                for member in archive:
                    if member.isfile():
                        key, _, ext = member.name.rpartition(".")
                        suffix = f".{ext.lower()}"
                        if suffix in CAPTION_SUFFIXES:
                            handle = archive.extractfile(member)
                            members.setdefault(key, {})[suffix] = handle.read() if handle else b""
                        else:
                            members.setdefault(key, {})[suffix] = (member.offset_data, member.size)
                        headers.append((shard.name, member.name, member.size))
        except tarfile.TarError as exc:
            raise MicromergeError(f"{shard}: not a readable tar shard ({exc})") from exc
        for key, parts in sorted(members.items()):
            image = next((parts[s] for s in IMAGE_SUFFIXES if s in parts), None)
            if image is None or not set(CAPTION_SUFFIXES) & parts.keys():
                raise MicromergeError(f"{shard}: sample {key} needs an image and a caption (.txt or .json)")
            caption = tar_caption(shard, key, parts)
            if not caption:
                raise MicromergeError(f"{shard}: sample {key} has an image but no caption (.txt)")
            images.append((str(shard), *image, key))
            targets.append(caption)
    fingerprint = hashlib.sha256(
        json.dumps({"shards": _file_facts(shards), "members": headers}).encode()
    ).hexdigest()
    return CorpusIndex(spec, "tar", images, targets, fingerprint)


def decoded_bytes(count: int, size: int) -> int:
    return count * 3 * size * size


def choose_in_memory(setting: str, count: int, size: int, augment: tuple[str, ...]) -> tuple[bool, str]:
    """(decode everything into memory?, why): `--data-in-memory auto|yes|no`."""
    need = decoded_bytes(count, size)
    if setting == "yes":
        if augment:
            raise MicromergeError(
                "--data-in-memory yes: augmentation needs the streaming path (decoded per step)"
            )
        return True, "asked for (--data-in-memory yes)"
    if setting == "no":
        return False, "asked for (--data-in-memory no)"
    if augment:
        return False, f"augmentation ({', '.join(augment)}) decodes each image per step"
    if need <= IN_MEMORY_BUDGET:
        return True, f"the decoded images take {need / 2**20:.0f} MiB, within {IN_MEMORY_BUDGET >> 30} GiB"
    return False, f"the decoded images would take {need / 2**30:.1f} GiB, over {IN_MEMORY_BUDGET >> 30} GiB"


@dataclass(frozen=True)
class SampleRecipe:
    """How every streamed sample is made, whichever reader yields it (an index, webdataset shards,
    a hub stream): decoded at `size`, augmented from `seed` when `augment` names any, its caption or
    label turned into a tensor by `encode_target`."""

    size: int
    augment: tuple[str, ...]
    seed: int
    encode_target: Callable[[Any], torch.Tensor]

    def make(self, payload: dict | None, target: Any, seed: int, name: str) -> Sample:
        """(pixels, target, readable, name) of one sample; no payload: left undecoded (zeros,
        unreadable)."""
        pixels = None if payload is None else sample_pixels(payload, self.size, self.augment, seed)
        return sample_tuple(pixels, self.encode_target(target), self.size, name)


class StreamedSamples(torch.utils.data.Dataset):
    """Sample (epoch, i) -> (uint8 [3, S, S] image, target): read, decoded and augmented on demand."""

    def __init__(self, index: CorpusIndex, recipe: SampleRecipe):
        self.index, self.recipe = index, recipe
        self._arrow: datasets.Dataset | None = None

    def __len__(self) -> int:
        return len(self.index)

    def _payload(self, i: int) -> dict:
        location = self.index.images[i]
        if self.index.kind == "arrow":
            if self._arrow is None:  # opened in the worker: memory-mapped, never pickled to it
                self._arrow = _arrow_images(self.index)
            (value,) = self._arrow[int(location)].values()
            return image_payload(value)
        return _located_payload(self.index.kind, location)

    def _target(self, i: int) -> Any:
        return self.index.targets[i]

    def __getitem__(self, item: tuple[int, int]) -> Sample:
        """(pixels, target, readable, name): an unreadable image comes back as zeros with readable
        False, for the trainer to leave out of the loss or stop on with one line (an exception here
        would reach it as a worker's traceback)."""
        epoch, i = item
        payload = self._payload(i)
        seed = sample_seed(self.recipe.seed, epoch, i)
        return self.recipe.make(payload, self._target(i), seed, self.index.sample_name(i))


def image_payload(value: dict | None) -> dict:
    """An undecoded Arrow image cell ({bytes, path}) as a payload; a null cell is an empty one,
    which every path reads as an unreadable image."""
    return value if value is not None else {"path": None, "bytes": None}


def _located_payload(kind: str, location: Any) -> dict:
    """One sample's image payload from its index entry (all kinds but arrow)."""
    if kind == "table":
        return {"path": location, "bytes": None}
    if kind == "tar":
        return {"bytes": _read_member(location), "path": None}
    return location  # bytes: the payload itself


def _arrow_images(index: CorpusIndex) -> datasets.Dataset:
    """The image column of an indexed Arrow corpus, memory-mapped, with images left undecoded."""
    import datasets

    if index.arrow_layout == "ubench":
        from micromerge.eval.data import load_benchmark

        dataset = load_benchmark(index.source).dataset
    else:
        dataset = load_saved_corpus(Path(CorpusSpec.parse(index.source).location))
    column = index.image_column
    return dataset.cast_column(column, datasets.Image(decode=False)).select_columns([column])


def indexed_pairs(index: CorpusIndex) -> PairData:
    """Every sample's image bytes (or path) and caption, read once from the index: the in-memory
    path, so a corpus is indexed once and its bytes are read once whichever path is chosen."""
    if index.kind == "arrow":
        images = _arrow_images(index)
        payloads = [image_payload(v) for v in column_values(images, images.column_names[0])]
    else:
        payloads = [_located_payload(index.kind, location) for location in index.images]
    return PairData(payloads, list(index.targets), index.source)


def sample_tuple(pixels: np.ndarray | None, target: torch.Tensor, size: int, name: str) -> Sample:
    """(pixels, target, readable, name): an unreadable image travels as zeros with readable False
    and its name; a readable one without (names cost a DataLoader's pickling per sample)."""
    if pixels is None:
        return torch.zeros((3, size, size), dtype=torch.uint8), target, torch.tensor(False), name
    return torch.from_numpy(np.ascontiguousarray(pixels)), target, torch.tensor(True), ""


def _read_member(location: tuple[str, int, int, str]) -> bytes:
    shard, offset, size, _ = location
    with open(shard, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


def batches(
    order: Callable[[int], torch.Tensor],
    start_micro: int,
    total_micro: int,
    per_epoch: int,
    batch: int,
    world: int,
    rank: int,
) -> Iterator[list[tuple[int, int]]]:
    """The (epoch, sample) lists this rank trains on from `start_micro` on: the in-memory path's order."""
    for micro in range(start_micro, total_micro):
        epoch, offset = divmod(micro, per_epoch)
        start = (offset * world + rank) * batch
        yield [(epoch, int(i)) for i in order(epoch)[start : start + batch]]


def stream_loader(
    samples: StreamedSamples, plan: Iterator[list[tuple[int, int]]], workers: int
) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        samples,
        batch_sampler=plan,
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
