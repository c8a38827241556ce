"""Greedy soup (Wortsman et al., ICML 2022, "Model soups: averaging weights of multiple fine-tuned
models improves accuracy without increasing inference time"), on μ-Bench's halves.

The ingredients are the base and every fine-tuned model. Each is scored alone on the *select*
half of every task's images; in that order, best first, an ingredient joins the soup (a uniform
average of its members) when the soup's select-half all-task mean accuracy does not drop. The
chosen soup is reported on the *report* half, which took no part in the choice. Including the
base is what makes it a forgetting method: a soup of the base and one specialist is WiSE-FT at
alpha 1/2.

Every candidate is a `linear` merge evaluated by the sweep engine (in place, on the resident
model), so candidates are resumable like any sweep; their rows go to a side store
(`<store>.soup-candidates.jsonl`) and only the chosen soup's rows, relabelled `greedy-soup`,
to the main store, where reports and ablations see one run with one point.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from micromerge.analysis.metrics import curve
from micromerge.analysis.tables import GREEDY_SOUP, run_of_rows
from micromerge.core.atomic import same_file
from micromerge.core.errors import MicromergeError
from micromerge.core.hashing import sha256_json
from micromerge.core.json_text import parse_json
from micromerge.core.provenance import CHOSEN_ON
from micromerge.eval.engine import Prepared, prepare, run_sweep
from micromerge.eval.settings import EvalSettings, SweepPlan, select_half
from micromerge.merging.execute import MergeOutput
from micromerge.merging.job import check_file_out, job_from_mapping, run_merge_job
from micromerge.merging.methods import MethodParams
from micromerge.merging.plan import MergeSpec
from micromerge.merging.rules import KeyRules
from micromerge.merging.sources import CheckpointAccess

SELECTION = "select-half all-task mean accuracy; an ingredient joins when it does not drop (>=)"


@dataclass(frozen=True)
class Scored:
    weights: tuple[float, ...]
    select_mean: float
    report_mean: float
    rows: list[dict[str, Any]]


@dataclass(frozen=True)
class SoupStep:
    ingredient: str
    weights: tuple[float, ...]
    select_mean: float
    kept: bool


@dataclass(frozen=True)
class SoupResult:
    models: tuple[str, ...]  # base first, then the fine-tuned models
    own_select: dict[str, float]  # each ingredient alone, select half
    steps: tuple[SoupStep, ...]  # in the order tried: best ingredient first
    weights: tuple[float, ...]  # the chosen soup, as linear weights over `models`
    select_mean: float
    report_mean: float
    run_id: str
    chosen_on: dict[str, Any]  # the select half (data, halves seed) the soup was chosen on

    def describe(self) -> dict[str, Any]:
        return {
            "ingredients": list(self.models),
            "weights": list(self.weights),
            "order": [step.ingredient for step in self.steps],
            "selection": SELECTION,
            CHOSEN_ON: self.chosen_on,
            "steps": [
                {"ingredient": s.ingredient, "select_mean": s.select_mean, "kept": s.kept} for s in self.steps
            ],
        }


def candidate_store(store: Path) -> Path:
    return store.with_name(store.stem + ".soup-candidates.jsonl")


def _score(
    base: str,
    finetuned: tuple[str, ...],
    weights: tuple[float, ...],
    rules: KeyRules,
    settings: EvalSettings,
    device: torch.device,
    access: CheckpointAccess,
    prepared: Prepared,
) -> Scored:
    spec = MergeSpec("linear", MethodParams(weights=weights), rules)
    label = f"{GREEDY_SOUP} candidate {list(weights)}"
    plan = SweepPlan(base, finetuned, spec, (1.0,), access, label=label)
    rows = run_sweep(plan, settings, device, prepared=prepared)  # this selection's tasks only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # candidates are single points by design
        run = run_of_rows(rows[0]["run_id"], rows)
    halves = {split: curve(run, None, "accuracy", split)["value"] for split in ("select", "report")}
    empty = [split for split, values in halves.items() if values.empty]
    if empty:
        raise MicromergeError(
            f"{settings.data}: none of the evaluated tasks' images is in the {empty[0]} half, so a soup "
            "can be neither chosen nor reported; evaluate more tasks or images (--tasks)"
        )
    return Scored(weights, float(halves["select"].iloc[0]), float(halves["report"].iloc[0]), rows)


def uniform(members: list[int], count: int) -> tuple[float, ...]:
    return tuple(1.0 / len(members) if index in members else 0.0 for index in range(count))


def greedy_soup(
    base: str,
    finetuned: tuple[str, ...],
    settings: EvalSettings,
    device: torch.device,
    rules: KeyRules = KeyRules(),
    label: str | None = None,
    access: CheckpointAccess = CheckpointAccess(),
    prepared: Prepared | None = None,
) -> SoupResult:
    """Choose the soup on the select half, write its rows to `settings.store`, and return the recipe.

    The benchmark is loaded once (`prepared`, or here) for the soup's candidates, a sweep each."""
    if rules.strength_rules:
        raise MicromergeError(
            "greedy-soup: alpha rules do not apply (a soup is a uniform average); use include/exclude"
        )
    models = (base, *finetuned)
    side = replace(settings, store=candidate_store(Path(settings.store)), rank=0, world_size=1)
    count = len(models)
    prepared = prepare(side) if prepared is None else prepared

    def score(members: list[int]) -> Scored:
        return _score(base, finetuned, uniform(members, count), rules, side, device, access, prepared)

    own = {i: score([i]) for i in range(count)}
    order = sorted(range(count), key=lambda i: (-own[i].select_mean, i))
    members, best = [order[0]], own[order[0]]
    steps = [SoupStep(models[order[0]], best.weights, best.select_mean, True)]
    for index in order[1:]:
        trial = score([*members, index])
        kept = trial.select_mean >= best.select_mean
        steps.append(SoupStep(models[index], trial.weights, trial.select_mean, kept))
        if kept:
            members, best = [*members, index], trial
    result = SoupResult(
        models,
        {models[i]: own[i].select_mean for i in range(count)},
        tuple(steps),
        best.weights,
        best.select_mean,
        best.report_mean,
        run_id="",
        chosen_on={"data_fingerprint": prepared.bench.fingerprint, **select_half(settings)},
    )
    run_id = sha256_json(
        {"method": GREEDY_SOUP, "chosen": best.rows[0]["run_id"], "recipe": result.describe()}
    )[:16]
    parameters = {
        **result.describe(),
        "include": list(rules.include),
        "exclude": list(rules.exclude),
    }
    rows = [
        {
            **{key: value for key, value in row.items() if key != "label"},  # the candidate's label
            "run_id": run_id,
            "method": GREEDY_SOUP,
            "parameters": parameters,
            **({"label": label} if label else {}),  # else run_label's: its protocol, checkpoints by name
        }
        for row in best.rows
    ]
    prepared.results(settings.store).append(rows)  # skips rows an earlier run wrote, under the store's lock
    return replace(result, run_id=run_id)


