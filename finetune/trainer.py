"""The fine-tuning loop on accelerate: the same code on one CPU, one GPU (bf16) or DDP over many.

Data order is a seeded permutation per epoch, so the data position is one integer; the state
(model, optimizer, scheduler, RNG, position) is checkpointed every --save-every steps under a
LATEST pointer that is switched only once a checkpoint is complete. A run killed with
`kill -9` and resumed ends with the same weights as one never interrupted.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import micromerge
from micromerge.core.atomic import output_folder, sync_tree, write_json_atomic, write_text_atomic
from micromerge.core.devices import resolve_device
from micromerge.core.errors import MicromergeError
from micromerge.core.hashing import sha256_json
from micromerge.core.progress import progress_bar
from micromerge.core.provenance import LEARNED_FROM_HALVES, SUPERVISED_ON, task_data_fingerprint
from micromerge.eval.images import resident_on_device
from micromerge.eval.pairs import DecodedData, decode_checked
from micromerge.finetune.config import FinetuneConfig
from micromerge.finetune.hub_stream import HubStream, hub_name_and_revision, is_hub_layout
from micromerge.finetune.losses import ImageClassifier, ZeroShotHead, clip_loss
from micromerge.finetune.run_folder import (
    check_finished_settings,
    check_output_dir,
    one_run_per_folder,
    refuse_base_inside_out,
)
from micromerge.finetune.saved_state import (
    load_saved_state,
    read_log,
    restore_schedule,
)
from micromerge.finetune.shard_stream import ShardStream, is_shard_stream
from micromerge.finetune.streaming import (
    FINGERPRINTS,
    CorpusIndex,
    SampleRecipe,
    StreamedSamples,
    batches,
    choose_in_memory,
    index_pairs,
    indexed_pairs,
    stream_loader,
)
from micromerge.merging.execute import input_hashes
from micromerge.merging.lineage import sources_lineage, sources_select_halves
from micromerge.merging.model_card import write_model_card
from micromerge.merging.models import OPENAI_MEAN, OPENAI_STD, load_model, tokenizer_for
from micromerge.merging.plan import LOGIT_SCALE_MAX
from micromerge.merging.sources import open_source
from micromerge.merging.torch_save import save_tensors

if TYPE_CHECKING:
    from accelerate import Accelerator

# Reading a loss waits for the GPU; reading them in groups keeps the host ahead of the device.
LOSS_READ_EVERY = 10
# open_clip_train's rule: no weight decay on gains, biases, norms and the temperature (any tensor of
# fewer than two dimensions, or a name holding one of these), decay on everything else
NO_DECAY_MARKERS = ("bn", "ln", "bias", "logit_scale")


@dataclass
class Prepared:
    model: torch.nn.Module  # what is trained (CLIP, or CLIP + head)
    clip: torch.nn.Module
    model_config: dict[str, Any]
    data: DecodedData | None  # the in-memory path; None when streaming
    tokens: torch.Tensor | None
    classes: list[str] | None
    data_fingerprint: str
    base_label: str
    base_sha256: dict[str, str]
    arch_name: str | None
    base_supervised_on: list[str]  # the base's supervised lineage, carried on (merging.lineage)
    base_learned_from_halves: list[str]  # the select halves the base learned from, carried on
    stream: StreamedSamples | None = None  # the streaming path, by index
    shards: ShardStream | HubStream | None = None  # the streaming path, in order (webdataset, datasets)
    count: int = 0  # usable examples
    data_path: dict[str, Any] = field(default_factory=dict)  # which path, and why
    task_domain: str | None = None  # supervised: the trained task's domain, what --domain defaults to


class _Tokenize:
    """A caption to its token row, in a data worker (a class, so spawned workers can unpickle it)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def __call__(self, caption: str) -> torch.Tensor:
        return self.tokenizer([caption])[0]


def _label(value: int) -> torch.Tensor:
    return torch.tensor(int(value))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The seeded permutation of one epoch: the data order of both paths, so the position is one integer."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _inputs_digest(prepared: Prepared) -> dict[str, Any]:
    """What a resumed run must share with the run it continues: the data's content fingerprint and
    the base's sha256 (the same paths may hold other bytes by now)."""
    return {"data": prepared.data_fingerprint, "base": prepared.base_sha256}


