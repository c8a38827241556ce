"""The evaluation and sweep engine.

Images are decoded once into the cache, prompts tokenized once, the model built once; for a
sweep every alpha's weights are written in place into that one model. Each alpha is one unit
of work appended to the store in one write, so a killed sweep resumes where it stopped, and
several processes (accelerate launch) split the alphas between them.
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
from micromerge.eval.data import Benchmark, load_benchmark
from micromerge.eval.images import DECODE_IDENTITY, ImageCache, PixelFeed, build_image_cache
from micromerge.eval.metrics import classification_metrics, correctness_metrics
from micromerge.eval.setting_values import PRECISIONS, PROMPTS, PROTOCOLS
from micromerge.eval.source_metadata import load_source_table
from micromerge.eval.store import ResultStore, coefficients_file
from micromerge.eval.task_selection import select_tasks
from micromerge.eval.tasks import Task, discover_tasks
from micromerge.eval.trained_on import mark_rows, refuse_other_halves, trained_on_marks, warn_trained_on
from micromerge.eval.zeroshot import (
    class_embeddings,
    effective_precision,
    image_embeddings,
    option_correct,
    predict,
    text_embeddings,
)
from micromerge.merging.execute import StatisticsInput, input_hashes, warn_repeated_inputs
from micromerge.merging.lineage import sources_lineage, sources_select_halves
from micromerge.merging.methods import get_method
from micromerge.merging.models import image_size, load_model, normalisation, tokenizer_for
from micromerge.merging.plan import MergeSpec
from micromerge.merging.resident import ResidentMerge
from micromerge.merging.sources import CheckpointAccess

HALVES = "per-image"
"""How the benchmark is split into select and report halves; part of every run id, so results of
the earlier per-task split are never mixed with these."""
MAX_BOOTSTRAP = 100_000


def check_bootstrap(resamples: int) -> None:
    """The resample count every evaluation takes; checked where a command starts (the demo's
    sweeps come after minutes of training)."""
    if not 0 <= resamples <= MAX_BOOTSTRAP:
        raise MicromergeError(f"--bootstrap {resamples}: must be in [0, {MAX_BOOTSTRAP:,}] (0: no intervals)")


def select_half(settings: EvalSettings) -> dict[str, Any]:
    """Which images statistics, learned coefficients and a soup's choice draw from: the select half
    of the halves --seed draws (`Evaluator`). Part of their cache key and provenance: without the seed, a
    sweep under --seed 3 reused a table `merge --seed 3` had learned on seed 0's select half, half
    of whose images are in seed 3's report half (`eval.trained_on.refuse_other_halves`)."""
    return {"split": "select", "halves_seed": settings.seed}


