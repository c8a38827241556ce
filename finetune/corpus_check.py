"""`micromerge data check`: every sample of a fine-tuning corpus read once, as a fine-tune reads it,
and the ones a fine-tune would leave out named, before hours of training rather than after.

A streamed fine-tune leaves out the unreadable samples it meets, stops past --max-bad-fraction, and
lists the ones it left out in its run folder (finetune/unreadable.py). On a scraped corpus a user
wants that list first: to clean the corpus, or to know that --max-bad-fraction will hold. The check
reads every sample through the reader and decoder the trainer's stream uses, so it finds what a run
would leave out (an image that does not decode, a shard sample without a caption), no more. It reads
in the corpus's own order, in DataLoader worker processes, without shuffling or augmenting, and
throws the decoded pixels away. A hub dataset's rows, which the training stream cannot name (it
shuffles them across files), are named here by their file and row.

A check of a million samples takes minutes to hours, so it reads the corpus in parts, one after
another, each by all the workers; with --out the finished parts are kept in a report
(finetune/check_report.py), and the check run again goes on from the first part not finished.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch
from tqdm import tqdm

from micromerge.finetune.hub_stream import HubStream, RowGroup, is_hub_layout
from micromerge.finetune.shard_stream import STREAM_PREFIXES, ShardStream, is_shard_stream
from micromerge.finetune.streaming import SampleRecipe, StreamedSamples, index_pairs, stream_loader

CHECK_SIZE = 8
"""Each image is decoded whole, then resized to this and thrown away: whether it decodes is all
the check keeps, and a small size keeps the resize cheap."""

CHECK_BATCH = 64
"""Samples a worker hands back at a time."""

PART_SAMPLES = 8192
"""Samples per worker in a part of an indexed corpus or a hub copy (whole row groups, at least one
per worker); a shard stream's part is cut by bytes (PART_SHARD_BYTES), its sample count unknown.
Each part starts and ends worker processes of its own: 0.11 s for two workers (measured, a loader
of one item), 3 % of a part of 2,048 samples a worker at this machine's ~450 samples/s a worker
and under 1 % of this size, about 18 s; an interrupted check loses at most the part it was in."""

PART_SHARD_BYTES = 512 * 2**20
"""Bytes of local shards per worker in a part of a shard stream: about 9,000 images of the 59 KB
the bench's 256 px noise JPEGs take (176 MB for 3,000), near PART_SAMPLES."""

Unit = TypeVar("Unit")


@dataclass(frozen=True)
class CheckProgress:
    """What a check has finished: its first `parts_done` parts, the samples read in them, and the
    unreadable ones by name, in the order read."""

    parts_done: int = 0
    read: int = 0
    unreadable: tuple[str, ...] = ()


class CorpusParts(Protocol):
    """A corpus cut into parts that a check reads one after another. The cut depends only on the
    corpus and `per_part` (recorded in the report), so a check resumed with other --workers reads
    the same parts."""

    @property
    def fingerprint(self) -> str: ...

    @property
    def samples(self) -> int | None:
        """How many samples the corpus holds; None for a shard stream, known only once read."""

    def __len__(self) -> int: ...

    def batches(self, part: int, workers: int) -> Iterable[tuple[torch.Tensor, ...]]: ...


def no_target(_: object) -> torch.Tensor:
    """The check keeps no caption or label (a module function: spawned workers unpickle it)."""
    return torch.zeros((), dtype=torch.int64)


def corpus_parts(spec: str, per_part: int) -> CorpusParts:
    """The image-caption corpus `spec` (any form `finetune contrastive --data` takes) in parts sized
    for `per_part` workers."""
    recipe = SampleRecipe(CHECK_SIZE, (), 0, no_target)
    if is_shard_stream(spec):
        return _shard_parts(ShardStream(spec, recipe), per_part)
    if is_hub_layout(spec):
        return _hub_parts(HubStream(spec, recipe), per_part)
    return _IndexParts(StreamedSamples(index_pairs(spec), recipe), per_part)


