"""`micromerge report`: Markdown and an HTML page, plus CSV/JSON exports. The page is self-contained
(figures embedded) up to RUN_FIGURE_RUNS runs; an ablation grid's report draws its runs per
comparison set (analysis.sets) and links its figures instead.

The report says which protocol produced each number: alpha is chosen on the 'select' half of
the benchmark's images and the chosen alpha's accuracy is reported on the 'report' half.
"""

from __future__ import annotations

import json
import re
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pandas as pd

import micromerge
from micromerge.analysis import figures
from micromerge.analysis.evaluated import (
    evaluation_names,
    evaluations,
    evaluations_of_models_in,
    models_change_table,
    models_group_means,
    models_group_table,
    models_table,
    models_task_table,
    pick_baseline,
)
from micromerge.analysis.metrics import (
    CRITERIA,
    METRIC_NAMES,
    Summary,
    curve,
    summarise,
    task_changes,
    valid_groups,
)
from micromerge.analysis.report_page import Layout, chosen_alpha, html_page, markdown_page, percent
from micromerge.analysis.sets import ComparisonSet, comparison_sets
from micromerge.analysis.tables import GREEDY_SOUP, Run, finetuned_domain, has_curve, load_runs, run_label
from micromerge.core.atomic import output_folder, staged_files, write_json_atomic, write_text_atomic
from micromerge.core.errors import MicromergeError
from micromerge.core.hashing import sha256_file, sha256_json
from micromerge.core.json_text import parse_json
from micromerge.core.provenance import has_interval
from micromerge.core.suggest import meant
from micromerge.eval.store import coefficients_file

CRITERIA_TEXT = {
    "all_task_mean": "highest mean {metric} over all tasks",
    "worst_group": "highest {metric} of the worst group (coarse, fine, each domain)",
    "harmonic_target_control": "highest harmonic mean of target and control {metric}",
}
"""Each α-selection criterion in words, `{metric}` the report's metric (METRIC_NAMES)."""


def headline_table(runs: list[Run], summaries: list[Summary]) -> pd.DataFrame:
    records = []
    for run, s in zip(runs, summaries, strict=True):
        records.append(
            {
                "run": run.label,
                "target": s.target,
                "base: target": percent(s.base[s.target]),
                "fine-tuned: target": percent(s.finetuned[s.target]),
                "gain (pts)": percent(s.gain),
                "forgetting on controls (pts)": percent(s.forgetting),
                "chosen α (select half)": chosen_alpha(run, s),
                "all-task mean at chosen α (report half)": percent(s.best_report["all_task_mean"]),
                "AUC all tasks": percent(s.auc["all tasks"]),
            }
        )
    return pd.DataFrame.from_records(records)


def criteria_table(runs: list[Run], summaries: list[Summary], metric: str = "accuracy") -> pd.DataFrame:
    """Each criterion's α of each run with several (a run of one point has nothing to choose)."""
    return pd.DataFrame.from_records(
        [
            {
                "run": r.label,
                "criterion": CRITERIA_TEXT[c].format(metric=METRIC_NAMES[metric]),
                "α chosen on select half": f"{s.best_alpha[c]:g}",
                "all-task mean on report half (%)": percent(s.best_report[c]),
            }
            for r, s in zip(runs, summaries, strict=True)
            if has_curve(r)
            for c in CRITERIA
        ],
        columns=["run", "criterion", "α chosen on select half", "all-task mean on report half (%)"],
    )


def group_table(run: Run, groups: list[str], metric: str = "accuracy") -> pd.DataFrame:
    """Percent per α, to one decimal like every other percentage in the report (two decimals
    printed 78.9 beside 56.06 in one column, and claimed a precision no benchmark half has). A
    group the run scored no task of (level:coarse of a `--tasks domain:pathology` sweep) has no
    column, where it had one of NaN."""
    columns = {}
    for group in [*groups, None]:
        frame = curve(run, group, metric)
        if not frame.empty:
            columns[group or "all tasks"] = frame.set_index("alpha")["value"]
    table = pd.DataFrame(columns) * 100
    table.index.name = "alpha"
    table = table.round(1).reset_index()
    return (
        table.drop(columns="alpha") if run.method == GREEDY_SOUP else table
    )  # its candidate's α 1, not its own