@dataclass(frozen=True)
class EvalSettings:
    data: str
    store: Path
    cache_dir: Path
    tasks: str = "all"
    batch_size: int = 256
    precision: str = "bf16"
    bootstrap: int = 1000
    seed: int = 0
    prompts: str = "names"
    protocol: str = "ubench"
    sources: Path | None = None  # overrides of the source metadata table
    progress: bool = True
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise MicromergeError(f"--batch-size {self.batch_size}: must be at least 1")
        check_bootstrap(self.bootstrap)
        if self.seed < 0:
            raise MicromergeError(f"--seed {self.seed}: must be non-negative")
        if self.protocol not in PROTOCOLS:
            raise MicromergeError(f"--protocol {self.protocol!r}: expected one of {', '.join(PROTOCOLS)}")
        if self.precision not in PRECISIONS:
            raise MicromergeError(f"--precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.prompts not in PROMPTS:
            raise MicromergeError(f"--prompts {self.prompts!r}: expected one of {', '.join(PROMPTS)}")
        if self.protocol == "ubench" and self.prompts != "names":
            # it changed nothing but the run id: the same numbers stored again as another run
            raise MicromergeError(
                f"--prompts {self.prompts}: applies to --protocol closed-set only (the ubench protocol "
                "scores each image against its own caption options, not prompts)"
            )


@dataclass(frozen=True)
class SweepPlan:
    base: str
    finetuned: tuple[str, ...]
    spec: MergeSpec
    alphas: tuple[float, ...]
    access: CheckpointAccess = CheckpointAccess()
    label: str | None = (
        None  # a name for reports (ablations name pair/method/rule set); not part of the run id
    )
    model_data: tuple[str | None, ...] = ()  # Fisher/RegMean: per model (base first), a corpus of its own
    # the process the first alpha is dealt to: a grid of sweeps deals each on from where the last
    # left off, so its processes finish together (from process 0 each time, process 0 took the
    # remainder of every sweep, and the others waited on it at the grid's end)
    first_process: int = 0


HEADLINE_COARSE, HEADLINE_FINE = "ubench:coarse", "ubench:fine"
POOLED = "all"  # caption_key of a task's row pooled over its caption keys


@dataclass(frozen=True)
class _OptionPlan:
    """One task's caption key, ready to score: its valid rows and, on the device, each row's image
    position, options (ids into the evaluator's distinct-text table, -1 = padding) and answer."""

    rows: np.ndarray
    labels: np.ndarray
    n_options: np.ndarray
    positions: torch.Tensor
    options: torch.Tensor
    answers: torch.Tensor


@dataclass
class _Outcomes:
    """Right/wrong per scored question of one caption key, with the image row and class of each."""

    rows: np.ndarray
    labels: np.ndarray
    correct: np.ndarray
    n_options: np.ndarray  # options the question offered (its chance of a right guess is 1/n)


class Evaluator:
    """Scores one resident model on the selected tasks; everything model-independent is cached."""

    def __init__(
        self,
        bench: Benchmark,
        tasks: list[Task],
        model_config: dict[str, Any],
        settings: EvalSettings,
        device: torch.device,
        outside_paper_rows: np.ndarray | None = None,
        headlines: frozenset[str] = frozenset(),
    ):
        self.bench, self.tasks, self.settings, self.device = bench, tasks, settings, device
        self.headlines = headlines  # the headline rows to write: those whose every task is scored
        self.outside_paper_rows = np.empty(0, np.int64) if outside_paper_rows is None else outside_paper_rows
        size = image_size(model_config)
        self.cache: ImageCache = build_image_cache(
            bench.dataset, bench.fingerprint, size, settings.cache_dir, settings.progress
        )
        self._refuse_unreadable_tasks()
        self.tokenizer = tokenizer_for(model_config)
        self.token_cache: dict = {}
        order = np.random.default_rng(
            int(sha256_json({"seed": settings.seed, "halves": HALVES})[:8], 16)
        ).permutation(len(bench.dataset))
        self.select_half = np.zeros(len(bench.dataset), dtype=bool)
        self.select_half[order[: len(order) // 2]] = True
        needed = sorted({r for t in tasks for r in t.image_rows})
        self.rows = np.array([r for r in needed if self.cache.valid[r]], dtype=np.int64)
        self.position = np.full(len(bench.dataset), -1, dtype=np.int64)
        self.position[self.rows] = np.arange(len(self.rows))
        self.pixels = PixelFeed(
            self.cache,
            self.rows,
            *normalisation(model_config),
            device,
        )
        if settings.protocol == "ubench":
            self._index_options()

    def _refuse_unreadable_tasks(self) -> None:
        """A task none of whose images decodes got no row at all: it vanished from the printed
        table and the report, a headline said to pool every task of its level pooled without it,
        and a sweep never found its alphas finished (its completion row never came), so each
        resume evaluated every alpha again. Unreadable images are skipped and counted; a task of
        nothing but unreadable ones is a broken copy."""

        def scored(task: Task) -> np.ndarray:  # the rows this protocol asks about
            if self.settings.protocol == "ubench":
                return np.unique(np.concatenate([q.rows for q in task.questions]).astype(np.int64))
            return np.asarray(task.rows, dtype=np.int64)

        asked = {task.name: scored(task) for task in self.tasks}
        empty = [task for task in self.tasks if not self.cache.valid[asked[task.name]].any()]
        if empty:
            first = empty[0]
            raise MicromergeError(
                f"--data {self.bench.source}: none of the {len(asked[first.name])} images of task {first.name} "
                + (f"(and of {len(empty) - 1} more task(s)) " if len(empty) > 1 else "")
                + "can be read; repair the copy (`micromerge data verify` checks one of the Hub's folder), "
                "or leave the task out with --tasks"
            )

    def _index_options(self) -> None:
        """One table of every distinct option text over all tasks and keys (embedded once per
        model), and per question its valid rows, image positions and options as global text ids."""
        text_ids: dict[str, int] = {}
        self.option_plans: dict[tuple[str, str], _OptionPlan] = {}
        for task in self.tasks:
            for question in task.questions:
                local_to_global = np.array([text_ids.setdefault(t, len(text_ids)) for t in question.texts])
                keep = self.cache.valid[question.rows]
                options = np.where(question.options >= 0, local_to_global[question.options.clip(min=0)], -1)[
                    keep
                ]
                self.option_plans[(task.name, question.key)] = _OptionPlan(
                    rows=question.rows[keep],
                    labels=question.labels[keep],
                    n_options=(options >= 0).sum(axis=1),
                    positions=torch.from_numpy(self.position[question.rows[keep]]).to(self.device),
                    options=torch.from_numpy(options).to(self.device),
                    answers=torch.from_numpy(question.answers[keep]).to(self.device),
                )
        self.texts = list(text_ids)

    def _splits(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """All of a task's images, and its images in each half of the benchmark: 'select' (to choose
        alpha, and what data-aware merges learn from) and 'report' (to report on).

        The halves split the *images*, once for the whole benchmark (a seeded permutation of its
        rows), not each task separately: an image belongs to one half for every task that asks
        about it, so nothing chosen or learned on the select half has seen a report-half image,
        even through another task's question. Each task's halves are about, not exactly, half.
        A half that holds none of the task's images is left out: it has no accuracy to report (a
        row of NaN would be skipped by every mean over tasks, silently), as the headline rows do."""
        in_select = self.select_half[rows]
        halves = {"all": rows, "select": rows[in_select], "report": rows[~in_select]}
        return {split: members for split, members in halves.items() if len(members)}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        model.eval()
        images = image_embeddings(model, self.pixels, self.settings.batch_size, self.settings.precision)
        if self.settings.protocol == "ubench":
            return self._evaluate_options(model, images)
        return self._evaluate_closed_set(model, images)

    def _row(self, task: Task, split: str, metric: str, values: dict, n: int, **extra: Any) -> dict[str, Any]:
        return {
            "task": task.name,
            "level": task.level,
            "groups": task.groups,
            "protocol": self.settings.protocol,
            "split": split,
            "metric": metric,
            **values,
            "n_images": int(n),
            "n_classes": len(task.classes),
            **extra,
        }

    def _metric_rows(
        self, task: Task, split: str, metrics: dict[str, dict], n: int, **extra: Any
    ) -> list[dict[str, Any]]:
        return [self._row(task, split, metric, values, n, **extra) for metric, values in metrics.items()]

    def _evaluate_closed_set(self, model: torch.nn.Module, images: torch.Tensor) -> list[dict[str, Any]]:
        results = []
        for task in self.tasks:
            keep = [(r, y) for r, y in zip(task.rows, task.labels, strict=True) if self.cache.valid[r]]
            if not keep:
                continue
            index = torch.from_numpy(self.position[[r for r, _ in keep]]).to(images.device)
            labels = np.array([y for _, y in keep])
            texts = class_embeddings(
                model, self.tokenizer, task, self.device, self.settings.prompts, self.token_cache
            )
            predictions = predict(images[index], texts)
            kept_rows = np.array([r for r, _ in keep])
            for split, members in self._splits(kept_rows).items():
                chosen = np.isin(kept_rows, members)
                metrics = classification_metrics(
                    labels[chosen],
                    predictions[chosen],
                    len(task.classes),
                    self.settings.bootstrap,
                    self.settings.seed,
                )
                results += self._metric_rows(
                    task,
                    split,
                    metrics,
                    chosen.sum(),
                    caption_key=None,
                    n_corrupt=len(task.rows) - len(keep),
                    chance=1 / len(task.classes),
                )
        return results

    def _option_outcomes(
        self, model: torch.nn.Module, images: torch.Tensor
    ) -> dict[tuple[str, str], _Outcomes]:
        text_emb = text_embeddings(model, self.tokenizer, self.texts, self.device, self.token_cache)
        outcomes: dict[tuple[str, str], _Outcomes] = {}
        for name, plan in self.option_plans.items():
            correct = option_correct(images[plan.positions], text_emb, plan.options, plan.answers)
            outcomes[name] = _Outcomes(plan.rows, plan.labels, correct, plan.n_options)
        return outcomes

    @torch.no_grad()
    def task_correctness(
        self, model: torch.nn.Module, split: str = "report"
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(right/wrong, image row) of every question each task asks about one half's images (μ-Bench
        protocol), in an order fixed by the benchmark: two models' arrays pair question by question,
        and the rows let a bootstrap resample images with all their questions."""
        if self.settings.protocol != "ubench":
            raise MicromergeError("paired outcomes are defined for --protocol ubench only")
        model.eval()
        images = image_embeddings(model, self.pixels, self.settings.batch_size, self.settings.precision)
        outcomes = self._option_outcomes(model, images)
        paired = {}
        for task in self.tasks:
            parts = [outcomes[(task.name, q.key)] for q in task.questions]
            pooled = _concat(parts)
            members = self._splits(np.unique(pooled.rows)).get(split)  # None: no image in this half
            if members is not None:
                half = self._subset(pooled, members)
                paired[task.name] = (half.correct, half.rows)
        return paired

    def _evaluate_options(self, model: torch.nn.Module, images: torch.Tensor) -> list[dict[str, Any]]:
        outcomes = self._option_outcomes(model, images)
        results = []
        headline: dict[str, dict[str, list[_Outcomes]]] = {HEADLINE_COARSE: {}, HEADLINE_FINE: {}}
        for task in self.tasks:
            mine = {q.key: outcomes[(task.name, q.key)] for q in task.questions}
            if not mine:
                continue
            image_rows = np.unique(np.concatenate([o.rows for o in mine.values()]))
            n_corrupt = len(task.image_rows) - len(image_rows)
            for split, members in self._splits(image_rows).items():
                parts = {key: self._subset(o, members) for key, o in mine.items()}
                parts[POOLED] = _concat(list(parts.values()))
                for key, part in parts.items():
                    if not len(part.rows):  # this question is asked of no image in this half
                        continue
                    metrics = correctness_metrics(
                        part.labels,
                        part.correct,
                        len(task.classes),
                        self.settings.bootstrap,
                        self.settings.seed,
                        images=part.rows,
                    )
                    results += self._metric_rows(
                        task,
                        split,
                        metrics,
                        len(np.unique(part.rows)),
                        caption_key=key,
                        n_questions=len(part.rows),
                        n_corrupt=n_corrupt,
                        chance=_chance(part),
                    )
                if task.level == "coarse":
                    headline[HEADLINE_COARSE].setdefault(split, []).extend(
                        self._paper_rows(parts[k]) for k in mine
                    )
                # fine_headline is "yes" only for a source in the paper's tables (eval.tasks)
                elif task.groups.get("fine_headline") == "yes" and "classification_1" in parts:
                    headline[HEADLINE_FINE].setdefault(split, []).append(parts["classification_1"])
        for name, by_split in headline.items():
            if name not in self.headlines:
                continue
            for split, pooled_parts in by_split.items():
                pooled = _concat(pooled_parts)
                if not len(pooled.rows):
                    continue
                values = correctness_metrics(
                    np.full(len(pooled.rows), -1),
                    pooled.correct,
                    0,
                    self.settings.bootstrap,
                    self.settings.seed,
                    images=pooled.rows,
                )["accuracy"]
                level_task = Task(name, "headline", (), (), (), (), (), groups={"level": "headline"})
                results.append(
                    self._row(
                        level_task,
                        split,
                        "accuracy",
                        values,
                        len(np.unique(pooled.rows)),
                        caption_key="coarse keys pooled" if name == HEADLINE_COARSE else "classification_1",
                        n_questions=len(pooled.rows),
                        n_corrupt=0,
                        chance=_chance(pooled),
                    )
                )
        return results

    def _paper_rows(self, part: _Outcomes) -> _Outcomes:
        """A coarse question's outcomes without the sources outside the paper's tables."""
        return _take(part, ~np.isin(part.rows, self.outside_paper_rows))

    @staticmethod
    def _subset(outcomes: _Outcomes, members: np.ndarray) -> _Outcomes:
        return _take(outcomes, np.isin(outcomes.rows, members))


_OUTCOME_FIELDS = ("rows", "labels", "correct", "n_options")


def _take(outcomes: _Outcomes, mask: np.ndarray) -> _Outcomes:
    return _Outcomes(*(getattr(outcomes, f)[mask] for f in _OUTCOME_FIELDS))


def _concat(parts: list[_Outcomes]) -> _Outcomes:
    if not parts:
        return _Outcomes(*(np.empty(0, np.int64) for _ in _OUTCOME_FIELDS))
    return _Outcomes(*(np.concatenate([getattr(p, f) for p in parts]) for f in _OUTCOME_FIELDS))


def _chance(outcomes: _Outcomes) -> float:
    """Expected accuracy of a uniform guess among each question's own options."""
    return float(np.mean(1.0 / outcomes.n_options)) if len(outcomes.n_options) else float("nan")


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
        refuse_other_halves(sources_select_halves([source]), bench.fingerprint, settings.seed, model_spec)
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
    statistics = statistics_input(
        kind, models, plan.spec.params, settings, device, plan.access, plan.model_data
    )
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
