"""`micromerge ablate CONFIG`: a grid of checkpoint pairs x methods x rule sets through sweep and report.

Resumable because every sweep is: re-running the same config finishes what is missing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from micromerge.analysis.metrics import GROUP_KINDS, table_groups
from micromerge.analysis.report import build_report
from micromerge.analysis.soup import GREEDY_SOUP, greedy_soup
from micromerge.analysis.tables import task_table
from micromerge.core.config_files import load_section
from micromerge.core.config_schema import ABLATION_SCHEMA, MERGE_SCHEMA, check_section, refuse_unknown_keys
from micromerge.core.errors import MicromergeError
from micromerge.eval.engine import alone, prepare, run_eval, run_sweep
from micromerge.eval.settings import EvalSettings, SweepPlan
from micromerge.eval.source_metadata import load_source_table
from micromerge.eval.trained_on import refuse_other_halves
from micromerge.merging.job import MergeJob, job_from_mapping, parse_alphas
from micromerge.merging.lineage import sources_select_halves
from micromerge.merging.methods import get_method
from micromerge.merging.plan import MergeSpec, plan_merge
from micromerge.merging.rules import KeyRules
from micromerge.merging.sources import CheckpointAccess

PAIR_ACCESS_SCHEMA = {"allow_pickle": "bool", "arch": "str"}
PAIR_SCHEMA = {
    "name": "str",
    "base": "str",
    "finetuned": "str_or_str_list",
    "base_data": "str",
    "ft_data": "str_list",
    **PAIR_ACCESS_SCHEMA,
}


@dataclass(frozen=True)
class Ablation:
    data: str
    store: Path
    report: Path
    alphas: str
    pairs: tuple[dict[str, Any], ...]
    methods: tuple[str, ...]
    rule_sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks: str = "all"
    protocol: str = "ubench"
    prompts: str = "names"  # closed-set only, as eval's --prompts
    sources: Path | None = None  # a table overriding the source metadata, as eval's --sources
    precision: str = "bf16"  # the image forward on a GPU, as eval's --precision
    bootstrap: int = 1000
    seed: int = 0
    batch_size: int = 256
    target: str | None = None
    method_parameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    run_figures: bool | None = None  # the report's (None: up to its limit of runs)


def load_ablation(path: str | Path) -> Ablation:
    section = load_section(path, "ablation", ABLATION_SCHEMA)
    for key in ("data", "store", "report", "pairs", "methods"):
        if not section.get(key):
            raise MicromergeError(f"{path}: [ablation] needs {key!r}")
    base_dir = Path(path).parent

    def resolve(value: str) -> str:
        return str(base_dir / value) if value.startswith(("./", "../")) else value

    pairs = []
    for pair in section["pairs"]:
        refuse_unknown_keys(f"{path} pair", pair, set(PAIR_SCHEMA))
        if not pair.get("base") or not pair.get("finetuned"):
            raise MicromergeError(f"{path}: every pair needs base and finetuned")
        check_section(f"{path} pair {pair.get('name') or pair['base']}", pair, PAIR_SCHEMA)
        finetuned = pair["finetuned"] if isinstance(pair["finetuned"], list) else [pair["finetuned"]]
        pairs.append(
            {
                "name": pair.get("name") or pair["base"],
                "base": resolve(pair["base"]),
                "finetuned": [resolve(f) for f in finetuned],
                # Fisher/RegMean: each model's own corpus (the others use the ablation's μ-Bench data)
                # how the pair's checkpoints are opened (a wise-ft pickle, a file without its arch)
                "access": CheckpointAccess(bool(pair.get("allow_pickle", False)), pair.get("arch")),
                "own_data": {
                    "base_data": resolve(pair["base_data"]) if pair.get("base_data") else None,
                    "ft_data": [resolve(f) for f in pair.get("ft_data") or []],
                },
            }
        )
    names = [pair["name"] for pair in pairs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:  # their results would share labels in the store and the report
        raise MicromergeError(f"{path}: pair name {repeated[0]!r} is used twice; give each pair its own name")
    for method in sorted(set(section.get("method_parameters") or {}) - set(section["methods"])):
        try:  # a typo ([ablation.method_parameters.tie]) is named with the methods there are
            get_method(method)
        except MicromergeError as exc:
            raise MicromergeError(f"{path}: method_parameters.{method}: {exc}") from exc
        warnings.warn(
            f"{path}: method_parameters.{method}: {method} is not in methods {list(section['methods'])}; unused",
            stacklevel=2,
        )
    alphas = section.get("alphas", "0:1:0.1")
    ablation = Ablation(
        data=resolve(section["data"]),
        store=Path(resolve(section["store"])),
        report=Path(resolve(section["report"])),
        alphas=",".join(str(a) for a in alphas) if isinstance(alphas, list) else str(alphas),
        pairs=tuple(pairs),
        methods=tuple(section["methods"]),
        rule_sets=section.get("rule_sets") or {"all": {}},
        tasks=section.get("tasks", "all"),
        protocol=str(section.get("protocol", "ubench")),
        prompts=str(section.get("prompts", "names")),
        sources=Path(resolve(section["sources"])) if section.get("sources") else None,
        precision=str(section.get("precision", "bf16")),
        bootstrap=int(section.get("bootstrap", 1000)),
        seed=int(section.get("seed", 0)),
        batch_size=int(section.get("batch_size", 256)),
        target=section.get("target"),
        method_parameters=section.get("method_parameters") or {},
        run_figures=section.get("run_figures"),
    )
    try:  # validate the whole grid now
        parse_alphas(alphas)  # as written: `alphas = []` joins to "", which reads as no --alphas
        check_target_form(ablation.target)
        _evaluation_settings(ablation, Path(), progress=False)  # their values, as eval checks its flags
        if ablation.sources is not None:
            load_source_table(ablation.sources)
        _, skipped = plan_grid(ablation)
    except MicromergeError as exc:
        raise MicromergeError(f"{path}: {exc}") from exc
    for message in skipped:  # here only: the run plans the grid again, and said each one twice
        warnings.warn(message, stacklevel=2)
    return ablation


def _evaluation_settings(
    ablation: Ablation, cache_dir: Path, progress: bool, rank: int = 0, world_size: int = 1
) -> EvalSettings:
    """How every evaluation, sweep and soup of the grid scores (EvalSettings checks the values)."""
    return EvalSettings(
        data=ablation.data,
        store=ablation.store,
        cache_dir=cache_dir,
        tasks=ablation.tasks,
        protocol=ablation.protocol,
        prompts=ablation.prompts,
        sources=ablation.sources,
        precision=ablation.precision,
        batch_size=ablation.batch_size,
        bootstrap=ablation.bootstrap,
        seed=ablation.seed,
        progress=progress,
        rank=rank,
        world_size=world_size,
    )


def check_target_form(target: str | None) -> None:
    """`KIND:VALUE` of a kind the report knows, checked before anything runs."""
    kind, _, value = (target or "level:fine").partition(":")
    if kind not in ("level", *GROUP_KINDS) or not value:
        raise MicromergeError(
            f"target {target!r}: expected level:coarse|fine or one of "
            f"{', '.join(k + ':VALUE' for k in GROUP_KINDS)} (e.g. domain:pathology)"
        )


def check_target(target: str | None, rows: list[dict[str, Any]], data: str) -> None:
    """The target is a group of the benchmark's tasks. The report checks it too, but only after
    every sweep of the grid (hours on μ-Bench): here it is checked on the first model's evaluation."""
    if target is None:
        return
    groups = table_groups(task_table(rows))
    if target not in groups:
        raise MicromergeError(
            f"target {target!r}: not a group of the tasks of {data}; valid groups: {groups}"
        )


