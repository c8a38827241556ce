"""The `micromerge` command line: wires the stages together; no logic of its own.

Every MicromergeError becomes one line on stderr and exit code 2; warnings print as one
`warning:` line. Flags and config files become plain dataclasses here and flow down.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable
from typing import Any

import click
from click.core import ParameterSource

from micromerge import __version__
from micromerge.errors import MicromergeError


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {message}", err=True)


def friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user-fixable errors into a one-line message and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        warnings.showwarning = _show_warning
        try:
            return func(*args, **kwargs)
        except MicromergeError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: finished work is kept; run the same command again to resume", err=True)
            sys.exit(130)

    return wrapper


def explicit_options(ctx: click.Context, values: dict[str, Any]) -> dict[str, Any]:
    """Only the options the user typed (so a config file supplies the rest)."""
    return {
        name: value
        for name, value in values.items()
        if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    }


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="micromerge")
def cli() -> None:
    """Fine-tune, merge and evaluate CLIP-style models on microscopy (the μ-Bench loop)."""


MERGE_HELP = """Merge checkpoints: `merge --base A --ft B --alpha 0.5` (WiSE-FT by default).

Checkpoints are zoo names (`micromerge zoo`), hf-hub: ids, .safetensors/.pt/.bin files, or
transformers/open_clip folders. Output: a safetensors file plus <file>.manifest.json.
"""


@click.command("merge", help=MERGE_HELP)
@click.option("--base", help="The base (pre-trained) checkpoint.")
@click.option(
    "--ft",
    "finetuned",
    multiple=True,
    help="A fine-tuned checkpoint (repeat for task arithmetic, TIES, DARE).",
)
@click.option(
    "--method",
    type=str,
    default="wise-ft",
    show_default=True,
    help="linear, wise-ft, task-arithmetic, ties, dare, slerp.",
)
@click.option(
    "--alpha",
    type=float,
    default=0.5,
    show_default=True,
    help="WiSE-FT alpha, task-arithmetic/TIES/DARE lambda, SLERP t.",
)
@click.option(
    "--alphas", help="Several alphas, START:STOP:STEP or a,b,c: one checkpoint each (then --out is a folder)."
)
@click.option(
    "--weights", help="linear: comma-separated weights, base first (default uniform; not normalised)."
)
@click.option(
    "--density",
    type=float,
    default=0.2,
    show_default=True,
    help="TIES: fraction of task-vector entries kept.",
)
@click.option(
    "--drop-rate", type=float, default=0.9, show_default=True, help="DARE: probability of dropping an entry."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for stochastic methods (DARE).")
@click.option(
    "--include",
    multiple=True,
    help="Merge only keys matching this glob (or re:REGEX); others come from the base.",
)
@click.option("--exclude", multiple=True, help="Never merge keys matching this glob (or re:REGEX).")
@click.option(
    "--alpha-rule", "alpha_rules", multiple=True, help="PATTERN=VALUE: a per-key alpha, first match wins."
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    help="Output dtype (default: the base's).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--out", type=click.Path(dir_okay=True), help="Output .safetensors (or folder with --alphas).")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Read pickles that hold Python objects (restricted unpickler, no code run).",
)
@click.option("--allow-nonfinite", is_flag=True, help="Merge inputs with NaN/Inf (warn instead of refusing).")
@click.option("--arch", help="Architecture name when the checkpoint does not say (e.g. ViT-B-32-quickgelu).")
@click.option(
    "--config",
    "config_file",
    type=click.Path(),
    help="TOML/YAML file with a [merge] table; flags override it.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
@friendly_errors
def merge_command(ctx: click.Context, config_file: str | None, quiet: bool, **values: Any) -> None:
    from merging.job import job_from_mapping, run_merge_job
    from micromerge.config_files import load_config_file
    from micromerge.devices import resolve_device

    mapping: dict[str, Any] = {}
    if config_file:
        loaded = load_config_file(config_file)
        mapping.update(loaded.get("merge", loaded))
    defaults = {k: v for k, v in values.items() if k not in mapping}
    mapping.update({k: v for k, v in defaults.items() if v not in ((), None)})
    mapping.update(explicit_options(ctx, values))
    mapping = {k: (list(v) if isinstance(v, tuple) else v) for k, v in mapping.items()}
    job = job_from_mapping(mapping)
    outputs = run_merge_job(job, resolve_device(job.device), progress=not quiet)
    for output in outputs:
        click.echo(
            f"wrote {output.path} ({output.manifest['seconds']:.2f} s; manifest {output.manifest_path.name})"
        )


cli.add_command(merge_command)


@cli.command("zoo")
@friendly_errors
def zoo_command() -> None:
    """List the checkpoint zoo: names, architectures, sources and formats."""
    from merging.zoo import load_zoo

    entries = load_zoo()
    width = max(len(name) for name in entries)
    click.echo(f"{'name':<{width}}  {'arch':<20} {'domain':<11} source")
    for entry in entries.values():
        arch = entry.arch or (entry.arch_config and f"config:{entry.arch_config}") or "?"
        click.echo(f"{entry.name:<{width}}  {arch:<20} {entry.domain or '':<11} {entry.source}")


@cli.command("export")
@click.argument("checkpoint")
@click.option(
    "--out", required=True, type=click.Path(), help="Folder to write (config.json + model.safetensors)."
)
@click.option(
    "--format", "fmt", type=click.Choice(["transformers"]), default="transformers", show_default=True
)
@click.option("--arch", help="Architecture name when the checkpoint does not say.")
@click.option("--force", is_flag=True, help="Overwrite an existing folder's files.")
@friendly_errors
def export_command(checkpoint: str, out: str, fmt: str, arch: str | None, force: bool) -> None:
    """Export a checkpoint as a transformers CLIPModel folder (e.g. a merged PLIP)."""
    from merging.export import export_transformers

    path = export_transformers(checkpoint, out, arch=arch, force=force)
    click.echo(f"wrote {path}")


def main() -> None:
    cli(prog_name="micromerge")


def merge_main() -> None:
    merge_command(prog_name="merge")
