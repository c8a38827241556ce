"""Figures: accuracy vs alpha, per-task small multiples, target-vs-control Pareto, task x alpha heat map.

Every figure is saved as PNG and SVG, uses seaborn's colour-blind palette, and labels its
axes with units. Functions return the matplotlib Figure so tests can inspect it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from micromerge.analysis.metrics import METRIC_NAMES, Summary, _control_curve, curve, task_changes  # noqa: E402
from micromerge.analysis.sets import ComparisonSet, label_parts  # noqa: E402
from micromerge.analysis.tables import Run  # noqa: E402

PALETTE = sns.color_palette("colorblind")


def save(figure: plt.Figure, folder: Path, name: str) -> list[Path]:
    """PNG and SVG with the same bytes for the same figure: no date or software version, and the
    SVG's element ids salted with the figure's name (matplotlib salts them with a fresh uuid4).
    Both are cut to one tight box, measured once (matplotlib's `bbox_inches="tight"` measures it
    in every save: a third of a report's time, which is mostly its figures)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.svg"]
    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]  # the Agg canvas (matplotlib.use above)
    box = figure.get_tightbbox(renderer).padded(0.1)  # savefig's pad_inches
    figure.savefig(paths[0], dpi=130, bbox_inches=box, metadata={"Software": None})
    with matplotlib.rc_context({"svg.hashsalt": name}):
        figure.savefig(paths[1], bbox_inches=box, metadata={"Date": None, "Creator": None})
    plt.close(figure)
    return paths


STYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P"]
HATCHES = ["", "//", "..", "xx"]