@dataclass(frozen=True)
class SoupJob:
    """A greedy soup in the grid: chosen on the select half instead of swept over alpha."""

    base: str
    finetuned: tuple[str, ...]
    rules: KeyRules
    access: CheckpointAccess


def grid_jobs(ablation: Ablation) -> list[tuple[str, MergeJob | SoupJob]]:
    """Every (label, job) of the grid (`plan_grid`)."""
    return plan_grid(ablation)[0]


def plan_grid(ablation: Ablation) -> tuple[list[tuple[str, MergeJob | SoupJob]], list[str]]:
    """Every (label, job) of the grid, built and validated together: a bad method name,
    parameter or rule anywhere fails before the first sweep runs; and the combinations a method
    cannot take (Model Stock with one specialist, WiSE-FT or SLERP with two, a soup with alpha
    rules) or would repeat (a
    sign-electing variant on a one-specialist pair), each `label: skipped (why)`, which
    `load_ablation` warns of."""
    jobs: list[tuple[str, MergeJob | SoupJob]] = []
    merges: dict[tuple[str, str, str], tuple[str, MergeJob]] = {}
    skipped: list[str] = []
    for pair in ablation.pairs:
        for method in ablation.methods:
            if method != GREEDY_SOUP and not get_method(method).takes_alpha:
                raise MicromergeError(
                    f"methods: {method} takes no alpha, so its sweep would score one merge at every alpha; "
                    f"remove it (greedy-soup chooses the models' weights from the data)"
                )
            parameters = ablation.method_parameters.get(method, {})
            if not isinstance(parameters, dict):
                raise MicromergeError(f"method_parameters.{method} must be a table, not {parameters!r}")
            for key in sorted(set(parameters) & set(PAIR_ACCESS_SCHEMA)):
                raise MicromergeError(
                    f"method_parameters.{method}.{key}: how checkpoints are opened is a pair's setting "
                    f"(pairs = [{{ ..., {key} = ... }}]), not a method's"
                )
            for key in sorted(set(parameters) & {"alpha", "alphas"}):
                # every sweep of the grid sets its own alpha: a method's alpha = 0.25 changed nothing
                raise MicromergeError(
                    f"method_parameters.{method}.{key}: every merge of the grid takes its alpha from the "
                    "ablation's alphas; remove it (or give the method an ablation of its own alphas)"
                )
            for rule_name, rules in ablation.rule_sets.items():
                if not isinstance(rules, dict):
                    raise MicromergeError(f"rule_sets.{rule_name} must be a table, not {rules!r}")
                refuse_unknown_keys(f"rule set {rule_name!r}", rules, {"include", "exclude", "alpha_rules"})
                label = f"{pair['name']} / {method} / {rule_name}"
                values = {**parameters, **rules}
                check_section(f"{method} / {rule_name}", values, MERGE_SCHEMA)
                if method == GREEDY_SOUP:
                    if rules.get("alpha_rules"):
                        skipped.append(
                            f"{label}: skipped (a soup is a uniform average: alpha rules do not apply)"
                        )
                        continue
                    rule = KeyRules(tuple(rules.get("include") or ()), tuple(rules.get("exclude") or ()))
                    jobs.append(
                        (label, SoupJob(pair["base"], tuple(pair["finetuned"]), rule, pair["access"]))
                    )
                    continue
                taken = get_method(method)
                count = len(pair["finetuned"])
                if count < taken.min_finetuned:
                    why = f"{method} needs at least {taken.min_finetuned} fine-tuned models"
                elif taken.max_finetuned is not None and count > taken.max_finetuned:
                    # WiSE-FT, SLERP: their sweep refused a two-specialist pair, hours into the grid
                    why = f"{method} takes at most {taken.max_finetuned} fine-tuned model; this pair has {count}"
                else:
                    why = ""
                if why:
                    skipped.append(f"{label}: skipped ({why})")
                    continue
                job = job_from_mapping(
                    {
                        "base": pair["base"],
                        "finetuned": pair["finetuned"],
                        "method": method,
                        "alphas": ablation.alphas,
                        "seed": ablation.seed,
                        **(pair["own_data"] if get_method(method).statistics in ("fisher", "gram") else {}),
                        **values,
                    }
                )
                job = replace(job, access=pair["access"])
                jobs.append((label, job))
                merges[(pair["name"], method, rule_name)] = label, job
    return _without_repeats(jobs, merges, skipped)


