"""The models a results store holds `eval` runs of, side by side: the μ-Bench paper's main tables
compare models zero-shot (CLIP, PLIP, QuiltNet, BiomedCLIP …) before anyone merges them, and a
store with only such evaluations had no report at all.

Each column is one evaluation as `micromerge eval` scored it (its protocol, data and task
definition in its name where they differ); a model evaluated on fewer tasks has empty cells, not
a mean over other tasks.
"""

from __future__ import annotations

from dataclasses import replace
from fnmatch import fnmatchcase

import pandas as pd

from micromerge.analysis.metrics import METRIC_NAMES, curve, table_groups
from micromerge.analysis.tables import Run, evaluated_model, scoring
from micromerge.core.errors import MicromergeError
from micromerge.core.suggest import meant

GROUP_ORDER = ("level:coarse", "level:fine")
"""The two levels first, then every other group in name order."""


def evaluations(runs: list[Run]) -> list[Run]:
    """The `eval` runs (one model each, no alpha) among a store's runs."""
    return [run for run in runs if run.method == "none"]


def evaluations_of_models_in(evaluated: list[Run], runs: list[Run]) -> list[Run]:
    """The evaluations of models the given sweeps merge, told by sha256: `report --runs` of one pair
    of an ablation grid showed every model of every pair beside it. An evaluation that records no
    sha256 (a store written by hand) cannot be told apart and is kept."""
    merged = {
        digest
        for run in runs
        for key in ("base_sha256", "finetuned_sha256")
        for digest in run.model.get(key) or []
    }
    return [run for run in evaluated if set(run.model.get("base_sha256") or []) <= merged]


def evaluation_names(evaluated: list[Run]) -> list[str]:
    """`pathology-specialist [ubench]` for `none [ubench]: pathology-specialist`; the run id is
    added where two evaluations would otherwise share a name (one model on two copies of the data)."""
    names = []
    for run in evaluated:
        method_part, _, model = run.label.partition(": ")
        scoring = method_part.removeprefix("none").strip()
        names.append(f"{model} {scoring}".strip() if model else run.label)
    return [
        f"{name} ({run.run_id})" if names.count(name) > 1 else name
        for name, run in zip(names, evaluated, strict=True)
    ]


def _group_mean(run: Run, group: str | None, metric: str) -> float:
    """The mean over the group's tasks (None: every task), as a sweep's curve takes it at one alpha."""
    single = replace(run, table=run.table.assign(alpha=0.0))  # an evaluation's alpha is null
    values = curve(single, group, metric)["value"]
    return float(values.iloc[0]) if len(values) else float("nan")


def _groups(evaluated: list[Run]) -> list[str]:
    found = set().union(*(table_groups(run.table) for run in evaluated))
    return [*(g for g in GROUP_ORDER if g in found), *sorted(found - set(GROUP_ORDER))]


def _percent(value: float) -> float:
    return round(100 * value, 1)


def models_table(evaluated: list[Run], paper_headlines: list[pd.DataFrame], metric: str) -> pd.DataFrame:
    """One row per evaluation: its task count, the mean over all tasks, the coarse and fine task
    means, and (ubench protocol) the paper's pooled coarse and fine numbers with their intervals,
    from `paper_headlines` (the report's paper headline table of each evaluation alone, in order:
    two evaluations of one label, one model on two copies of the data, keep their own)."""
    records = []
    for run, name, paper in zip(evaluated, evaluation_names(evaluated), paper_headlines, strict=True):
        tasks = run.table[(run.table["metric"] == metric) & (run.table["split"] == "all")]["task"].nunique()
        record = {
            "model": name,
            "protocol": run.protocol,
            "tasks": tasks,
            f"all tasks ({METRIC_NAMES[metric]} %)": _percent(_group_mean(run, None, metric)),
            "coarse tasks %": _percent(_group_mean(run, "level:coarse", metric)),
            "fine tasks %": _percent(_group_mean(run, "level:fine", metric)),
        }
        if not paper.empty:
            headline = paper.drop(columns=["run", "protocol", "alpha"]).iloc[0]
            record.update({f"paper {column}": value for column, value in headline.items()})
        records.append(record)
    return pd.DataFrame.from_records(records)


