"""Image-caption datasets in the Hugging Face hub's layout, read with `streaming=True`.

A hub dataset such as Quilt-1M is parquet files (images embedded as `{bytes, path}` structs, the
`datasets` features in the schema's metadata). Loading it the ordinary way downloads every file and
converts it to an Arrow cache first: 150 GB before the first step. Streamed, `datasets` reads the
files as it goes: shards (files, or parquet row groups after `reshard`) are shuffled per pass from
the seed, split between processes (`split_dataset_by_node`) and DataLoader workers, and samples
mixed in a seeded buffer. The same path reads a local copy of such a repository (a folder of its
parquet files, as `hf download --repo-type dataset` leaves it), which is how it is
tested here: the hub only adds the download.

The order depends only on the seed and the numbers of processes and workers, so a resumed run reads
again the rows it had trained on (without decoding their images) and continues at the exact sample.
"""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from micromerge.core.errors import MicromergeError, first_line
from micromerge.core.hub_download import hf_download_command, offline_setting
from micromerge.eval.pairs import (
    CAPTION_TABLES,
    CorpusSpec,
    damaged_parquet,
    dataset_columns,
    is_hub_id,
    is_saved_dataset,
    parquet_footer,
    training_split,
)
from micromerge.finetune.augment import named_sample_seed
from micromerge.finetune.shard_stream import ShardReadError, skipped_here
from micromerge.finetune.streaming import Sample, SampleRecipe, corpus_fingerprint, image_payload

if TYPE_CHECKING:
    import datasets

SAMPLE_SHUFFLE = 5000  # open_clip_train's sample buffer, as the webdataset path
LOCAL_SUFFIXES = (".parquet",)


def is_hub_layout(spec: str) -> bool:
    """A hub dataset id (`owner/name`, optionally `@revision`) that is not a local path, or a local
    folder holding only parquet files (a downloaded hub repository)."""
    location = CorpusSpec.parse(spec).location
    path = Path(location)
    if path.exists():
        return path.is_dir() and _local_files(path) != [] and not _other_layout(path)
    return is_hub_id(location)


def _local_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in LOCAL_SUFFIXES and p.is_file())


def _other_layout(folder: Path) -> bool:
    """The folder is a layout another loader reads (captions table, tar shards, save_to_disk)."""
    tables = any((folder / n).is_file() for n in (*CAPTION_TABLES, "state.json"))
    return tables or is_saved_dataset(folder) or any(folder.glob("*.tar"))


class HubStream:
    """A hub-layout dataset streamed with `datasets` (`streaming=True`): see the module docstring."""

    def __init__(self, spec: str, recipe: SampleRecipe):
        self.spec, self.recipe = spec, recipe
        corpus = CorpusSpec.parse(spec)
        self.dataset, files, self.rows = _open_streaming(corpus.location)
        self.files = [file for file, _ in files]
        features = self.dataset.features or {}
        self.image_column, self.caption_column = dataset_columns(features, corpus, f"--data {spec}")
        import datasets

        self.dataset = self.dataset.select_columns([self.image_column, self.caption_column])
        self.dataset = self.dataset.cast_column(self.image_column, datasets.Image(decode=False))
        self.fingerprint = corpus_fingerprint({"files": files}, corpus)

    @property
    def num_shards(self) -> int:
        return self.dataset.num_shards

    def loader(self, batch: int, workers: int, world: int, rank: int, skip: int) -> Iterator:
        from datasets.distributed import split_dataset_by_node

        dataset = self.dataset
        need = world * max(1, workers)
        if dataset.num_shards < need:  # parquet: one shard per row group instead of per file
            dataset = dataset.reshard()
        if dataset.num_shards < need:
            raise MicromergeError(
                f"--data {self.spec}: {dataset.num_shards} shards (files or parquet row groups) for {world} "
                f"process(es) x {max(1, workers)} worker(s): each needs a shard of its own; lower --workers "
                "or write the data in more files"
            )
        # every process draws the same shard order from the seed (and the pass), then takes its own
        dataset = split_dataset_by_node(
            dataset.shuffle(seed=self.recipe.seed, buffer_size=SAMPLE_SHUFFLE), rank=rank, world_size=world
        )
        samples = _HubSamples(self, dataset, rank, skip_samples=(skip, batch))
        loader = torch.utils.data.DataLoader(samples, batch_size=batch, drop_last=True, num_workers=workers)
        batches = iter(loader)
        for _ in range(skip):  # already trained on: read again (not decoded), not trained again
            next(batches)
        return batches

    def row_groups(self) -> list[RowGroup]:
        """Every row group of a local copy, in the files' order, from their footers (a damaged footer is
        a one-line error here, not in a worker): what `data check` reads, a few groups at a time."""
        if not all(os.path.isfile(file) for file in self.files):
            name, revision = hub_name_and_revision(CorpusSpec.parse(self.spec).location)
            raise MicromergeError(
                f"--data {self.spec}: data check reads every byte of a local copy; make one "
                f"(`{hf_download_command(name, dataset=True, revision=revision or None)}`) and pass its folder"
            )
        groups = []
        for file in self.files:
            footer, first = parquet_footer(file, self.spec), 0
            for group in range(footer.num_row_groups):
                rows = footer.row_group(group).num_rows
                groups.append(RowGroup(file, group, first, rows, footer))
                first += rows
        return groups

    def one_pass(self, batch: int, workers: int, groups: list[RowGroup]) -> torch.utils.data.DataLoader:
        """The rows of these row groups once, in order, unshuffled, each unreadable one named by its
        file and row (`data check`); the workers share the groups, so one large file is read by all
        of them."""
        rows = _NamedRows(self, groups)
        return torch.utils.data.DataLoader(rows, batch_size=batch, num_workers=min(workers, len(groups)))