def _run_style(index: int) -> dict[str, object]:
    """The colour, line style and marker of the index-th run of a figure that colours by run: ten
    colour-blind-safe colours, then the next line style (40 runs before a style repeats)."""
    return {
        "color": PALETTE[index % len(PALETTE)],
        "linestyle": STYLES[(index // len(PALETTE)) % len(STYLES)],
        "marker": MARKERS[index % len(MARKERS)],
    }


def _opening(name: str) -> str:
    """A metric's name opening a title: "Macro F1", where str.capitalize() gave "Macro f1"."""
    return name[:1].upper() + name[1:]


def _joined(names: list[str], most: int = 3) -> str:
    """Names of runs drawn as one curve, at most `most` of them (48 copies of a run once made a
    legend entry 67,000 pixels wide)."""
    shown = " = ".join(names[:most])
    return shown + (f" (+{len(names) - most} more)" if len(names) > most else "")


def accuracy_vs_alpha(runs: list[Run], summaries: list[Summary], metric: str = "accuracy") -> plt.Figure:
    """Group means with interval bands; end points marked; the chosen alpha marked. Several runs share
    axes: colour = group, line style and marker = run (method). A curve identical to one already drawn
    (WiSE-FT and task arithmetic with one specialist are one formula) is drawn once, named for both."""
    figure, ax = plt.subplots(figsize=(8, 5))
    names, shared = label_parts(runs)
    drawn: dict[tuple, dict] = {}  # (group, alphas, values) -> the line drawn for it and its names
    chosen: dict[float, None] = {}  # each alpha chosen, once, in the order the runs chose it
    for r_index, (run, summary) in enumerate(zip(runs, summaries, strict=True)):
        style, marker = STYLES[r_index % len(STYLES)], MARKERS[r_index % len(MARKERS)]
        for g_index, group in enumerate([summary.target, *summary.controls, None]):
            frame = curve(run, group, metric)
            if frame.empty:
                continue
            key = (group, tuple(frame["alpha"].round(10)), tuple(frame["value"].round(10)))
            if key in drawn:
                drawn[key]["names"].setdefault(names[r_index])
                continue
            color = PALETTE[g_index % len(PALETTE)]
            (line,) = ax.plot(
                frame["alpha"], frame["value"] * 100, style, color=color, marker=marker, markersize=4
            )
            drawn[key] = {"line": line, "names": {names[r_index]: None}, "group": group or "all tasks"}
            ax.fill_between(
                frame["alpha"], frame["ci_low"] * 100, frame["ci_high"] * 100, color=color, alpha=0.12
            )
            ax.scatter(
                frame["alpha"].iloc[[0, -1]],
                frame["value"].iloc[[0, -1]] * 100,
                color=color,
                marker=marker,
                s=40,
                zorder=3,
                edgecolor="black",
            )
        best = summary.best_alpha["all_task_mean"]
        ax.axvline(best, color="grey", linestyle=style, linewidth=1)
        chosen[best] = None
    for best in chosen:
        ax.text(best, 1.01, f"α={best:g}", transform=ax.get_xaxis_transform(), fontsize=7, ha="center",
                va="bottom", color="grey")  # fmt: skip
    for entry in drawn.values():
        entry["line"].set_label(f"{_joined(list(entry['names']))} — {entry['group']}")
    ax.set_xlabel("interpolation weight α (0 = base, 1 = fine-tuned)")
    ax.set_ylabel(f"mean {METRIC_NAMES[metric]} (%)")
    ax.set_title(
        f"{_opening(METRIC_NAMES[metric])} versus α"
        + (f" ({shared})" if shared else "")
        + "\nbands: mean of per-task 95% bootstrap intervals; vertical lines: α chosen on the select half",
        fontsize=9,
        pad=16,
    )
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    ax.grid(alpha=0.3)
    return figure


def per_task_grid(run: Run, metric: str = "accuracy") -> plt.Figure:
    """Small multiples of accuracy vs alpha per task, coarse first, then fine grouped by domain."""
    changes = task_changes(run, metric)
    order = changes.drop_duplicates("task")[["task", "level", "domain"]].values.tolist()
    figure, axes = _panels(len(order), 4, 3.2, 2.4, legend=False)
    domains = sorted({d for _, _, d in order})
    for ax, (task, level, domain) in zip(axes.flat, order, strict=False):
        frame = changes[changes["task"] == task]
        color = PALETTE[domains.index(domain) % len(PALETTE)]
        ax.plot(frame["alpha"], frame["value"] * 100, color=color, marker="o", markersize=2.5)
        ax.fill_between(
            frame["alpha"], frame["ci_low"] * 100, frame["ci_high"] * 100, color=color, alpha=0.15
        )
        ax.set_title(f"{task}\n({level}, {domain})", fontsize=8)
        ax.set_ylabel(f"{METRIC_NAMES[metric]} (%)", fontsize=7)
        ax.set_xlabel("α", fontsize=7)
        ax.grid(alpha=0.3)
    _title_above_panels(figure, f"{run.label}: per-task {METRIC_NAMES[metric]} versus α")
    return figure


NAMED_FRONTS = 4
"""Up to this many runs, each run's Pareto front has its own legend entry; beyond, one entry says
what the hollow circles are (a legend of 192 fronts was 7,643 pixels tall)."""


def pareto(
    runs: list[Run] | tuple[Run, ...], summaries: list[Summary] | tuple[Summary, ...],
    metric: str = "accuracy", title: str = "",
) -> plt.Figure:  # fmt: skip
    """Target (fine-tuning domain) versus control accuracy along alpha, one curve per run (the WiSE-FT figure)."""
    figure, ax = plt.subplots(figsize=(5.5, 5))
    names, _ = label_parts(runs)
    ends: list[tuple[str, tuple[float, float]]] = []
    for index, (run, summary) in enumerate(zip(runs, summaries, strict=True)):
        target = curve(run, summary.target, metric)
        control = (
            _control_curve(run, list(summary.controls), metric, "all")
            if summary.controls
            else target[["alpha", "value"]]
        )
        style = _run_style(index)
        ax.plot(
            target["value"] * 100,
            control["value"].to_numpy() * 100,
            marker="o",
            markersize=3,
            color=style["color"],
            linestyle=style["linestyle"],
            label=run.label if len(runs) <= NAMED_FRONTS else names[index],
        )
        for text, at in (("α=0 (base)", 0), ("α=1 (fine-tuned)", -1)):
            ends.append((text, (target["value"].iloc[at] * 100, control["value"].iloc[at] * 100)))
        front = np.array([(t, c) for _, t, c in summary.pareto]) * 100
        ax.scatter(
            front[:, 0],
            front[:, 1],
            facecolor="none",
            edgecolor=style["color"],
            s=70,
            label=f"Pareto front ({names[index]})"
            if len(runs) <= NAMED_FRONTS
            else ("Pareto front of each run (hollow circles)" if index == 0 else "_front"),
        )
    named: list[tuple[str, tuple[float, float]]] = []
    for text, point in ends:  # end points within 3 points of one already named are not named again
        if not any(
            t == text and max(abs(p - q) for p, q in zip(point, at, strict=True)) < 3 for t, at in named
        ):
            named.append((text, point))
            ax.annotate(text, point, fontsize=7)
    ax.set_xlabel(f"target ({summaries[0].target}) mean {METRIC_NAMES[metric]} (%)")
    ax.set_ylabel(f"control ({', '.join(summaries[0].controls) or 'none'}) mean {METRIC_NAMES[metric]} (%)")
    ax.set_title("Target versus control along α" + (f"\n{title}" if title else ""), fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: labels[i].startswith("Pareto front of each run"))
    ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=7, loc="upper left",
              bbox_to_anchor=(1.02, 1.0), borderaxespad=0)  # fmt: skip
    ax.grid(alpha=0.3)
    return figure


CurveKey = TypeVar("CurveKey")
"""What a figure's panels are keyed by: a task's name, or a group (None: all tasks)."""


def _distinct_curves(
    runs: tuple[Run, ...],
    names: tuple[str, ...],
    keys: list[CurveKey],
    of: Callable[[Run, CurveKey], pd.DataFrame],
) -> list[tuple[list[str], dict[CurveKey, pd.DataFrame]]]:
    """Each distinct run's curves (one per key: a group, or a task) with the names of every run
    that has exactly those curves (WiSE-FT and task arithmetic with one specialist are one formula)."""
    drawn: dict[tuple, tuple[list[str], dict]] = {}
    for run, name in zip(runs, names, strict=True):
        curves = {key: of(run, key) for key in keys}
        signature = tuple(
            (key, tuple(frame["alpha"].round(10)), tuple(frame["value"].round(10)))
            for key, frame in curves.items()
        )
        drawn.setdefault(signature, ([], curves))[0].append(name)
    return list(drawn.values())


def _task_curves(run: Run, metric: str) -> dict[str, pd.DataFrame]:
    """Each task's alpha -> value of a run (its table filtered once, not once per task)."""
    table = run.table[(run.table["metric"] == metric) & (run.table["split"] == "all")]
    return {task: rows[["alpha", "value"]].sort_values("alpha") for task, rows in table.groupby("task")}


def _panels(
    count: int, columns: int, width: float, height: float, legend: bool = True
) -> tuple[plt.Figure, np.ndarray]:
    """`count` panels sharing the α axis, the unused ones of the last row hidden; a panel above a
    hidden one shows its own α tick labels (shared axes show them on the bottom row only)."""
    rows = int(np.ceil(count / columns))
    figure, axes = plt.subplots(
        rows, columns, figsize=(width * columns, height * rows + (0.9 if legend else 0)), sharex=True,
        squeeze=False,
    )  # fmt: skip
    for index, ax in enumerate(axes.flat):
        if index >= count:
            ax.axis("off")
        elif index + columns >= count:
            ax.tick_params(labelbottom=True)
    return figure, axes


def _title_above_panels(figure: plt.Figure, title: str) -> None:
    """The suptitle, with the panels moved below it where tight_layout left them on it: over seven
    rows of panels (the real μ-Bench's 27 tasks) it lay on the first row's titles."""
    text = figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    boxes = [ax.get_tightbbox() for ax in figure.axes if ax.axison]
    panels_top = max(box.y1 for box in boxes if box is not None)
    overlap = panels_top + 0.05 * figure.dpi - text.get_window_extent().y0
    if overlap > 0:
        figure.subplots_adjust(top=figure.subplotpars.top - overlap / figure.bbox.height)


def _run_legend(figure: plt.Figure, handles: list) -> None:
    """One legend for every panel, under them."""
    figure.legend(
        handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(handles)),
        fontsize=7, frameon=False,
    )  # fmt: skip


