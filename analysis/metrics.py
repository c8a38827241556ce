"""Forgetting and recovery metrics over accuracy-versus-alpha tables.

Target groups are where the specialist was fine-tuned (default: the domain in its manifest);
control groups are every other fine-grained domain. The honest protocol chooses alpha on the
'select' half of the benchmark's images and reports the 'report' half.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from scipy.integrate import trapezoid

from micromerge.analysis.tables import Run
from micromerge.core.errors import MicromergeError

CRITERIA = ("all_task_mean", "worst_group", "harmonic_target_control")
METRIC_NAMES = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "macro_f1": "macro F1"}
"""Each metric (eval.metrics.METRICS) as the report's sentences, tables and figures name it: with
`report --metric macro_f1` the page said "mean accuracy" beside macro-F1 numbers."""
GROUP_KINDS = ("domain", "subdomain", "modality", "submodality", "taxonomy", "scale")


def valid_groups(run: Run) -> list[str]:
    return table_groups(run.table)


def table_groups(table: pd.DataFrame) -> list[str]:
    """Every group a target or control can name in a task table: `level:coarse|fine`, and
    `KIND:VALUE` for each value of each group kind among its fine-grained tasks."""
    fine = table[table["level"] == "fine"]
    return sorted(
        {f"domain:{d}" for d in fine["domain"].unique()}
        | {
            f"{kind}:{v}"
            for kind in GROUP_KINDS[1:]
            for v in fine[kind].unique()
            if v not in ("all", "unknown")
        }
        | {"level:coarse", "level:fine"}
    )


def _mask(table: pd.DataFrame, group: str) -> pd.Series:
    kind, _, value = group.partition(":")
    if kind == "level":
        return table["level"] == value
    if kind in GROUP_KINDS:
        return (table["level"] == "fine") & (table[kind] == value)
    raise MicromergeError(
        f"group {group!r}: expected level:X or one of {', '.join(k + ':X' for k in GROUP_KINDS)}"
    )


def check_group(run: Run, group: str) -> None:
    if group not in valid_groups(run) and not _mask(run.table, group).any():
        raise MicromergeError(
            f"group {group!r} does not exist in run {run.label}; valid groups: {valid_groups(run)}"
        )


def curve(run: Run, group: str | None, metric: str = "accuracy", split: str = "all") -> pd.DataFrame:
    """alpha -> mean over the group's tasks of value, ci_low, ci_high (group None: every task)."""
    return _group_curve(_rows_of(run, metric, split), group)


def _rows_of(run: Run, metric: str, split: str) -> pd.DataFrame:
    return run.table[(run.table["metric"] == metric) & (run.table["split"] == split)]


def _group_curve(table: pd.DataFrame, group: str | None) -> pd.DataFrame:
    if group is not None:
        table = table[_mask(table, group)]
    return table.groupby("alpha")[["value", "ci_low", "ci_high"]].mean().reset_index().sort_values("alpha")


class _Curves:
    """One run's curves for one metric, each computed once: a summary asks for about forty, half of
    them twice (84 ms a run, 16 s of a 192-run report; BENCHMARKS.md "Reports at the paper grid's
    size")."""

    def __init__(self, run: Run, metric: str) -> None:
        self.run, self.metric = run, metric
        self._rows: dict[str, pd.DataFrame] = {}
        self._curves: dict[tuple[str | None, str], pd.DataFrame] = {}

    def rows(self, split: str) -> pd.DataFrame:
        if split not in self._rows:
            self._rows[split] = _rows_of(self.run, self.metric, split)
        return self._rows[split]

    def of(self, group: str | None, split: str = "all") -> pd.DataFrame:
        if (group, split) not in self._curves:
            self._curves[group, split] = _group_curve(self.rows(split), group)
        return self._curves[group, split]


def control_groups(run: Run, target: str) -> list[str]:
    kind, _, value = target.partition(":")
    fine = run.table[run.table["level"] == "fine"]
    return [f"{kind}:{v}" for v in sorted(fine[kind].unique()) if v != value] if kind in GROUP_KINDS else []


@dataclass(frozen=True)
class Summary:
    target: str
    controls: tuple[str, ...]
    # group -> value of the base / the specialist: their own evaluation, else the lowest / highest alpha
    base: dict[str, float]
    finetuned: dict[str, float]
    gain: float  # target: fine-tuned minus base
    forgetting: float  # controls: base minus fine-tuned
    best_alpha: dict[str, float]  # criterion -> alpha chosen on the select half
    best_report: dict[str, float]  # criterion -> all-task mean on the report half at that alpha
    auc: dict[str, float]  # group -> area under the accuracy-vs-alpha curve over the alpha range (normalised)
    pareto: list[tuple[float, float, float]]  # (alpha, target, control) on the front
    # what base/finetuned are: "evaluated models", "alpha endpoints", or "none" (one point, no evaluations)
    references: str = "alpha endpoints"


def _control_curve(run: Run, controls: list[str], metric: str, split: str) -> pd.DataFrame:
    return _pooled_curve(_rows_of(run, metric, split), controls)


def _pooled_curve(table: pd.DataFrame, controls: list[str]) -> pd.DataFrame:
    """alpha -> mean value over the tasks of every control group together."""
    mask = np.zeros(len(table), dtype=bool)
    for group in controls:
        mask |= _mask(table, group).to_numpy()
    return table[mask].groupby("alpha")["value"].mean().reset_index().sort_values("alpha")