@dataclass(frozen=True)
class RowGroup:
    """A parquet row group of a local copy: its file, its number there, its first row in the file,
    how many rows it holds, and the file's footer (pyarrow's FileMetaData, one object for all the
    file's groups). The footer is passed on so that each group is opened without reading it again:
    it grows with the number of groups, and reading it for each of a file's 1,000 groups of 100 rows
    cost 14.6 ms a group against 0.8 ms (measured), beside about 100 ms to decode its 100 images."""

    file: str
    group: int
    first: int
    rows: int
    footer: Any = field(compare=False, repr=False)


class _NamedRows(torch.utils.data.IterableDataset):
    """A local copy's rows, row group by row group: (pixels, target, readable, name) per row, the
    name `row R of 'FILE'`. Read with pyarrow: datasets' stream, iterated in a DataLoader worker,
    deals its shards among the workers itself, and which file a row came from is not known there."""

    def __init__(self, stream: HubStream, groups: list[RowGroup]):
        self.stream, self.groups = stream, groups

    def __iter__(self) -> Iterator[Sample]:
        import pyarrow
        import pyarrow.parquet as pq

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = self.stream
        columns = [stream.image_column, stream.caption_column]
        for span in self.groups[worker::workers]:
            file, row = span.file, span.first
            try:
                with pq.ParquetFile(file, metadata=span.footer) as parquet:
                    for batch in parquet.iter_batches(
                        batch_size=256, row_groups=[span.group], columns=columns
                    ):
                        images, captions = (batch.column(name).to_pylist() for name in columns)
                        for image, caption in zip(images, captions, strict=True):
                            text = _row_caption(caption)
                            payload = _cell_payload(image) if text else None
                            yield stream.recipe.make(payload, text, 0, f"row {row} of {file!r}")
                            row += 1
            except (OSError, pyarrow.ArrowException) as error:
                why = first_line(error)
                raise ShardReadError(
                    f"--data {stream.spec}: {file} is damaged at row {row} ({why}); download or write it again"
                ) from None


def _row_caption(value: Any) -> str:
    """A row's caption as the stream and `data check` read it: its text, stripped; anything else
    (null; a type the column check let through) is none, so the row is left out as unreadable."""
    return value.strip() if isinstance(value, str) else ""


def _cell_payload(value: Any) -> dict:
    """An image cell as parquet holds it: datasets' `{bytes, path}` struct, raw bytes, or null."""
    return {"bytes": value, "path": None} if isinstance(value, bytes) else image_payload(value)


class _HubSamples(torch.utils.data.IterableDataset):
    """Endless passes over this process's share of the stream: (pixels, target, readable, name) per row.
    Each pass reshuffles (`set_epoch`); augmentation is drawn from (seed, pass, process, worker, n).
    The rows of the batches a resumed run has already trained on are read but not decoded (zeros,
    marked unreadable, dropped by the loader)."""

    def __init__(
        self, stream: HubStream, dataset: datasets.IterableDataset, rank: int, skip_samples: tuple[int, int]
    ):
        self.stream, self.dataset, self.rank = stream, dataset, rank
        self.skip, self.batch = skip_samples

    def __iter__(self) -> Iterator[Sample]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        stream = self.stream
        undecoded = skipped_here(self.skip) * self.batch
        yielded = False
        # datasets keeps the epoch in shared memory (for persistent workers), and forked workers
        # share it: one worker starting its next pass reshuffled the pass another was starting, and
        # a resumed run (whose first worker races through its undecoded pass) trained on other rows
        dataset = copy.deepcopy(self.dataset)
        for current in itertools.count():
            dataset.set_epoch(current)
            for n, row in enumerate(_rows_or_one_line(dataset, stream)):
                yielded = True
                caption = _row_caption(row[stream.caption_column])
                payload = image_payload(row[stream.image_column])
                seed = named_sample_seed(stream.recipe.seed, current, f"{self.rank}|{worker}|{n}")
                # a row without a caption is left undecoded: unreadable, it is left out of the loss
                # a streamed row has no name a user could find it by (its file is not given)
                yield stream.recipe.make(None if undecoded or not caption else payload, caption, seed, "")
                undecoded = max(0, undecoded - 1)
            # an empty share would loop here for ever; shards are dealt afresh each pass, so a
            # worker that has had rows goes on past a pass whose share was an empty file
            if not yielded:
                return


