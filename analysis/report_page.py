"""The report's two pages from its Layout: Markdown, and an HTML page whose figures are embedded
(self-contained) up to report.RUN_FIGURE_RUNS runs and linked beyond. What each section says of how its
numbers were made is written once here and shown on both pages."""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from micromerge.analysis.metrics import METRIC_NAMES, Summary
from micromerge.analysis.tables import GREEDY_SOUP, Run, has_curve


def percent(value: float) -> str:
    return (
        "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"
    )


def _filled(frame: pd.DataFrame) -> pd.DataFrame:
    """The table with its missing values (NaN, None) as empty strings: pages printed "nan", "NaN"
    and "None". Cast first: fillna("") of a float column is refused by pandas 4."""
    return frame.astype(object).where(frame.notna(), "")


def _markdown_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    lines = ["| " + " | ".join(str(v) for v in row) + " |" for row in _filled(frame).itertuples(index=False)]
    return "\n".join([header, rule, *lines])


def _html_table(frame: pd.DataFrame) -> str:
    return _filled(frame).to_html(index=False)


_CODE_SPAN = re.compile(r"`([^`]+)`")
_EMPHASIS = re.compile(r"\*(\w(?:[\w ]*\w)?)\*")  # words only: `visual.*=1, text.*` in a label stays


def _prose_html(text: str) -> str:
    """The HTML of a sentence written once for both pages: escaped, with the Markdown page's
    `code` and *emphasis* drawn as such instead of shown as backticks and asterisks."""
    escaped = html.escape(text)
    return _EMPHASIS.sub(r"<em>\1</em>", _CODE_SPAN.sub(r"<code>\1</code>", escaped))