def _provenance(
    store: Path, runs: list[Run], summaries: list[Summary], settings: dict[str, Any], evaluated: list[Run]
) -> dict[str, Any]:
    """What the report was made from and how: the store's sha256, the report's own settings (its
    numbers change with the target and the metric), each run with the target it was read by, and
    each evaluation the models table shows."""
    return {
        "micromerge_version": micromerge.__version__,
        "results_store": str(store),
        "results_store_sha256": sha256_file(store),
        **settings,
        "runs": [
            {
                "run_id": r.run_id,
                "label": r.label,
                "method": r.method,
                "parameters": r.parameters,
                "model": r.model,
                "dataset": r.dataset,
                "target": s.target,
            }
            for r, s in zip(runs, summaries, strict=True)
        ],
        "evaluations": [
            {
                "run_id": r.run_id,
                "label": r.label,
                "protocol": r.protocol,
                "model": r.model,
                "dataset": r.dataset,
            }
            for r in evaluated
        ],
        "alpha_selection_protocol": "alpha chosen on a seeded half of the benchmark's images ('select', the same images for every task); numbers at that alpha reported on the other half ('report')",
    }


def paper_headline_table(runs: list[Run]) -> pd.DataFrame:
    """The μ-Bench paper's two numbers per run and alpha (ubench protocol only): coarse-grained
    accuracy pooled over every coarse caption key and image, fine-grained = classification_1
    pooled (without eulenberg darkfield/epifluorescence and sources outside the paper), with CIs."""
    records = []
    for run in runs:
        if run.headline.empty:
            continue
        frame = run.headline[(run.headline["split"] == "all") & (run.headline["metric"] == "accuracy")]
        for alpha, rows in frame.groupby("alpha", dropna=False):
            # a soup's rows carry its linear candidate's α 1, which read as the specialist's: no α
            shown_alpha = None if run.method == GREEDY_SOUP else alpha
            record = {"run": run.label, "protocol": run.protocol, "alpha": shown_alpha}
            for _, row in rows.iterrows():
                name = "coarse" if row["task"].endswith("coarse") else "fine"
                record[f"{name} %"] = round(100 * row["value"], 1)
                record[f"{name} 95% CI"] = (
                    "n/a (--bootstrap 0)"
                    if not has_interval(row)
                    else f"[{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}]"
                )
            records.append(record)
    return pd.DataFrame.from_records(records)


# every file a report writes into figures/ and tables/: those of an earlier report that this one
# did not write again (its runs left the store) are removed; any other file there is the user's
REPORT_FILES = re.compile(
    r"figures/((accuracy_vs_alpha|pareto_target_vs_control)(_set\d+)?|per_task_set\d+|models"
    r"|(per_task|heatmap|coefficients)_run\d+)\.(png|svg)"
    r"|tables/(headline|paper_headline|alpha_selection|comparison_sets|models(_groups|_tasks|_change)?"
    r"|(groups|tasks|pareto)_run\d+)\.(csv|json)"
)
OVERVIEW_RUNS = 4
"""Up to this many runs with curves share one accuracy-versus-α and one Pareto figure; beyond, one
of each (and a per-task figure) per comparison set (analysis.sets)."""
RUN_FIGURE_RUNS = 12
"""Up to this many runs, each run's own figures are drawn by default and every figure is embedded
in the page; beyond, each run's are drawn only on request (`run_figures`), and figures are linked
from the page: a 192-run grid's own figures took 4 of a report's 4.5 minutes and 89 MB of its page."""


