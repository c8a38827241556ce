"""Running evaluations and sweeps: one model, or a merge at every alpha, through the Evaluator
into the results store.

The benchmark and its tasks are prepared once and the model built once; for a sweep every alpha's
weights are written in place into that one model. Each alpha is one unit of work appended to the
store in one write, so a killed sweep resumes where it stopped, and several processes (accelerate
launch) split the alphas between them. The scoring itself is eval/evaluator.py; what a run is asked
to do, eval/settings.py.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import micromerge
from micromerge.core.atomic import write_json_atomic
from micromerge.core.errors import MicromergeError
from micromerge.core.hashing import sha256_file, sha256_json
from micromerge.core.progress import progress_bar
from micromerge.core.provenance import LEARNED_FROM_SELECT, select_half_mark
from micromerge.eval.data import Benchmark, load_benchmark
from micromerge.eval.evaluator import HEADLINE_COARSE, HEADLINE_FINE, POOLED, Evaluator
from micromerge.eval.images import DECODE_IDENTITY
from micromerge.eval.settings import HALVES, EvalSettings, SweepPlan
from micromerge.eval.source_metadata import load_source_table
from micromerge.eval.store import ResultStore, coefficients_file
from micromerge.eval.task_selection import select_tasks
from micromerge.eval.tasks import Task, discover_tasks
from micromerge.eval.trained_on import mark_rows, refuse_other_halves, trained_on_marks, warn_trained_on
from micromerge.eval.zeroshot import effective_precision
from micromerge.merging.execute import StatisticsInput, input_hashes, warn_repeated_inputs
from micromerge.merging.lineage import sources_lineage, sources_select_halves
from micromerge.merging.methods import get_method
from micromerge.merging.models import load_model
from micromerge.merging.resident import ResidentMerge
from micromerge.merging.sources import CheckpointAccess


def _base_row(
    run_id: str, settings: EvalSettings, bench: Benchmark, provenance: dict[str, Any], device: torch.device
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "dataset": {"source": bench.source, "fingerprint": bench.fingerprint},
        "seed": settings.seed,
        "bootstrap": settings.bootstrap,
        "prompts": settings.prompts if settings.protocol == "closed-set" else None,
        "precision": effective_precision(device, settings.precision),
        "sources": (
            {"file": str(settings.sources), "sha256": sha256_file(settings.sources)}
            if settings.sources is not None
            else None
        ),
        "micromerge_version": micromerge.__version__,
        "decode": DECODE_IDENTITY,
        "process": f"{settings.rank}/{settings.world_size}",
        **provenance,
    }


@dataclass(frozen=True)
class Prepared:
    bench: Benchmark
    tasks: list[Task]
    # rows of the sources outside the paper's tables, from every task (not only the selected ones)
    outside_paper_rows: np.ndarray
    every: list[Task]  # every task of the benchmark, selected or not
    # every task as `finetune supervised --task` sees it, under the shipped source table (it takes
    # no --sources): what the task fingerprints of a model's lineage name. Under a --sources table
    # that moves null-dataset rows to another source, a task trained on keeps its shipped rows.
    trainable: list[Task]
    headlines: frozenset[str] = frozenset()  # the headlines the selected tasks complete
    # one reader per results store, shared by the evaluations and sweeps of this preparation: its
    # index of where each run's lines lie is built once (on a paper-size grid's 500 MB store, about
    # a second), not at every sweep's resume check (BENCHMARKS.md, "One reader for a grid")
    readers: dict[Path, ResultStore] = field(default_factory=dict)

    def results(self, store: str | Path) -> ResultStore:
        """The shared reader of `store` (a soup's candidates go to a store of their own)."""
        return self.readers.setdefault(Path(store), ResultStore(store))


def complete_headlines(tasks: list[Task], every: list[Task]) -> frozenset[str]:
    """The headlines whose pool the selected (and scorable) tasks cover: `ubench:coarse` pools every
    coarse task's questions, `ubench:fine` every fine source of the authors' headline. Pooled over a
    selection that lacks one, the row held another number under the paper's name (`--tasks
    modality`: 82.4 % where the coarse headline is 70.3 %), and a later run over every task, resuming
    into the same store, kept it: rows do not depend on which tasks are selected, except these."""
    selected = {task.name for task in tasks}
    pools = {
        HEADLINE_COARSE: [t for t in every if t.level == "coarse" and t.questions],
        HEADLINE_FINE: [
            t
            for t in every
            if t.level == "fine"
            and t.groups.get("fine_headline") == "yes"  # in the paper's tables too (eval.tasks)
            and any(q.key == "classification_1" for q in t.questions)
        ],
    }
    return frozenset(name for name, pool in pools.items() if pool and {t.name for t in pool} <= selected)


def _check_cache_dir(cache_dir: Path) -> None:
    """A read-only --cache-dir fails now, not after minutes of decoding."""
    try:
        (cache_dir / "images").mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache_dir / "images", prefix=".probe."):
            pass
    except OSError as exc:
        raise MicromergeError(
            f"--cache-dir {cache_dir}: cannot write ({exc.strerror or exc}); choose another"
        ) from exc


