"""Training data read as it is used: memory that does not grow with the corpus, and augmentation.

The in-memory path decodes every image once into one uint8 array, which is the fastest for small
data (the demo, one μ-Bench task) and impossible for PLIP's 208 k or Quilt-1M's million pairs. Here
a corpus is an index of where each sample's bytes are — a CSV/JSONL table of image files, a
`save_to_disk` Arrow dataset (memory-mapped), or webdataset-style tar shards (each member's offset
read from the tar headers once, so any sample is one seek away) — and DataLoader workers read,
decode and augment only the samples of the current batches.

Random access keeps the trainer's data order (a seeded permutation per epoch, each rank its own
slice) identical on both paths: without augmentation the streamed run ends bit-identical to the
in-memory one, and resuming continues at the exact sample. Augmentation is drawn from a seed per
(run seed, epoch, sample), so a resumed run also ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from micromerge.core.errors import MicromergeError
from micromerge.eval.data import column_values
from micromerge.eval.images import decode_one
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

if TYPE_CHECKING:
    import datasets

Sample = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(pixels, target, readable): one sample as every streaming path hands it to the trainer's loader."""

FINGERPRINTS = {
    "table": "the table's bytes, image file names and sizes",
    "arrow": "the dataset's Arrow fingerprint, file names and sizes",
    "tar": "shard names and sizes, every member's tar header",
    "bytes": "every byte",
}
"""What a streamed corpus's fingerprint is made of, by index kind (recorded in the manifest)."""

IN_MEMORY_BUDGET = 4 << 30
"""`--data-in-memory auto`: decode into memory when the decoded images take at most this many bytes."""


def _crop(size: int) -> Callable:
    """open_clip's training crop: RandomResizedCrop to the input size, scale (0.9, 1), bicubic."""
    from torchvision.transforms import InterpolationMode, RandomResizedCrop

    return RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=InterpolationMode.BICUBIC)


def _flips(_size: int) -> Callable:
    from torchvision.transforms import Compose, RandomHorizontalFlip, RandomVerticalFlip

    return Compose([RandomHorizontalFlip(), RandomVerticalFlip()])


def _rot90(_size: int) -> Callable:
    def rotate(image: Image.Image) -> Image.Image:
        turns = int(torch.randint(0, 4, (1,)))
        return image.rotate(90 * turns) if turns else image

    return rotate


def _stain_jitter(_size: int) -> Callable:
    """Small colour jitter, the usual stand-in for stain variation between pathology labs."""
    from torchvision.transforms import ColorJitter

    return ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02)


AUGMENTATIONS: dict[str, Callable[[int], Callable]] = {
    "crop": _crop,
    "flip": _flips,
    "rot90": _rot90,
    "stain-jitter": _stain_jitter,
}
"""Augmentations by name (config `augment = ["crop", "flip", ...]`), applied in the order named."""


def check_augment(names: tuple[str, ...]) -> None:
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise MicromergeError(f"--augment {unknown[0]}: choose from {sorted(AUGMENTATIONS)}")


@dataclass(frozen=True)
class CorpusIndex:
    """Where every sample is: per sample a reader key (file path, Arrow row or tar member offsets)
    and its caption or label location, plus a cheap fingerprint of the whole corpus."""

    source: str
    kind: str  # table | arrow | tar | bytes
    images: list  # table: file paths; arrow: row numbers; tar: (shard, offset, size); bytes: payloads
    targets: list  # captions (str) or class indices (int)
    fingerprint: str
    arrow_layout: str = "save_to_disk"  # or "ubench": a μ-Bench copy, opened as `eval` opens it
    image_column: str = "image"  # arrow: the column the images are read from

    def __len__(self) -> int:
        return len(self.images)


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
            images.append((str(shard), *image))
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

    def make(self, payload: dict | None, target: Any, seed: int) -> Sample:
        """(pixels, target, readable) of one sample; no payload: left undecoded (zeros, unreadable)."""
        pixels = None if payload is None else sample_pixels(payload, self.size, self.augment, seed)
        return sample_tuple(pixels, self.encode_target(target), self.size)


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
        """(pixels, target, readable): an unreadable image comes back as zeros with readable False,
        for the trainer to stop on with one line (an exception here would reach it as a worker's
        traceback)."""
        epoch, i = item
        payload = self._payload(i)
        return self.recipe.make(payload, self._target(i), sample_seed(self.recipe.seed, epoch, i))


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