def _rows_or_one_line(dataset: datasets.IterableDataset, stream: HubStream) -> Iterator[dict[str, Any]]:
    """The stream's rows; a file that fails as it is read (a damaged page behind a valid footer: the
    footers were read up front) stops the run with one line naming it, not pyarrow's "Couldn't
    deserialize thrift" traceback from a DataLoader worker, hours into a run."""
    import pyarrow

    rows = iter(dataset)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except (OSError, pyarrow.ArrowException) as error:
            raise _unreadable(stream, error) from None
        yield row


def _unreadable(stream: HubStream, error: Exception) -> ShardReadError:
    """The one line for a stream that failed: the damaged local file, or the hub's read error."""
    why = first_line(error)
    if not all(os.path.isfile(file) for file in stream.files):
        return ShardReadError(
            f"--data {stream.spec}: reading the hub stream failed ({why}); run again with --resume, or "
            "download a local copy and pass its folder"
        )
    damaged = damaged_parquet(stream.files, stream.spec)
    # not reproduced when read again: a read error of the moment
    return ShardReadError(
        damaged or f"--data {stream.spec}: a file could not be read ({why}); run again with --resume"
    )


def hub_name_and_revision(spec: str) -> tuple[str, str]:
    """(`owner/name`, revision or "") of a hub id `owner/name[@revision]`; a local path is all name."""
    name, _, revision = spec.partition("@") if not Path(spec).exists() else (spec, "", "")
    return name, revision


def _open_streaming(spec: str) -> tuple[Any, list, int | None]:
    """(the train split as an IterableDataset, the data files it reads, its number of rows when known
    without reading the data: the parquet footers of a local copy, the hub card's split sizes) for a
    hub id or local copy. The files (resolved hub paths carry the revision's commit; local ones get
    their sizes) are the stream's fingerprint: cheap, and it changes when the repository or a file does."""
    import datasets

    name, revision = hub_name_and_revision(spec)
    try:
        builder = datasets.load_dataset_builder(name, revision=revision or None)
    except Exception as exc:  # the hub's and fsspec's errors have no common base
        offline = offline_setting(dataset=True)
        how = (
            f"is not in the cache, and the hub cannot be reached offline ({offline})"
            if offline
            else f"could not be opened ({type(exc).__name__})"
        )
        raise MicromergeError(
            f"--data {spec}: the hub dataset {how}; make a local copy, a folder of its parquet files "
            f"(`{hf_download_command(name, dataset=True, revision=revision or None)}`), and pass --data DIR"
        ) from exc
    splits = builder.config.data_files or {}
    split = training_split(list(splits), spec)
    files = [str(f) for f in splits[split]]
    facts = [(f, os.path.getsize(f)) if os.path.isfile(f) else (f, None) for f in files]
    return builder.as_streaming_dataset(split=split), facts, _row_count(builder, split, files, spec)


def _row_count(builder: datasets.DatasetBuilder, split: str, files: list[str], spec: str) -> int | None:
    """The rows of a local copy from its parquet footers, or the hub card's count. A local file with
    a row group of no rows (pyarrow and pandas write a table of none so; `datasets` writes no row
    group) is refused here: datasets' stream fails on it in a DataLoader worker ("BatchSize must be
    greater than 0", datasets 5.0 to 5.2)."""
    if files and all(os.path.isfile(f) and f.endswith(".parquet") for f in files):
        footers = [parquet_footer(f, spec) for f in files]
        for file, footer in zip(files, footers, strict=True):
            if any(footer.row_group(i).num_rows == 0 for i in range(footer.num_row_groups)):
                raise MicromergeError(
                    f"--data {spec}: {file} has a row group of no rows, which datasets' stream cannot "
                    "read; delete the file if it holds no rows, or write it again without the empty group"
                )
        return sum(footer.num_rows for footer in footers)
    known = (builder.info.splits or {}).get(split)
    return known.num_examples if known is not None and known.num_examples else None