def _check_resume_inputs(cfg: FinetuneConfig, resume_from: Path, prepared: Prepared) -> None:
    saved = json.loads((resume_from / "trainer_state.json").read_text()).get("inputs") or {}
    changed = [k for k, v in _inputs_digest(prepared).items() if saved.get(k) != v]
    if changed:
        raise MicromergeError(
            f"--resume {cfg.out}: the {' and '.join(changed)} changed since that run started (other bytes at "
            "the same path); restore them, or start over with --force"
        )


def _prepare(cfg: FinetuneConfig) -> Prepared:
    with open_source(cfg.base, allow_pickle=cfg.allow_pickle, arch=cfg.arch) as source:
        hashes = input_hashes([source])
        clip, model_config = load_model(source)
        arch_name = source.arch.name
        lineage = sources_lineage([source])
        halves = sources_select_halves([source])
    size = int(model_config["vision_cfg"]["image_size"])
    tokenizer = tokenizer_for(model_config)
    common = (cfg.base, hashes, arch_name, lineage, halves)
    captions = SampleRecipe(size, cfg.augment, cfg.seed, _Tokenize(tokenizer))  # contrastive samples
    hub, hub_why = None, ""
    if cfg.mode == "contrastive" and is_hub_layout(cfg.data) and cfg.data_in_memory != "yes":
        hub = HubStream(cfg.data, captions)
        in_memory, hub_why = choose_in_memory(cfg.data_in_memory, hub.rows or 0, size, cfg.augment)
        if in_memory and hub.rows is None:
            hub_why = "its size is not known before download"
        elif in_memory:
            hub = None  # small enough: loaded whole by the in-memory path below
    if cfg.mode == "contrastive" and (is_shard_stream(cfg.data) or hub is not None):
        if cfg.max_steps is None:
            raise MicromergeError(
                f"--data {cfg.data}: a stream has no length here: give --max-steps "
                "(open_clip_train asks for --train-num-samples likewise)"
            )
        shards: ShardStream | HubStream
        if hub is not None:
            shards = hub
            why = f"a hub-layout dataset of {hub.num_shards} shards streamed by datasets (streaming=True): {hub_why}"
            fingerprint = "data file paths (hub: at their commit) and local sizes"
        else:
            shards = ShardStream(cfg.data, captions)
            why = f"a stream of {len(shards.urls)} shards, read in order by the webdataset library"
            fingerprint = "shard names"
        path = {"in_memory": False, "why": why, "fingerprint": fingerprint}
        return Prepared(clip, clip, model_config, None, None, None, shards.fingerprint, *common,
                        shards=shards, data_path=path)  # fmt: skip
    if cfg.mode == "contrastive":
        index = index_pairs(cfg.data)
        in_memory, why = choose_in_memory(cfg.data_in_memory, len(index), size, cfg.augment)
        if not in_memory:
            stream = StreamedSamples(index, captions)
            path = {"in_memory": False, "why": why, "fingerprint": FINGERPRINTS[index.kind]}
            return Prepared(clip, clip, model_config, None, None, None, index.fingerprint, *common,
                            stream=stream, count=len(index), data_path=path)  # fmt: skip
        pairs = indexed_pairs(index)
        fingerprint = pairs.fingerprint()
        data = decode_checked(
            pairs.payloads, pairs.captions, size, cfg.max_bad_fraction, cfg.data, cfg.progress
        )
        path = {"in_memory": True, "why": why, "fingerprint": "every byte"}
        return Prepared(clip, clip, model_config, data, tokenizer(data.targets), None, fingerprint, *common,
                        count=len(data.targets), data_path=path)  # fmt: skip
    from datasets import Image

    from micromerge.eval.data import column_values, load_benchmark
    from micromerge.eval.task_selection import select_tasks
    from micromerge.eval.tasks import discover_tasks
    from micromerge.eval.zeroshot import class_embeddings

    bench = load_benchmark(cfg.data, progress=cfg.progress)
    assert cfg.task is not None  # FinetuneConfig requires it of a supervised run
    chosen = select_tasks(discover_tasks(bench.dataset), cfg.task, option="--task")
    if len(chosen) != 1 or len(chosen[0].classes) < 2:
        names = ", ".join(t.name for t in chosen)
        raise MicromergeError(
            f"--task {cfg.task}: supervised fine-tuning trains one task with two or more classes; "
            f"this selects {len(chosen)} ({names[:200]}): name one task"
        )
    task = chosen[0]
    domain = task.groups.get("domain")
    task_domain = domain if domain and domain != "unknown" else None
    texts = class_embeddings(clip, tokenizer, task, torch.device("cpu"))
    head = ZeroShotHead(texts, float(clip.logit_scale.detach().exp()))
    fingerprint = task_data_fingerprint(bench.fingerprint, task.name)
    model = ImageClassifier(clip, head)
    in_memory, why = choose_in_memory(cfg.data_in_memory, len(task.rows), size, cfg.augment)
    if not in_memory:
        index = CorpusIndex(cfg.data, "arrow", list(task.rows), list(task.labels), fingerprint, "ubench")
        stream = StreamedSamples(index, SampleRecipe(size, cfg.augment, cfg.seed, _label))
        path = {"in_memory": False, "why": why, "fingerprint": "the benchmark's files"}
        return Prepared(model, clip, model_config, None, None, list(task.classes), fingerprint, *common,
                        stream=stream, count=len(index), data_path=path, task_domain=task_domain)  # fmt: skip
    images = column_values(bench.dataset.select(task.rows).cast_column("image", Image(decode=False)), "image")
    data = decode_checked(images, list(task.labels), size, cfg.max_bad_fraction, cfg.data, cfg.progress)
    path = {"in_memory": True, "why": why, "fingerprint": "the benchmark's files"}
    return Prepared(model, clip, model_config, data, None, list(task.classes), fingerprint, *common,
                    count=len(data.targets), data_path=path, task_domain=task_domain)  # fmt: skip


