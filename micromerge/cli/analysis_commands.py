"""`report`, `ablate` and `demo`: the results turned into figures and pages, a grid of runs, and
the whole loop offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from micromerge.cli.errors import friendly_errors
from micromerge.cli.options import CACHE_DIR, DEVICE, QUIET, SEED


@click.command("demo")
@click.option(
    "--out",
    type=click.Path(),
    default="demo-out",
    show_default=True,
    help="Where data, checkpoints, results and the report go.",
)
@SEED
@click.option(
    "--bench-per-class", type=int, default=40, show_default=True, help="Benchmark images per class."
)
@click.option(
    "--corpus-per-class", type=int, default=300, show_default=True, help="Training pairs per class."
)
@click.option(
    "--pretrain-epochs",
    type=int,
    default=4,
    show_default=True,
    help="Epochs of the tiny CLIP on the general corpus (the base).",
)
@click.option(
    "--finetune-epochs",
    type=int,
    default=3,
    show_default=True,
    help="Epochs of the base on the pathology corpus (the specialist).",
)
@click.option(
    "--bootstrap",
    type=int,
    default=500,
    show_default=True,
    help="Bootstrap resamples for the sweeps' 95% intervals: 0 (none) or 40 to 100,000.",
)
@click.option("--fresh", is_flag=True, help="Start over instead of reusing finished stages.")
@QUIET
@friendly_errors
def demo_command(out: str, quiet: bool, **values: Any) -> None:
    """The whole loop offline: synthetic μ-Bench -> tiny CLIP -> specialist -> sweeps -> report."""
    from micromerge.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=Path(out), progress=not quiet, **values))


@click.command("report")
@click.argument("results", type=click.Path())
@click.option(
    "--out",
    type=click.Path(),
    default="report",
    show_default=True,
    help="Folder for report.md, report.html, provenance.json, figures/ and tables/ (all written or none).",
)
@click.option(
    "--target",
    help="Target group, e.g. domain:pathology (default: the domain in the fine-tuned checkpoint's manifest).",
)
@click.option(
    "--metric",
    type=click.Choice(["accuracy", "balanced_accuracy", "macro_f1"]),
    default="accuracy",
    show_default=True,
    help="What the curves, summaries and model tables show (the paper-comparable table: accuracy, as the paper).",
)
@click.option(
    "--run-figures/--no-run-figures",
    default=None,
    help="Draw each run's own figures (per-task grid, heat map). Default: drawn up to 12 runs; beyond, "
    "only when asked, and the page links its figures instead of embedding them. (Beyond 4 runs, runs are "
    "compared per comparison set: the same models, rules, data, protocol and target.)",
)
@click.option(
    "--runs",
    "selected",
    multiple=True,
    help="Report only the runs whose label or run id matches this glob (repeatable), e.g. "
    "'clip-b32+plip / *' for one pair of an ablation grid. Default: every run.",
)
@click.option(
    "--baseline",
    help="An evaluated model (its name in the models table, e.g. 'base [ubench]', or just 'base' where one "
    "protocol scored it; its label or run id; globs allowed) the others "
    "are compared with, group by group: e.g. the base CLIP against PLIP and QuiltNet.",
)
@friendly_errors
def report_command(
    results: str,
    out: str,
    target: str | None,
    metric: str,
    run_figures: bool | None,
    selected: tuple[str, ...],
    baseline: str | None,
) -> None:
    """Markdown + HTML report (figures, tables, provenance) from a results store: sweeps' forgetting
    and recovery, and every evaluated model side by side (a store of `eval` runs only gets just
    that); self-contained up to 12 runs."""
    from micromerge.analysis.report import build_report

    click.echo(f"wrote {build_report(results, out, target, metric, run_figures, selected, baseline)}")


@click.command("ablate")
@click.argument("config", type=click.Path())
@DEVICE
@CACHE_DIR
@QUIET
@click.option(
    "--dry-run",
    is_flag=True,
    help="Check the grid against its checkpoints and list its runs; evaluate nothing.",
)
@friendly_errors
def ablate_command(config: str, device: str, cache_dir: str | None, quiet: bool, dry_run: bool) -> None:
    """Run a grid (pairs x methods x alphas x rule sets) from a TOML/YAML file through sweep and report
    (`accelerate launch` shares it between processes)."""
    from accelerate import PartialState

    from micromerge.analysis.ablate import (
        check_grid_against_checkpoints,
        describe_grid,
        load_ablation,
        plan_grid,
        refuse_grid_halves,
        run_ablation,
    )
    from micromerge.core.devices import resolve_device
    from micromerge.core.hashing import default_cache_dir
    from micromerge.eval.data import load_benchmark

    ablation = load_ablation(config)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if dry_run:  # the list first: it needs no checkpoint, and offline the check may not reach one
        jobs, skipped = plan_grid(ablation)
        click.echo("\n".join(describe_grid(ablation, jobs, skipped)))
        halves = check_grid_against_checkpoints(jobs)

        def fingerprint() -> str:
            return load_benchmark(ablation.data, cache_dir=cache, progress=not quiet).fingerprint

        refuse_grid_halves(halves, fingerprint, ablation.seed)
        return
    state = PartialState(cpu=device == "cpu")
    html = run_ablation(
        ablation,
        cache,
        resolve_device(device),
        progress=not quiet and state.is_main_process,
        rank=state.process_index,
        world_size=state.num_processes,
        wait_for_everyone=state.wait_for_everyone,
    )
    if html is not None:
        click.echo(f"wrote {html}")