def _criterion_scores(curves: _Curves, target: str, controls: list[str], split: str) -> pd.DataFrame:
    overall = curves.of(None, split).set_index("alpha")["value"]
    target_curve = curves.of(target, split).set_index("alpha")["value"]
    control = (
        _pooled_curve(curves.rows(split), controls).set_index("alpha")["value"] if controls else target_curve
    )
    groups = [g for g in valid_groups(curves.run) if g.startswith(("domain:", "level:"))]
    worst = pd.concat([curves.of(g, split).set_index("alpha")["value"] for g in groups], axis=1).min(axis=1)
    harmonic = 2 * target_curve * control / (target_curve + control)
    return pd.DataFrame(
        {
            "all_task_mean": overall,
            "worst_group": worst,
            "harmonic_target_control": harmonic,
            "target": target_curve,
            "control": control,
        }
    )


def pareto_front(points: list[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
    """(alpha, target, control) points not dominated on both target and control."""
    front = []
    for alpha, t, c in points:
        dominated = any((t2 >= t and c2 >= c) and (t2 > t or c2 > c) for _, t2, c2 in points)
        if not dominated:
            front.append((alpha, t, c))
    return sorted(front)


def area_under(curve_frame: pd.DataFrame) -> float:
    alphas, values = curve_frame["alpha"].to_numpy(), curve_frame["value"].to_numpy()
    if len(alphas) < 2:
        return float("nan")
    return float(trapezoid(values, alphas) / (alphas[-1] - alphas[0]))


def summarise(run: Run, target: str, metric: str = "accuracy") -> Summary:
    check_group(run, target)
    controls = control_groups(run, target)
    alphas = sorted(a for a in run.table["alpha"].unique() if not np.isnan(a))
    if not alphas:
        raise MicromergeError(f"run {run.label} has no alpha values (an `eval` run): nothing to summarise")
    groups = [target, *controls, "level:coarse", "level:fine"]
    curves = _Curves(run, metric)

    def at(alpha: float) -> dict[str, float]:
        return {g: float(curves.of(g).set_index("alpha")["value"].get(alpha, np.nan)) for g in groups}

    def evaluated(table: pd.DataFrame) -> dict[str, float]:
        reference = replace(run, table=table.assign(alpha=0.0))
        return {g: float(curve(reference, g, metric)["value"].iloc[0]) for g in groups}

    has_references = run.base_reference is not None and run.finetuned_reference is not None
    if has_references:
        base, finetuned = evaluated(run.base_reference), evaluated(run.finetuned_reference)
    elif len(alphas) > 1:
        base, finetuned = at(alphas[0]), at(alphas[-1])
    else:  # one point (a soup, `sweep --alphas 0.5`): both ends were it, a gain and a forgetting of 0.0
        base = finetuned = dict.fromkeys(groups, float("nan"))
    select = _criterion_scores(curves, target, controls, "select")
    report = _criterion_scores(curves, target, controls, "report")
    for split, scores, needed in (("select", select, CRITERIA), ("report", report, ("all_task_mean",))):
        empty = [c for c in needed if scores.empty or scores[c].isna().all()]
        if empty:  # a benchmark (or --tasks subset) too small for one half to hold an image of a group
            raise MicromergeError(
                f"run {run.label}: the {split} half has no image for {', '.join(empty)} (target {target}), "
                "so alpha can be neither chosen nor reported; evaluate more tasks or images (--tasks)"
            )
    best_alpha = {c: float(select[c].idxmax()) for c in CRITERIA}
    best_report = {c: float(report.loc[best_alpha[c], "all_task_mean"]) for c in CRITERIA}
    full = _criterion_scores(curves, target, controls, "all")
    points = [(float(a), float(full.loc[a, "target"]), float(full.loc[a, "control"])) for a in full.index]
    auc = {g: area_under(curves.of(g)) for g in groups} | {"all tasks": area_under(curves.of(None))}
    return Summary(
        target=target,
        controls=tuple(controls),
        base=base,
        finetuned=finetuned,
        gain=finetuned[target] - base[target],
        forgetting=_mean_of_known([base[c] - finetuned[c] for c in controls]),
        best_alpha=best_alpha,
        best_report=best_report,
        auc=auc,
        pareto=pareto_front(points),
        references="evaluated models" if has_references else "alpha endpoints" if len(alphas) > 1 else "none",
    )


def _mean_of_known(values: list[float]) -> float:
    """The mean of the values that are not NaN (a control missing at one end), NaN where none is:
    np.nanmean of no number warns "Mean of empty slice"."""
    known = [v for v in values if not np.isnan(v)]
    return float(np.mean(known)) if known else float("nan")


def _task_values(table: pd.DataFrame, metric: str) -> pd.Series:
    return table[(table["metric"] == metric) & (table["split"] == "all")].set_index("task")["value"]


def task_changes(run: Run, metric: str = "accuracy") -> pd.DataFrame:
    """Per task and alpha: value, change vs base (alpha min), change vs fine-tuned (alpha max), normalised accuracy."""
    table = run.table[(run.table["metric"] == metric) & (run.table["split"] == "all")][
        ["task", "level", "domain", "alpha", "value", "ci_low", "ci_high"]
    ]
    lo, hi = table["alpha"].min(), table["alpha"].max()
    both = run.base_reference is not None and run.finetuned_reference is not None  # as summarise takes them
    base, finetuned = (
        _task_values(reference, metric)
        if both and reference is not None
        else table[table["alpha"] == end].set_index("task")["value"]
        if lo != hi
        else pd.Series(dtype=float)  # one point, no evaluations: no change to tell (NaN, not 0.0)
        for reference, end in ((run.base_reference, lo), (run.finetuned_reference, hi))
    )
    table = table.copy()
    table["vs_base"] = table["value"] - table["task"].map(base)
    table["vs_finetuned"] = table["value"] - table["task"].map(finetuned)
    table["normalised"] = table["value"] / table["task"].map(finetuned).replace(0, np.nan)
    return table.sort_values(["level", "domain", "task", "alpha"]).reset_index(drop=True)
