"""The task registry: every μ-Bench task, discovered from the rows as the benchmark defines them.

Kinds of task are registered in one place (`COARSE_KINDS` plus the fine-grained kind): one coarse
task per perception level (modality, submodality, domain, subdomain, stain) and one fine-grained
task per source `dataset` (rows with a null `dataset` named by the source table's rule, never
"None"). Each task carries what both protocols need:
- `closed-set`: its classes, their texts and prompt templates (every class of the task);
- `ubench`: per caption key (`modality_0`, `classification_1`, ...) each row's own option texts
  and answer index, as the authors score CLIP-style models (shared/ubench/SCHEMA.md);
and its groups (domain, subdomain, modality, submodality, taxonomy, scale, paper) for reports.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import cached_property

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from micromerge.core.errors import MicromergeError
from micromerge.core.hashing import sha256_json
from micromerge.eval.data import column_values
from micromerge.eval.prompts import TEMPLATES, class_text
from micromerge.eval.source_metadata import SourceTable, load_source_table


@dataclass(frozen=True)
class CoarseKind:
    name: str
    column: str  # the row's class under closed-set; `<name>_<n>` caption keys under ubench


COARSE_KINDS: tuple[CoarseKind, ...] = tuple(
    CoarseKind(name, name) for name in ("modality", "submodality", "domain", "subdomain", "stain")
)
FINE_CAPTION_KIND = "classification"
GROUP_COLUMNS = ("domain", "subdomain", "modality", "submodality")
MISSING_VALUES = ("", "none", "n/a", "na", "unknown", None)
_CAPTION_KEY = re.compile(r"^(?P<kind>.+)_(?P<variant>\d+)$")


@dataclass(frozen=True, eq=False)
class OptionQuestion:
    """One caption key of a task under the ubench protocol: each row scores its own options."""

    key: str
    rows: np.ndarray  # [n] dataset rows holding this caption
    texts: tuple[str, ...]  # the distinct option texts of this key
    options: np.ndarray  # [n, m] indices into `texts`, -1 where a row has fewer options
    answers: np.ndarray  # [n] index of the correct option within the row's options
    labels: np.ndarray  # [n] the row's class within the task's classes, -1 where unknown


@dataclass(frozen=True)
class Task:
    name: str
    level: str  # coarse | fine
    classes: tuple[str, ...]
    class_texts: tuple[str, ...]
    templates: tuple[str, ...]
    rows: tuple[int, ...]  # rows scored under closed-set
    labels: tuple[int, ...]
    class_captions: tuple[str, ...] = ()
    groups: dict[str, str] = field(default_factory=dict)
    questions: tuple[OptionQuestion, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def n_images(self) -> int:
        return len(self.image_rows)

    @cached_property
    def image_rows(self) -> tuple[int, ...]:
        """Every row the task scores under either protocol."""
        rows = set(self.rows)
        for question in self.questions:
            rows.update(int(r) for r in question.rows)
        return tuple(sorted(rows))


def _present(value: object) -> bool:
    return (value.strip().lower() if isinstance(value, str) else value) not in MISSING_VALUES


def _captions_column(dataset: datasets.Dataset) -> pa.StructArray | None:
    if "captions" not in dataset.column_names:
        return None
    table = dataset.select_columns(["captions"]).with_format("arrow")[:]
    return table.column("captions").combine_chunks()


def caption_keys(dataset: datasets.Dataset) -> tuple[str, ...]:
    captions = dataset.features.get("captions")
    return tuple(captions) if isinstance(captions, dict) else ()


def _has_key(captions: pa.StructArray | None, key: str) -> bool:
    return captions is not None and key in {f.name for f in captions.type}


def _field(struct: pa.Array, name: str) -> pa.Array:
    """A child of a struct array with the parent's nulls applied (a null caption stays null)."""
    return pc.struct_field(struct, name)


CaptionLists = dict[str, tuple[list, list]]  # caption key -> (options per row, answer_idx per row)


def _asked(options: list | None, answer: object) -> bool:
    """Whether a row's caption entry is a question to score: it has options and an answer (a null or
    blank `answer_idx` is a question not asked of this image, like a null entry)."""
    return bool(options) and answer is not None and str(answer).strip() != ""


