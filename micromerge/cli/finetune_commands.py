"""`finetune contrastive` and `finetune supervised`: one set of options, a config file under them."""

from __future__ import annotations

from typing import Any

import click

from micromerge.cli.errors import friendly_errors
from micromerge.cli.options import ALLOW_PICKLE, ARCH, QUIET, SEED, Command, explicit_options
from micromerge.core.errors import MicromergeError
from micromerge.finetune.config import DEFAULT_MAX_BAD_FRACTION


def _finetune_options(func: Command) -> Command:
    """The options both modes take; each mode adds its own (--task, --lp-epochs ...)."""
    options = [
        click.option("--base", help="Checkpoint to start from: zoo name, hf-hub: id, file or folder."),
        click.option(
            "--data",
            help="Training data (see README): a CSV/TSV/JSONL caption table or a folder with one, saved "
            "dataset, .tar shards or a shard pattern/URL, a hub dataset id or a local copy of one (parquet "
            "files, streamed). A table or dataset made for another tool: "
            "'PATH#image=COLUMN,caption=COLUMN,sep=tab,root=IMAGE_FOLDER'.",
        ),
        click.option(
            "--out",
            type=click.Path(),
            help="Run folder (model.safetensors, manifest.json, train_log.jsonl, state/).",
        ),
        ARCH,
        click.option(
            "--epochs", type=int, default=1, show_default=True, help="Passes over the training data."
        ),
        click.option(
            "--max-steps", type=int, help="Stop after this many optimizer steps (overrides --epochs)."
        ),
        click.option(
            "--batch-size",
            type=int,
            default=64,
            show_default=True,
            help="Images per micro-batch, per process (a step: processes x --accum-steps x this).",
        ),
        click.option(
            "--accum-steps",
            type=int,
            default=1,
            show_default=True,
            help="Micro-batches per step; contrastive: one loss over all of them (open_clip_train's --accum-freq).",
        ),
        click.option(
            "--lr",
            type=float,
            default=1e-4,
            show_default=True,
            help="AdamW's peak learning rate, reached after --warmup-steps; cosine decay to 0 after.",
        ),
        click.option(
            "--weight-decay",
            type=float,
            default=0.1,
            show_default=True,
            help="Not applied to gains, biases, norms and the logit scale (open_clip_train's rule).",
        ),
        click.option(
            "--warmup-steps",
            type=int,
            default=0,
            show_default=True,
            help="Optimizer steps of linear warm-up to --lr.",
        ),
        click.option(
            "--grad-clip",
            type=float,
            default=1.0,
            show_default=True,
            help="Clip the gradients' global norm to this (0: no clipping).",
        ),
        SEED,
        click.option(
            "--precision",
            type=click.Choice(["no", "bf16", "fp16"]),
            default="bf16",
            show_default=True,
            help="Mixed precision on GPU.",
        ),
        click.option(
            "--device",
            default="auto",
            show_default=True,
            help="auto, cpu or cuda (the GPU accelerate gives each process; pick one with CUDA_VISIBLE_DEVICES).",
        ),
        click.option(
            "--save-every",
            type=int,
            default=100,
            show_default=True,
            help="Checkpoint every N steps (0: final only).",
        ),
        click.option("--freeze", multiple=True, help="Freeze parameters matching this glob (repeatable)."),
        click.option(
            "--max-bad-fraction",
            type=float,
            default=DEFAULT_MAX_BAD_FRACTION,
            show_default=True,
            help="Stop if more than this fraction of the images are unreadable (a stream: of those read so "
            "far; the rest train, each unreadable one left out of its step's loss).",
        ),
        click.option(
            "--domain",
            help="What the specialist is for (e.g. pathology); recorded for analysis "
            "(supervised: default, the trained task's domain).",
        ),
        click.option(
            "--data-in-memory",
            type=click.Choice(["auto", "yes", "no"]),
            default="auto",
            show_default=True,
            help="Decode every image once into memory, or stream (read, decode and augment per batch in "
            "--workers processes); auto: in memory when the decoded images fit in 4 GiB and nothing is augmented.",
        ),
        click.option(
            "--augment",
            multiple=True,
            type=click.Choice(["crop", "flip", "rot90", "stain-jitter"]),
            help="Augment each image (repeat, applied in order): crop = open_clip's random resized crop; "
            "flip, rot90 = microscopy's symmetries; stain-jitter = small colour jitter (pathology). Streams.",
        ),
        click.option(
            "--workers", type=int, default=2, show_default=True, help="Data worker processes when streaming."
        ),
        click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint."),
        click.option("--force", is_flag=True, help="Discard the run in --out and start over."),
        ALLOW_PICKLE,
        click.option(
            "--config",
            "config_file",
            type=click.Path(),
            help="TOML/YAML with a [finetune] table; flags override it.",
        ),
        QUIET,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _run_finetune(ctx: click.Context, mode: str, values: dict[str, Any]) -> None:
    """The [finetune] table of --config under the flags: a flag typed wins, a flag's default fills
    only what the file leaves out, and the subcommand is the mode."""
    from micromerge.core.config_files import load_section
    from micromerge.core.config_schema import FINETUNE_SCHEMA
    from micromerge.finetune.config import config_from_mapping
    from micromerge.finetune.trainer import run_finetune

    config_file, quiet = values.pop("config_file"), values.pop("quiet")
    mapping: dict[str, Any] = {}
    if config_file:
        mapping.update(load_section(config_file, "finetune", FINETUNE_SCHEMA))
    if mapping.get("mode", mode) != mode:  # the subcommand is the mode: the file's was overridden, silently
        raise MicromergeError(
            f"{config_file} [finetune]: mode = {mapping['mode']!r}, but this is `finetune {mode}`; "
            f"run `finetune {mapping['mode']}`, or remove mode"
        )
    mapping.update({k: v for k, v in values.items() if k not in mapping and v not in ((), None)})
    mapping.update(explicit_options(ctx, values))
    mapping = {k: (list(v) if isinstance(v, tuple) else v) for k, v in mapping.items() if v is not None}
    mapping.update(mode=mode, progress=not quiet)
    path = run_finetune(config_from_mapping(mapping))
    click.echo(f"wrote {path} (manifest {path.parent / 'manifest.json'})")


@click.group("finetune")
def finetune_group() -> None:
    """Make domain-specialist checkpoints (accelerate: CPU, GPU bf16, DDP via `accelerate launch`)."""


@finetune_group.command("contrastive")
@_finetune_options
@click.option("--freeze-text/--train-text", default=None, help="Freeze the text tower (default: train it).")
@click.pass_context
@friendly_errors
def finetune_contrastive(ctx: click.Context, **values: Any) -> None:
    """CLIP InfoNCE on image-caption pairs (how PLIP and QuiltNet were made)."""
    _run_finetune(ctx, "contrastive", values)


@finetune_group.command("supervised")
@_finetune_options
@click.option(
    "--task",
    help="The one task of --data (a μ-Bench-schema dataset) to train on: a name, or a pattern or group naming one.",
)
@click.option(
    "--freeze-text/--train-text",
    default=None,
    help="The text tower stays frozen, as in WiSE-FT: the head scores the images, so it gets no gradient "
    "(--train-text is refused).",
)
@click.option(
    "--lp-epochs",
    type=int,
    default=0,
    show_default=True,
    help="Train the head alone first for N epochs (LP-FT).",
)
@click.pass_context
@friendly_errors
def finetune_supervised(ctx: click.Context, **values: Any) -> None:
    """Cross-entropy through a head initialised from the class text embeddings (the zero-shot head)."""
    _run_finetune(ctx, "supervised", values)
