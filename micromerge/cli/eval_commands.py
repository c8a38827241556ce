"""`eval`, `sweep` and `soup`: zero-shot scores of one model, of a merge at every alpha, and of a
greedy soup, each written to a results store and printed as a table."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from micromerge.cli.errors import friendly_errors
from micromerge.cli.options import (
    ALLOW_PICKLE,
    ARCH,
    BASE_HELP,
    CACHE_DIR,
    DEVICE,
    EXCLUDE,
    FINETUNED_HELP,
    INCLUDE,
    METHOD,
    QUIET,
    SEED,
    SOURCES_HELP,
    UBENCH_DATA_HELP,
    WEIGHTS_HELP,
    Command,
    method_options,
    statistics_data_options,
)
from micromerge.eval.setting_values import PRECISIONS, PROMPTS, PROTOCOLS

if TYPE_CHECKING:
    from accelerate import PartialState

    from micromerge.eval.settings import EvalSettings


def _eval_options(func: Command) -> Command:
    """Options shared by `eval` and `sweep`."""
    options = [
        click.option("--data", default="ubench", show_default=True, help=UBENCH_DATA_HELP),
        click.option(
            "--tasks",
            default="all",
            show_default=True,
            help="Comma-separated: all, coarse, fine, task names, name patterns (held_*) or groups as "
            "`micromerge tasks` lists them (domain:pathology, scale:tissue, paper:yes).",
        ),
        click.option(
            "--store",
            type=click.Path(),
            default="results/results.jsonl",
            show_default=True,
            help="Results store (JSONL).",
        ),
        click.option(
            "--batch-size",
            type=int,
            default=256,
            show_default=True,
            help="Images per forward pass (lower it if the GPU runs out of memory).",
        ),
        click.option(
            "--precision",
            type=click.Choice(PRECISIONS),
            default="bf16",
            show_default=True,
            help="Autocast on GPU (CPU always fp32).",
        ),
        click.option(
            "--bootstrap",
            type=int,
            default=1000,
            show_default=True,
            help="Bootstrap resamples for 95% intervals: 0 (none) or 40 to 100,000.",
        ),
        SEED,
        click.option(
            "--protocol",
            type=click.Choice(PROTOCOLS),
            default="ubench",
            show_default=True,
            help="ubench: each image scored against its own caption options, as the μ-Bench authors do; "
            "closed-set: against every class of the task (CLIP_benchmark-style).",
        ),
        click.option(
            "--prompts",
            type=click.Choice(PROMPTS),
            default="names",
            show_default=True,
            help="closed-set: class names in templates, or class captions.",
        ),
        click.option(
            "--sources",
            type=click.Path(),
            help=SOURCES_HELP,
        ),
        DEVICE,
        CACHE_DIR,
        ALLOW_PICKLE,
        ARCH,
        QUIET,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _eval_settings(values: dict[str, Any]) -> tuple[EvalSettings, PartialState]:
    """The flags `eval`, `sweep` and `soup` share, as EvalSettings, and the accelerate state that says
    which process this is: under `accelerate launch` each writes its share, the main one prints."""
    from accelerate import PartialState

    from micromerge.core.hashing import default_cache_dir
    from micromerge.eval.settings import EvalSettings

    state = PartialState(cpu=values["device"] == "cpu")
    settings = EvalSettings(
        data=values["data"],
        store=Path(values["store"]),
        cache_dir=Path(values["cache_dir"]) if values.get("cache_dir") else default_cache_dir(),
        tasks=values["tasks"],
        batch_size=values["batch_size"],
        precision=values["precision"],
        bootstrap=values["bootstrap"],
        seed=values["seed"],
        prompts=values["prompts"],
        protocol=values["protocol"],
        sources=Path(values["sources"]) if values.get("sources") else None,
        progress=not values["quiet"] and state.is_main_process,
        rank=state.process_index,
        world_size=state.num_processes,
    )
    return settings, state


def _print_evaluation(rows: list[dict[str, Any]]) -> None:
    """One model's table: each task and caption key over all images, then the group means."""
    from micromerge.core.provenance import LEARNED_FROM_SELECT, has_interval, trained_on_note
    from micromerge.eval.aggregate import aggregate

    table: dict[tuple[str, Any], dict[str, Any]] = {}
    for row in rows:
        if row.get("split", "all") == "all":
            table.setdefault((row["task"], row.get("caption_key")), {})[row["metric"]] = row
    width = max([34, *(len(task) for task, _ in table)])  # real names reach 36 (eulenberg…)
    click.echo(
        f"{'task':<{width}} {'caption key':<18} {'level':<8} {'n':>6} {'accuracy':>9} {'95% CI':>15} {'bal.acc':>8}"
    )
    for (task, key), metrics in table.items():
        acc = metrics["accuracy"]
        interval = "[{:.3f}, {:.3f}]".format(acc["ci_low"], acc["ci_high"]) if has_interval(acc) else "-"
        corrupt = f"  ({acc['n_corrupt']} corrupt images skipped)" if acc.get("n_corrupt") else ""
        corrupt += trained_on_note(acc)
        balanced = metrics.get("balanced_accuracy", {}).get("value")
        # none for a headline (pooled over tasks, it has no classes): a dash, not "nan"
        balanced_text = "-" if balanced is None or balanced != balanced else f"{balanced:.3f}"
        click.echo(
            f"{task:<{width}} {key or '-':<18} {acc['level']:<8} {acc['n_images']:>6} {acc['value']:>9.3f} "
            f"{interval:>15} {balanced_text:>8}{corrupt}"
        )
    means = aggregate(rows)
    group_width = max((len(group) for group in means), default=0)
    for group, value in means.items():
        click.echo(f"  mean accuracy {group:<{group_width}} {value:.3f}")
    if any(row.get(LEARNED_FROM_SELECT) for row in rows):
        click.echo(
            f"\nIt learned from, or was chosen on, the select half of these images (--seed {rows[0].get('seed')}): "
            "the numbers above include them. Held out: its report-half rows in the store "
            "(`micromerge report`; `export --results` puts them in its model card)."
        )