def _freeze(prepared: Prepared, cfg: FinetuneConfig) -> None:
    names_seen = set()
    for name, param in prepared.clip.named_parameters():
        frozen = cfg.text_frozen and not name.startswith("visual.") and name != "logit_scale"
        if cfg.mode == "supervised" and name == "logit_scale":
            frozen = True
        for pattern in cfg.freeze:
            if fnmatch.fnmatchcase(name, pattern):
                frozen = True
                names_seen.add(pattern)
        if frozen:
            param.requires_grad_(False)
    unused = [p for p in cfg.freeze if p not in names_seen]
    if unused:
        raise MicromergeError(
            f"--freeze {unused[0]}: matches no parameter (names look like visual.transformer.resblocks.0.*)"
        )
    if not any(param.requires_grad for param in prepared.model.parameters()):
        flags = " ".join(f"--freeze {p}" for p in cfg.freeze) + (
            " (text tower frozen)" if cfg.text_frozen else ""
        )
        raise MicromergeError(
            f"{flags}: freezes every parameter, so the run would train nothing; freeze fewer"
        )


def _param_groups(prepared: Prepared, cfg: FinetuneConfig) -> list[dict[str, Any]]:
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in prepared.model.named_parameters():
        if not param.requires_grad:
            continue
        is_head = name.startswith("head.")
        no_decay = param.ndim < 2 or any(marker in name for marker in NO_DECAY_MARKERS)
        groups.setdefault((is_head, no_decay), []).append(param)
    return [
        {"params": params, "weight_decay": 0.0 if no_decay else cfg.weight_decay, "is_head": is_head}
        for (is_head, no_decay), params in sorted(groups.items())
    ]


