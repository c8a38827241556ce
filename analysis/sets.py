"""Comparison sets: the runs of a report that one figure can compare.

A paper-size ablation (configs/ablation-paper.toml: 4 checkpoint pairs x 3 rule sets x 16
methods) puts some 190 sweeps in one store. Drawn on one axis they are unreadable (the overview
figure of such a store was 67,552 pixels wide), and most of them answer different questions.
Runs are comparable when they merge the same models under the same rules and are scored on the
same data, protocol and target: what differs is the method (and its parameters), which is what
the figure of a set compares.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from micromerge.analysis.metrics import Summary
from micromerge.analysis.tables import Run

RULE_PARAMETERS = ("include", "exclude", "alpha_rules")
"""The run parameters that say which tensors a merge touches and how strongly (sweep's rules)."""


@dataclass(frozen=True)
class ComparisonSet:
    title: str  # what the runs share, e.g. "clip-b32+plip / … / vision-only"
    runs: tuple[Run, ...]
    summaries: tuple[Summary, ...]
    names: tuple[str, ...]  # each run's name within the set (its label less what all share)


def comparison_key(run: Run, summary: Summary) -> tuple[Any, ...]:
    """What two runs must share to be drawn on one figure."""
    model = run.model
    rules = {k: run.parameters.get(k) or [] for k in RULE_PARAMETERS}
    return (
        run.protocol,
        run.dataset.get("fingerprint") or run.dataset.get("source"),
        run.task_definition,
        tuple(model.get("base_sha256") or [model.get("base")]),
        tuple(model.get("finetuned_sha256") or model.get("finetuned") or []),
        json.dumps(rules, sort_keys=True, default=str),
        summary.target,
    )


def comparison_sets(runs: list[Run], summaries: list[Summary]) -> list[ComparisonSet]:
    """The runs grouped by `comparison_key`, in the order each set's first run comes in the store."""
    grouped: dict[tuple, list[int]] = {}
    for index, (run, summary) in enumerate(zip(runs, summaries, strict=True)):
        grouped.setdefault(comparison_key(run, summary), []).append(index)
    sets = []
    for indices in grouped.values():
        members = [runs[i] for i in indices]
        names, title = label_parts(members)
        sets.append(ComparisonSet(title, tuple(members), tuple(summaries[i] for i in indices), tuple(names)))
    return sets


def _word_prefix(labels: list[str]) -> str:
    """The longest start every label shares, cut back to a word's end (never mid-name)."""
    prefix = labels[0]
    for label in labels[1:]:
        while not label.startswith(prefix):
            prefix = prefix[:-1]
    cut = prefix.rfind(" ")
    return prefix[: cut + 1] if cut >= 0 else ""


def _word_suffix(labels: list[str]) -> str:
    """The longest ending every label shares, cut forward to a word's start."""
    suffix = labels[0]
    for label in labels[1:]:
        while not label.endswith(suffix):
            suffix = suffix[1:]
    cut = suffix.find(" ")
    return suffix[cut:] if cut >= 0 else ""


def label_parts(runs: list[Run] | tuple[Run, ...]) -> tuple[list[str], str]:
    """Each run's label less the start and ending that all of them share, and what they share
    ("pair-0 / … / all", or the ending alone); runs that share a label (an older run kept in the
    store) are told apart by run id. A label that would lose everything keeps it whole."""
    labels = [run.label for run in runs]
    distinct = list(dict.fromkeys(labels))
    prefix = suffix = ""
    if len(distinct) > 1:
        prefix, suffix = _word_prefix(distinct), _word_suffix(distinct)
        if any(len(prefix) + len(suffix) >= len(label) for label in distinct):
            prefix = suffix = ""  # one label is all shared words: nothing is cut
    short = [label[len(prefix) : len(label) - len(suffix)].strip(" :—/") for label in labels]
    counts = Counter(short)
    named = [
        s + (f" (run {run.run_id[:6]})" if counts[s] > 1 else "") for s, run in zip(short, runs, strict=True)
    ]
    start, end = prefix.strip(" :—/"), suffix.strip(" :—/")
    shared = f"{start} / … / {end}" if start and end else start or end
    return named, shared