def _print_sweep(rows: list[dict[str, Any]]) -> None:
    """Each task's, headline's and group's accuracy across α, one line each, as the report's curves
    read: the eval table printed once per α was about 60 lines an α, 660 for a default sweep.
    Intervals, halves, caption keys and balanced accuracy are in the store and the report."""
    from micromerge.core.provenance import trained_on_note
    from micromerge.eval.aggregate import aggregate, is_task_row

    alphas = sorted({row["alpha"] for row in rows})
    lines: dict[str, dict[float, float]] = {}
    notes: dict[str, set[str]] = {}
    for row in rows:
        if row.get("split", "all") != "all" or row["metric"] != "accuracy":
            continue
        if is_task_row(row) or row.get("level") == "headline":
            lines.setdefault(row["task"], {})[row["alpha"]] = row["value"]
            task_notes = notes.setdefault(row["task"], set())
            if row.get("n_corrupt"):
                task_notes.add(f"{row['n_corrupt']} corrupt images skipped")
            if trained_on_note(row):
                task_notes.add(trained_on_note(row).strip(" ()") + " at some α")
    for alpha in alphas:
        for group, value in aggregate([r for r in rows if r["alpha"] == alpha]).items():
            lines.setdefault(f"mean {group}", {})[alpha] = value
    width = max((len(name) for name in lines), default=len("task / group"))
    click.echo("\naccuracy by α (all images; intervals, halves and caption keys: `micromerge report`)")
    click.echo(f"{'task / group':<{width}} " + " ".join(f"{alpha:>6g}" for alpha in alphas))
    for name, values in lines.items():
        cells = " ".join(f"{values[a]:>6.3f}" if a in values else f"{'-':>6}" for a in alphas)
        said = "; ".join(sorted(notes.get(name, ())))
        click.echo(f"{name:<{width}} {cells}" + (f"  ({said})" if said else ""))


@click.command("eval")
@click.option("--model", required=True, help="Checkpoint: zoo name, hf-hub: id, file or folder.")
@_eval_options
@friendly_errors
def eval_command(model: str, **values: Any) -> None:
    """Zero-shot evaluation of one checkpoint on every μ-Bench task."""
    from micromerge.core.devices import resolve_device
    from micromerge.eval.engine import run_eval
    from micromerge.merging.sources import CheckpointAccess

    settings, state = _eval_settings(values)
    if not state.is_main_process:
        return  # one model is one process's work: under `accelerate launch` each did it all and printed it
    access = CheckpointAccess(values["allow_pickle"], values["arch"])
    rows = run_eval(model, settings, resolve_device(values["device"]), access)
    _print_evaluation(rows)
    click.echo(f"\nresults in {settings.store}")