def _lr_lambdas(
    groups: list[dict[str, Any]], cfg: FinetuneConfig, total_steps: int, lp_steps: int
) -> list[Callable[[int], float]]:
    def schedule(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def for_group(is_head: bool) -> Callable[[int], float]:
        return lambda step: schedule(step) if (is_head or step >= lp_steps) else 0.0

    return [for_group(group["is_head"]) for group in groups]


def run_finetune(cfg: FinetuneConfig) -> Path:
    """Train, checkpoint, and write `model.safetensors` + `manifest.json` into cfg.out; returns the
    model path. A run refused before it wrote anything leaves no empty --out folder behind."""
    refuse_base_inside_out(cfg)
    with output_folder(cfg.out):
        accelerator = _accelerator(cfg)
        with one_run_per_folder(cfg, accelerator):
            return _train(cfg, accelerator)


def _accelerator(cfg: FinetuneConfig) -> Accelerator:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    use_cpu = resolve_device(cfg.device).type == "cpu"  # `cuda` without a GPU: one line, not a CPU run
    if use_cpu and os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        raise MicromergeError(
            "accelerate launch --use_fsdp: accelerate shards models over GPUs only; on the CPU the "
            "processes would not share the work: launch with --multi_gpu (DDP over gloo) instead"
        )
    # accelerate keeps its state in process-wide singletons, so a second run in one process (a
    # script or notebook: a CPU run, then a bf16 GPU run) would inherit the first run's device and
    # precision, or refuse. Each run starts from a fresh state; under a distributed launch the
    # process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=not torch.distributed.is_initialized())
    return Accelerator(cpu=use_cpu, mixed_precision="no" if use_cpu else cfg.precision)


def _train(cfg: FinetuneConfig, accelerator: Accelerator) -> Path:
    from accelerate.utils import set_seed

    if cfg.resume and not cfg.force and (cfg.out / "manifest.json").is_file():
        # already finished: resuming is a no-op, apart from the state a kill after the manifest left
        check_finished_settings(cfg)
        shutil.rmtree(cfg.out / "state", ignore_errors=True)
        return cfg.out / "model.safetensors"
    if cfg.mode == "contrastive" and cfg.batch_size * accelerator.num_processes < 2:
        # one pair is its own only candidate: InfoNCE is log(1) = 0, so the run trained nothing
        raise MicromergeError(
            f"--batch-size {cfg.batch_size}: contrastive training needs at least 2 pairs in a step (over "
            "one pair the loss is 0 and has no gradient: the run would train nothing)"
        )
    resume_from = check_output_dir(cfg, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)
    prepared = _prepare(cfg)
    if resume_from is not None:
        _check_resume_inputs(cfg, resume_from, prepared)
    _freeze(prepared, cfg)
    n, world, batch = prepared.count, accelerator.num_processes, cfg.batch_size
    if cfg.progress and accelerator.is_main_process:
        how = "in memory" if prepared.data_path["in_memory"] else f"streamed by {cfg.workers} workers"
        size = f"{n} examples, " if prepared.shards is None else ""
        print(f"data: {size}{how} ({prepared.data_path['why']})", file=sys.stderr)
        if isinstance(prepared.shards, HubStream):
            _say_pauses_between_passes(prepared.shards.rows, cfg, world)
    if prepared.shards is None:
        per_epoch = n // (batch * world)
    else:  # a stream has no epochs: the run is its --max-steps (which _prepare requires), one pass of the order
        assert cfg.max_steps is not None
        per_epoch = cfg.max_steps * cfg.accum_steps
    if per_epoch == 0:
        raise MicromergeError(
            f"--data {cfg.data}: {n} usable examples is less than one batch ({batch} x {world} processes); lower --batch-size"
        )
    lp_micro = cfg.lp_epochs * per_epoch if cfg.mode == "supervised" else 0
    total_micro = (
        (cfg.epochs * per_epoch + lp_micro) if cfg.max_steps is None else cfg.max_steps * cfg.accum_steps
    )
    total_steps = math.ceil(total_micro / cfg.accum_steps)
    groups = _param_groups(prepared, cfg)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambdas(groups, cfg, total_steps, lp_micro // cfg.accum_steps)
    )
    model, optimizer = accelerator.prepare(prepared.model, optimizer)
    micro_step, history = 0, []
    log_path = cfg.out / "train_log.jsonl"
    if resume_from is not None:
        saved = json.loads((resume_from / "trainer_state.json").read_text())
        load_saved_state(accelerator, cfg, resume_from)
        restore_schedule(cfg, scheduler, saved)
        micro_step = saved["micro_step"]
        history = [row for row in read_log(log_path) if row["step"] <= micro_step // cfg.accum_steps]
    feed = _MicroBatches(prepared, cfg, accelerator, micro_step, total_micro, per_epoch)
    clip = (
        accelerator.unwrap_model(model).clip if cfg.mode == "supervised" else accelerator.unwrap_model(model)
    )
    bar = progress_bar(
        total=total_steps,
        initial=micro_step // cfg.accum_steps,
        desc=f"finetune {cfg.mode}",
        unit="step",
        disable=not (cfg.progress and accelerator.is_main_process),
    )
    started, seen = time.perf_counter(), 0
    pending: list[tuple[int, float, float, torch.Tensor]] = []  # step, lr, images/s, loss on device
    try:
        model.train()
        while micro_step < total_micro:
            micro = [feed.get(micro_step + j) for j in range(min(cfg.accum_steps, total_micro - micro_step))]
            if cfg.mode == "contrastive":
                loss = _contrastive_gradients(model, accelerator, micro, across_ranks=world > 1)
            else:
                loss = _supervised_gradients(model, accelerator, micro)
                # each process's mean over its own rows: the step's loss is their mean, as DDP's gradient
                if world > 1:
                    loss = accelerator.reduce(loss, reduction="mean")
            if cfg.grad_clip:
                # all of the model's parameters (frozen ones hold no gradient): under FSDP,
                # accelerate clips by the global norm only when handed exactly these
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            with torch.no_grad():
                clip.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
            micro_step += len(micro)
            seen += sum(len(pixels) for pixels, _ in micro) * world
            step = math.ceil(micro_step / cfg.accum_steps)
            rate = seen / max(1e-9, time.perf_counter() - started)
            pending.append((step, float(scheduler.get_last_lr()[0]), round(rate, 1), loss))
            bar.update(1)
            saving = cfg.save_every and step % cfg.save_every == 0 and micro_step < total_micro
            if saving or len(pending) >= LOSS_READ_EVERY or micro_step >= total_micro:
                _record_losses(pending, history, bar)
            if saving:
                _save_state(accelerator, cfg, prepared, micro_step, step, history, scheduler)
    except torch.cuda.OutOfMemoryError as exc:
        raise MicromergeError(
            f"out of GPU memory at --batch-size {cfg.batch_size}: lower it and raise --accum-steps to keep the effective batch "
            f"({cfg.batch_size * cfg.accum_steps})"
        ) from exc
    finally:
        bar.close()
        feed.close()
    accelerator.wait_for_everyone()
    from accelerate.utils import gather_object

    # the whole state on every DDP rank; under FSDP gathered from the shards onto the main process
    state = accelerator.get_state_dict(model)
    rank_digests = gather_object([_weights_digest(state) if state else None])
    path = cfg.out / "model.safetensors"
    if accelerator.is_main_process:
        hardware = {
            "device": str(accelerator.device),
            "mixed_precision": accelerator.mixed_precision,
            "distributed": accelerator.distributed_type.value,
            "processes": world,
        }
        _write_final(
            state,
            prepared,
            cfg,
            history,
            time.perf_counter() - started,
            seen,
            [d for d in rank_digests if d],
            hardware,
        )
    accelerator.wait_for_everyone()
    return path


class _MicroBatches:
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

    def get(self, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stream is not None:
            try:
                pixels, targets, readable = next(self.stream)
            except StopIteration:  # every worker's share passed without a full batch
                raise MicromergeError(
                    f"--data {self.cfg.data}: the stream ran dry at step {micro}: no shard holds a full batch "
                    f"of {self.cfg.batch_size} samples (empty shards?); check the shards or lower --batch-size"
                ) from None
            except MicromergeError as exc:  # a worker's (an unreadable shard), raised again by the loader
                # without the loader's frames, which held its workers alive as long as the error lived
                raise exc.with_traceback(None) from None

            if not bool(readable.all()):
                raise MicromergeError(
                    f"--data {self.cfg.data}: an image of step {micro} is unreadable or has no caption (none, "
                    "blank, or a .json caption that is not text, such as a list), and the streaming path cannot "
                    "skip it; fix the corpus, or for a local or hub-layout copy pass --data-in-memory yes (which "
                    "drops unreadable images)"
                )
            pixels, targets = pixels.to(self.device), targets.to(self.device)
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
        return ((pixels.float() / 255.0) - self.mean) / self.std, targets


def _clip_features(
    model: torch.nn.Module, pixels: torch.Tensor, tokens: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    out = model(pixels, tokens)
    image, text, scale = (
        (out["image_features"], out["text_features"], out["logit_scale"])
        if isinstance(out, dict)
        else out[:3]
    )
    return image.float(), text.float(), scale.float()


def _contrastive_gradients(
    model: torch.nn.Module, accelerator: Accelerator, micro: list, across_ranks: bool
) -> torch.Tensor:
    """Gradients of one step's contrastive loss over all its micro-batches at once (and every
    process's, across ranks), returned as the loss. Accumulating several micro-batches works as
    open_clip_train's --accum-freq does: their features are first computed without gradients, then
    each micro-batch is run again with gradients and its fresh features replace its cached ones in
    the whole step's loss. Every image's negatives are thus the whole accumulated batch, and the
    summed gradients equal those of one batch of that size (averaging per-micro-batch losses
    instead would train smaller contrastive tasks). Unlike open_clip_train, the temperature's
    gradient is taken once, not once per micro-batch, so the equality is exact; it is taken at the
    last micro-batch, whose backward DDP synchronises and which must give every trained parameter
    a gradient (at the first, DDP stopped the next step: "Expected to have finished reduction")."""
    if len(micro) == 1:
        with accelerator.autocast():
            image, text, scale = _clip_features(model, *micro[0])
            loss = clip_loss(image, text, scale, across_ranks)
        accelerator.backward(loss)
        return loss.detach()
    with torch.no_grad(), accelerator.autocast():
        cached = [_clip_features(model, pixels, tokens)[:2] for pixels, tokens in micro]
    first: torch.Tensor | None = None
    for j, (pixels, tokens) in enumerate(micro):
        last = j == len(micro) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model), accelerator.autocast():
            image, text, scale = _clip_features(model, pixels, tokens)
            images = torch.cat([c[0] for c in cached[:j]] + [image] + [c[0] for c in cached[j + 1 :]])
            texts = torch.cat([c[1] for c in cached[:j]] + [text] + [c[1] for c in cached[j + 1 :]])
            loss = clip_loss(images, texts, scale if last else scale.detach(), across_ranks)
            accelerator.backward(loss)
        first = loss.detach() if first is None else first
    assert first is not None  # two or more micro-batches
    return first


def _say_pauses_between_passes(rows: int | None, cfg: FinetuneConfig, world: int) -> None:
    """datasets (5.x) sleeps SLEEP_TIME_ON_THREADS_SHUTDOWN (5 s) whenever a parquet stream ends, its
    guard against apache/arrow#45214; on a small corpus streamed for many passes that adds up
    (BENCHMARKS.md measured it as the hub stream's whole gap), so say it and the way round it."""
    import datasets

    pause = float(getattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0))
    if not rows or not pause:
        return
    assert cfg.max_steps is not None  # a stream's run is its --max-steps
    passes = cfg.max_steps * cfg.accum_steps * cfg.batch_size * world / rows
    if passes * pause >= 60:
        name, revision = hub_name_and_revision(cfg.data)
        load = f"datasets.load_dataset({name!r}, split='train'" + (
            f", revision={revision!r})" if revision else ")"
        )
        print(
            f"note: about {passes:.0f} passes over {rows} rows, and datasets pauses {pause:g} s at the end of "
            f"each (about {passes * pause / 60:.0f} min in all); for a corpus this small, save it once with "
            f"`{load}.save_to_disk(DIR)` and pass DIR (read memory-mapped, no pause)",
            file=sys.stderr,
        )


def _supervised_gradients(model: torch.nn.Module, accelerator: Accelerator, micro: list) -> torch.Tensor:
    """Gradients of the mean cross-entropy over all of one step's micro-batches; returns that mean."""
    rows = sum(len(labels) for _, labels in micro)
    total = torch.zeros((), device=micro[0][1].device)
    for j, (pixels, labels) in enumerate(micro):
        last = j == len(micro) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model), accelerator.autocast():
            loss = torch.nn.functional.cross_entropy(model(pixels).float(), labels) * (len(labels) / rows)
            accelerator.backward(loss)
        total = total + loss.detach()
    return total


def _record_losses(
    pending: list[tuple[int, float, float, torch.Tensor]], history: list[dict[str, Any]], bar: Any
) -> None:
    """Read the pending steps' losses into the history: one device sync for several steps."""
    for step, lr, rate, loss in pending:
        history.append({"step": step, "loss": round(float(loss), 6), "lr": lr, "images_per_s": rate})
    last = history[-1]
    bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}", img_s=f"{last['images_per_s']:.0f}")
    pending.clear()


