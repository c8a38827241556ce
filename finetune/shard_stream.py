"""webdataset tar shards read in order, as open_clip_train reads them: shard lists, brace
patterns, pipes and URLs through the webdataset library, shuffled from the seed, split between
processes and DataLoader workers, resumable at the exact sample. Also what both in-order streams
(these shards and a hub dataset, finetune/hub_stream.py) share: the one-line error of a shard a
worker cannot read, and which skipped batches a worker makes."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from micromerge.core.errors import MicromergeError
from micromerge.core.json_text import parse_json
from micromerge.eval.pairs import IMAGE_SUFFIXES
from micromerge.finetune.augment import named_sample_seed
from micromerge.finetune.streaming import Sample, SampleRecipe

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
            _TarSamples(_UnreadableShard(self.spec, self.urls)),
            wds.shuffle(SAMPLE_SHUFFLE, SAMPLE_SHUFFLE_INITIAL, rng=random.Random(self.recipe.seed)),
            wds.batched(batch, collation_fn=list, partial=False),
            _StreamDecoder(self, skip),
        )
        loader = torch.utils.data.DataLoader(_Passes(pipeline), batch_size=None, num_workers=workers)
        batches = iter(loader)
        for _ in range(skip):  # already trained on: read again (not decoded), not trained again
            next(batches)
        return batches

    def one_pass(self, batch: int, workers: int, urls: list[str]) -> torch.utils.data.DataLoader:
        """Every sample of these shards once, shard by shard in the list's order, unshuffled, named
        (`data check`, a few shards at a time); each worker reads every workers-th shard."""
        import webdataset as wds

        pipeline = wds.DataPipeline(
            wds.SimpleShardList(urls),
            wds.split_by_worker,
            _TarSamples(_UnreadableShard(self.spec, self.urls)),
            wds.batched(batch, collation_fn=list, partial=True),
            _StreamDecoder(self, 0),
        )
        return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=min(workers, len(urls)))


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


class _TarSamples:
    """webdataset's `tarfile_to_samples` (its three stages, in webdataset 0.2.86 and 1.0.2), each
    shard's stream closed once its tar is read: a `pipe:` command's exit status was seen only when
    one of its reads found the command already ended (webdataset's Pipe polls at each read), so a
    command that failed after writing its output (`curl ...; exit 22`) went unnoticed whenever the
    reads finished first; a local shard was left open for the garbage collector. A class, as
    webdataset's own stages are picklable: spawned DataLoader workers (macOS, Windows) unpickle it."""

    def __init__(self, handler: Callable[[Exception], bool]):
        self.handler = handler

    def __call__(self, shards: Iterable[dict]) -> Iterator[dict]:
        from webdataset import tariterators as tar

        opened = _closed_once_read(tar.url_opener(shards, handler=self.handler), self.handler)
        return tar.group_by_keys(tar.tar_file_expander(opened, handler=self.handler), handler=self.handler)


def _closed_once_read(shards: Iterable[dict], handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """The opened shards, each closed when the next is asked for (its tar has been read to its end):
    a pipe read to its end first, then its command waited for, and its exit status said (webdataset's
    Pipe.close raises for a status other than 0 or 141, a shell's broken pipe)."""
    for shard in shards:
        yield shard
        stream = shard["stream"]
        try:
            if getattr(stream, "proc", None) is not None:  # a pipe: what follows the tar's end, drained
                while stream.read(2**16):
                    pass
            stream.close()
        except Exception as error:
            error.args = (*error.args, stream, shard["url"])
            if not handler(error):
                return


PIPE_EXIT = re.compile(r": exit (-?\d+) \(read\)")
"""How webdataset's `pipe:` reader says its command failed (webdataset 0.2.86 and 1.0.2 gopen.py,
`Pipe.check_status`)."""


class _UnreadableShard:
    """webdataset's handler for a shard it cannot read: stop with one line that names the shard
    (webdataset adds its URL as the exception's last argument). Skipping it, as open_clip_train's
    `log_and_continue` does, would train on a corpus other than the one the manifest names.

    A member cut short (an interrupted download) reaches the handler twice: from webdataset's
    per-member loop, with " @ <stream>" added to its message and no URL, then, raised again, from
    its per-shard loop with the stream and URL added (webdataset 0.2.86 tariterators.py,
    `tar_file_iterator` and `tar_file_expander`). The first is passed on as it is: answering it made
    the second line hold the first, which named no shard."""

    def __init__(self, spec: str, urls: list[str]):
        self.spec, self.urls = spec, set(urls)

    def __call__(self, error: Exception) -> bool:
        if not error.args or error.args[-1] not in self.urls:
            raise error  # the per-member loop: the per-shard loop calls again with the URL
        url = error.args[-1]
        why = str(error.args[0]).split(" @ ")[0] if len(error.args) > 1 else type(error).__name__
        opened = error.args[-2] if len(error.args) > 2 else None  # the shard's stream, which it leaves open
        if isinstance(opened, io.IOBase):
            opened.close()
        status = PIPE_EXIT.search(why)  # webdataset's Pipe: "(args, kwargs): exit N (read) {}"
        if status:
            raise ShardReadError(
                f"--data {self.spec}: shard {url}: its command exited with status {status[1]}; run the "
                "command on its own to see why (a download's URL or credentials?), then run again"
            ) from None
        if url.startswith("pipe:") and why == "empty file":  # tarfile's word for a stream of no bytes
            raise ShardReadError(
                f"--data {self.spec}: shard {url}: its command wrote nothing (and exited with status 0); "
                "run the command on its own to see why, then run again"
            ) from None
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
    """A pipeline stage: batches of webdataset samples -> (pixels, target, readable, name) batches,
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
        # no caption: not decoded, so the sample is unreadable and left out of the loss (it
        # trained on empty text once), as the indexed path refuses it before training
        payload = {"bytes": image, "path": None} if image is not None and caption and decode else None
        url, key = sample.get("__url__"), sample.get("__key__")
        seed = named_sample_seed(stream.recipe.seed, current, f"{url}|{key}")
        # a batch a resumed run skips is not decoded either: it is no unreadable sample to name
        return stream.recipe.make(payload, caption, seed, f"{key!r} of {url!r}" if decode else "")


def _sample_caption(sample: dict) -> str:
    """A webdataset sample's caption: its `txt`, else the `caption` of its `json`, as the indexed
    path reads a local shard (the stream read `txt` only: a corpus captioned in `.json` trained on
    empty text). Bad bytes are replaced, bad JSON or a caption that is not text is no caption: the
    sample is then unreadable, and the trainer leaves it out and counts it (finetune/unreadable.py)."""

    def text(key: str) -> str:
        value = sample.get(key, b"")
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    caption = text("txt").strip()
    if not caption and "json" in sample:
        try:
            meta = parse_json(text("json"))
        except json.JSONDecodeError:
            return ""
        found = meta.get("caption") if isinstance(meta, dict) else None
        caption = found.strip() if isinstance(found, str) else ""  # a list or a number: no caption
    return caption