def check_corpus(
    parts: CorpusParts,
    workers: int,
    progress: bool,
    done: CheckProgress = CheckProgress(),
    found: Callable[[str], None] = lambda _: None,
    kept: Callable[[CheckProgress], None] = lambda _: None,
) -> CheckProgress:
    """Read every sample of the parts after `done` once, and name the ones a fine-tune would leave
    out: `found` is told each as it is met (so an interrupted check has said what it found), `kept`
    what is finished after each part."""
    with tqdm(
        total=parts.samples, initial=done.read, unit="sample", desc="check samples", disable=not progress
    ) as bar:
        for part in range(done.parts_done, len(parts)):
            read, unreadable = 0, []
            for _, _, readable, names in parts.batches(part, workers):
                read += len(readable)
                for name, ok in zip(names, readable.tolist(), strict=True):
                    if not ok:
                        unreadable.append(name)
                        found(name)
                bar.update(len(readable))
            done = CheckProgress(part + 1, done.read + read, (*done.unreadable, *unreadable))
            kept(done)
    return done


class _OnePass(Protocol[Unit]):
    """A training stream that can also read some of its units (shards, row groups) once, in order."""

    @property
    def fingerprint(self) -> str: ...

    def one_pass(self, batch: int, workers: int, units: list[Unit]) -> Iterable[tuple[torch.Tensor, ...]]: ...


@dataclass(frozen=True)
class _StreamParts(Generic[Unit]):
    """A stream's units in parts (`_shard_parts`, `_hub_parts`), read by the stream's own one pass."""

    stream: _OnePass[Unit]
    parts: list[list[Unit]]
    samples: int | None

    @property
    def fingerprint(self) -> str:
        return self.stream.fingerprint

    def __len__(self) -> int:
        return len(self.parts)

    def batches(self, part: int, workers: int) -> Iterable[tuple[torch.Tensor, ...]]:
        return self.stream.one_pass(CHECK_BATCH, workers, self.parts[part])


def _shard_parts(stream: ShardStream, per_part: int) -> _StreamParts[str]:
    """webdataset shards through the library as a fine-tune reads them, at least `per_part` a part:
    a pipe's or a URL's size is unknown, so those are one a worker; local shards are taken until
    they hold `per_part` x PART_SHARD_BYTES, so a corpus of small shards is not read in parts that
    each cost more to start than to read."""
    return _StreamParts(stream, _cut(stream.urls, per_part, _shard_bytes, PART_SHARD_BYTES), None)


def _shard_bytes(url: str) -> float:
    return os.path.getsize(url) if not url.startswith(STREAM_PREFIXES) else math.inf


def _hub_parts(stream: HubStream, per_part: int) -> _StreamParts[RowGroup]:
    """A local hub copy's row groups, at least `per_part` and `per_part` x PART_SAMPLES rows a part."""
    groups = stream.row_groups()
    parts = _cut(groups, per_part, lambda group: group.rows, PART_SAMPLES)
    return _StreamParts(stream, parts, sum(group.rows for group in groups))


def _cut(units: list[Unit], per_part: int, size: Callable[[Unit], float], least: float) -> list[list[Unit]]:
    """Units (shards, row groups) in order, in parts of at least one a worker and `least` in size a
    worker; the last part may hold less."""
    parts: list[list[Unit]] = []
    held = 0.0
    for unit in units:
        if not parts or (len(parts[-1]) >= per_part and held >= per_part * least):
            parts.append([])
            held = 0.0
        parts[-1].append(unit)
        held += size(unit)
    return parts


class _IndexParts:
    """An indexed corpus (captions table, tar folder, save_to_disk) through the trainer's index
    reader, `per_part` x PART_SAMPLES samples a part, in the corpus's order."""

    def __init__(self, samples: StreamedSamples, per_part: int):
        self.reader, self.size = samples, per_part * PART_SAMPLES
        self.fingerprint, self.samples = samples.index.fingerprint, len(samples.index)

    def __len__(self) -> int:
        return math.ceil(self.samples / self.size)

    def batches(self, part: int, workers: int) -> Iterable[tuple[torch.Tensor, ...]]:
        start = part * self.size
        return stream_loader(self.reader, _in_order(start, min(start + self.size, self.samples)), workers)


def _in_order(start: int, stop: int) -> Iterator[list[tuple[int, int]]]:
    """Samples start to stop once, in order, in batches: a plan for the trainer's own index loader."""
    for first in range(start, stop, CHECK_BATCH):
        yield [(0, i) for i in range(first, min(first + CHECK_BATCH, stop))]