def prepare(settings: EvalSettings, writes_results: bool = True) -> Prepared:
    """The benchmark and its tasks; checks first that results can be written, where they will be."""
    if writes_results:
        ResultStore(settings.store).check_writable()
    _check_cache_dir(settings.cache_dir)
    bench = load_benchmark(settings.data, cache_dir=settings.cache_dir, progress=settings.progress)
    every = discover_tasks(bench.dataset, load_source_table(settings.sources))
    tasks = select_tasks(every, settings.tasks)
    if settings.protocol == "ubench":
        unscorable = [t.name for t in tasks if not t.questions]
        tasks = [t for t in tasks if t.questions]
    else:
        unscorable = [t.name for t in tasks if len(t.classes) < 2]
        tasks = [t for t in tasks if len(t.classes) >= 2]
    if not tasks:
        raise MicromergeError(
            f"--tasks {settings.tasks}: no task can be scored under --protocol {settings.protocol} "
            f"({', '.join(unscorable) or 'none selected'}: no caption options, or a single class)"
        )
    named = [t for t in unscorable if t in settings.tasks.split(",")]  # asked for by name: say so
    if named:
        warnings.warn(
            f"not scored under --protocol {settings.protocol}: {', '.join(named)} "
            "(no caption options, or a single class)",
            stacklevel=2,
        )
    outside = sorted({r for t in every if t.groups.get("paper") == "no" for r in t.image_rows})
    trainable = every if settings.sources is None else discover_tasks(bench.dataset)
    return Prepared(
        bench, tasks, np.array(outside, dtype=np.int64), every, trainable, complete_headlines(tasks, every)
    )


def _completion_identity(alpha: float | None, task: str, protocol: str) -> tuple:
    """The row that marks a task done at `alpha`: its accuracy on all of its images (pooled over its
    questions under the ubench protocol), the one split every evaluated task has."""
    return (alpha, task, POOLED if protocol == "ubench" else None, "all", "accuracy")


def _complete(done: set, alpha: float | None, tasks: list[Task], protocol: str) -> bool:
    return all(_completion_identity(alpha, t.name, protocol) in done for t in tasks)


def _unstored(rows: list[dict[str, Any]], done: set, protocol: str) -> list[dict[str, Any]]:
    """The rows not in the store yet, completion rows last: a kill tears an append after some
    whole lines (the store drops the torn one), so a point whose completion rows are all stored
    has every other row stored too."""
    fresh = [r for r in rows if ResultStore.identity(r) not in done]
    return sorted(
        fresh, key=lambda r: ResultStore.identity(r) == _completion_identity(r["alpha"], r["task"], protocol)
    )


def _run_id(models: dict[str, Any], settings: EvalSettings, bench: Benchmark, device: torch.device) -> str:
    """A run's id: what was evaluated (`models`: the checkpoints' sha256, and for a sweep its method
    and parameters) and everything else that changes its numbers, so that resuming adds rows only to
    the run that computed them. The decode identity is in it: a resume under another Pillow is
    another run, not mixed in. So are, since 0.1.2, a bf16 image forward (a sweep begun on a CPU and
    resumed on a GPU mixed fp32 and bf16 rows) and a `--sources` override (it names and groups the
    tasks): each only where it is present, so ids of the fp32, shipped-table runs before are kept
    and their stores resume. Since 0.1.5 a ubench run's intervals resample images, not questions
    (a pooled row's and a headline's were too narrow): its id says so, so a run begun before is not
    resumed with intervals of the other kind at its later alphas."""
    identity = {
        **models,
        "data": bench.fingerprint,
        "prompts": settings.prompts,
        "protocol": settings.protocol,
        "bootstrap": settings.bootstrap,
        "seed": settings.seed,
        "halves": HALVES,
        "decode": DECODE_IDENTITY,
    }
    precision = effective_precision(device, settings.precision)
    if precision != "fp32":
        identity["precision"] = precision
    if settings.sources is not None:
        identity["sources"] = sha256_file(settings.sources)
    if settings.protocol == "ubench" and settings.bootstrap > 0:
        identity["intervals"] = "images"  # since 0.1.5; before, pooled rows resampled questions
    return sha256_json(identity)[:16]


