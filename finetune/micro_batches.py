"""The trainer's data order and its batches: a seeded permutation per epoch (so the data position
is one integer, and a resumed run continues at the exact sample), and micro-batch number i as
normalised pixels and targets on the device, from whichever path the data took."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from micromerge.core.errors import MicromergeError
from micromerge.eval.images import resident_on_device
from micromerge.finetune.config import FinetuneConfig
from micromerge.finetune.prepare import Prepared
from micromerge.finetune.streaming import batches, stream_loader
from micromerge.finetune.unreadable import WHAT, first_named
from micromerge.merging.models import OPENAI_MEAN, OPENAI_STD

if TYPE_CHECKING:
    from accelerate import Accelerator


class MicroBatch(NamedTuple):
    """Normalised pixels and targets on the device; for a stream, which samples are readable (on
    the device, for the loss), how many are not (counted on the host, without a device sync) and
    the names of those the stream names. The in-memory path dropped its unreadable images when it
    decoded them: keep is None."""

    pixels: torch.Tensor
    targets: torch.Tensor
    keep: torch.Tensor | None = None
    unreadable: int = 0
    unreadable_names: tuple[str, ...] = ()


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The seeded permutation of one epoch: the data order of both paths, so the position is one integer."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class MicroBatches:
    """Micro-batch number i -> (normalised pixels, targets) on the device, from whichever path the
    data took: a stream (its own order), pixels resident on the GPU, or the host array. The in-memory
    order is the seeded permutation of each epoch, each rank taking its own slice."""

    def __init__(
        self,
        prepared: Prepared,
        cfg: FinetuneConfig,
        accelerator: Accelerator,
        first: int,
        total: int,
        per_epoch: int,
    ):
        self.prepared, self.cfg, self.device = prepared, cfg, accelerator.device
        self.per_epoch, self.world, self.rank = (
            per_epoch,
            accelerator.num_processes,
            accelerator.process_index,
        )
        preprocess = prepared.model_config.get("preprocess_cfg", {})
        self.mean = torch.tensor(preprocess.get("mean", OPENAI_MEAN), device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocess.get("std", OPENAI_STD), device=self.device).view(1, 3, 1, 1)
        self.resident: torch.Tensor | None = None
        self.stream: Iterator[tuple[torch.Tensor, ...]] | None = None
        self.epoch = -1  # no epoch's order drawn yet: the first in-memory batch draws it
        self.permutation = torch.empty(0, dtype=torch.long)
        n, batch, workers = prepared.count, cfg.batch_size, cfg.workers
        if prepared.shards is not None:
            self.stream = prepared.shards.loader(batch, workers, self.world, self.rank, skip=first)
        elif prepared.stream is not None:
            plan = batches(lambda epoch: epoch_order(n, cfg.seed, epoch), first, total, per_epoch, batch,
                           self.world, self.rank)  # fmt: skip
            self.stream = iter(stream_loader(prepared.stream, plan, workers))
        else:
            assert prepared.data is not None  # neither stream: the in-memory path
            targets = prepared.tokens if prepared.tokens is not None else torch.tensor(prepared.data.targets)
            self.resident = resident_on_device(prepared.data.pixels, np.arange(n), self.device)
            # on a GPU the batches are gathered on the device: no per-step copy
            self.targets = targets.to(self.device) if self.resident is not None else targets

    def close(self) -> None:
        """Stop the stream's worker processes now. An interrupted or failed run's traceback holds
        this object (a notebook keeps the last one), and its DataLoader workers lived on with it,
        two idle processes of a `--workers 2` run until the next error replaced it."""
        self.stream = None  # its last reference: the loader's iterator shuts its workers down

    def get(self, micro: int) -> MicroBatch:
        keep, unreadable, names = None, 0, ()
        if self.stream is not None:
            try:
                pixels, targets, readable, named = next(self.stream)
            except StopIteration:  # every worker's share passed without a full batch
                raise MicromergeError(
                    f"--data {self.cfg.data}: the stream ran dry at step {micro}: no shard holds a full batch "
                    f"of {self.cfg.batch_size} samples (empty shards?); check the shards or lower --batch-size"
                ) from None
            except MicromergeError as exc:  # a worker's (an unreadable shard), raised again by the loader
                # without the loader's frames, which held its workers alive as long as the error lived
                raise exc.with_traceback(None) from None

            unreadable, names = len(readable) - int(readable.sum()), tuple(name for name in named if name)
            if unreadable == len(readable):  # nothing left to train on (the loss would be 0/0)
                raise MicromergeError(
                    f"--data {self.cfg.data}: all {len(readable)} samples of a batch at step "
                    f"{micro // self.cfg.accum_steps + 1} were {WHAT}{first_named(names)}, so the step has "
                    "nothing to train on (a whole batch is most often a broken shard or folder); fix the corpus"
                )
            pixels, targets = pixels.to(self.device), targets.to(self.device)
            keep = readable.to(self.device)
        else:
            epoch, offset = divmod(micro, self.per_epoch)
            if epoch != self.epoch:
                self.epoch, self.permutation = epoch, epoch_order(self.prepared.count, self.cfg.seed, epoch)
                if self.resident is not None:
                    self.permutation = self.permutation.to(self.device)
            start = (offset * self.world + self.rank) * self.cfg.batch_size
            chosen = self.permutation[start : start + self.cfg.batch_size]
            if self.resident is not None:
                pixels, targets = self.resident[chosen], self.targets[chosen]
            else:
                assert self.prepared.data is not None  # the in-memory path
                index = chosen.numpy()
                rows = np.ascontiguousarray(self.prepared.data.pixels[np.sort(index)])  # sorted: one pass
                pixels = torch.from_numpy(rows)[torch.from_numpy(np.argsort(np.argsort(index)))]
                pixels, targets = pixels.to(self.device), self.targets[chosen].to(self.device)
        return MicroBatch(((pixels.float() / 255.0) - self.mean) / self.std, targets, keep, unreadable, names)