def _embed(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


NO_HEADLINE = (
    "no headline rows: no run here is of the ubench protocol, or its tasks hold no images of the "
    "paper's sources (a --tasks selection, a --sources override setting paper_tables = false)"
)


@dataclass(frozen=True)
class Layout:
    """Everything the Markdown and HTML pages show, in the order they show it."""

    runs: list[Run]
    summaries: list[Summary]
    tables: dict[str, pd.DataFrame]
    overview: list[tuple[str, Path]]  # (caption, PNG): the figures that compare runs
    per_run: dict[int, list[tuple[str, Path]]]  # run index -> (caption, PNG) of its own figures
    notes: list[str]
    provenance: dict[str, Any]
    out: Path
    many: bool  # more than report.RUN_FIGURE_RUNS runs: one line for them all, figures linked, not embedded
    baseline: str | None = None  # the evaluated model `tables["models_change"]` compares the others with
    metric: str = "accuracy"  # what the summaries, curves and group tables hold (`report --metric`)

    def sentences(self) -> list[tuple[str, str]]:
        """(run label, what happened to it), or one line for a report of many runs."""
        if not self.runs:
            count = len(self.tables["models"])
            return [(f"{count} evaluated model{'s' if count > 1 else ''}", MODELS_ONLY_TEXT)]
        if self.many:
            sets = self.tables.get("comparison_sets")
            grouped = f" in {sets['set'].nunique()} comparison sets" if sets is not None else ""
            return [(f"{len(self.runs)} runs", f"{grouped}: the headline table has one row for each.")]
        return [(run.label, self._sentence(run, s)) for run, s in zip(self.runs, self.summaries, strict=True)]

    def _sentence(self, run: Run, s: Summary) -> str:
        if s.references == "none":
            change = "no base or specialist numbers to compare it with (see the notes)"
        else:
            change = f"fine-tuning changed the target ({s.target}) by {percent(s.gain)} points" + (
                f" and the controls ({', '.join(s.controls)}) by {percent(-s.forgetting)} points"
                if s.controls
                else " (no control group among its tasks)"
            )
        if has_curve(run):
            point = f"α={s.best_alpha['all_task_mean']:g}, chosen on the select half,"
        elif run.method == GREEDY_SOUP:
            point = f"the {chosen_alpha(run, s)}, chosen on the select half,"
        else:
            point = f"its one α ({s.best_alpha['all_task_mean']:g})"
        mean = f"{percent(s.best_report['all_task_mean'])}% mean {METRIC_NAMES[self.metric]}"
        return f": {change}; {point} gives {mean} on the report half."


def chosen_alpha(run: Run, summary: Summary) -> str:
    """The α the select half chose, or what a run of one point is: a soup's weights were chosen on
    the select half too; a one-α sweep had nothing to choose."""
    if has_curve(run):
        return f"{summary.best_alpha['all_task_mean']:g}"
    if run.method == GREEDY_SOUP:
        return "soup (weights " + ", ".join(f"{w:.3g}" for w in run.parameters.get("weights", [])) + ")"
    return f"{summary.best_alpha['all_task_mean']:g} (its only α)"


NO_CHOICE = "every run here is one point: no α to choose"

PAPER_HEADLINE_TEXT = (
    "Coarse: every coarse caption key pooled over all images; fine: `classification_1` pooled, without "
    "eulenberg darkfield/epifluorescence and sources outside the paper's tables, as the authors computed them. "
    "Each run's protocol is in its row; the per-task tables below use each task's own number (ubench: its "
    "caption keys pooled; closed-set: every class of the task)."
)
PAPER_HEADLINE_MANY_TEXT = (
    "Here each run at its α chosen on the select half (highest all-task mean); every α of every run: "
    "`tables/paper_headline.csv`."
)
MODELS_TEXT = (
    "Each model as `micromerge eval` scored it, with no merging: the mean of the tasks of each group "
    "(coarse, fine, each domain, modality …), and with the ubench protocol the paper's pooled coarse "
    "and fine numbers. An empty cell: that model was not evaluated on that task. Per task: "
    "`tables/models_tasks.csv`."
)
MODELS_ONLY_TEXT = ": no merge sweep in this store; the models are compared side by side below."
SELECTION_TEXT = (
    "α is chosen on a seeded half of the benchmark's images (*select*, the same images for every task) "
    "and reported on the other half (*report*)."
)
SETS_TEXT = (
    "Runs that merge the same models under the same rules, scored on the same data, protocol and "
    "target, are one comparison set: one figure each (which run is in which set: "
    "`tables/comparison_sets.csv`)."
)


def _change_text(baseline: str | None) -> str:
    return (
        f"Against {baseline}, group by group (points; negative: below it — a specialist's forgetting "
        "outside its domain, as the μ-Bench paper measured PLIP and QuiltNet against CLIP). Only models "
        "scored as it was (protocol, data, task definition) are compared."
    )


def _paper_headline_shown(layout: Layout) -> tuple[pd.DataFrame, list[str]]:
    """The paper-comparable rows the page shows, and what it says of them: every α of a few runs;
    of many, each run's chosen α (a 200-run grid's eleven α each put 2,200 rows above the rest)."""
    table = layout.tables["paper_headline"]
    if not layout.many or table.empty:
        return table, []
    chosen = {
        r.label: s.best_alpha["all_task_mean"] for r, s in zip(layout.runs, layout.summaries, strict=True)
    }
    soups = {r.label for r in layout.runs if r.method == GREEDY_SOUP}  # one row, shown without an α
    shown = [
        label in soups or chosen.get(label) == alpha
        for label, alpha in zip(table["run"], table["alpha"], strict=True)
    ]
    return table[shown], [PAPER_HEADLINE_MANY_TEXT]


def _title(layout: Layout) -> str:
    return "micromerge report: " + ("forgetting and recovery" if layout.runs else "zero-shot evaluation")


def markdown_page(layout: Layout) -> str:
    tables, out = layout.tables, layout.out
    lines = [f"# {_title(layout)}", ""]
    lines += [f"- **{label}**{rest}" for label, rest in layout.sentences()]
    lines.append("")
    if layout.runs:
        lines += ["## Headline", "", _markdown_table(tables["headline"]), ""]
        shown, said = _paper_headline_shown(layout)
        lines += ["## Paper-comparable headline (μ-Bench protocol)", "", PAPER_HEADLINE_TEXT, ""]
        lines += [line for text in said for line in (text, "")]
        lines += [_markdown_table(shown) if not shown.empty else f"({NO_HEADLINE})", ""]
    if "models" in tables:
        lines += [
            "## Evaluated models",
            "",
            MODELS_TEXT,
            "",
            _markdown_table(tables["models"]),
            "",
        ]
        lines += [_markdown_table(tables["models_groups"]), ""]
        if "models_change" in tables:
            lines += [
                _change_text(layout.baseline),
                "",
                _markdown_table(tables["models_change"]),
                "",
            ]
    if layout.runs:
        lines += [
            "## α selection (honest protocol)",
            "",
            SELECTION_TEXT,
            "",
            _markdown_table(tables["alpha_selection"])
            if len(tables["alpha_selection"])
            else f"({NO_CHOICE})",
            "",
        ]
    if layout.overview:
        lines += ["## Figures", ""] + ([SETS_TEXT, ""] if "comparison_sets" in tables else [])
        for caption, path in layout.overview:
            lines += [f"![{caption}]({path.relative_to(out)})", ""]
    for index, run in enumerate(layout.runs):
        lines += [
            f"## {run.label}",
            "",
            f"Group means ({METRIC_NAMES[layout.metric]} %):",
            "",
            _markdown_table(tables[f"groups_run{index}"]),
            "",
        ]
        for caption, path in layout.per_run[index]:
            lines += [f"![{caption}]({path.relative_to(out)})", ""]
    if layout.notes:
        lines += ["## Notes", "", *[f"- {n}" for n in layout.notes], ""]
    lines += [
        "## Provenance",
        "",
        "```json",
        json.dumps(layout.provenance, indent=2, sort_keys=True, default=str),
        "```",
        "",
        "Tables as CSV and JSON: `tables/`. Figures as PNG and SVG: `figures/`.",
        "",
    ]
    return "\n".join(lines)


def _figure_html(caption: str, path: Path, out: Path, embed: bool) -> str:
    """An embedded figure (a self-contained page), or beyond a few runs one linked from figures/."""
    source = _embed(path) if embed else html.escape(str(path.relative_to(out)))
    image = f"<img alt='{html.escape(caption)}' src='{source}'" + ("" if embed else " loading='lazy'") + ">"
    if not embed:
        image = f"<a href='{source}'>{image}</a>"
    return f"<figure>{image}<figcaption>{html.escape(caption)}</figcaption></figure>"


def html_page(layout: Layout) -> str:
    tables, out = layout.tables, layout.out
    style = "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse;font-size:12px;margin:.8em 0}td,th{border:1px solid #ccc;padding:3px 6px}th{text-align:left}img{max-width:100%}summary{cursor:pointer;font-weight:bold;margin:.5em 0}"
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>micromerge report</title><style>{style}</style></head><body>",
        f"<h1>{html.escape(_title(layout))}</h1><ul>",
        *[f"<li><b>{html.escape(label)}</b>{html.escape(rest)}</li>" for label, rest in layout.sentences()],
        "</ul>",
    ]
    if layout.runs:
        shown, said = _paper_headline_shown(layout)
        parts += [
            "<h2>Headline</h2>",
            _html_table(tables["headline"]),
            "<h2>Paper-comparable headline (μ-Bench protocol)</h2>",
            *[f"<p>{_prose_html(text)}</p>" for text in [PAPER_HEADLINE_TEXT, *said]],
            _html_table(shown) if not shown.empty else f"<p>({NO_HEADLINE})</p>",
        ]
    if "models" in tables:
        parts += [
            "<h2>Evaluated models</h2>",
            f"<p>{_prose_html(MODELS_TEXT)}</p>",
            _html_table(tables["models"]),
            _html_table(tables["models_groups"]),
        ]
        if "models_change" in tables:
            parts += [
                f"<p>{_prose_html(_change_text(layout.baseline))}</p>",
                _html_table(tables["models_change"]),
            ]
    if layout.runs:
        parts += [
            "<h2>α selection (honest protocol)</h2>",
            f"<p>{_prose_html(SELECTION_TEXT)}</p>",
            _html_table(tables["alpha_selection"])
            if len(tables["alpha_selection"])
            else f"<p>({NO_CHOICE})</p>",
        ]
    if layout.overview:
        parts.append("<h2>Figures</h2>")
        if "comparison_sets" in tables:
            parts.append(f"<p>{_prose_html(SETS_TEXT)}</p>")
        parts += [
            _figure_html(caption, path, out, embed=not layout.many) for caption, path in layout.overview
        ]
    for index, run in enumerate(layout.runs):
        body = [
            f"<p>Group means ({METRIC_NAMES[layout.metric]} %):</p>",
            _html_table(tables[f"groups_run{index}"]),
            *[_figure_html(c, p, out, embed=not layout.many) for c, p in layout.per_run[index]],
        ]
        label = html.escape(run.label)
        parts += (
            [f"<details><summary>{label}</summary>", *body, "</details>"]
            if layout.many
            else [f"<h2>{label}</h2>", *body]
        )
    if layout.notes:
        parts += ["<h2>Notes</h2><ul>", *[f"<li>{_prose_html(n)}</li>" for n in layout.notes], "</ul>"]
    parts += [
        "<h2>Provenance</h2><details><summary>the results store's sha256, this report's settings, and "
        "each run's and evaluation's inputs (checkpoints' sha256, data, method, parameters); also in "
        "provenance.json</summary><pre>",
        html.escape(json.dumps(layout.provenance, indent=2, sort_keys=True, default=str)),
        "</pre></details>",
        "<p>Tables as CSV and JSON in <code>tables/</code>; figures as PNG and SVG in <code>figures/</code>"
        + (
            " (this page links each run's own figures there: keep the folder beside it)"
            if layout.many
            else ""
        )
        + ".</p></body></html>",
    ]
    return "\n".join(parts)