def run_eval(
    model_spec: str,
    settings: EvalSettings,
    device: torch.device,
    access: CheckpointAccess = CheckpointAccess(),
    prepared: Prepared | None = None,
) -> list[dict[str, Any]]:
    """Evaluate one checkpoint; rows go to the store (alpha is null). Re-running skips finished work.

    `prepared`: `prepare(settings)` done once by a caller that runs many evaluations and sweeps on
    the same data, tasks and protocol (an ablation), instead of once per call."""
    prepared = prepare(settings) if prepared is None else prepared
    bench, tasks = prepared.bench, prepared.tasks
    with access.open(model_spec) as source:
        halves = sources_select_halves([source])
        refuse_other_halves(halves, bench.fingerprint, settings.seed, model_spec)
        learned = select_half_mark(bench.fingerprint, settings.seed) in halves
        hashes = input_hashes([source])
        run_id = _run_id({"model": sorted(hashes.values())}, settings, bench, device)
        store = prepared.results(settings.store)
        done = store.done(run_id)
        if _complete(done, None, tasks, settings.protocol):
            return _of_selection(store.rows(run_id), prepared)
        model, config = load_model(source)
        trained, marks = trained_on_marks(
            sources_lineage([source]), bench.fingerprint, prepared.trainable, tasks
        )
    warn_trained_on(model_spec, trained, marks)
    model.to(device)
    evaluator = Evaluator(
        bench, tasks, config, settings, device, prepared.outside_paper_rows, prepared.headlines
    )
    provenance = {
        "method": "none",
        "model": {
            "base": model_spec,
            "base_sha256": list(hashes.values()),
            "finetuned": [],
            "finetuned_sha256": [],
        },
        "parameters": {},
    }
    base_row = _base_row(run_id, settings, bench, provenance, device)
    rows = [{**base_row, "alpha": None, **r} for r in mark_rows(evaluator.evaluate(model), marks)]
    if learned:  # its `all` and `select` rows hold images it learned from; `report` is held out
        rows = [{**r, LEARNED_FROM_SELECT: True} if r["split"] != "report" else r for r in rows]
    store.append(_unstored(rows, done, settings.protocol))
    return rows


def _of_selection(rows: list[dict[str, Any]], prepared: Prepared) -> list[dict[str, Any]]:
    """The rows of this call's tasks and the headlines they complete. A run is keyed on its models,
    data and method, not on `--tasks`, so selections evaluated into one store add up to one run (a
    second selection resumes the first); what an evaluation or sweep returns, and what a soup
    chooses and reports on, is its own selection's: a `--tasks coarse` soup into a store that held
    an all-task soup chose and reported on every task's rows."""
    wanted = {t.name for t in prepared.tasks} | prepared.headlines
    return [row for row in rows if row["task"] in wanted]


def process_share(
    alphas: tuple[float, ...], rank: int, world_size: int, first_process: int = 0
) -> tuple[float, ...]:
    """The alphas process `rank` of `world_size` takes: the list dealt in turn, its first alpha to
    `first_process`. Every process deals the same whole list, so the shares cover it once."""
    return alphas[(rank - first_process) % world_size :: world_size]


def _statistics_for(
    plan: SweepPlan, settings: EvalSettings, device: torch.device, wait_for_everyone: Callable[[], None]
) -> StatisticsInput | None:
    """A data-aware method's per-model statistics, on this sweep's own data (its select half).

    Under a launch the first process computes them (or reads them from the cache), and the others
    read what it cached once it has: each process computed its own, the same minutes of work on
    every GPU, and learned coefficients that differed in a last bit between GPUs (kernels that are
    not deterministic) gave each process's rows another run id, one sweep split into several runs
    of a few alphas each. The cache (`--cache-dir`) must be one folder for every process."""
    kind = get_method(plan.spec.method).statistics
    if kind is None:
        return None
    from micromerge.eval.statistics import statistics_input

    models = (plan.base, *plan.finetuned)
    if settings.rank != 0:
        wait_for_everyone()
    try:
        statistics = statistics_input(
            kind, models, plan.spec.params, settings, device, plan.access, plan.model_data
        )
    except MicromergeError:
        # the others, at the barrier, each printed a traceback when this process ended (the
        # process group's connection closed); released, they find no cache and are stopped by
        # the launcher, or stop on the same error
        if settings.rank == 0:
            wait_for_everyone()
        raise
    if settings.rank == 0:
        wait_for_everyone()
    return statistics