@click.command("sweep")
@click.option("--base", required=True, help=BASE_HELP)
@click.option("--ft", "finetuned", multiple=True, required=True, help=FINETUNED_HELP)
@METHOD
@click.option("--alphas", default="0:1:0.1", show_default=True, help="START:STOP:STEP or a,b,c.")
@click.option("--weights", help=WEIGHTS_HELP)
@method_options
@statistics_data_options
@INCLUDE
@EXCLUDE
@click.option(
    "--alpha-rule",
    "alpha_rules",
    multiple=True,
    help="PATTERN=VALUE: a per-key alpha, the same at every swept α; first match wins (repeatable).",
)
@_eval_options
@friendly_errors
def sweep_command(base: str, finetuned: tuple[str, ...], method: str, alphas: str, **values: Any) -> None:
    """Evaluate a merge at every alpha on every task (resumable; `accelerate launch` splits alphas)."""
    from micromerge.core.devices import resolve_device
    from micromerge.eval.engine import run_sweep
    from micromerge.eval.settings import SweepPlan
    from micromerge.merging.job import job_from_mapping, warn_of_a_variant_with_one_finetuned
    from micromerge.merging.methods import TUNABLE

    job = job_from_mapping(
        {
            "base": base,
            "finetuned": list(finetuned),
            "method": method,
            "alphas": alphas,
            "weights": values.pop("weights"),
            **{name: values.pop(name) for name in TUNABLE},
            "base_data": values.pop("base_data"),
            "ft_data": list(values.pop("ft_data")),
            "seed": values["seed"],
            "include": list(values.pop("include")),
            "exclude": list(values.pop("exclude")),
            "alpha_rules": list(values.pop("alpha_rules")),
            "allow_pickle": values["allow_pickle"],
            "arch": values["arch"],
        }
    )
    warn_of_a_variant_with_one_finetuned(job)
    settings, state = _eval_settings(values)
    plan = SweepPlan(
        job.base, job.finetuned, job.spec, job.alphas or (), job.access, model_data=job.model_data
    )
    rows = run_sweep(plan, settings, resolve_device(values["device"]), state.wait_for_everyone)
    state.wait_for_everyone()
    if state.is_main_process:
        _print_sweep(_rows_of_the_run(settings, rows))
        click.echo(f"\nresults in {settings.store}")


@click.command("soup")
@click.option("--base", required=True, help=BASE_HELP)
@click.option("--ft", "finetuned", multiple=True, required=True, help="A fine-tuned model (repeat).")
@INCLUDE
@EXCLUDE
@click.option("--out", type=click.Path(), help="Also write the chosen soup as a checkpoint (+ manifest).")
@click.option("--force", is_flag=True, help="Overwrite --out.")
@_eval_options
@friendly_errors
def soup_command(
    base: str, finetuned: tuple[str, ...], include: tuple[str, ...], exclude: tuple[str, ...], **values: Any
) -> None:
    """Greedy soup of the base and the fine-tuned models, chosen on the select half, reported on the other."""
    from micromerge.analysis.soup import check_soup_out, greedy_soup, write_soup
    from micromerge.core.devices import resolve_device
    from micromerge.merging.rules import KeyRules
    from micromerge.merging.sources import CheckpointAccess

    out, force = values.pop("out"), values.pop("force")
    settings, state = _eval_settings(values)
    if not state.is_main_process:
        return  # one process chooses: each step depends on the last
    access = CheckpointAccess(values["allow_pickle"], values["arch"])
    if out:
        check_soup_out(Path(out), force, (base, *finetuned))
    result = greedy_soup(
        base,
        finetuned,
        settings,
        resolve_device(values["device"]),
        KeyRules(tuple(include), tuple(exclude)),
        access=access,
    )
    for step in result.steps:
        verdict = "kept" if step.kept else "left out"
        click.echo(f"{100 * step.select_mean:6.2f}%  (select half)  + {step.ingredient}: {verdict}")
    weights = ", ".join(f"{w:.3g}" for w in result.weights)
    click.echo(
        f"soup weights (base, ft...): {weights}; report half: {100 * result.report_mean:.2f}% all-task mean"
    )
    click.echo(f"results in {settings.store} (run {result.run_id})")
    if out:
        rules = KeyRules(tuple(include), tuple(exclude))
        written = write_soup(result, Path(out), force, rules, progress=settings.progress, access=access)
        click.echo(f"wrote {written.path} (manifest {written.manifest_path.name})")


def _rows_of_the_run(settings: EvalSettings, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All rows of this run once every process has finished (each process returns its view)."""
    from micromerge.eval.store import ResultStore

    store = ResultStore(settings.store)
    return [row for run_id in sorted({r["run_id"] for r in rows}) for row in store.rows(run_id)]
