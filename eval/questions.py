"""Questions the data-aware merges learn from, and the model's log-probabilities over their options.

A question is an image and its own list of option texts (the μ-Bench authors' protocol: each image
against its own caption options). They come from μ-Bench's select half (`select_questions`, an
Evaluator being the bank of images and texts) or from a fine-tuning corpus
(`eval.corpus_questions`); the scoring is the same for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from micromerge.core.errors import MicromergeError
from micromerge.eval.evaluator import Evaluator

if TYPE_CHECKING:
    from micromerge.merging.models import ClipModel, Tokenizer


class QuestionBank(Protocol):
    """What scoring a question reads: images by position, the option texts, their tokenizer and the
    device. An Evaluator is one (μ-Bench); `eval.corpus_questions.CorpusBank` is another."""

    @property
    def pixels(self) -> Any: ...
    @property
    def texts(self) -> list[str]: ...
    @property
    def tokenizer(self) -> Tokenizer: ...
    @property
    def device(self) -> torch.device: ...


@dataclass(frozen=True)
class Questions:
    """Drawn questions: image positions (into the bank's pixels) and option text ids (-1 pads). Answers only when the caller learns from labels (the supervised per-block α):
    Fisher, Gram and AdaMerging use the model's own predictions and never read one."""

    positions: np.ndarray
    options: np.ndarray
    answers: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.positions)

    def take(self, indices: np.ndarray) -> Questions:
        answers = None if self.answers is None else self.answers[indices]
        return Questions(self.positions[indices], self.options[indices], answers)


def select_questions(evaluator: Evaluator, samples: int, seed: int, labelled: bool = False) -> Questions:
    """`samples` questions about select-half images, from every task (the halves split images, so
    no question about a report-half image is ever drawn); with their answers when `labelled`."""
    positions, options, answers = [], [], []
    width = max((plan.options.shape[1] for plan in evaluator.option_plans.values()), default=0)
    for task in evaluator.tasks:
        for question in task.questions:
            plan = evaluator.option_plans[(task.name, question.key)]
            keep = evaluator.select_half[plan.rows]  # the benchmark's select half: no report-half image
            positions.append(plan.positions.cpu().numpy()[keep])
            padded = np.full((int(keep.sum()), width), -1, dtype=np.int64)
            padded[:, : plan.options.shape[1]] = plan.options.cpu().numpy()[keep]
            options.append(padded)
            answers.append(plan.answers.cpu().numpy()[keep])
    if not positions or not sum(len(p) for p in positions):
        raise MicromergeError("no select-half questions to estimate statistics on (are the tasks scorable?)")
    every = Questions(
        np.concatenate(positions), np.concatenate(options), np.concatenate(answers) if labelled else None
    )
    order = np.random.default_rng(seed).permutation(len(every))[: min(samples, len(every))]
    order.sort()
    return every.take(order)


def option_log_probs(
    model: ClipModel,
    bank: QuestionBank,
    questions: Questions,
    start: int,
    stop: int,
    logit_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, K] log-probabilities of each question's own options (padding at -inf), at the model's
    temperature or at `logit_scale` (the log of one) when given."""
    images = F.normalize(
        model.encode_image(bank.pixels.take(questions.positions[start:stop])).float(), dim=-1
    )
    ids = questions.options[start:stop]
    used = np.unique(ids[ids >= 0])
    tokens = bank.tokenizer([bank.texts[i] for i in used]).to(bank.device)
    texts = F.normalize(model.encode_text(tokens).float(), dim=-1)
    local = torch.from_numpy(np.searchsorted(used, ids.clip(min=0))).to(bank.device)
    scores = (model.logit_scale if logit_scale is None else logit_scale).exp() * (images @ texts.T)
    scores = scores.gather(1, local).masked_fill(torch.from_numpy(ids < 0).to(bank.device), float("-inf"))
    return scores.log_softmax(dim=1)
