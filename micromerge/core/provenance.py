"""Provenance records attached to every artefact (checkpoint, result row, report)."""

from __future__ import annotations

import importlib
import platform
from typing import Any

import micromerge
from micromerge.core.hashing import sha256_json

TRAINED_ON = "trained_on"
"""The result-row field marking a task whose number is not zero-shot: a model evaluated was trained
on that task ("task") or on images it scores ("images"); absent otherwise (eval.trained_on)."""
SUPERVISED_ON = "supervised_on"
"""The provenance field of a checkpoint made from others (a fine-tune of a base, a merge): the
labelled benchmark data its inputs were trained on (`supervised_lineage`), so the fact outlives
every step after the supervised fine-tune that trained on it."""
LEARNED_FROM_HALVES = "learned_from_halves"
"""The provenance field of a checkpoint made from others: the select halves of benchmarks that a
data-aware merge among its inputs learned from (`select_half_lineage`), carried on as SUPERVISED_ON is."""
LEARNED_FROM_SELECT = "learned_from_select_half"
"""The result-row field of an `eval` of a checkpoint that learned from, or was chosen on, the select
half of the very images it is scored on (a data-aware merge, a greedy soup, or a model made from
one; the same --seed): true on its `all` and `select` rows, which hold those images; its `report`
rows are the held-out numbers (eval.engine.run_eval)."""
CHOSEN_ON = "chosen_on"
"""In a recipe chosen with data (a greedy soup's), the select half it was chosen on, recorded as
statistics record theirs (data_fingerprint, split, halves_seed)."""


def provenance(
    *,
    method: str,
    parameters: dict[str, Any],
    inputs: dict[str, str],
    seed: int | None,
    array_library: str = "torch",
) -> dict[str, Any]:
    """What made an artefact: inputs' sha256, method, parameters, seed and versions.

    `array_library` is the library that computed it (torch, or numpy for the torch-free merge
    engine); its version is recorded as `<library>_version`. Deliberately free of timestamps
    and host names so the same inputs give the same bytes; timing goes in the sidecar manifest.
    """
    library = importlib.import_module(array_library)
    return {
        "micromerge_version": micromerge.__version__,
        f"{array_library}_version": library.__version__,
        "python_version": platform.python_version(),
        "method": method,
        "parameters": parameters,
        "inputs_sha256": inputs,
        "seed": seed,
    }


def has_interval(row: Any) -> bool:
    """Whether a result row holds a bootstrap interval, by the bootstrap count it records: with
    --bootstrap 0 its ci_low and ci_high are its point value, which no table prints as an interval."""
    return row.get("bootstrap") != 0


def trained_on_note(row: Any) -> str:
    """What a table or card prints after a row's task when the row is marked `TRAINED_ON`."""
    mark = row.get(TRAINED_ON)
    return f" (trained on its {'images' if mark == 'images' else 'task'}: not zero-shot)" if mark else ""


def task_data_fingerprint(benchmark_fingerprint: str, task: str) -> str:
    """The data of a supervised fine-tune on one task of a benchmark (its `data_fingerprint`), and
    what evaluation on a benchmark compares every task of it with."""
    return sha256_json({"data": benchmark_fingerprint, "task": task})


def supervised_lineage(record: Any) -> list[str]:
    """The task data (`task_data_fingerprint`) a checkpoint's weights were trained on with labels:
    its own, if it is a supervised fine-tune, and what its inputs were (`SUPERVISED_ON`)."""
    if not isinstance(record, dict):
        return []
    own = record.get("data_fingerprint") if record.get("kind") == "finetune-supervised" else None
    inherited = record.get(SUPERVISED_ON)
    values = [own, *(inherited if isinstance(inherited, list) else [])]
    return sorted({value for value in values if isinstance(value, str)})


def select_half_mark(benchmark_fingerprint: str, halves_seed: int) -> str:
    """The select half of a benchmark's images as the halves drawn with `halves_seed` (--seed) hold
    it: what a data-aware merge learned from (`eval.statistics.select_half`)."""
    return f"select-half:{benchmark_fingerprint}:seed={halves_seed}"


def select_half_lineage(record: Any) -> list[str]:
    """The select halves (`select_half_mark`) a checkpoint's weights were learned from: its own
    statistics or learned coefficients drawn from a benchmark, the half a recipe was chosen on
    (`CHOSEN_ON`), and its inputs' (`LEARNED_FROM_HALVES`). Statistics recorded without a halves
    seed were drawn by a `merge` before 0.1.6, which always split the images as seed 0 does."""
    if not isinstance(record, dict):
        return []
    found = set()
    statistics = record.get("statistics")
    entries = [*(statistics if isinstance(statistics, list) else [])]
    entries += [value.get(CHOSEN_ON) for value in record.values() if isinstance(value, dict)]
    for entry in entries:
        if isinstance(entry, dict) and entry.get("split") == "select" and entry.get("data_fingerprint"):
            seed = entry.get("halves_seed", 0)
            found.add(select_half_mark(str(entry["data_fingerprint"]), seed if isinstance(seed, int) else 0))
    inherited = record.get(LEARNED_FROM_HALVES)
    found.update(m for m in (inherited if isinstance(inherited, list) else []) if isinstance(m, str))
    return sorted(found)
