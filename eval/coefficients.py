"""Learned merge coefficients: AdaMerging and the supervised per-block α, both on the select half only.

Both learn lambda[group, task] in theta = theta_0 + sum_i lambda[g(key), i] tau_i[key] (tau_i = the
i-th specialist minus the base), with the base and the task vectors held once in memory and the
merge written functionally (torch.func.functional_call), so gradients reach the coefficients and
no model is rebuilt per step.

  adamerging (Yang et al., ICLR 2024): minimise the entropy of each select-half question's
      distribution over its own options; no label is read. FusionBench's CLIP defaults: Adam,
      learning rate 1e-3, every coefficient starting at 0.3, no clamping.
  supervised: the honest counterpart that does read labels: maximise select-half accuracy, by
      gradient on the zero-shot cross-entropy over each question's options, or (`search="grid"`)
      by coordinate search over alpha in {0, 0.1, ..., 1}, two passes, a tie keeping the current value.

Groups (`granularity`): "task" (one coefficient per specialist), "block" (each residual block of
either tower, plus each tower's embeddings and head), "layer" (every parameter tensor: AdaMerging's
layer-wise). The table, the loss history and what data they came from are cached under
`<cache_dir>/statistics/`, written beside a merged checkpoint (`<out>.coefficients.json`) and
beside a sweep's store (`<store>.coefficients/`), where the report plots them per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.func import functional_call

import micromerge
from micromerge.core.atomic import write_json_atomic
from micromerge.core.errors import MicromergeError
from micromerge.core.hashing import sha256_json
from micromerge.core.json_text import parse_json
from micromerge.core.progress import progress_bar
from micromerge.eval.engine import Prepared, prepare
from micromerge.eval.evaluator import Evaluator
from micromerge.eval.images import DECODE_IDENTITY
from micromerge.eval.questions import Questions, option_log_probs, select_questions
from micromerge.eval.settings import EvalSettings, select_half
from micromerge.eval.statistics import question_digest, question_scope
from micromerge.merging.execute import StatisticsInput, input_hashes
from micromerge.merging.methods import GRANULARITIES, SEARCHES, MethodParams
from micromerge.merging.methods.learned import ADAMERGING, SUPERVISED, CoefficientTable, coefficient_group
from micromerge.merging.models import load_model
from micromerge.merging.sources import CheckpointAccess
from micromerge.merging.torch_sources import load_all

if TYPE_CHECKING:
    from micromerge.merging.models import ClipModel

LEARNED = ("adamerging", "supervised")
GRID = tuple(i / 10 for i in range(11))
GRID_PASSES = 2
BATCH = 64
"""Questions per gradient step, drawn with the seed from the `samples` select-half questions."""


@dataclass(frozen=True)
class LearningRequest:
    kind: str
    granularity: str
    search: str = "gradient"
    samples: int = 256
    seed: int = 0
    steps: int = 200
    learning_rate: float = 1e-3
    init: float = 0.3

    def __post_init__(self) -> None:
        if self.kind not in LEARNED:
            raise MicromergeError(f"learned coefficients {self.kind!r}: expected one of {list(LEARNED)}")
        if self.granularity not in GRANULARITIES:
            raise MicromergeError(f"--granularity {self.granularity!r}: choose one of {list(GRANULARITIES)}")
        if self.search not in SEARCHES or (self.kind == "adamerging" and self.search != "gradient"):
            raise MicromergeError(
                f"--search {self.search!r}: AdaMerging learns by gradient; the supervised α takes "
                f"one of {list(SEARCHES)}"
            )

    @staticmethod
    def from_params(kind: str, params: MethodParams) -> LearningRequest:
        return LearningRequest(
            kind,
            params.granularity,
            params.search,
            params.samples,
            params.seed,
            params.steps,
            params.learning_rate,
            params.init,
        )

    def describe(self) -> dict[str, Any]:
        if self.kind == "adamerging":
            objective = "mean entropy of each question's distribution over its own options (no labels)"
        elif self.search == "gradient":
            objective = (
                "mean cross-entropy of each question's answer among its own options (select-half labels)"
            )
        else:
            objective = "select-half accuracy, coordinate search over alpha in {0, 0.1, ..., 1}, two passes"
        described = {
            "kind": self.kind,
            "objective": objective,
            "granularity": self.granularity,
            "search": self.search,
            "samples": self.samples,
            "seed": self.seed,
            "init": self.init,
            "temperature": "the base model's logit scale while learning",
        }
        if self.search == "gradient":
            described.update(
                steps=self.steps, learning_rate=self.learning_rate, batch=BATCH, optimizer="adam"
            )
        return described


class _Scorer(torch.nn.Module):
    """The CLIP as a submodule, so functional_call swaps its parameters for the merged ones.

    Scores are taken at the base model's temperature: otherwise entropy falls to zero by raising
    the merged logit scale alone, which changes no prediction (accuracy and cross-entropy's
    argmax do not depend on it either)."""

    temperature: torch.Tensor  # a buffer: moves with the module, never trained

    def __init__(self, model: ClipModel, evaluator: Evaluator):
        super().__init__()
        self.model = model
        self.evaluator = evaluator
        self.register_buffer("temperature", model.logit_scale.detach().clone(), persistent=False)

    def forward(self, questions: Questions) -> torch.Tensor:
        return option_log_probs(self.model, self.evaluator, questions, 0, len(questions), self.temperature)


class FunctionalMerge:
    """theta(lambda) for every learned key, from the base and task vectors held once."""

    def __init__(self, model: torch.nn.Module, finetuned: list[dict[str, torch.Tensor]], granularity: str):
        self.base = {k: p.detach() for k, p in model.named_parameters()}
        missing = [k for k in self.base if any(k not in state for state in finetuned)]
        if missing:
            raise MicromergeError(
                f"a fine-tuned checkpoint has no tensor {missing[0]!r}: not the base's architecture"
            )
        self.vectors = [{k: state[k].to(v) - v for k, v in self.base.items()} for state in finetuned]
        names: dict[str, int] = {}
        self.key_groups = {
            k: names.setdefault(coefficient_group(k, granularity), len(names)) for k in self.base
        }
        self.groups = tuple(names)

    def __call__(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        merged = {}
        for key, base in self.base.items():
            row = coefficients[self.key_groups[key]]
            merged[f"model.{key}"] = base + sum(row[i] * tau[key] for i, tau in enumerate(self.vectors))
        return merged


def _entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy over questions; padding (-inf) contributes 0 and no NaN gradient."""
    finite = log_probs.masked_fill(~torch.isfinite(log_probs), 0.0)
    return -(log_probs.exp() * finite).sum(dim=1).mean()


