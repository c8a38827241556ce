"""Results-store rows -> tidy tables (one per run), with a check for missing rows."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from micromerge.core.collector import cycle_collection_paused
from micromerge.core.errors import MicromergeError
from micromerge.core.hashing import default_cache_dir, sha256_file
from micromerge.core.provenance import LEARNED_FROM_SELECT, TRAINED_ON
from micromerge.eval.aggregate import is_task_row
from micromerge.eval.store import ResultStore
from micromerge.merging.model_card import checkpoint_provenance
from micromerge.merging.sources import CHECKPOINT_SUFFIXES, checkpoint_name


@dataclass
class Run:
    run_id: str
    label: str
    method: str
    parameters: dict[str, Any]
    model: dict[str, Any]
    dataset: dict[str, Any]
    table: pd.DataFrame  # one row per (alpha, task, split, metric): the task's own number, with its groups
    protocol: str = "closed-set"
    headline: pd.DataFrame = field(default_factory=pd.DataFrame)  # ubench: the paper's coarse/fine headline
    # The base and the specialist themselves, evaluated once (`micromerge eval`, or `ablate` per pair) on
    # the same data and protocol; None where the store has no such evaluation (alpha 0/1 stand in).
    base_reference: pd.DataFrame | None = None
    finetuned_reference: pd.DataFrame | None = None
    # evaluations of the base or the specialist that were not taken as references, and why (they
    # scored fewer tasks than the sweep): the report says so instead of "no evaluation"
    unused_references: tuple[str, ...] = ()
    # tasks whose rows are not zero-shot: a model of the run was trained on them ("task") or on
    # images they score ("images"), as the evaluation marked them (eval.trained_on)
    trained_on: dict[str, str] = field(default_factory=dict)
    # what else decides which rows a task holds and how they are asked: the sha256 of the run's
    # `--sources` table (None: the shipped one) and its closed-set prompts; runs that differ in
    # either are never each other's references, nor drawn on one figure
    task_definition: tuple[str | None, str | None] = (None, None)
    # an evaluation of a checkpoint that learned from, or was chosen on, the select half of these
    # images (LEARNED_FROM_SELECT): its numbers on all images include images it learned from
    learned_from_select: bool = False


GREEDY_SOUP = "greedy-soup"
SINGLE_POINT_METHODS = ("none", GREEDY_SOUP)
"""Runs with no curve by design: an `eval` of one model, and a greedy soup (one chosen point)."""


def has_curve(run: Run) -> bool:
    """Whether a run has several α (a curve, α to choose); a soup or `sweep --alphas 0.5` has one."""
    return bool(run.table["alpha"].nunique() > 1)


def evaluated_model(run: Run) -> str:
    """`pathology-specialist` for `none [ubench]: pathology-specialist`: an evaluation's checkpoint."""
    return run.label.partition(": ")[2]


def _model_name(spec: str, whole: bool) -> str:
    """A checkpoint file by its name (`checkpoint_name`); anything else (a zoo name, an hf-hub: id,
    a folder) whole for the base, by its last part for a specialist."""
    return spec if whole and Path(spec).suffix not in CHECKPOINT_SUFFIXES else checkpoint_name(spec)


def run_label(row: dict[str, Any]) -> str:
    if row.get("label"):
        return str(row["label"])
    model = row["model"]
    names = [_model_name(str(model["base"]), whole=True)]
    names += [_model_name(str(f), whole=False) for f in model.get("finetuned", [])]
    # what tells two runs of the same models apart when they score otherwise (task_definition)
    marks = [str(row["protocol"])] if row.get("protocol") else []
    if row.get("prompts") == "captions":
        marks.append("caption prompts")
    if isinstance(row.get("sources"), dict):
        marks.append(f"sources {Path(str(row['sources'].get('file'))).name}")
    scoring = f" [{', '.join(marks)}]" if marks else ""
    return f"{row['method']}{scoring}: {' + '.join(names)}"


def load_runs(store_path: str | Path, wanted: Callable[[dict[str, Any]], bool] | None = None) -> list[Run]:
    """Every run in a results store; rows missing from a run are reported, not fatal.

    `wanted` (given a run's first row): read only those runs and every evaluation (`eval` rows, the
    references a sweep is reported against), not every row; a report of one pair of a 192-sweep
    grid decoded all 392,832 rows. Lines that are no rows are then not counted."""
    path = Path(store_path)
    if path.is_dir():
        stores = sorted(p.name for p in path.glob("*.jsonl"))
        raise MicromergeError(
            f"{path}: is a folder; pass the results store (a .jsonl file)"
            + (f" in it: {', '.join(stores[:3])}" if stores else "")
        )
    store = ResultStore(path)
    store.check_readable("")
    firsts = (store.first_rows() if wanted is not None else None) or {}
    chosen = {run_id for run_id, first in firsts.items() if wanted is not None and wanted(first)}
    by_run: dict[str, list[dict[str, Any]]] = {}
    if chosen:  # else every row: a selection of nothing is refused naming the runs there are
        for run_id, first in firsts.items():
            if run_id in chosen or first["method"] == "none":  # an evaluation: a sweep's reference
                by_run[run_id] = store.rows(run_id)
    else:
        for row in store.rows():
            by_run.setdefault(row["run_id"], []).append(row)
    if not by_run:
        raise MicromergeError(f"{path}: holds no rows of this micromerge version")
    with cycle_collection_paused():  # a table row per store row: hundreds of thousands on a grid
        runs = [run_of_rows(run_id, run_rows) for run_id, run_rows in by_run.items()]
    _attach_references(runs)
    return runs