def augmented_pixels(payload: dict, size: int, augment: tuple[str, ...], seed: int) -> np.ndarray | None:
    """One image through the named augmentations, drawn from `seed` alone; uint8 [3, S, S] or None."""
    try:
        source = io.BytesIO(payload["bytes"]) if payload.get("bytes") else payload["path"]
        if source is None:  # a null image cell: no bytes and no path
            return None
        image = Image.open(source).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError):
        return None
    # this worker's CPU generator, for this sample only (torchvision's random transforms draw from it).
    # Not torch.manual_seed: on a CUDA build it also queues a seeding of every GPU, formatting a stack
    # trace for each call (measured: 1.3 ms a sample, more than decoding and cropping it)
    torch.random.default_generator.manual_seed(seed)
    for name in augment:
        image = AUGMENTATIONS[name](size)(image)
    if image.size != (size, size):  # no crop named: fit as the in-memory path does
        return decode_one({"bytes": _png(image), "path": None}, size)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def sample_tuple(pixels: np.ndarray | None, target: torch.Tensor, size: int) -> Sample:
    """(pixels, target, readable): an unreadable image travels as zeros with readable False."""
    if pixels is None:
        return torch.zeros((3, size, size), dtype=torch.uint8), target, torch.tensor(False)
    return torch.from_numpy(np.ascontiguousarray(pixels)), target, torch.tensor(True)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _read_member(location: tuple[str, int, int]) -> bytes:
    shard, offset, size = location
    with open(shard, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


def sample_seed(seed: int, epoch: int, i: int) -> int:
    digest = hashlib.sha256(f"{seed}|{epoch}|{i}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def named_sample_seed(seed: int, current: int, name: str) -> int:
    """The augmentation seed of a streamed sample known by a name rather than an index."""
    return sample_seed(seed, current, int.from_bytes(hashlib.sha256(name.encode()).digest()[:6], "little"))


def sample_pixels(payload: dict, size: int, augment: tuple[str, ...], seed: int) -> np.ndarray | None:
    """One streamed image, uint8 [3, S, S] or None: through the augmentations drawn from `seed`, or,
    without augmentation, exactly the in-memory path's decode (so the two paths then train alike)."""
    return augmented_pixels(payload, size, augment, seed) if augment else decode_one(payload, size)


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


STREAM_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")
# open_clip_train's buffer sizes (shards: 2,000, the first draw after 500; samples: 5,000, after
# 1,000): a smaller sample buffer leaves batches of shards written in class order full of one
# class (measured: a loss up to 1.1 above open_clip_train's on the demo corpus with 1,000 and 100)
SHARD_SHUFFLE, SHARD_SHUFFLE_INITIAL = 2000, 500
SAMPLE_SHUFFLE, SAMPLE_SHUFFLE_INITIAL = 5000, 1000


def is_shard_stream(spec: str) -> bool:
    """A shard list only the webdataset library can read in order: URLs, pipes, brace patterns."""
    return spec.startswith(STREAM_PREFIXES) or ("{" in spec and ".." in spec)


def shard_urls(spec: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(spec))


class ShardStream:
    """webdataset shards read in order through the webdataset library: shards shuffled per pass from
    the seed, split between ranks (as split_by_node) and workers (split_by_worker), samples mixed in a
    seeded buffer. Built from the pipeline stages webdataset 0.2 and 1.0 share, so it runs beside
    open_clip's training extra (which pins webdataset <= 0.2.86). The order depends only on the seed
    and the numbers of ranks and workers, so a resumed run skips the batches it has trained on and
    continues at the exact sample."""

    def __init__(self, spec: str, recipe: SampleRecipe):
        self.spec, self.recipe = spec, recipe
        self.urls = shard_urls(spec)
        missing = [
            url for url in self.urls if not url.startswith(STREAM_PREFIXES) and not Path(url).is_file()
        ]
        if missing:  # found by a DataLoader worker, it was webdataset's FileNotFoundError traceback
            more = f" (and {len(missing) - 1} more of its {len(self.urls)})" if len(missing) > 1 else ""
            raise MicromergeError(
                f"--data {spec}: shard {missing[0]}{more} does not exist; check the pattern"
            )
        self.fingerprint = hashlib.sha256(json.dumps({"shards": self.urls}).encode()).hexdigest()

    def loader(self, batch: int, workers: int, world: int, rank: int, skip: int) -> Iterator:
        import random

        import webdataset as wds

        if len(self.urls) < world * max(1, workers):
            raise MicromergeError(
                f"--data {self.spec}: {len(self.urls)} shards for {world} process(es) x {max(1, workers)} "
                "worker(s): each needs a shard of its own; lower --workers or split the corpus into more shards"
            )
        # every rank and worker draws the same shard order (seed, pass), then takes its own shards
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.urls),
            wds.detshuffle(SHARD_SHUFFLE, SHARD_SHUFFLE_INITIAL, seed=self.recipe.seed),
            _NodeSplit(rank, world),
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=_UnreadableShard(self.spec)),
            wds.shuffle(SAMPLE_SHUFFLE, SAMPLE_SHUFFLE_INITIAL, rng=random.Random(self.recipe.seed)),
            wds.batched(batch, collation_fn=list, partial=False),
            _StreamDecoder(self, skip),
        )
        loader = torch.utils.data.DataLoader(_Passes(pipeline), batch_size=None, num_workers=workers)
        batches = iter(loader)
        for _ in range(skip):  # already trained on: read again (not decoded), not trained again
            next(batches)
        return batches


def skipped_here(skip: int) -> int:
    """How many of the first `skip` batches this DataLoader worker makes: the loader asks its
    workers in turn (batch i from worker i mod W), and an endless stream never retires one."""
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return len(range(worker, skip, workers))