def check_soup_out(out: Path, force: bool, models: tuple[str, ...]) -> None:
    """Refuse an --out the soup could not be written to before the search, not after it: the search
    evaluates every candidate (minutes to hours), then `--out` was found to exist. An output of an
    earlier soup (its manifest holds the recipe) is left for the write to reuse or refuse, as the
    chosen weights decide; an input given as --out is refused."""
    check_file_out(out)
    clash = next((m for m in models if Path(m).exists() and same_file(out, Path(m))), None)
    if clash is not None:
        raise MicromergeError(f"--out {out}: is an input ({clash}); choose another --out")
    if force or not os.path.lexists(out):
        return
    try:
        manifest = parse_json(out.with_name(out.name + ".manifest.json").read_text())
    except (OSError, ValueError):
        manifest = None
    if not (isinstance(manifest, dict) and GREEDY_SOUP in manifest):
        raise MicromergeError(
            f"--out {out}: exists (not a soup's output); pass --force to overwrite or choose another --out"
        )


def write_soup(
    result: SoupResult,
    out: Path,
    force: bool,
    rules: KeyRules = KeyRules(),
    progress: bool = True,
    access: CheckpointAccess = CheckpointAccess(),
) -> MergeOutput:
    """The chosen soup as a checkpoint: a linear merge with the soup's weights; the manifest keeps the recipe."""
    job = job_from_mapping(
        {
            "base": result.models[0],
            "finetuned": list(result.models[1:]),
            "method": "linear",
            "weights": list(result.weights),
            "include": list(rules.include),
            "exclude": list(rules.exclude),
            "out": str(out),
            "force": force,
        }
    )
    recipe = {GREEDY_SOUP: {**result.describe(), "run_id": result.run_id}}
    (output,) = run_merge_job(replace(job, access=access, extra=recipe), progress=progress)
    return output