def build_report(
    store: str | Path,
    out: str | Path,
    target: str | None = None,
    metric: str = "accuracy",
    run_figures: bool | None = None,
    selected: tuple[str, ...] = (),
    baseline: str | None = None,
) -> Path:
    """Write report.md, report.html, provenance.json, figures/ and tables/ into `out`, all of them
    or (on a failure or Ctrl-C) none, and no file of an earlier report that this one does not
    replace; files of the user's own stay. `run_figures`: draw each run's own figures (None: up to
    RUN_FIGURE_RUNS runs); `selected`: report only the runs whose label or run id matches one of
    these globs (one pair of an ablation grid: "clip-b32+plip / *"); `baseline`: the evaluated model
    the others are compared with, group by group. Returns the HTML path."""
    superseded = REPORT_FILES.fullmatch
    with (
        output_folder(out) as folder,
        staged_files(folder, lambda name: superseded(name) is not None) as staging,
    ):
        _write_report(Path(store), staging, target, metric, run_figures, selected, baseline)
    return folder / "report.html"


def _meant_group(group: str, valid: list[str]) -> str:
    """` (did you mean domain:pathology?)` for `pathology`, `domain:Pathology` or a near miss."""
    value = group.rpartition(":")[2].lower()  # `pathology` of `pathology` and of `domain:Pathology`
    by_value = [g for g in valid if g.partition(":")[2].lower() == value]
    return f" (did you mean {by_value[0]}?)" if by_value else meant(group, valid)


def picked(label: str, run_id: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(label, p) or fnmatchcase(run_id, p) for p in patterns)


def select_runs(runs: list[Run], patterns: tuple[str, ...], store: Path) -> list[Run]:
    """The runs whose label or run id matches one of the globs (all runs when there are none)."""
    if not patterns:
        return runs
    kept = [r for r in runs if picked(r.label, r.run_id, patterns)]
    if not kept:
        labels = sorted({r.label for r in runs})
        raise MicromergeError(
            f"--runs {' '.join(patterns)}: matches no run label or run id of {store}; its labels: "
            + "; ".join(labels[:5])
            + (f" (and {len(labels) - 5} more)" if len(labels) > 5 else "")
        )
    return kept


def _scored_with(
    runs: list[Run], evaluated: list[Run], metric: str, store: Path
) -> tuple[list[Run], list[Run], str | None]:
    """The sweeps and evaluations to report that have `metric`, and a note naming those that do not:
    a ubench-protocol run has no macro F1 (its summary found no value where it looked for one and
    the report stopped on a pandas IndexError). Sweeps none of which has it (or, in a store of
    evaluations, no evaluation): one line saying which metrics they have; the metric does not turn
    a report of sweeps into one of the models alone."""

    def has(run: Run) -> bool:
        return bool((run.table["metric"] == metric).any())

    asked = runs or evaluated
    if not any(has(run) for run in asked):
        present = sorted({m for run in asked for m in run.table["metric"].unique()})
        raise MicromergeError(
            f"--metric {metric}: no {'sweep' if runs else 'evaluation'} reported from {store} has it"
            f"{_why_unscored(metric)}; they have {', '.join(present)}"
        )
    left_runs = [run.label for run in runs if not has(run)]
    left_models = [
        name for run, name in zip(evaluated, evaluation_names(evaluated), strict=True) if not has(run)
    ]
    if not left_runs and not left_models:
        return runs, evaluated, None
    parts = [
        f"{len(names)} {kind} ({_listed(names)})"
        for kind, names in (("sweep(s)", left_runs), ("evaluated model(s)", left_models))
        if names
    ]
    note = (
        f"left out, as they have no {metric}: {' and '.join(parts)}{_why_unscored(metric)}; "
        "`--metric accuracy` reports them"
    )
    return [run for run in runs if has(run)], [run for run in evaluated if has(run)], note


def _why_unscored(metric: str) -> str:
    return (
        " (the ubench protocol has none: each image answers its own options, so there is no confusion "
        "matrix; `--protocol closed-set` runs have it)"
        if metric == "macro_f1"
        else ""
    )


def _unused_references(run: Run, scorer: str) -> str:
    """Why the store's evaluations of the run's models were not its references (they scored fewer
    tasks), where there are such: the note's advice to run `eval` would otherwise read as if none ran."""
    if not run.unused_references:
        return ""
    return f" (on every task {scorer} scored: {'; '.join(run.unused_references)})"


