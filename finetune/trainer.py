"""The fine-tuning loop on accelerate: the same code on one CPU, one GPU (bf16) or DDP over many.

Data order is a seeded permutation per epoch, so the data position is one integer; the state
(model, optimizer, scheduler, RNG, position) is checkpointed every --save-every steps under a
LATEST pointer that is switched only once a checkpoint is complete. A run killed with
`kill -9` and resumed ends with the same weights as one never interrupted. What the loop trains on
is made ready in finetune/prepare.py, and its batches come from finetune/micro_batches.py.
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
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import micromerge
from micromerge.core.atomic import output_folder, sync_tree, write_json_atomic, write_text_atomic
from micromerge.core.devices import resolve_device
from micromerge.core.errors import MicromergeError
from micromerge.core.json_text import parse_json
from micromerge.core.progress import progress_bar
from micromerge.core.provenance import LEARNED_FROM_HALVES, SUPERVISED_ON
from micromerge.finetune.config import FinetuneConfig
from micromerge.finetune.divergence import refuse_diverged_losses, refuse_diverged_weights
from micromerge.finetune.hub_stream import HubStream, hub_name_and_revision
from micromerge.finetune.losses import IGNORED, clip_loss
from micromerge.finetune.micro_batches import MicroBatch, MicroBatches
from micromerge.finetune.prepare import Prepared, prepare_training
from micromerge.finetune.run_folder import (
    UNREADABLE_LIST,
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
from micromerge.finetune.unreadable import UnreadableCount
from micromerge.merging.model_card import write_model_card
from micromerge.merging.plan import LOGIT_SCALE_MAX
from micromerge.merging.torch_save import save_tensors

if TYPE_CHECKING:
    from accelerate import Accelerator

# Reading a loss waits for the GPU; reading them in groups keeps the host ahead of the device.
LOSS_READ_EVERY = 10
# open_clip_train's rule: no weight decay on gains, biases, norms and the temperature (any tensor of
# fewer than two dimensions, or a name holding one of these), decay on everything else
NO_DECAY_MARKERS = ("bn", "ln", "bias", "logit_scale")


def _inputs_digest(prepared: Prepared) -> dict[str, Any]:
    """What a resumed run must share with the run it continues: the data's content fingerprint and
    the base's sha256 (the same paths may hold other bytes by now)."""
    return {"data": prepared.data_fingerprint, "base": prepared.base_sha256}