def alone() -> None:
    """The barrier of a single process: nothing to wait for."""


def run_sweep(
    plan: SweepPlan,
    settings: EvalSettings,
    device: torch.device,
    wait_for_everyone: Callable[[], None] = alone,
    prepared: Prepared | None = None,
) -> list[dict[str, Any]]:
    """Every alpha on every task; resumable; the processes take turns at the alphas, from
    `plan.first_process` on (`wait_for_everyone`: the launch's barrier, as accelerate's
    PartialState gives it; every process calls run_sweep with the same plan). `prepared`: as in
    `run_eval`."""
    prepared = prepare(settings) if prepared is None else prepared
    bench, tasks = prepared.bench, prepared.tasks
    store = prepared.results(settings.store)
    base = plan.access.open(plan.base)
    finetuned = [plan.access.open(f) for f in plan.finetuned]
    try:
        hashes = input_hashes([base, *finetuned])
        warn_repeated_inputs([base, *finetuned], hashes)
        refuse_other_halves(
            sources_select_halves([base, *finetuned]),
            bench.fingerprint,
            settings.seed,
            f"a sweep of {', '.join([plan.base, *plan.finetuned])}",
        )
        base_hashes = [hashes[str(f)] for f in base.files]
        ft_hashes = [hashes[str(f)] for s in finetuned for f in s.files]
        parameters = plan.spec.describe()
        parameters.pop("alpha", None)
        statistics = _statistics_for(plan, settings, device, wait_for_everyone)
        if statistics is not None:
            parameters["statistics"] = statistics.described
            if statistics.attachment is not None:
                write_json_atomic(
                    coefficients_file(settings.store, statistics.described[0]), statistics.attachment
                )
        run_id = _run_id(
            {"base": base_hashes, "ft": ft_hashes, "method": plan.spec.method, "parameters": parameters},
            settings,
            bench,
            device,
        )
        done = store.done(run_id)
        # dealt from the whole list, then what is finished dropped: dealt from what was left, a
        # process reading the store after another had finished an alpha took another share, and
        # an alpha fell between them
        share = process_share(plan.alphas, settings.rank, settings.world_size, plan.first_process)
        mine = [a for a in share if not _complete(done, a, tasks, settings.protocol)]
        if mine:
            lineage = sources_lineage([base, *finetuned])
            trained, marks = trained_on_marks(lineage, bench.fingerprint, prepared.trainable, tasks)
            warn_trained_on(f"a model of {plan.label or plan.spec.method}", trained, marks)
            base_marks = (
                trained_on_marks(sources_lineage([base]), bench.fingerprint, prepared.trainable, tasks)[1]
                if marks
                else {}
            )
            model, config = load_model(base)
            merger = ResidentMerge(
                model, plan.spec, base, finetuned, device, statistics.values if statistics else None
            )
            evaluator = Evaluator(
                bench, tasks, config, settings, device, prepared.outside_paper_rows, prepared.headlines
            )
            provenance = {
                "method": plan.spec.method,
                "parameters": parameters,
                "model": {
                    "base": plan.base,
                    "base_sha256": base_hashes,
                    "finetuned": list(plan.finetuned),
                    "finetuned_sha256": ft_hashes,
                    "finetuned_files": [str(Path(f).resolve()) for s in finetuned for f in s.files],
                },
                "label": plan.label,
            }
            base_row = _base_row(run_id, settings, bench, provenance, device)
            for alpha in progress_bar(
                mine, desc=f"sweep {plan.spec.method}", unit="alpha", disable=not settings.progress
            ):
                merger.apply(alpha)
                own = base_marks if marks and merger.holds_the_base() else marks
                rows = [
                    {**base_row, "alpha": alpha, **r}
                    for r in mark_rows(evaluator.evaluate(merger.model), own)
                ]
                store.append(_unstored(rows, done, settings.protocol))
    finally:
        base.close()
        for source in finetuned:
            source.close()
    return _of_selection(store.rows(run_id), prepared)
