"""Aggregates as the paper reports them: per perception level, per domain/modality/scale, overall."""

from __future__ import annotations

from collections import defaultdict
from typing import Any


def group_labels(row: dict[str, Any]) -> list[str]:
    """Groups a task row counts towards (coarse tasks only towards the coarse level)."""
    groups = row.get("groups", {})
    labels = [f"level:{groups.get('level', row.get('level', '?'))}"]
    if groups.get("level") == "fine":
        for column in ("domain", "subdomain", "modality", "submodality", "taxonomy", "scale"):
            value = groups.get(column)
            if value and value not in ("all", "unknown"):
                labels.append(f"{column}:{value}")
    return labels


def is_task_row(row: dict[str, Any]) -> bool:
    """One number per task: closed-set rows, or ubench rows pooled over the task's caption keys
    (per-key rows and the paper's headline rows are reported beside, not averaged in)."""
    return row.get("level") != "headline" and row.get("caption_key") in (None, "all")


def aggregate(rows: list[dict[str, Any]], metric: str = "accuracy", split: str = "all") -> dict[str, float]:
    """Mean of per-task values per group, and `overall` (the mean over all tasks)."""
    per_group: dict[str, list[float]] = defaultdict(list)
    values = []
    for row in rows:
        if row["metric"] != metric or row.get("split", "all") != split or not is_task_row(row):
            continue
        values.append(row["value"])
        for label in group_labels(row):
            per_group[label].append(row["value"])
    result = {label: sum(v) / len(v) for label, v in sorted(per_group.items())}
    if values:
        result["overall"] = sum(values) / len(values)
    return result