class _Passes(torch.utils.data.IterableDataset):
    """Pass after pass over a pipeline (what webdataset's `.repeat()` does), ending when the first
    pass yields nothing: `.repeat()` spun for ever on a worker whose shards hold no full batch, and
    the loader, which asks its workers in turn, hung with it (an empty shard, or a corpus of none).
    Shards are dealt to workers afresh each pass, so a worker that has yielded goes on past an empty
    pass. Which worker ends depends only on the seed, so the batch order, and resuming, stay exact."""

    def __init__(self, pipeline: Iterable[tuple[torch.Tensor, ...]]):
        self.pipeline = pipeline

    def __iter__(self) -> Iterator:
        yielded = False
        while True:
            for item in self.pipeline:
                yielded = True
                yield item
            if not yielded:
                return


class ShardReadError(MicromergeError):
    """A shard webdataset could not read (not a tar file, cut short). Raised in a DataLoader worker,
    it reaches the main process as torch re-raises a worker's exception: its class called with a
    message that adds the worker's whole traceback. The class keeps the one line it was raised with
    (the traceback's last), so the user reads one line, as everywhere else."""

    def __init__(self, message: str):
        if "\n" in message:  # re-raised from a worker: "…\nmicromerge.….ShardReadError: the line"
            message = message.rstrip().splitlines()[-1].partition(f"{type(self).__name__}: ")[2] or message
        super().__init__(message)


class _UnreadableShard:
    """webdataset's handler for a shard it cannot read: stop with one line that names the shard
    (webdataset adds its URL as the exception's last argument). Skipping it, as open_clip_train's
    `log_and_continue` does, would train on a corpus other than the one the manifest names."""

    def __init__(self, spec: str):
        self.spec = spec

    def __call__(self, error: Exception) -> bool:
        url = error.args[-1] if error.args else "?"
        why = error.args[0] if len(error.args) > 1 else type(error).__name__
        opened = error.args[-2] if len(error.args) > 2 else None  # the shard's stream, which it leaves open
        if isinstance(opened, io.IOBase):
            opened.close()
        raise ShardReadError(
            f"--data {self.spec}: shard {url} cannot be read as a tar file ({why}); re-create or re-download it"
        ) from None


class _NodeSplit:
    """This process's shards: every world-th from its rank on (webdataset's split_by_node, with the
    rank and world given rather than read from torch.distributed, so one process can be tested as
    any rank)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def __call__(self, shards: Iterator[dict]) -> Iterator[dict]:
        return itertools.islice(shards, self.rank, None, self.world)


class _StreamDecoder:
    """A pipeline stage: batches of webdataset samples -> (pixels, target, readable) batches,
    augmented from (seed, pass, shard, key). Called once per pass of the data (DataPipeline.repeat),
    so it counts passes itself (a sample is augmented afresh on each pass) and this worker's batches:
    the ones a resumed run has already trained on are read but not decoded (their images come back
    as zeros, marked unreadable, and are dropped by the loader), so resuming deep into a corpus
    costs reading the tar shards up to there, not decoding them. It keeps nothing per sample."""

    def __init__(self, stream: ShardStream, skip: int):
        self.stream, self.skip = stream, skip
        self.passes, self.batches = 0, 0

    def __call__(self, batches: Iterator[list[dict]]) -> Iterator[tuple[torch.Tensor, ...]]:
        current = self.passes
        self.passes += 1
        skipped = skipped_here(self.skip)
        for samples in batches:
            decode = self.batches >= skipped
            self.batches += 1
            yield torch.utils.data.default_collate([self._decode(s, current, decode) for s in samples])

    def _decode(self, sample: dict, current: int, decode: bool) -> Sample:
        stream = self.stream
        image = next((sample[s[1:]] for s in IMAGE_SUFFIXES if s[1:] in sample), None)
        caption = _sample_caption(sample)
        # no caption: not decoded, so the sample is unreadable and the run stops at its step, as
        # the indexed path refuses it before training (it trained on empty text)
        payload = {"bytes": image, "path": None} if image is not None and caption and decode else None
        name = f"{sample.get('__url__')}|{sample.get('__key__')}"
        return stream.recipe.make(payload, caption, named_sample_seed(stream.recipe.seed, current, name))


def _sample_caption(sample: dict) -> str:
    """A webdataset sample's caption: its `txt`, else the `caption` of its `json`, as the indexed
    path reads a local shard (the stream read `txt` only: a corpus captioned in `.json` trained on
    empty text). Bad bytes are replaced, bad JSON or a caption that is not text is no caption: a
    worker cannot stop the run (the step that meets it does)."""

    def text(key: str) -> str:
        value = sample.get(key, b"")
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    caption = text("txt").strip()
    if not caption and "json" in sample:
        try:
            meta = json.loads(text("json"))
        except json.JSONDecodeError:
            return ""
        found = meta.get("caption") if isinstance(meta, dict) else None
        caption = found.strip() if isinstance(found, str) else ""  # a list or a number: no caption
    return caption