def _listed(names: list[str], shown: int = 3) -> str:
    return "; ".join(names[:shown]) + (f"; and {len(names) - shown} more" if len(names) > shown else "")


def _write_report(
    store: Path,
    out: Path,
    target: str | None,
    metric: str,
    run_figures: bool | None,
    selected: tuple[str, ...],
    baseline: str | None = None,
) -> None:
    # with --runs, only the selected runs' rows are read (and the evaluations they are reported against)
    wanted = (lambda first: picked(run_label(first), first["run_id"], selected)) if selected else None
    loaded = load_runs(store, wanted)
    swept = [r for r in loaded if r.table["alpha"].notna().any()]
    evaluated = evaluations(loaded)
    if not swept and not evaluated:
        raise MicromergeError(
            f"{store}: no sweep and no evaluation runs; run `micromerge sweep` or `eval` first"
        )
    # a store of evaluations only is the models side by side; --runs then picks among them
    runs = select_runs(swept, selected, store) if swept else []
    summaries, notes = [], []
    if not swept and selected:
        evaluated = select_runs(evaluated, selected, store)
    elif selected:
        merged = {run.run_id for run in evaluations_of_models_in(evaluated, runs)}
        shown = [e for e in evaluated if e.run_id in merged or picked(e.label, e.run_id, selected)]
        if len(shown) < len(evaluated):
            notes.append(
                f"{len(evaluated) - len(shown)} evaluated model(s) that no selected run merges are left out "
                "of the models tables (`--runs` with their label or run id adds them)"
            )
        evaluated = shown
    runs, evaluated, unscored = _scored_with(runs, evaluated, metric, store)
    if unscored:
        notes.append(unscored)
    learned = [
        name
        for run, name in zip(evaluated, evaluation_names(evaluated), strict=True)
        if run.learned_from_select
    ]
    if learned:
        notes.append(
            f"{'; '.join(learned)}: learned from, or chosen on, the select half of the images it was scored "
            "on, so its numbers in the models tables (all images) include images it learned from; the "
            "held-out ones are its report half's (split `report` in the store; `micromerge export --results` "
            "puts them in its model card)"
        )
    for run in runs:
        domain = finetuned_domain(run, Path(store))
        group = target or (f"domain:{domain}" if domain else None)
        why = "no fine-tuning domain recorded in the checkpoint manifest"
        if target is None and group is not None and group not in valid_groups(run):
            # `finetune --domain histopathology`: refused as if the user had typed a wrong --target
            why, group = f"the recorded fine-tuning domain {domain!r} is no domain of this benchmark", None
        if group is None:
            fine_domains = sorted(run.table[run.table["level"] == "fine"]["domain"].unique())
            group = f"domain:{fine_domains[0]}" if fine_domains else "level:coarse"
            notes.append(f"{run.label}: {why}; target defaults to {group} (set --target)")
        if group not in valid_groups(run):
            if any(group in valid_groups(other) for other in runs):  # a sweep of fewer tasks among others
                raise MicromergeError(
                    f"--target {group}: run {run.label} scored no task of it (other runs here did); leave "
                    "it out with --runs, or choose a target every run has"
                )
            raise MicromergeError(
                f"--target {group}: not a group of run {run.label}{_meant_group(group, valid_groups(run))}; "
                f"valid groups: {valid_groups(run)}"
            )
        summaries.append(summarise(run, group, metric))
        if run.trained_on:
            own = sorted(t for t, mark in run.trained_on.items() if mark == "task")
            notes.append(
                f"{run.label}: a model in it was fine-tuned (supervised) on this benchmark's own images "
                f"({', '.join(own) or 'of tasks not evaluated here'}): the numbers of "
                f"{', '.join(sorted(run.trained_on))} and the headline are not zero-shot at the α that "
                "include its weights (marked trained_on in the store)"
            )
        if summaries[-1].references == "none":
            notes.append(
                f"{run.label}: one point, so no 'base' and 'fine-tuned' numbers (gain, forgetting, change "
                "per task) without `micromerge eval` of the base and the specialist into this store"
                + _unused_references(run, "it")
            )
        if summaries[-1].references == "alpha endpoints":
            rules = any(run.parameters.get(k) for k in ("alpha_rules", "include", "exclude"))
            notes.append(
                f"{run.label}: 'base' and 'fine-tuned' are this sweep's lowest and highest α"
                + (", which under its include/exclude/alpha rules are NOT the real models" if rules else "")
                + "; `micromerge eval` of the base and the specialist into this store makes them the real ones"
                + _unused_references(run, "the sweep")
            )
    figure_dir, table_dir = out / "figures", out / "tables"
    curves = [r for r in runs if has_curve(r)]
    if runs and not curves:
        notes.append("every run has a single alpha: no curves, tables only")
    overview, sets = _overview_figures(runs, summaries, curves, figure_dir, metric)
    many = len(runs) > RUN_FIGURE_RUNS  # 192 runs' sentences and embedded figures made an 89 MB page
    draw_runs = run_figures if run_figures is not None else not many
    per_run = _run_figures(store, runs, curves if draw_runs else [], figure_dir, metric, notes)
    if curves and not draw_runs:
        why = "--no-run-figures" if run_figures is False else f"{len(runs)} runs, more than {RUN_FIGURE_RUNS}"
        notes.append(
            f"each run's own figures (per-task grid, heat map) are not drawn ({why}): "
            "`micromerge report --run-figures` draws them, about a second a run"
        )
    tables: dict[str, pd.DataFrame] = {}
    if runs:
        tables["headline"] = headline_table(runs, summaries)
        tables["paper_headline"] = paper_headline_table(runs)
        tables["alpha_selection"] = criteria_table(runs, summaries, metric)
    for index, (run, summary) in enumerate(zip(runs, summaries, strict=True)):
        tables[f"groups_run{index}"] = group_table(
            run, [summary.target, *summary.controls, "level:coarse", "level:fine"], metric
        )
        tables[f"tasks_run{index}"] = task_changes(run, metric).round(4)
        tables[f"pareto_run{index}"] = pd.DataFrame(
            summary.pareto, columns=["alpha", "target", "control"]
        ).round(4)
    if evaluated:
        headlines = [paper_headline_table([run]) for run in evaluated]
        tables["models"] = models_table(evaluated, headlines, metric)
        means = models_group_means(evaluated, metric)
        tables["models_groups"] = models_group_table(means)
        tables["models_tasks"] = models_task_table(evaluated, metric)
        if baseline is not None:
            # under another metric, the models without it are left out: say so where the baseline is not found
            scope = str(store) if metric == "accuracy" else f"{store} with {metric}"
            chosen = pick_baseline(evaluated, baseline, scope)
            baseline = evaluation_names(evaluated)[chosen]
            tables["models_change"], other = models_change_table(means, evaluated, chosen)
            if other:
                notes.append(
                    f"--baseline: {', '.join(other)} scored otherwise than {baseline} (another protocol, "
                    "copy of the data or task definition): not compared with it"
                )
        drawn = figures.models_by_group(tables["models_groups"], metric)
        overview.insert(
            0, ("evaluated models by level and domain", figures.save(drawn, figure_dir, "models")[0])
        )
    if sets:
        tables["comparison_sets"] = pd.DataFrame.from_records(
            [
                {"set": number, "title": comparison.title, "run": name, "run_id": run.run_id}
                for number, comparison in enumerate(sets)
                for run, name in zip(comparison.runs, comparison.names, strict=True)
            ]
        )
    table_dir.mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        write_text_atomic(table_dir / f"{name}.csv", frame.to_csv(index=False))
        write_json_atomic(table_dir / f"{name}.json", json.loads(frame.to_json(orient="records")))
    settings = {
        "runs_selected": list(selected) or "all",
        "target": target or "each run's fine-tuning domain (its checkpoint manifest)",
        "metric": metric,
        "run_figures": draw_runs,
        "baseline": baseline,
    }
    provenance = _provenance(store, runs, summaries, settings, evaluated)
    write_json_atomic(out / "provenance.json", provenance)
    layout = Layout(
        runs, summaries, tables, overview, per_run, notes, provenance, out, many, baseline, metric
    )
    write_text_atomic(out / "report.md", markdown_page(layout))
    write_text_atomic(out / "report.html", html_page(layout))


