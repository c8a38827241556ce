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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from tqdm import tqdm

from micromerge.finetune.hub_stream import HubStream, is_hub_layout
from micromerge.finetune.shard_stream import ShardStream, is_shard_stream
from micromerge.finetune.streaming import SampleRecipe, StreamedSamples, index_pairs, stream_loader

CHECK_SIZE = 8
"""Each image is decoded whole, then resized to this and thrown away: whether it decodes is all
the check keeps, and a small size keeps the resize cheap."""

CHECK_BATCH = 64
"""Samples a worker hands back at a time."""


@dataclass(frozen=True)
class CorpusCheck:
    """What one pass over a corpus found: how many samples it read, and the unreadable ones by name
    (in the corpus's order within each worker's share)."""

    read: int
    unreadable: list[str]


def no_target(_: object) -> torch.Tensor:
    """The check keeps no caption or label (a module function: spawned workers unpickle it)."""
    return torch.zeros((), dtype=torch.int64)


def check_corpus(
    spec: str, workers: int, progress: bool, found: Callable[[str], None] = lambda _: None
) -> CorpusCheck:
    """Read every sample of the image-caption corpus `spec` (any form `finetune contrastive --data`
    takes) once, and name the ones a fine-tune would leave out; `found` is told each as it is met,
    so a check of hours that is interrupted has said what it found."""
    recipe = SampleRecipe(CHECK_SIZE, (), 0, no_target)
    batches: Iterable
    if is_shard_stream(spec):
        batches, total = ShardStream(spec, recipe).one_pass(CHECK_BATCH, workers), None
    elif is_hub_layout(spec):
        hub = HubStream(spec, recipe)
        batches, total = hub.one_pass(CHECK_BATCH, workers), hub.rows
    else:
        index = index_pairs(spec)
        samples = StreamedSamples(index, recipe)
        batches, total = stream_loader(samples, _in_order(len(index)), workers), len(index)
    read, unreadable = 0, []
    with tqdm(total=total, unit="sample", desc="check samples", disable=not progress) as bar:
        for _, _, readable, names in batches:
            read += len(readable)
            for name, ok in zip(names, readable.tolist(), strict=True):
                if not ok:
                    unreadable.append(name)
                    found(name)
            bar.update(len(readable))
    return CorpusCheck(read, unreadable)


def _in_order(count: int) -> Iterator[list[tuple[int, int]]]:
    """Every sample once, in order, in batches: a plan for the trainer's own index loader."""
    for start in range(0, count, CHECK_BATCH):
        yield [(0, i) for i in range(start, min(start + CHECK_BATCH, count))]