def set_accuracy_vs_alpha(comparison: ComparisonSet, metric: str = "accuracy") -> plt.Figure:
    """The runs of a comparison set along alpha: one panel per group (target, each control, all
    tasks), one line per run, the alpha chosen on the select half ringed in black. Intervals are
    left to the per-run figures and tables: a band per run is mud at sixteen runs."""
    first = comparison.summaries[0]
    groups: list[str | None] = [first.target, *first.controls, None]
    figure, axes = _panels(len(groups), min(4, len(groups)), 3.6, 2.8)
    handles = []
    distinct = _distinct_curves(
        comparison.runs, comparison.names, groups, lambda run, group: curve(run, group, metric)
    )
    chosen = {
        n: s.best_alpha["all_task_mean"] for n, s in zip(comparison.names, comparison.summaries, strict=True)
    }
    for index, (names, curves) in enumerate(distinct):
        style = _run_style(index)
        for ax, group in zip(axes.flat, groups, strict=False):
            frame = curves[group]
            (line,) = ax.plot(
                frame["alpha"], frame["value"] * 100, markersize=3, label=_joined(names), **style
            )
            at = frame[frame["alpha"] == chosen[names[0]]]
            ax.scatter(at["alpha"], at["value"] * 100, s=45, facecolor="none", edgecolor="black", zorder=3)
        handles.append(line)
    for ax, group in zip(axes.flat, groups, strict=False):
        ax.set_title(group or "all tasks", fontsize=9)
        ax.set_xlabel("α (0 = base, 1 = fine-tuned)", fontsize=8)
        ax.set_ylabel(f"mean {METRIC_NAMES[metric]} (%)", fontsize=8)
        ax.grid(alpha=0.3)
    _run_legend(figure, handles)
    _title_above_panels(figure, f"{_opening(METRIC_NAMES[metric])} versus α: {comparison.title or 'one comparison set'}\n"
                        "black rings: α chosen on the select half; intervals in the per-run tables")  # fmt: skip
    return figure


