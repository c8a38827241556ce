"""`merge` (also the `merge` console command) and `methods`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from micromerge.cli.errors import friendly_errors, writes_nothing
from micromerge.cli.options import (
    ALLOW_PICKLE,
    ARCH,
    BASE_HELP,
    CACHE_DIR,
    EXCLUDE,
    FINETUNED_HELP,
    INCLUDE,
    METHOD,
    QUIET,
    WEIGHTS_HELP,
    OneAlpha,
    explicit_options,
    method_options,
    statistics_data_options,
)
from micromerge.core.errors import MicromergeError

if TYPE_CHECKING:
    from micromerge.merging.execute import StatisticsInput
    from micromerge.merging.job import MergeJob


MERGE_HELP = """Merge checkpoints: `merge --base A --ft B --alpha 0.5` (WiSE-FT by default).

Checkpoints are zoo names (`micromerge zoo`), hf-hub: ids, .safetensors/.pt/.bin files, or
transformers/open_clip folders. Output: a safetensors file plus <file>.manifest.json.
"""


@click.command("merge", help=MERGE_HELP)
@click.option("--base", help=BASE_HELP)
@click.option("--ft", "finetuned", multiple=True, help=FINETUNED_HELP)
@METHOD
@click.option(
    "--alpha",
    type=OneAlpha(),
    help="WiSE-FT alpha, task-arithmetic/TIES/DARE/Breadcrumbs/DELLA/TSV/Iso-C lambda, SLERP t, LiNeS's "
    "first-block scale, Model Stock's step (default 0.5; 1.0 for model-stock, tsv, iso-c).",
)
@click.option(
    "--alphas", help="Several alphas, START:STOP:STEP or a,b,c: one checkpoint each (then --out is a folder)."
)
@click.option("--weights", help=WEIGHTS_HELP)
@method_options
@statistics_data_options
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed for stochastic methods (DARE, DELLA) and, with --data, of the select half data-aware "
    "methods learn from (evaluate the merge with the same --seed).",
)
@INCLUDE
@EXCLUDE
@click.option(
    "--alpha-rule",
    "alpha_rules",
    multiple=True,
    help="PATTERN=VALUE: a per-key alpha, first match wins (repeatable).",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    help="Output dtype of every float tensor (default: a merged tensor takes its inputs' dtype, the widest "
    "where they differ, fp16 + fp32 -> fp32; a copied one keeps the base's).",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto, cpu or cuda[:N]. auto: the CPU when the numpy engine can run the merge "
    "(a one-off merge is I/O-bound; see --engine), else CUDA when present.",
)
@click.option(
    "--engine",
    type=click.Choice(["auto", "numpy", "torch"]),
    default="auto",
    show_default=True,
    help="auto: numpy (no torch import) when the method is elementwise, the device the CPU and "
    "every input a local safetensors file without bfloat16; torch otherwise. Same bytes either way.",
)
@click.option("--out", type=click.Path(dir_okay=True), help="Output .safetensors (or folder with --alphas).")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
@ALLOW_PICKLE
@click.option("--allow-nonfinite", is_flag=True, help="Merge inputs with NaN/Inf (warn instead of refusing).")
@ARCH
@click.option(
    "--data",
    help="Fisher/RegMean: the μ-Bench copy ('ubench' or a folder) whose select half the statistics come from.",
)
@CACHE_DIR
@click.option(
    "--config",
    "config_file",
    type=click.Path(),
    help="TOML/YAML file with a [merge] table; flags override it.",
)
@QUIET
@click.pass_context
@friendly_errors
def merge_command(ctx: click.Context, config_file: str | None, quiet: bool, **values: Any) -> None:
    from micromerge.core.config_files import load_section
    from micromerge.core.config_schema import MERGE_SCHEMA
    from micromerge.merging.job import job_from_mapping, run_merge_job, warn_of_a_variant_with_one_finetuned

    mapping: dict[str, Any] = {}
    if config_file:
        mapping.update(load_section(config_file, "merge", MERGE_SCHEMA))
    defaults = {k: v for k, v in values.items() if k not in mapping}
    mapping.update({k: v for k, v in defaults.items() if v not in ((), None)})
    mapping.update(explicit_options(ctx, values))
    mapping = {k: (list(v) if isinstance(v, tuple) else v) for k, v in mapping.items()}
    job = job_from_mapping(mapping)
    warn_of_a_variant_with_one_finetuned(job)
    outputs = run_merge_job(job, progress=not quiet, statistics=_merge_statistics(job, quiet))
    for output in outputs:
        if output.reused:
            click.echo(f"kept {output.path} (finished earlier from the same inputs and parameters)")
        else:
            click.echo(
                f"wrote {output.path} ({output.manifest['seconds']:.2f} s; manifest {output.manifest_path.name})"
            )


def _merge_statistics(job: MergeJob, quiet: bool) -> StatisticsInput | None:
    """The statistics a data-aware method merges with, estimated on --data's select half."""
    from micromerge.merging.methods import get_method

    kind = get_method(job.spec.method).statistics
    if kind is None:
        return None
    own_data = len(job.model_data) == 1 + len(job.finetuned) and all(job.model_data)
    if not job.data and not own_data:
        raise MicromergeError(
            f"--method {job.spec.method} learns from data: give --data (a μ-Bench folder, or 'ubench')"
            + _who_needs_data(job)
        )
    from micromerge.core.devices import resolve_device
    from micromerge.core.hashing import default_cache_dir
    from micromerge.eval.settings import EvalSettings
    from micromerge.eval.statistics import statistics_input

    settings = EvalSettings(
        data=job.data or "",  # every model has data of its own: μ-Bench is not read
        store=Path(os.devnull),  # statistics write no result rows (prepare(writes_results=False))
        cache_dir=Path(job.cache_dir) if job.cache_dir else default_cache_dir(),
        seed=job.spec.params.seed,  # the select half, as eval and sweep draw it with the same --seed
        progress=not quiet,
    )
    models = (job.base, *job.finetuned)
    device = resolve_device(job.device)
    return statistics_input(kind, models, job.spec.params, settings, device, job.access, job.model_data)


def _who_needs_data(job: MergeJob) -> str:
    """With --base-data or --ft-data given, which models --data is still for."""
    if not job.model_data:
        return ""
    flags = ("--base", *["--ft"] * len(job.finetuned))
    without = dict.fromkeys(flag for flag, data in zip(flags, job.model_data, strict=True) if not data)
    return (
        f", which the models without data of their own ({', '.join(without)}) learn from, or give "
        "--base-data and one --ft-data per --ft"
    )


@click.command("methods")
@friendly_errors
@writes_nothing
def methods_command() -> None:
    """List the merge methods: how many --ft each takes, the parameters it reads, the engines it runs on."""
    from micromerge.merging.methods import METHODS

    width = max(len(name) for name in METHODS)
    click.echo(f"{'method':<{width}}  {'--ft':<5} {'engines':<12} flags / what it does")
    for method in METHODS.values():
        count = f"{method.min_finetuned}+" if method.max_finetuned is None else str(method.max_finetuned)
        engines = "numpy, torch" if method.elementwise else "torch"
        uses = ", ".join(
            "--alpha" if name == "strength" else f"--{name.replace('_', '-')}" for name in method.uses
        )
        click.echo(f"{method.name:<{width}}  {count:<5} {engines:<12} {uses}")
        click.echo(f"{'':<{width}}  {'':<5} {'':<12} {method.summary}")
