"""Rows of tasks a model has been trained on: marked, and said, never silently reported as zero-shot.

`micromerge finetune supervised --data BENCH --task T` trains on task T's own images of BENCH. Its
provenance records that (`core.provenance.task_data_fingerprint`), and the checkpoints made from it
carry it on (`merging.lineage`). Evaluated on the same benchmark (the same files), T's rows are
marked `trained_on: "task"`, the rows of every other task scoring any of T's images
`trained_on: "images"` (the model has seen them, with other labels), and the headline rows, which
pool tasks, `"images"` too. A merge that leaves the base's weights bit for bit (α 0 without per-block
rules) is the base: a sweep's rows at that α, and a merged file's lineage, are the base's own. A
benchmark of other files, such as another copy or the held-out split of the data trained on, marks
nothing.

A data-aware merge (Fisher, RegMean, AdaMerging, the supervised α) learns from the select half of
the images, and its report half is held out only under the halves it learned with: those --seed
draws. Evaluated with another --seed, about half of its report half is images it learned from
(labels included, for the supervised α), so that is refused (`refuse_other_halves`).
"""

from __future__ import annotations

import warnings
from typing import Any

from micromerge.core.errors import MicromergeError
from micromerge.core.provenance import TRAINED_ON, select_half_mark, task_data_fingerprint
from micromerge.eval.tasks import Task


def trained_on_marks(
    lineage: list[str], benchmark_fingerprint: str, trainable: list[Task], evaluated: list[Task]
) -> tuple[list[str], dict[str, str]]:
    """(the benchmark's tasks the lineage trained on, {evaluated task: "task" | "images"}), the tasks
    trained on found among `trainable` (as fine-tuning saw them), their images among `evaluated`'s."""
    trained = [t for t in trainable if task_data_fingerprint(benchmark_fingerprint, t.name) in lineage]
    if not trained:
        return [], {}
    names = {t.name for t in trained}
    seen = {row for t in trained for row in t.image_rows}
    marks = {}
    for task in evaluated:
        if task.name in names:
            marks[task.name] = "task"
        elif seen.intersection(task.image_rows):
            marks[task.name] = "images"
    return sorted(names), marks


def mark_rows(rows: list[dict[str, Any]], marks: dict[str, str]) -> list[dict[str, Any]]:
    """The rows with their `trained_on` mark (headline rows pool tasks: "images" when any is marked)."""
    if not marks:
        return rows
    marked = []
    for row in rows:
        mark = marks.get(row["task"]) or ("images" if row.get("level") == "headline" else None)
        marked.append({**row, TRAINED_ON: mark} if mark else row)
    return marked


def warn_trained_on(what: str, trained: list[str], marks: dict[str, str]) -> None:
    if trained:
        warnings.warn(
            f"{what} is, or was made from, a model fine-tuned (supervised) on this benchmark's own images of "
            f"{', '.join(trained)}: "
            f"the rows of {len(marks)} task(s) scoring them are not zero-shot (marked {TRAINED_ON} in the store)",
            stacklevel=3,
        )


def refuse_other_halves(halves: list[str], benchmark_fingerprint: str, seed: int, what: str) -> None:
    """Stop when `what` (its weights, or an input's) learned from this benchmark's select half as
    another --seed splits it (`halves`: `merging.lineage.sources_select_halves`)."""
    mark = select_half_mark(benchmark_fingerprint, seed)
    prefix = mark[: -len(str(seed))]
    others = sorted(int(m[len(prefix) :]) for m in halves if m.startswith(prefix) and m != mark)
    if not others:
        return
    learned = ", ".join(f"--seed {s}" for s in others)
    fix = (
        f"give --seed {others[0]}"
        if len(others) == 1 and mark not in halves
        else "no one --seed holds its report half out"
    )
    raise MicromergeError(
        f"{what}: a data-aware merge (it, or an input) learned from the select half of these images as "
        f"{learned} splits them, and under --seed {seed} half of the report half is images it learned "
        f"from: {fix}"
    )