def set_per_task(comparison: ComparisonSet, metric: str = "accuracy") -> plt.Figure:
    """Small multiples of accuracy versus alpha per task (coarse first, then fine by domain), one
    line per run of the set: which tasks a method forgets, beside the others."""
    tasks = list(  # every task of any run of the set (a --tasks subset can differ between them)
        dict.fromkeys(
            (task, level, domain)
            for run in comparison.runs
            for task, level, domain in task_changes(run, metric)[["task", "level", "domain"]].values.tolist()
        )
    )
    figure, axes = _panels(len(tasks), 4, 3.2, 2.4)
    handles = []
    by_run = {run.run_id: _task_curves(run, metric) for run in comparison.runs}
    no_rows = pd.DataFrame({"alpha": [], "value": []})  # a task this run did not score
    distinct = _distinct_curves(
        comparison.runs,
        comparison.names,
        [t for t, _, _ in tasks],
        lambda run, task: by_run[run.run_id].get(task, no_rows),
    )
    for index, (names, curves) in enumerate(distinct):
        style = _run_style(index)
        for ax, (task, _, _) in zip(axes.flat, tasks, strict=False):
            frame = curves[task]
            (line,) = ax.plot(
                frame["alpha"], frame["value"] * 100, markersize=2, label=_joined(names), **style
            )
        handles.append(line)
    for ax, (task, level, domain) in zip(axes.flat, tasks, strict=False):
        ax.set_title(f"{task}\n({level}, {domain})", fontsize=8)
        ax.set_ylabel(f"{METRIC_NAMES[metric]} (%)", fontsize=7)
        ax.set_xlabel("α", fontsize=7)
        ax.grid(alpha=0.3)
    _run_legend(figure, handles)
    _title_above_panels(
        figure, f"Per-task {METRIC_NAMES[metric]} versus α: {comparison.title or 'one comparison set'}"
    )
    return figure