def _check_resume_inputs(cfg: FinetuneConfig, resume_from: Path, prepared: Prepared) -> None:
    saved = parse_json((resume_from / "trainer_state.json").read_text()).get("inputs") or {}
    changed = [k for k, v in _inputs_digest(prepared).items() if saved.get(k) != v]
    if changed:
        raise MicromergeError(
            f"--resume {cfg.out}: the {' and '.join(changed)} changed since that run started (other bytes at "
            "the same path); restore them, or start over with --force"
        )


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
    trained = [name for name, param in prepared.clip.named_parameters() if param.requires_grad]
    if not [name for name in trained if name != "logit_scale"]:
        # a supervised head is kept apart (head.safetensors), not in the checkpoint eval, merge and
        # sweep read, and the temperature alone changes no prediction: such a run saved the base's
        # predictions as a specialist
        flags = " ".join(f"--freeze {p}" for p in cfg.freeze) + (
            " (text tower frozen)" if cfg.text_frozen else ""
        )
        left = "nothing" if not trained else "only logit_scale, which changes no prediction"
        raise MicromergeError(
            f"{flags}: freezes every weight of the checkpoint, so the run would train {left}"
            f"{' (the head is kept apart, in head.safetensors)' if cfg.mode == 'supervised' else ''}; freeze fewer"
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


def _check_schedule(cfg: FinetuneConfig, total_steps: int, lp_steps: int, is_main: bool) -> None:
    """Refuse a run whose linear probe takes every step, and say when the warm-up outlasts the run.
    `--lp-epochs 2 --max-steps 3` trained the head alone for the whole run and saved the base's
    weights unchanged (the head is kept apart, in head.safetensors), as if it were a specialist."""
    if lp_steps >= total_steps:
        raise MicromergeError(
            f"--lp-epochs {cfg.lp_epochs}: the linear probe takes {lp_steps} steps and --max-steps "
            f"{cfg.max_steps} ends the run within them, so the model would be saved as the base, untrained; "
            f"raise --max-steps above {lp_steps} or lower --lp-epochs"
        )
    if is_main and cfg.warmup_steps > total_steps:
        warnings.warn(
            f"--warmup-steps {cfg.warmup_steps} is longer than the run ({total_steps} steps): the learning "
            f"rate rises to {total_steps / cfg.warmup_steps:.0%} of --lr {cfg.lr:g} and never decays",
            stacklevel=2,
        )


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
    prepared = prepare_training(cfg)
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
    else:  # a stream has no epochs: the run is its --max-steps (which prepare_training requires), one pass of the order
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
    _check_schedule(cfg, total_steps, lp_micro // cfg.accum_steps, accelerator.is_main_process)
    groups = _param_groups(prepared, cfg)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambdas(groups, cfg, total_steps, lp_micro // cfg.accum_steps)
    )
    model, optimizer = accelerator.prepare(prepared.model, optimizer)
    micro_step, history = 0, []
    # decoding in memory dropped the unreadable images before training: only a stream counts them
    skipped = UnreadableCount(cfg.data, cfg.max_bad_fraction) if prepared.data is None else None
    log_path = cfg.out / "train_log.jsonl"
    if resume_from is not None:
        saved = parse_json((resume_from / "trainer_state.json").read_text())
        load_saved_state(accelerator, cfg, resume_from)
        restore_schedule(cfg, scheduler, saved)
        if skipped is not None:
            skipped.restore(saved.get("unreadable"))
        micro_step = saved["micro_step"]
        history = [row for row in read_log(log_path) if row["step"] <= micro_step // cfg.accum_steps]
    feed = MicroBatches(prepared, cfg, accelerator, micro_step, total_micro, per_epoch)
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
            if skipped is not None:
                skipped.add(
                    sum(len(part.pixels) for part in micro),
                    sum(part.unreadable for part in micro),
                    tuple(name for part in micro for name in part.unreadable_names),
                )
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
            seen += sum(len(part.pixels) for part in micro) * world
            step = math.ceil(micro_step / cfg.accum_steps)
            rate = seen / max(1e-9, time.perf_counter() - started)
            pending.append((step, float(scheduler.get_last_lr()[0]), round(rate, 1), loss))
            bar.update(1)
            saving = cfg.save_every and step % cfg.save_every == 0 and micro_step < total_micro
            if saving or len(pending) >= LOSS_READ_EVERY or micro_step >= total_micro:
                refuse_diverged_losses(accelerator, pending)
                if skipped is not None:
                    skipped.check(accelerator, step, say=cfg.progress and accelerator.is_main_process)
                _record_losses(pending, history, bar)
            if saving:
                refuse_diverged_weights(accelerator, model.parameters(), step)
                if skipped is not None:
                    skipped.gather()
                _save_state(accelerator, cfg, prepared, micro_step, step, history, scheduler, skipped)
    except torch.cuda.OutOfMemoryError as exc:
        raise MicromergeError(
            f"out of GPU memory at --batch-size {cfg.batch_size}: lower it and raise --accum-steps to keep the effective batch "
            f"({cfg.batch_size * cfg.accum_steps})"
        ) from exc
    finally:
        bar.close()
        feed.close()
    refuse_diverged_weights(accelerator, model.parameters(), math.ceil(micro_step / cfg.accum_steps))
    if skipped is not None:
        skipped.gather()
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
            skipped,
        )
    accelerator.wait_for_everyone()
    return path


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
    model: torch.nn.Module, accelerator: Accelerator, micro: list[MicroBatch], across_ranks: bool
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
    a gradient (at the first, DDP stopped the next step: "Expected to have finished reduction").
    A stream's unreadable samples are left out of the whole step's loss (finetune/unreadable.py)."""
    keep = _kept_rows(accelerator, micro, across_ranks)
    if len(micro) == 1:
        with accelerator.autocast():
            image, text, scale = _clip_features(model, micro[0].pixels, micro[0].targets)
            loss = clip_loss(image, text, scale, across_ranks, keep)
        accelerator.backward(loss)
        return loss.detach()
    with torch.no_grad(), accelerator.autocast():
        cached = [_clip_features(model, part.pixels, part.targets)[:2] for part in micro]
    first: torch.Tensor | None = None
    for j, (pixels, tokens, *_) in enumerate(micro):
        last = j == len(micro) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model), accelerator.autocast():
            image, text, scale = _clip_features(model, pixels, tokens)
            images = torch.cat([c[0] for c in cached[:j]] + [image] + [c[0] for c in cached[j + 1 :]])
            texts = torch.cat([c[1] for c in cached[:j]] + [text] + [c[1] for c in cached[j + 1 :]])
            loss = clip_loss(images, texts, scale if last else scale.detach(), across_ranks, keep)
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


def _kept_rows(accelerator: Accelerator, micro: list[MicroBatch], across_ranks: bool) -> torch.Tensor | None:
    """Which rows of the step's whole batch (its micro-batches in order, then across ranks in rank
    order, as the loss gathers the features) are readable; None on the in-memory path."""
    if micro[0].keep is None:
        return None
    keep = torch.cat([part.keep for part in micro if part.keep is not None])
    return accelerator.gather(keep.to(torch.uint8)).bool() if across_ranks else keep


def _supervised_gradients(
    model: torch.nn.Module, accelerator: Accelerator, micro: list[MicroBatch]
) -> torch.Tensor:
    """Gradients of the mean cross-entropy over all of one step's micro-batches; returns that mean
    (this process's share of it under a launch, which the caller averages as DDP averages the
    gradients). A stream's unreadable rows are left out: the mean is over the readable rows of
    every process, counted with one all-reduce, so each process weighs its rows alike."""
    rows: int | torch.Tensor = sum(len(part.targets) for part in micro)
    kept = _kept_rows(accelerator, micro, across_ranks=False)
    if kept is not None:
        rows = accelerator.reduce(kept.sum(), reduction="sum") / accelerator.num_processes
    total = torch.zeros((), device=micro[0].targets.device)
    for j, (pixels, labels, keep, *_) in enumerate(micro):
        last = j == len(micro) - 1
        targets = labels if keep is None else labels.masked_fill(~keep, IGNORED)
        with contextlib.nullcontext() if last else accelerator.no_sync(model), accelerator.autocast():
            logits = model(pixels).float()
            loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum") / rows
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
    skipped: UnreadableCount | None,
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
                "config_digest": cfg.resume_digest(),
                "inputs": _inputs_digest(prepared),
                "scheduler": scheduler.state_dict(),
                **({"unreadable": skipped.state()} if skipped is not None else {}),
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
    skipped: UnreadableCount | None,
) -> None:
    prefix = "clip." if cfg.mode == "supervised" else ""
    tensors = {
        k.removeprefix(prefix): v.detach().to("cpu", torch.float32).contiguous()
        for k, v in state.items()
        if k.startswith(prefix)  # open_clip keeps the causal attn_mask out of state_dict()
    }
    # by name, one a line: what a user cleaning the corpus goes through
    unreadable = skipped.listed if skipped is not None else prepared.data.dropped if prepared.data else ()
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
        # a stream left them out of the loss; decoding in memory dropped them
        "corrupt_images_skipped": skipped.unreadable
        if skipped is not None
        else (prepared.data.n_corrupt if prepared.data is not None else 0),
        **({"corrupt_images_listed": UNREADABLE_LIST} if unreadable else {}),
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
    if unreadable:
        write_text_atomic(cfg.out / UNREADABLE_LIST, "".join(f"{name}\n" for name in unreadable))
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
