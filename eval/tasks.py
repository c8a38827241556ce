"""The task registry: every μ-Bench task a CLIP-style model can be scored on, discovered from data.

Kinds of task are registered in one place (`COARSE_KINDS` plus the fine-grained kind); the
tasks themselves are discovered from the rows, never from a closed list: one coarse task per
perception level present in the data (modality, submodality, domain, stain) and one
fine-grained task per source `dataset`. Each task carries its classes, a caption text per
class, its prompt templates and its group (level, domain, modality, scale) for aggregation.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import datasets

from eval.data import column_values
from eval.prompts import TEMPLATES, class_text
from micromerge.errors import MicromergeError


@dataclass(frozen=True)
class CoarseKind:
    name: str
    columns: tuple[str, ...]  # the first column present holds the class of each row


COARSE_KINDS: tuple[CoarseKind, ...] = (
    CoarseKind("modality", ("modality",)),
    CoarseKind("submodality", ("submodality",)),
    CoarseKind("domain", ("domain",)),
    CoarseKind("stain", ("stain", "staining")),
)
GROUP_COLUMNS = ("domain", "modality", "scale")
MISSING_VALUES = ("", "none", "n/a", "na", "unknown", None)


@dataclass(frozen=True)
class Task:
    name: str
    level: str  # coarse | fine
    classes: tuple[str, ...]
    class_texts: tuple[str, ...]
    templates: tuple[str, ...]
    rows: tuple[int, ...]
    labels: tuple[int, ...]
    class_captions: tuple[str, ...] = ()
    groups: dict[str, str] = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return len(self.rows)


def _column(dataset: datasets.Dataset, name: str) -> list | None:
    return column_values(dataset, name) if name in dataset.column_names else None


def _caption_for(captions: list | None, key: str, row: int) -> str | None:
    if captions is None:
        return None
    value = captions[row]
    if isinstance(value, dict):
        text = value.get(key)
        return text if isinstance(text, str) and text.strip() else None
    return None


def _class_captions(
    captions: list | None, key: str, rows: list[int], values: list, classes: list[str]
) -> tuple[str, ...]:
    """A caption per class from the `captions` dict (first row of each class), else the class text."""
    found: dict[str, str] = {}
    for i in rows:
        if values[i] not in found and (caption := _caption_for(captions, key, i)):
            found[values[i]] = caption
    return tuple(found.get(c, class_text(c)) for c in classes)


def discover_tasks(dataset: datasets.Dataset) -> list[Task]:
    """Every task the rows support, coarse-grained first, then fine-grained by source dataset."""
    captions = _column(dataset, "captions")
    group_values = {c: _column(dataset, c) for c in GROUP_COLUMNS}
    tasks: list[Task] = []
    for kind in COARSE_KINDS:
        column = next((c for c in kind.columns if c in dataset.column_names), None)
        if column is None:
            continue
        values = column_values(dataset, column)
        rows = [
            i
            for i, v in enumerate(values)
            if (v.strip().lower() if isinstance(v, str) else v) not in MISSING_VALUES
        ]
        classes = sorted({values[i] for i in rows})
        if len(classes) < 2:
            continue
        index = {c: i for i, c in enumerate(classes)}
        tasks.append(
            Task(
                name=kind.name,
                level="coarse",
                classes=tuple(classes),
                class_texts=tuple(class_text(c) for c in classes),
                templates=TEMPLATES[kind.name],
                rows=tuple(rows),
                labels=tuple(index[values[i]] for i in rows),
                class_captions=_class_captions(captions, kind.name, rows, values, classes),
                groups={"level": "coarse", "domain": "all", "modality": "all", "scale": "all"},
            )
        )
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, source in enumerate(column_values(dataset, "dataset")):
        by_source[source].append(i)
    label_names = column_values(dataset, "label_name")
    for source in sorted(by_source):
        rows = by_source[source]
        classes = sorted({label_names[i] for i in rows})
        if len(classes) < 2:
            continue
        index = {c: k for k, c in enumerate(classes)}
        groups = {"level": "fine"}
        for column, values in group_values.items():
            groups[column] = (
                Counter(values[i] for i in rows).most_common(1)[0][0] if values is not None else "unknown"
            )
        tasks.append(
            Task(
                name=source,
                level="fine",
                classes=tuple(classes),
                class_texts=tuple(class_text(c) for c in classes),
                templates=TEMPLATES["fine_grained"],
                rows=tuple(rows),
                labels=tuple(index[label_names[i]] for i in rows),
                class_captions=_class_captions(captions, "label", rows, label_names, classes),
                groups=groups,
            )
        )
    return tasks


def select_tasks(tasks: list[Task], wanted: str | tuple[str, ...]) -> list[Task]:
    """`all`, `coarse`, `fine`, or a comma-separated list of task names."""
    names = [wanted] if isinstance(wanted, str) else list(wanted)
    if len(names) == 1 and "," in names[0]:
        names = [n.strip() for n in names[0].split(",") if n.strip()]
    if names in (["all"], []):
        return tasks
    if names in (["coarse"], ["fine"]):
        return [t for t in tasks if t.level == names[0]]
    known = {t.name: t for t in tasks}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise MicromergeError(
            f"--tasks: unknown task(s) {unknown}; available: {sorted(known)} (or all, coarse, fine)"
        )
    return [known[n] for n in names]