def _overview_figures(
    runs: list[Run], summaries: list[Summary], curves: list[Run], figure_dir: Path, metric: str
) -> tuple[list[tuple[str, Path]], list[ComparisonSet]]:
    """The figures that compare runs, as (caption, PNG): one accuracy-versus-α and one Pareto figure
    for up to OVERVIEW_RUNS runs with curves, else three per comparison set (and the sets)."""
    curve_ids = {run.run_id for run in curves}
    curve_summaries = [s for r, s in zip(runs, summaries, strict=True) if r.run_id in curve_ids]
    shown = METRIC_NAMES[metric]
    if len(curves) <= OVERVIEW_RUNS:
        drawn = [
            (f"{shown} versus α", figures.accuracy_vs_alpha(curves, curve_summaries, metric), "accuracy_vs_alpha"),
            ("target versus control", figures.pareto(curves, curve_summaries, metric), "pareto_target_vs_control"),
        ] if curves else []  # fmt: skip
        return [(caption, figures.save(figure, figure_dir, name)[0]) for caption, figure, name in drawn], []
    sets = comparison_sets(curves, curve_summaries)
    overview = []
    for number, comparison in enumerate(sets):
        title = comparison.title or f"comparison set {number}"
        for caption, figure, name in (
            (f"{shown} versus α", figures.set_accuracy_vs_alpha(comparison, metric), "accuracy_vs_alpha"),
            ("target versus control", figures.pareto(comparison.runs, comparison.summaries, metric, title),
             "pareto_target_vs_control"),
            ("per task", figures.set_per_task(comparison, metric), "per_task"),
        ):  # fmt: skip
            overview.append(
                (f"{title}: {caption}", figures.save(figure, figure_dir, f"{name}_set{number}")[0])
            )
    return overview, sets