def heatmap(run: Run, metric: str = "accuracy") -> plt.Figure:
    """Task x alpha heat map of the change against the base (percentage points)."""
    changes = task_changes(run, metric)
    grid = changes.pivot_table(index="task", columns="alpha", values="vs_base", sort=False) * 100
    figure, ax = plt.subplots(figsize=(1.0 + 0.55 * grid.shape[1], 0.9 + 0.35 * grid.shape[0]))
    limit = max(1.0, float(np.nanmax(np.abs(grid.to_numpy()))))
    sns.heatmap(
        grid,
        ax=ax,
        cmap="vlag",  # white at 0: the limits are symmetric (seaborn's center= re-builds the colour
        vmin=-limit,  # map through a call matplotlib 3.11 deprecates: a warning per heat map)
        vmax=limit,
        annot=(grid.round() + 0.0) if grid.shape[1] <= 11 else False,  # + 0.0: "0", not "-0", for -0.4
        fmt=".0f",
        cbar_kws={"label": f"change in {METRIC_NAMES[metric]} vs base (points)"},
        annot_kws={"fontsize": 6},
    )
    ax.set_xlabel("α")
    ax.set_ylabel("task")
    ax.set_xticklabels([f"{float(t.get_text()):g}" for t in ax.get_xticklabels()], rotation=0)
    ax.set_title(f"{run.label}: change against the base")
    return figure


def learned_coefficients(saved: dict, label: str) -> plt.Figure:
    """Each specialist's learned coefficient per group, in the model's parameter order (the per-layer
    figure AdaMerging and LiNeS users read), with the starting value dashed."""
    groups, values = saved["table"]["groups"], np.array(saved["table"]["values"])
    figure, ax = plt.subplots(figsize=(min(14.0, 4.0 + 0.12 * len(groups)), 4.0))
    for task in range(values.shape[1]):
        ax.plot(
            range(len(groups)),
            values[:, task],
            marker="o",
            markersize=3,
            color=PALETTE[task % len(PALETTE)],
            label=f"specialist {task + 1}",
        )
    ax.axhline(saved["described"]["init"], color="grey", linestyle="--", linewidth=1, label="start")
    step = max(1, len(groups) // 40)
    ax.set_xticks(range(0, len(groups), step))
    ax.set_xticklabels(groups[::step], rotation=90, fontsize=6)
    ax.set_ylabel("coefficient λ")
    described = saved["described"]
    ax.set_title(f"{label}: {described['kind']} coefficients per {described['granularity']}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return figure


def models_by_group(groups: pd.DataFrame, metric: str = "accuracy") -> plt.Figure:
    """The evaluated models side by side: one bar per model for each level and domain (the rows
    of `analysis.evaluated.models_group_table` whose kind is level or domain; the other groups are
    in its table), so forgetting across domains reads at a glance, as in the μ-Bench paper."""
    shown = groups[groups["group"].str.startswith(("level:", "domain:"))]
    models = [c for c in groups.columns if c != "group"]
    width = 0.8 / max(1, len(models))
    figure, axis = plt.subplots(figsize=(max(6.0, 1.2 * len(shown) * max(1, len(models)) ** 0.5), 4))
    positions = np.arange(len(shown))
    for index, model in enumerate(models):
        # past ten models a colour comes back, told apart by its hatch (as runs by their line style)
        axis.bar(positions + (index - (len(models) - 1) / 2) * width, shown[model], width,
                 label=model, color=PALETTE[index % len(PALETTE)],
                 hatch=HATCHES[(index // len(PALETTE)) % len(HATCHES)], edgecolor="white")  # fmt: skip
    axis.set_xticks(positions, shown["group"], rotation=20, ha="right")
    axis.set_ylabel(f"mean task {METRIC_NAMES[metric]} (%)")
    axis.set_ylim(0, 100)
    axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=min(3, len(models)))
    axis.set_title("evaluated models by level and domain")
    return figure