def models_group_means(evaluated: list[Run], metric: str) -> pd.DataFrame:
    """Group x model: the mean of the group's tasks (a fraction, unrounded), one column per
    evaluation: what the group table shows and the change against a baseline is taken from."""
    groups = _groups(evaluated)
    columns = {
        name: [_group_mean(run, group, metric) for group in groups]
        for run, name in zip(evaluated, evaluation_names(evaluated), strict=True)
    }
    return pd.DataFrame({"group": groups, **columns})


def models_group_table(means: pd.DataFrame) -> pd.DataFrame:
    """`models_group_means` in percent, to one decimal."""
    return means.assign(**{name: means[name].map(_percent) for name in means.columns[1:]})


def models_task_table(evaluated: list[Run], metric: str) -> pd.DataFrame:
    """Task x model (%), with each task's level and domain; empty where a model was not evaluated."""
    frames = []
    for run, name in zip(evaluated, evaluation_names(evaluated), strict=True):
        rows = run.table[(run.table["metric"] == metric) & (run.table["split"] == "all")]
        frames.append(rows.set_index("task")["value"].mul(100).round(1).rename(name))
    described = pd.concat(
        [run.table[["task", "level", "domain"]] for run in evaluated], ignore_index=True
    ).drop_duplicates("task")
    matrix = pd.concat(frames, axis=1)
    table = described.set_index("task").join(matrix, how="right")
    return table.sort_values(["level", "task"]).reset_index()


def pick_baseline(evaluated: list[Run], pattern: str, store: str) -> int:
    """The index of the one evaluation `report --baseline` names: by its name in the models table,
    its checkpoint's name alone (`base`, when one protocol scored it), its label or its run id, as
    written (`base [ubench]`: brackets are a glob's character class) or as a glob."""
    names = evaluation_names(evaluated)
    found = [
        i
        for i, (run, name) in enumerate(zip(evaluated, names, strict=True))
        if any(
            text == pattern or fnmatchcase(text, pattern)
            for text in (name, evaluated_model(run), run.label, run.run_id)
        )
    ]
    if len(found) != 1:
        how = "matches no evaluated model" if not found else f"matches {len(found)} evaluated models"
        listed = [names[i] for i in found] if found else names
        raise MicromergeError(
            f"--baseline {pattern}: {how} of {store}{meant(pattern, names) if not found else ''}; "
            f"{'give one of' if found else 'its evaluated models'}: {'; '.join(listed[:6])}"
            + (f" (and {len(listed) - 6} more)" if len(listed) > 6 else "")
        )
    return found[0]


def models_change_table(
    means: pd.DataFrame, evaluated: list[Run], baseline: int
) -> tuple[pd.DataFrame, list[str]]:
    """Group x model: each model's group mean minus the baseline's, in points (the μ-Bench paper's
    forgetting, a specialist against its base: negative outside its domain), and the names of the
    models left out because they were scored otherwise (another protocol, copy of the data or task
    definition): a difference between them would measure the scoring, not the model. Differences
    are taken from `models_group_means`, before rounding: two means shown to 0.1 can be 0.1
    further apart than the models."""
    names = evaluation_names(evaluated)
    base_run, base_name = evaluated[baseline], names[baseline]
    change = means[["group"]].copy()
    other: list[str] = []
    for run, name in zip(evaluated, names, strict=True):
        if name == base_name:
            continue
        if scoring(run) != scoring(base_run):
            other.append(name)
            continue
        change[f"{name} − {base_name}"] = (means[name] - means[base_name]).map(_percent)
    return change, other