def _without_repeats(
    jobs: list[tuple[str, MergeJob | SoupJob]],
    merges: dict[tuple[str, str, str], tuple[str, MergeJob]],
    skipped: list[str],
) -> tuple[list[tuple[str, MergeJob | SoupJob]], list[str]]:
    """The grid less each merge that repeats another of it: a sign-electing variant (dare-ties,
    breadcrumbs-ties) or DELLA's linear one on a one-specialist pair is the same merge as the method
    it varies (`same_with_one_finetuned`) with the same parameters and rules, so its sweep would
    spend its hours on the same numbers."""
    repeats: set[str] = set()
    for (pair, method, rule_name), (label, job) in merges.items():
        same = get_method(method).same_with_one_finetuned
        if not same or len(job.finetuned) != 1:
            continue
        other = merges.get((pair, same, rule_name))
        if other is not None and replace(other[1].spec, method=method) == job.spec:
            repeats.add(label)
            skipped.append(
                f"{label}: skipped (with one fine-tuned model {method} is {same}, "
                "which this grid runs with the same parameters)"
            )
        else:  # run, as asked, but its numbers are the other method's
            warnings.warn(
                f"{label}: with one fine-tuned model {method} is the same merge as {same}", stacklevel=2
            )
    return [(label, job) for label, job in jobs if label not in repeats], skipped


def check_grid_against_checkpoints(jobs: list[tuple[str, MergeJob | SoupJob]]) -> dict[str, list[str]]:
    """Plan every merge of the grid on its pair's checkpoints (their keys, shapes and dtypes) before
    any evaluation. The merge plan's checks (a rule set that leaves no key, a specialist that does
    not fit its base) ran only as a sweep began, after every sweep before it: hours into the paper
    grid. Each checkpoint of a pair is opened once for all its merges.

    Returns the select halves each checkpoint (by its spec) learned from, where it learned from any
    (`merging.lineage`), for `refuse_grid_halves`: they need the benchmark's fingerprint."""
    pairs: dict[tuple[str, tuple[str, ...], CheckpointAccess], list[tuple[str, MergeJob | SoupJob]]] = {}
    for label, job in jobs:
        pairs.setdefault((job.base, tuple(job.finetuned), job.access), []).append((label, job))
    halves: dict[str, list[str]] = {}
    for (base, finetuned, access), pair_jobs in pairs.items():
        with ExitStack() as opened:
            base_source = opened.enter_context(access.open(base))
            finetuned_sources = [opened.enter_context(access.open(f)) for f in finetuned]
            for model, source in zip((base, *finetuned), (base_source, *finetuned_sources), strict=True):
                if marks := sources_select_halves([source]):
                    halves[model] = marks
            for label, job in pair_jobs:
                spec = job.spec if isinstance(job, MergeJob) else MergeSpec("linear", rules=job.rules)
                try:
                    plan_merge(spec, base_source, finetuned_sources)
                except MicromergeError as error:
                    raise MicromergeError(f"{label}: {error}") from error
    return halves