def _caption_lists(captions: pa.StructArray | None, keys: tuple[str, ...]) -> CaptionLists:
    """Every caption key's options and answers, read once from Arrow (nulls kept as None)."""
    if captions is None:
        return {}
    lists = {}
    for key in keys:
        entry = _field(captions, key)
        lists[key] = (_field(entry, "options").to_pylist(), _field(entry, "answer_idx").to_pylist())
    return lists


def _question(
    key: str, lists: tuple[list, list], rows: list[int], classes_of_rows: list, classes: tuple[str, ...]
) -> OptionQuestion | None:
    options, answers = lists
    kept = [r for r in rows if _asked(options[r], answers[r])]
    if not kept:
        return None
    text_ids: dict[str, int] = {}
    width = max(len(options[r]) for r in kept)
    matrix = np.full((len(kept), width), -1, dtype=np.int64)
    for i, r in enumerate(kept):
        matrix[i, : len(options[r])] = [text_ids.setdefault(t, len(text_ids)) for t in options[r]]
    try:
        answer_index = np.array([int(answers[r]) for r in kept], dtype=np.int64)
    except ValueError as exc:
        raise MicromergeError(f"captions.{key}: an answer_idx is not an integer ({exc})") from exc
    bad = np.flatnonzero((answer_index < 0) | (answer_index >= (matrix >= 0).sum(axis=1)))
    if len(bad):
        raise MicromergeError(
            f"captions.{key}: answer_idx {answers[kept[bad[0]]]!r} of row {kept[bad[0]]} is outside its "
            f"{(matrix[bad[0]] >= 0).sum()} options"
        )
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index.get(classes_of_rows[r], -1) for r in kept], dtype=np.int64)
    return OptionQuestion(key, np.array(kept, dtype=np.int64), tuple(text_ids), matrix, answer_index, labels)


def _questions(
    lists: CaptionLists, kind: str, rows: list[int], values: list, classes: tuple[str, ...]
) -> tuple[OptionQuestion, ...]:
    found = []
    for key, key_lists in lists.items():
        match = _CAPTION_KEY.match(key)
        if match and match["kind"] == kind and (q := _question(key, key_lists, rows, values, classes)):
            found.append(q)
    return tuple(found)


def _class_captions(
    lists: CaptionLists, key: str, rows: list[int], values: list, classes: tuple[str, ...]
) -> tuple[str, ...]:
    """For `--prompts captions` under closed-set: per class, the first row's correct option."""
    if key not in lists:
        return tuple(class_text(c) for c in classes)
    options, answers = lists[key]
    found: dict[str, str] = {}
    for r in rows:
        if values[r] not in found and _asked(options[r], answers[r]):
            found[values[r]] = options[r][int(answers[r])]
    return tuple(found.get(c, class_text(c)) for c in classes)


def _null_source_names(
    dataset: datasets.Dataset, captions: pa.StructArray | None, sources: list, table: SourceTable
) -> list[str]:
    """Name the rows whose `dataset` is null by the table's rule: their classification caption
    template and annotation class names identify the source. Unmatched rows are grouped by
    template and named `unassigned_<digest>`, never None."""
    null_rows = [i for i, s in enumerate(sources) if not _present(s)]
    if not null_rows:
        return sources
    templates = [""] * len(sources)
    if _has_key(captions, f"{FINE_CAPTION_KIND}_0"):
        templates = _field(_field(captions, f"{FINE_CAPTION_KIND}_0"), "question").to_pylist()
    class_names: list[list[str]] = [[] for _ in sources]
    for column in ("polygon", "bbox"):
        if column in dataset.column_names:
            for i, annotations in enumerate(column_values(dataset.select(null_rows), column)):
                class_names[null_rows[i]] += [a.get("className") or "" for a in annotations or []]
    named = list(sources)
    for r in null_rows:
        evidence = " ".join([templates[r] or "", *class_names[r]])
        named[r] = table.name_null_source(evidence) or f"unassigned_{sha256_json(templates[r] or '')[:8]}"
    return named