def _run_figures(
    store: Path, runs: list[Run], drawn: list[Run], figure_dir: Path, metric: str, notes: list[str]
) -> dict[int, list[tuple[str, Path]]]:
    """Each run's own figures, as (caption, PNG) by its index: the per-task grid and heat map of
    the runs in `drawn`, and the learned coefficients of every run that has them."""
    drawn_ids = {run.run_id for run in drawn}
    per_run: dict[int, list[tuple[str, Path]]] = {}
    for index, run in enumerate(runs):
        figures_of_run = []
        if run.run_id in drawn_ids:
            figures_of_run += [
                ("per task", figures.per_task_grid(run, metric), f"per_task_run{index}"),
                ("change against the base", figures.heatmap(run, metric), f"heatmap_run{index}"),
            ]
        saved = _learned_coefficients(store, run, notes)
        if saved is not None:
            figures_of_run.append(
                (
                    "learned coefficients",
                    figures.learned_coefficients(saved, run.label),
                    f"coefficients_run{index}",
                )
            )
        per_run[index] = [(c, figures.save(f, figure_dir, name)[0]) for c, f, name in figures_of_run]
    return per_run


def _learned_coefficients(store: Path, run: Run, notes: list[str]) -> dict[str, Any] | None:
    """The coefficients a learned merge (AdaMerging, supervised α) used, kept beside the store."""
    described = (run.parameters.get("statistics") or [{}])[0]
    if "coefficients_sha256" not in described:
        return None
    path = coefficients_file(store, described)
    try:
        saved = parse_json(path.read_text())
    except (OSError, ValueError):
        notes.append(f"{run.label}: learned coefficients not found at {path} (the sweep writes them there)")
        return None
    table = saved.get("table") if isinstance(saved, dict) else None
    if table is None or sha256_json(table) != described["coefficients_sha256"] or "described" not in saved:
        # the figure would show another table than the one the run's rows were merged with
        notes.append(f"{run.label}: {path} is not the table this run used (its sha256 differs); no figure")
        return None
    return saved