def _cross_entropy(log_probs: torch.Tensor, questions: Questions) -> torch.Tensor:
    answers = torch.from_numpy(questions.answers).to(log_probs.device)
    return -log_probs.gather(1, answers[:, None]).mean()


def _loss(kind: str, log_probs: torch.Tensor, questions: Questions) -> torch.Tensor:
    return _entropy(log_probs) if kind == "adamerging" else _cross_entropy(log_probs, questions)


def learn_by_gradient(
    request: LearningRequest, scorer: _Scorer, merge: FunctionalMerge, questions: Questions, progress: bool
) -> tuple[torch.Tensor, list[float]]:
    device = next(iter(merge.base.values())).device
    coefficients = torch.full(
        (len(merge.groups), len(merge.vectors)), request.init, device=device, requires_grad=True
    )
    optimizer = torch.optim.Adam([coefficients], lr=request.learning_rate)
    rng = np.random.default_rng(request.seed)
    history = []
    for _ in progress_bar(
        range(request.steps), desc=f"learn {request.kind}", unit="step", disable=not progress
    ):
        batch = questions.take(np.sort(rng.choice(len(questions), min(BATCH, len(questions)), replace=False)))
        loss = _loss(
            request.kind, functional_call(scorer, merge(coefficients), (batch,), strict=False), batch
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    return coefficients.detach(), history


@torch.no_grad()
def _accuracy(
    scorer: _Scorer, merge: FunctionalMerge, coefficients: torch.Tensor, questions: Questions
) -> float:
    correct = 0
    for start in range(0, len(questions), BATCH):
        batch = questions.take(np.arange(start, min(start + BATCH, len(questions))))
        log_probs = functional_call(scorer, merge(coefficients), (batch,), strict=False)
        correct += int((log_probs.argmax(dim=1).cpu().numpy() == batch.answers).sum())
    return correct / len(questions)


def learn_by_grid(
    request: LearningRequest, scorer: _Scorer, merge: FunctionalMerge, questions: Questions, progress: bool
) -> tuple[torch.Tensor, list[float]]:
    """Coordinate search: each (group, task) in turn takes the grid value with the best select-half
    accuracy, the others held; a tie keeps the current value, so the result does not depend on
    the grid's order."""
    device = next(iter(merge.base.values())).device
    coefficients = torch.full((len(merge.groups), len(merge.vectors)), request.init, device=device)
    best = _accuracy(scorer, merge, coefficients, questions)
    history = [best]
    cells = [(g, t) for g in range(len(merge.groups)) for t in range(len(merge.vectors))]
    # the grid in the table's own precision, so a cell's current value is recognised and not scored
    # again (a python 0.3 never equals the float32 0.3 the table holds)
    grid = coefficients.new_tensor(GRID).tolist()
    total = GRID_PASSES * len(cells)
    with progress_bar(
        total=total, desc="search supervised α", unit="coefficient", disable=not progress
    ) as bar:
        for _ in range(GRID_PASSES):
            for group, task in cells:
                current = float(coefficients[group, task])
                for value in grid:
                    if value == current:
                        continue
                    coefficients[group, task] = value
                    accuracy = _accuracy(scorer, merge, coefficients, questions)
                    if accuracy > best:
                        best, current = accuracy, value
                coefficients[group, task] = current
                history.append(best)
                bar.update()
    return coefficients, history


def learned_coefficients(
    kind: str,
    models: tuple[str, ...],
    params: MethodParams,
    settings: EvalSettings,
    device: torch.device,
    access: CheckpointAccess = CheckpointAccess(),
) -> StatisticsInput:
    """The learned table (cached), as the one statistic a learned merge reads, with what it saw."""
    request = LearningRequest.from_params(kind, params)
    settings = replace(settings, protocol="ubench")
    prepared = prepare(settings, writes_results=False)
    sources = [access.open(m) for m in models]
    try:
        digests = [sorted(input_hashes([source]).values()) for source in sources]
        described = {
            **request.describe(),
            # part of the cache key: coefficients learned by another version (0.1.0 learned from
            # corrupted task vectors) are learned again, not reused
            "micromerge_version": micromerge.__version__,
            "data_fingerprint": prepared.bench.fingerprint,
            **select_half(settings),
            "tasks": question_scope(prepared),
            "questions": question_digest(prepared),
            "models_sha256": digests,
            "decode": DECODE_IDENTITY,  # the pixels they are learned from
        }
        path = Path(settings.cache_dir) / "statistics" / f"{kind}-{sha256_json(described)[:24]}.json"
        saved = _cached_table(path)
        if saved is None:
            model, config = load_model(sources[0])
            finetuned = [load_all(source) for source in sources[1:]]  # copies: read() reuses its buffer
            write_json_atomic(
                path, _learn(request, described, model, config, finetuned, prepared, settings, device)
            )
            saved = parse_json(path.read_text())  # as every later run reads it: one JSON round trip
    finally:
        for source in sources:
            source.close()
    return StatisticsInput((CoefficientTable.from_json(saved["table"]),), [saved["described"]], saved)


def _cached_table(path: Path) -> dict[str, Any] | None:
    """The cached learned table, or None (learned again) when missing or damaged on disk."""
    try:
        saved = parse_json(path.read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and {"table", "described"} <= saved.keys() else None


def _learn(
    request: LearningRequest,
    described: dict[str, Any],
    model: ClipModel,
    config: dict[str, Any],
    finetuned: list[dict[str, torch.Tensor]],
    prepared: Prepared,
    settings: EvalSettings,
    device: torch.device,
) -> dict[str, Any]:
    model = model.to(device).eval().requires_grad_(False)
    evaluator = Evaluator(prepared.bench, prepared.tasks, config, settings, device)
    questions = select_questions(
        evaluator, request.samples, request.seed, labelled=request.kind == "supervised"
    )
    merge = FunctionalMerge(
        model, [{k: v.to(device) for k, v in s.items()} for s in finetuned], request.granularity
    )
    scorer = _Scorer(model, evaluator)
    learn = learn_by_grid if request.search == "grid" else learn_by_gradient
    coefficients, history = learn(request, scorer, merge, questions, settings.progress)
    if not (torch.isfinite(coefficients).all() and np.isfinite(history).all()):
        # refused before the table is cached: the merge then stopped on its NaN output, naming
        # --allow-nonfinite, and every later run read the same NaN table back from the cache
        method = next(m.name for m in (ADAMERGING, SUPERVISED) if m.statistics == request.kind)
        raise MicromergeError(
            f"--method {method}: learning diverged (a loss or coefficient became NaN or inf at "
            f"--learning-rate {request.learning_rate:g}); lower --learning-rate"
        )
    table = CoefficientTable(
        merge.groups, merge.key_groups, tuple(tuple(float(x) for x in row) for row in coefficients.cpu())
    )
    trace = "select_accuracy" if request.search == "grid" else "loss"
    described = {
        **described,
        "coefficients_sha256": sha256_json(table.to_json()),
        "groups": len(table.groups),
        "questions": len(questions),
        trace: {"first": round(history[0], 6), "last": round(history[-1], 6)},
    }
    return {"described": described, "table": table.to_json(), "history": history}
