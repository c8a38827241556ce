"""Figures: accuracy vs alpha, per-task small multiples, target-vs-control Pareto, task x alpha heat map.

Every figure is saved as PNG and SVG, uses seaborn's colour-blind palette, and labels its
axes with units. Functions return the matplotlib Figure so tests can inspect it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402

from micromerge.analysis.metrics import Summary, _control_curve, curve, task_changes  # noqa: E402
from micromerge.analysis.tables import Run  # noqa: E402

PALETTE = sns.color_palette("colorblind")


def save(figure: plt.Figure, folder: Path, name: str) -> list[Path]:
    """PNG and SVG with the same bytes for the same figure: no date or software version, and the
    SVG's element ids salted with the figure's name (matplotlib salts them with a fresh uuid4).
    Both are cut to one tight box, measured once (matplotlib's `bbox_inches="tight"` measures it
    in every save: a third of a report's time, which is mostly its figures)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.svg"]
    box = figure.get_tightbbox(figure.canvas.get_renderer()).padded(0.1)  # savefig's pad_inches
    figure.savefig(paths[0], dpi=130, bbox_inches=box, metadata={"Software": None})
    with matplotlib.rc_context({"svg.hashsalt": name}):
        figure.savefig(paths[1], bbox_inches=box, metadata={"Date": None, "Creator": None})
    plt.close(figure)
    return paths


STYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P"]


def _short_labels(runs: list[Run]) -> tuple[list[str], str]:
    """Run labels without the ending they all share (e.g. ": base + pathology specialist"), and that
    ending; runs that share a label (an older run kept in the store) are told apart by run id."""
    labels = [run.label for run in runs]
    distinct = list(dict.fromkeys(labels))
    shared = ""
    if len(distinct) > 1:
        shared = distinct[0]
        for label in distinct[1:]:
            while not label.endswith(shared):
                shared = shared[1:]
        cut = shared.find(" ")  # end at a word boundary: never cut a name in half
        shared = shared[cut:] if cut > 0 else ""  # shorter than every label: each keeps a name
    short = [label[: len(label) - len(shared)].rstrip(" :—") if shared else label for label in labels]
    counts = Counter(short)
    named = [
        s + (f" (run {run.run_id[:6]})" if counts[s] > 1 else "") for s, run in zip(short, runs, strict=True)
    ]
    return named, shared.strip(" :—")


def accuracy_vs_alpha(runs: list[Run], summaries: list[Summary], metric: str = "accuracy") -> plt.Figure:
    """Group means with interval bands; end points marked; the chosen alpha marked. Several runs share
    axes: colour = group, line style and marker = run (method). A curve identical to one already drawn
    (WiSE-FT and task arithmetic with one specialist are one formula) is drawn once, named for both."""
    figure, ax = plt.subplots(figsize=(8, 5))
    names, shared = _short_labels(runs)
    drawn: dict[tuple, dict] = {}  # (group, alphas, values) -> the line drawn for it and its names
    chosen: dict[float, list[str]] = {}
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
        chosen.setdefault(best, [])
    for best in chosen:
        ax.text(best, 1.01, f"α={best:g}", transform=ax.get_xaxis_transform(), fontsize=7, ha="center",
                va="bottom", color="grey")  # fmt: skip
    for entry in drawn.values():
        entry["line"].set_label(f"{' = '.join(entry['names'])} — {entry['group']}")
    ax.set_xlabel("interpolation weight α (0 = base, 1 = fine-tuned)")
    ax.set_ylabel(f"mean {metric.replace('_', ' ')} (%)")
    ax.set_title(
        "Accuracy versus α"
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
    columns = 4
    rows = int(np.ceil(len(order) / columns))
    figure, axes = plt.subplots(
        rows, columns, figsize=(3.2 * columns, 2.4 * rows), sharex=True, squeeze=False
    )
    domains = sorted({d for _, _, d in order})
    for ax, (task, level, domain) in zip(axes.flat, order, strict=False):
        frame = changes[changes["task"] == task]
        color = PALETTE[domains.index(domain) % len(PALETTE)]
        ax.plot(frame["alpha"], frame["value"] * 100, color=color, marker="o", markersize=2.5)
        ax.fill_between(
            frame["alpha"], frame["ci_low"] * 100, frame["ci_high"] * 100, color=color, alpha=0.15
        )
        ax.set_title(f"{task}\n({level}, {domain})", fontsize=8)
        ax.set_ylabel(f"{metric} (%)", fontsize=7)
        ax.set_xlabel("α", fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(order) :]:
        ax.axis("off")
    figure.suptitle(f"{run.label}: per-task {metric} versus α", fontsize=10)
    figure.tight_layout()
    return figure


def pareto(runs: list[Run], summaries: list[Summary], metric: str = "accuracy") -> plt.Figure:
    """Target (fine-tuning domain) versus control accuracy along alpha, one curve per run (the WiSE-FT figure)."""
    figure, ax = plt.subplots(figsize=(5.5, 5))
    names, _ = _short_labels(runs)
    ends: list[tuple[str, tuple[float, float]]] = []
    for index, (run, summary) in enumerate(zip(runs, summaries, strict=True)):
        target = curve(run, summary.target, metric)
        control = (
            _control_curve(run, list(summary.controls), metric, "all")
            if summary.controls
            else target[["alpha", "value"]]
        )
        color = PALETTE[index % len(PALETTE)]
        ax.plot(
            target["value"] * 100,
            control["value"].to_numpy() * 100,
            marker="o",
            markersize=3,
            color=color,
            label=run.label,
        )
        for text, at in (("α=0 (base)", 0), ("α=1 (fine-tuned)", -1)):
            ends.append((text, (target["value"].iloc[at] * 100, control["value"].iloc[at] * 100)))
        front = np.array([(t, c) for _, t, c in summary.pareto]) * 100
        ax.scatter(
            front[:, 0],
            front[:, 1],
            facecolor="none",
            edgecolor=color,
            s=70,
            label=f"Pareto front ({names[index]})",
        )
    named: list[tuple[str, tuple[float, float]]] = []
    for text, point in ends:  # end points within 3 points of one already named are not named again
        if not any(
            t == text and max(abs(p - q) for p, q in zip(point, at, strict=True)) < 3 for t, at in named
        ):
            named.append((text, point))
            ax.annotate(text, point, fontsize=7)
    ax.set_xlabel(f"target ({summaries[0].target}) mean {metric} (%)")
    ax.set_ylabel(f"control ({', '.join(summaries[0].controls) or 'none'}) mean {metric} (%)")
    ax.set_title("Target versus control along α")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3)
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
        cmap="vlag",
        center=0,
        vmin=-limit,
        vmax=limit,
        annot=grid.shape[1] <= 11,
        fmt=".0f",
        cbar_kws={"label": f"change in {metric} vs base (points)"},
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
