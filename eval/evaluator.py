"""One resident model scored on the selected tasks: images decoded once into the cache, prompts
tokenized once, each image against its own caption options (the μ-Bench authors' protocol) or
against every class of its task (closed set); rows with bootstrap intervals, per caption key, per
task pooled, per metadata group and the paper's two headlines, on all images and on each half."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from micromerge.core.errors import MicromergeError
from micromerge.core.hashing import sha256_json
from micromerge.eval.data import Benchmark
from micromerge.eval.images import ImageCache, PixelFeed, build_image_cache
from micromerge.eval.metrics import classification_metrics, correctness_metrics
from micromerge.eval.settings import HALVES, EvalSettings
from micromerge.eval.tasks import Task
from micromerge.eval.zeroshot import (
    class_embeddings,
    image_embeddings,
    option_correct,
    predict,
    text_embeddings,
)
from micromerge.merging.models import image_size, normalisation, tokenizer_for

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