def _majority(values: list | None, rows: list[int]) -> str:
    if values is None:
        return "unknown"
    counts = Counter(values[i] for i in rows if _present(values[i]))
    return str(counts.most_common(1)[0][0]) if counts else "unknown"


def _median_mpp(values: list | None, rows: list[int]) -> float | None:
    numbers = [values[i] for i in rows if isinstance(values[i], (int, float))] if values is not None else []
    return float(np.median(numbers)) if numbers else None


def discover_tasks(dataset: datasets.Dataset, table: SourceTable | None = None) -> list[Task]:
    """Every task the rows support, coarse-grained first, then fine-grained by source dataset."""
    table = table or load_source_table()
    captions = _captions_column(dataset)
    lists = _caption_lists(captions, caption_keys(dataset))

    def column(name: str) -> list | None:
        return column_values(dataset, name) if name in dataset.column_names else None

    tasks: list[Task] = []
    for kind in COARSE_KINDS:
        values = column(kind.column)
        if values is None:
            continue
        rows = [i for i, v in enumerate(values) if _present(v)]
        classes = tuple(sorted({values[i] for i in rows}))
        questions = _questions(lists, kind.name, list(range(len(values))), values, classes)
        if len(classes) < 2 and not questions:
            continue
        index = {c: i for i, c in enumerate(classes)}
        tasks.append(
            Task(
                name=kind.name,
                level="coarse",
                classes=classes,
                class_texts=tuple(class_text(c) for c in classes),
                templates=TEMPLATES[kind.name],
                rows=tuple(rows) if len(classes) >= 2 else (),
                labels=tuple(index[values[i]] for i in rows) if len(classes) >= 2 else (),
                class_captions=_class_captions(lists, f"{kind.name}_0", rows, values, classes),
                groups={
                    "level": "coarse",
                    **{c: "all" for c in (*GROUP_COLUMNS, "taxonomy", "scale", "paper")},
                },
                questions=questions,
            )
        )
    published = column_values(dataset, "dataset")
    sources = _null_source_names(dataset, captions, published, table)
    table.warn_unmatched_overrides(set(sources))
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, source in enumerate(sources):
        by_source[source].append(i)
    label_names = column_values(dataset, "label_name")
    group_values = {c: column(c) for c in GROUP_COLUMNS}
    mpp = column("microns_per_pixel")
    synthetic = column("synthetic")
    for source in sorted(by_source):
        rows = by_source[source]
        classes = tuple(sorted({label_names[i] for i in rows}))
        questions = _questions(lists, FINE_CAPTION_KIND, rows, label_names, classes)
        if len(classes) < 2 and not questions:
            continue
        info = table.info(source)
        index = {c: k for k, c in enumerate(classes)}
        notes = [n for n in (table.scale_mismatch(source, _median_mpp(mpp, rows)),) if n]
        if source.startswith("unassigned_"):
            notes.append("rows with a null dataset that no null_dataset_match rule names (--sources)")
        elif named := sum(1 for i in rows if not _present(published[i])):
            notes.append(
                f"{named} of its rows have a null dataset; named by the null_dataset_match rule "
                f"{info.null_dataset_match!r} ({table.rule_origin(source)})"
            )
        closed = len(classes) >= 2
        tasks.append(
            Task(
                name=source,
                level="fine",
                classes=classes,
                class_texts=tuple(class_text(c) for c in classes),
                templates=TEMPLATES["fine_grained"],
                rows=tuple(rows) if closed else (),
                labels=tuple(index[label_names[i]] for i in rows) if closed else (),
                class_captions=_class_captions(lists, f"{FINE_CAPTION_KIND}_0", rows, label_names, classes),
                groups={
                    "level": "fine",
                    **{c: _majority(v, rows) for c, v in group_values.items()},
                    "taxonomy": info.taxonomy,
                    "scale": info.scale,
                    "paper": "yes" if info.paper_tables else "no",
                    "synthetic": {"True": "yes", "False": "no"}.get(_majority(synthetic, rows), "unknown"),
                    "fine_headline": "yes" if info.fine_headline and info.paper_tables else "no",
                },
                questions=questions,
                notes=tuple(notes),
            )
        )
    return tasks