def refuse_grid_halves(halves: dict[str, list[str]], fingerprint: Callable[[], str], seed: int) -> None:
    """Stop before any evaluation when a checkpoint of the grid learned from the benchmark's select
    half as another seed splits it (`eval.trained_on.refuse_other_halves`). Each reference
    evaluation checks its own model, so a later pair's was refused only after the evaluations
    before it, and `--dry-run` did not check it at all. `fingerprint` (the benchmark's) is asked
    for only when a checkpoint learned from some select half: the dry run loads the benchmark for
    nothing else."""
    if not halves:
        return
    benchmark = fingerprint()
    for model, marks in halves.items():
        refuse_other_halves(marks, benchmark, seed, model)


def describe_grid(
    ablation: Ablation, jobs: list[tuple[str, MergeJob | SoupJob]], skipped: list[str]
) -> list[str]:
    """What `ablate --dry-run` prints of the grid `plan_grid` made: each run with its alphas, then
    the totals (the skipped combinations are `load_ablation`'s warnings), so a paper-size grid is
    read before it spends its hours."""
    alphas = len(parse_alphas(ablation.alphas))
    lines = [
        f"{label}: {'greedy soup' if isinstance(job, SoupJob) else f'{alphas} alphas'}" for label, job in jobs
    ]
    sweeps = sum(isinstance(job, MergeJob) for _, job in jobs)
    references = len({m for pair in ablation.pairs for m in (pair["base"], *pair["finetuned"])})
    lines.append(
        f"{len(jobs)} runs ({sweeps} sweeps of {alphas} alphas, {len(jobs) - sweeps} soups), "
        f"{len(skipped)} skipped, {references} reference evaluations; results to {ablation.store}, "
        f"report to {ablation.report}"
    )
    return lines


def run_ablation(
    ablation: Ablation,
    cache_dir: Path,
    device: torch.device,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    wait_for_everyone: Callable[[], None] = alone,
) -> Path | None:
    """Run the grid, then write the report; the report's path (None in processes other than the first).

    Under `accelerate launch` the processes share the grid: the reference evaluations are dealt out
    (the first, whose rows check the target, is every process's), then the alphas of every sweep
    and the soups, in turn across the whole grid, so the processes finish together; the first
    writes the report once every process has finished (a process that wrote it earlier reported
    another's alphas as missing, and one waiting long at the barrier would hit its timeout)."""
    jobs = grid_jobs(ablation)
    halves = check_grid_against_checkpoints(jobs)
    settings = _evaluation_settings(ablation, cache_dir, progress, rank, world_size)
    # the reference points, once per pair, shared by every method and rule set
    references = [
        (model, pair["access"]) for pair in ablation.pairs for model in (pair["base"], *pair["finetuned"])
    ]
    prepared = prepare(settings)  # once: on the whole μ-Bench, a second or two per sweep of the grid
    refuse_grid_halves(halves, lambda: prepared.bench.fingerprint, ablation.seed)
    first, first_access = references[0]
    check_target(ablation.target, run_eval(first, settings, device, first_access, prepared), ablation.data)
    for index, (model, access) in enumerate(references[1:], start=1):
        if index % world_size == rank:
            run_eval(model, settings, device, access, prepared)
    dealt = 0  # units of work dealt so far (an alpha; a soup, one per model it weighs): taken in turn
    for label, job in jobs:
        if isinstance(job, SoupJob):
            if dealt % world_size == rank:  # each step of a soup depends on the last: one process chooses
                greedy_soup(job.base, job.finetuned, settings, device, job.rules, label, job.access, prepared)
            dealt += 1 + len(job.finetuned)
            continue
        plan = SweepPlan(
            job.base,
            job.finetuned,
            job.spec,
            job.alphas or (),
            job.access,
            label=label,
            model_data=job.model_data,
            first_process=dealt % world_size,
        )
        run_sweep(plan, settings, device, wait_for_everyone, prepared)
        dealt += len(plan.alphas)
    wait_for_everyone()
    return (
        build_report(ablation.store, ablation.report, ablation.target, run_figures=ablation.run_figures)
        if rank == 0
        else None
    )