def _save_state(
    accelerator: Accelerator,
    cfg: FinetuneConfig,
    prepared: Prepared,
    micro_step: int,
    step: int,
    history: list[dict[str, Any]],
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """The model and optimizer through accelerate (safetensors, and tensors torch.load reads with
    weights_only), the schedule's position in trainer_state.json: accelerate pickles a registered
    scheduler and unpickles it with weights_only=False, which runs whatever code a state folder
    handed to the user holds. Every file of the new state reaches the disk before LATEST names it
    and the older state is removed: a power loss never leaves only a torn state to resume from."""
    state_dir = cfg.out / "state"
    name = f"step-{step:08d}"
    accelerator.save_state(str(state_dir / name))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        sync_tree(state_dir / name)
        write_json_atomic(
            state_dir / name / "trainer_state.json",
            {
                "micro_step": micro_step,
                "step": step,
                "config_digest": sha256_json(cfg.hyperparameters()),
                "inputs": _inputs_digest(prepared),
                "scheduler": scheduler.state_dict(),
            },
        )
        write_text_atomic(cfg.out / "train_log.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        write_text_atomic(state_dir / "LATEST", name)
        for old in state_dir.glob("step-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over every weight, so the manifest can show all DDP ranks ended identical."""
    import hashlib

    digest = hashlib.sha256()
    for key, value in sorted(state.items()):
        digest.update(key.encode())
        digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _write_final(
    state: dict[str, torch.Tensor],
    prepared: Prepared,
    cfg: FinetuneConfig,
    history: list[dict[str, Any]],
    seconds: float,
    seen: int,
    rank_digests: list[str],
    hardware: dict[str, str],
) -> None:
    prefix = "clip." if cfg.mode == "supervised" else ""
    tensors = {
        k.removeprefix(prefix): v.detach().to("cpu", torch.float32).contiguous()
        for k, v in state.items()
        if k.startswith(prefix)  # open_clip keeps the causal attn_mask out of state_dict()
    }
    losses = [row["loss"] for row in history]
    manifest = {
        "kind": f"finetune-{cfg.mode}",
        "micromerge_version": micromerge.__version__,
        "torch_version": torch.__version__,
        "base": prepared.base_label,
        "base_sha256": prepared.base_sha256,
        "data": cfg.data,
        "data_fingerprint": prepared.data_fingerprint,
        "hyperparameters": cfg.hyperparameters(),
        "seed": cfg.seed,
        "domain": cfg.domain or prepared.task_domain,
        "classes": prepared.classes,
        "steps": len(history),
        **hardware,
        "rank_weight_sha256": rank_digests,
        "corrupt_images_skipped": prepared.data.n_corrupt if prepared.data is not None else None,
        "data_path": prepared.data_path,
        **({SUPERVISED_ON: prepared.base_supervised_on} if prepared.base_supervised_on else {}),
        **(
            {LEARNED_FROM_HALVES: prepared.base_learned_from_halves}
            if prepared.base_learned_from_halves
            else {}
        ),
        "loss_summary": {
            "first": losses[0] if losses else None,
            "last": losses[-1] if losses else None,
            "min": min(losses) if losses else None,
            "mean_last_10": float(np.mean(losses[-10:])) if losses else None,
        },
    }
    metadata = {
        "format": "pt",
        "micromerge.core.provenance": json.dumps(manifest, sort_keys=True),
        "micromerge.model_config": json.dumps(prepared.model_config, sort_keys=True),
    }
    if prepared.arch_name:
        metadata["micromerge.arch"] = prepared.arch_name
    save_tensors(cfg.out / "model.safetensors", tensors, metadata)
    if cfg.mode == "supervised":
        head = {
            k.removeprefix("head."): v.detach().cpu().contiguous()
            for k, v in state.items()
            if k.startswith("head.")
        }
        save_tensors(cfg.out / "head.safetensors", head, {"classes": json.dumps(prepared.classes)})
    write_text_atomic(cfg.out / "train_log.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    write_json_atomic(
        cfg.out / "manifest.json",
        {
            **manifest,
            "seconds": round(seconds, 2),
            "images_seen": seen,
            "images_per_s": round(seen / max(seconds, 1e-9), 1),
        },
    )
    write_model_card(
        cfg.out, str(cfg.out / "model.safetensors"), [cfg.out / "model.safetensors"], "open_clip"
    )
    shutil.rmtree(cfg.out / "state", ignore_errors=True)