def run_of_rows(run_id: str, run_rows: list[dict[str, Any]]) -> Run:
    """One run's rows as its tables (missing rows are warned about, not fatal)."""
    first = run_rows[0]
    table = task_table(run_rows)
    headline = pd.DataFrame.from_records(
        [
            {**_record(r), "caption_key": r.get("caption_key"), "bootstrap": r.get("bootstrap")}
            for r in run_rows
            if r.get("level") == "headline"
        ]
    )
    if first["method"] not in SINGLE_POINT_METHODS:
        _warn_missing(table, run_label(first))
    return Run(
        run_id,
        run_label(first),
        first["method"],
        first.get("parameters", {}),
        first["model"],
        first["dataset"],
        table,
        first.get("protocol", "closed-set"),
        headline,
        trained_on={
            r["task"]: r[TRAINED_ON] for r in run_rows if r.get(TRAINED_ON) and r.get("level") != "headline"
        },
        task_definition=((first.get("sources") or {}).get("sha256"), first.get("prompts")),
        learned_from_select=any(r.get(LEARNED_FROM_SELECT) for r in run_rows),
    )


def scoring(run: Run) -> tuple:
    """How a run was scored: its copy of the data, protocol and task definition. Two runs' numbers
    compare only where these agree."""
    return (run.dataset.get("fingerprint"), run.protocol, run.task_definition)


def _reference_key(run: Run, digests: list[str]) -> tuple:
    return (tuple(sorted(digests)), *scoring(run))


def _attach_references(runs: list[Run]) -> None:
    """Give each sweep the evaluation of its real base and specialist, found by sha256 (with the
    same data, protocol and task definition): with per-block alpha rules, alpha 0 and 1 are not
    those models. A reference must have scored every task the sweep did, and only those tasks are
    taken from it: an `eval --tasks domain:pathology` of the specialist left the controls' mean
    without a value (the report stopped on a pandas IndexError), and an evaluation of more tasks
    than the sweep's would have averaged tasks the sweep's curve does not hold. Of several, the
    store's last that covers the sweep."""
    evaluations: dict[tuple, list[Run]] = {}
    for r in runs:
        if r.method == "none":  # `micromerge eval`: one model, alpha null
            evaluations.setdefault(_reference_key(r, list(r.model.get("base_sha256") or [])), []).append(r)
    for run in runs:
        if run.method == "none":
            continue
        tasks = set(run.table["task"])
        unused = []
        for side in ("base", "finetuned"):
            candidates = evaluations.get(_reference_key(run, list(run.model.get(f"{side}_sha256") or [])), [])
            covering = [e for e in candidates if tasks <= set(e.table["task"])]
            if covering:
                table = covering[-1].table
                setattr(run, f"{side}_reference", table[table["task"].isin(tasks)])
            elif candidates:
                last = candidates[-1]
                missing = sorted(tasks - set(last.table["task"]))
                unused.append(
                    f"the evaluation of {evaluated_model(last) or last.label} (run {last.run_id}) "
                    f"scored {len(tasks) - len(missing)} of the sweep's {len(tasks)} tasks, not "
                    f"{', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}"
                )
        run.unused_references = tuple(unused)


GROUP_COLUMNS = ("domain", "subdomain", "modality", "submodality", "taxonomy", "scale", "paper")


def task_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Store rows -> one table row per task row (headline rows left out), with its groups."""
    return pd.DataFrame.from_records([_record(r) for r in rows if is_task_row(r)])


def _record(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "alpha": row["alpha"] if row["alpha"] is not None else float("nan"),
        "task": row["task"],
        "level": row["level"],
        **{column: row["groups"].get(column, "all") for column in GROUP_COLUMNS},
        "split": row.get("split", "all"),
        "metric": row["metric"],
        "value": row["value"],
        "ci_low": row["ci_low"],
        "ci_high": row["ci_high"],
        "n_images": row["n_images"],
    }


def _warn_missing(table: pd.DataFrame, label: str) -> None:
    alphas, tasks = table["alpha"].unique(), table["task"].unique()
    counts = table[table["split"] == "all"].groupby(["alpha", "metric"]).size()
    for (alpha, metric), count in counts.items():
        if count < len(tasks):
            warnings.warn(
                f"run {label}: alpha={alpha:g} has {count} of {len(tasks)} tasks for {metric}; reporting what is there",
                stacklevel=3,
            )
    if len(alphas) == 1:
        warnings.warn(
            f"run {label}: a single alpha, so no curve; the tables are still reported", stacklevel=3
        )


def finetuned_domain(run: Run, store: Path) -> str | None:
    """The fine-tuning domain recorded in the fine-tuned checkpoint's provenance (found as the
    model card finds it: its own manifest, its folder's, or its safetensors header), if any.

    The checkpoint is found by what it holds, not by where the report runs: each candidate path
    (the absolute file the sweep read, the recorded path against the store's own folder, the
    recorded path as given) counts only when its sha256 is the one the sweep recorded."""
    model = run.model
    recorded = list(model.get("finetuned_files") or model.get("finetuned", []))
    digests = list(model.get("finetuned_sha256") or [])
    for index, given in enumerate(model.get("finetuned", [])):
        candidates = [Path(p) for p in (recorded[index : index + 1] or [])]
        candidates += [store.parent / given, Path(given)]
        for path in candidates:
            if not path.is_file():
                continue
            if index < len(digests) and sha256_file(path, default_cache_dir()) != digests[index]:
                continue
            domain = checkpoint_provenance([path]).get("domain")
            if domain:
                return str(domain)
    return None
