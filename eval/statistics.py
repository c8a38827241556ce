"""What data-aware merges learn from: per-model statistics on the select half, never the report half.

By default the questions are μ-Bench's own (each image against its own caption options, the
authors' protocol), restricted to every task's *select* half exactly as the evaluator splits it,
then `samples` of them drawn with a seed. A model may instead be given data of its own (the
specialist its fine-tuning corpus, the base a general one: `eval.corpus_questions`). No label is
read: the targets are the model's own predictions, so the same statistics serve unlabeled use.

  Fisher (Matena & Raffel, NeurIPS 2022): the diagonal Fisher of each model, the mean over
      questions of (d log p(y | x) / d theta)^2 with y drawn from the model's own predictive
      distribution over the question's options (one draw per question, seeded), per-example
      gradients (batch size 1), both towers.
  Gram (RegMean, Jin et al., ICLR 2023): for every linear map, the mean of x x^T over the rows of
      its inputs (tokens included), as FusionBench accumulates it: the inputs of nn.Linear layers
      (the MLPs) and of attention's in_proj (the attention block's query input). open_clip's
      attention applies out_proj inside one fused call, so out_proj has no Gram and gets the mean.

Statistics are cached per (kind, model sha256, data and its fingerprint, split, samples, seed, and
the questions themselves) under `<cache_dir>/statistics/`, written atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from micromerge.core.errors import MicromergeError
from micromerge.core.hashing import sha256_json
from micromerge.eval.corpus_questions import corpus_questions, open_corpus
from micromerge.eval.engine import Prepared, prepare
from micromerge.eval.evaluator import Evaluator
from micromerge.eval.images import DECODE_IDENTITY
from micromerge.eval.questions import QuestionBank, Questions, option_log_probs, select_questions
from micromerge.eval.settings import EvalSettings, select_half
from micromerge.merging.execute import StatisticsInput, input_hashes
from micromerge.merging.methods import MethodParams
from micromerge.merging.models import load_model
from micromerge.merging.sources import CheckpointAccess
from micromerge.merging.torch_save import save_tensors

KINDS = ("fisher", "gram")


def fisher_diagonal(model: torch.nn.Module, bank: QuestionBank, questions: Questions, seed: int) -> dict:
    """Matena & Raffel's diagonal Fisher: the mean over questions of each parameter's squared
    gradient of log p(target), the target drawn from the model's own softmax over the question's
    options. Each draw is over the options as stored, padded with zero probability to the widest
    question's count, so it consumes the seeded generator by that width: the draws are fixed by the
    seed and the questions drawn from (both in the cache key), as the width is."""
    model.eval()
    params = {k: p for k, p in model.named_parameters() if p.requires_grad and p.is_floating_point()}
    total = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    generator = torch.Generator().manual_seed(seed)
    for index in range(len(questions.positions)):
        model.zero_grad(set_to_none=True)
        log_probs = option_log_probs(model, bank, questions, index, index + 1)[0]
        target = int(torch.multinomial(log_probs.detach().exp().cpu(), 1, generator=generator))
        log_probs[target].backward()
        for key, param in params.items():
            if param.grad is not None:
                total[key] += param.grad.float() ** 2
    model.zero_grad(set_to_none=True)
    return {key: value / len(questions.positions) for key, value in total.items()}


@torch.no_grad()
def gram_matrices(model: torch.nn.Module, bank: QuestionBank, questions: Questions, batch_size: int) -> dict:
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def recorder(key: str) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, inputs: tuple, *_rest: Any) -> None:
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            sums[key] = sums.get(key, 0) + x.T @ x
            rows[key] = rows.get(key, 0) + x.shape[0]

        return hook

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.MultiheadAttention) and module.in_proj_weight is not None:
            handles.append(module.register_forward_pre_hook(recorder(f"{name}.in_proj_weight")))
        elif type(module) is torch.nn.Linear:
            handles.append(module.register_forward_pre_hook(recorder(f"{name}.weight")))
    try:
        for start in range(0, len(questions.positions), batch_size):
            option_log_probs(model, bank, questions, start, start + batch_size)
    finally:
        for handle in handles:
            handle.remove()
    return {key: sums[key] / rows[key] for key in sums}


@dataclass(frozen=True)
class StatisticsRequest:
    """Which statistics, of which data: recorded in every manifest and result row that uses them."""

    kind: str
    samples: int = 256
    seed: int = 0
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise MicromergeError(f"statistics {self.kind!r}: expected one of {list(KINDS)}")
        if self.samples < 1:
            raise MicromergeError(f"--samples {self.samples}: must be at least 1")


def describe_request(request: StatisticsRequest) -> dict[str, Any]:
    """`samples` is the cap asked for: a select half (or corpus) of fewer questions gives all of
    them, and which they are is fixed by the data's fingerprint, the questions' digest and the seed."""
    return {
        "kind": request.kind,
        "samples": request.samples,
        "seed": request.seed,
        "targets": "the model's own predictions (no labels)",
    }


def question_scope(prepared: Prepared) -> str | list[str]:
    """The tasks whose select-half questions statistics and learned coefficients are drawn from, as
    their cache keys and provenance record it: `all` for every task with questions, else the names
    (a sweep's `--tasks coarse` learns from other questions than `--tasks fine`: one cache entry
    served both, and the record did not say which)."""
    names = [t.name for t in prepared.tasks]
    return "all" if names == [t.name for t in prepared.every if t.questions] else names


def question_digest(prepared: Prepared) -> str:
    """A digest of the questions statistics and learned coefficients may draw from: each selected
    task's caption keys, rows, options and answers. Names alone do not say which rows a task holds:
    a `--sources` table whose `null_dataset_match` rules move rows under another source's name gives
    the same names other questions, and one cache entry served both."""
    return sha256_json(
        [
            [
                task.name,
                [
                    [q.key, q.texts, q.rows.tolist(), q.options.tolist(), q.answers.tolist()]
                    for q in task.questions
                ],
            ]
            for task in prepared.tasks
        ]
    )[:16]


def describe(request: StatisticsRequest, prepared: Prepared, settings: EvalSettings) -> dict[str, Any]:
    return {
        **describe_request(request),
        "data_fingerprint": prepared.bench.fingerprint,
        **select_half(settings),
        "tasks": question_scope(prepared),
        "questions": question_digest(prepared),
    }


def model_statistics(
    checkpoint: str,
    request: StatisticsRequest,
    settings: EvalSettings,
    device: torch.device,
    access: CheckpointAccess = CheckpointAccess(),
    data: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(statistics keyed by state-dict key, their description), computed once and cached; on
    `data` (an image-caption corpus) when given, else on the select half of `settings.data`."""
    settings = replace(settings, protocol="ubench")
    if data is None:
        prepared = prepare(settings, writes_results=False)
        described = describe(request, prepared, settings)
    else:
        pairs, corpus = open_corpus(data)
        described = {**describe_request(request), **corpus}
    with access.open(checkpoint) as source:
        described["model_sha256"] = sorted(input_hashes([source]).values())
        described["decode"] = DECODE_IDENTITY  # the pixels the statistics are computed from
        path = (
            Path(settings.cache_dir)
            / "statistics"
            / f"{request.kind}-{sha256_json(described)[:24]}.safetensors"
        )
        cached = _cached_statistics(path)
        if cached is not None:
            return cached, described
        model, config = load_model(source)
    model = model.to(device)
    bank: QuestionBank
    if data is None:
        bank = Evaluator(prepared.bench, prepared.tasks, config, settings, device)
        questions = select_questions(bank, request.samples, request.seed)
    else:
        bank, questions = corpus_questions(
            pairs, config, request.samples, request.seed, device, settings.progress
        )
    if request.kind == "fisher":
        stats = fisher_diagonal(model, bank, questions, request.seed)
    else:
        stats = gram_matrices(model, bank, questions, request.batch_size)
    stats = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in stats.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, stats, {"micromerge.statistics": sha256_json(described)})
    return stats, described


def statistics_input(
    kind: str,
    models: tuple[str, ...],
    params: MethodParams,
    settings: EvalSettings,
    device: torch.device,
    access: CheckpointAccess = CheckpointAccess(),
    model_data: tuple[str | None, ...] = (),
) -> StatisticsInput:
    """Every model's statistics (base first) for a data-aware merge, or the coefficients a learned
    merge learns jointly from all of them, with what data they came from. `model_data`: empty, or
    per model (base first) a corpus of its own or None (the select half of `settings.data`), as
    `merging.job.model_data` checks it (only fisher and regmean take it, one per model)."""
    if kind not in KINDS:
        from micromerge.eval.coefficients import learned_coefficients

        return learned_coefficients(kind, models, params, settings, device, access)
    data = model_data or (None,) * len(models)
    request = StatisticsRequest(kind, params.samples, params.seed)
    computed = []
    for index, (model, corpus) in enumerate(zip(models, data, strict=True)):
        try:
            computed.append(model_statistics(model, request, settings, device, access, corpus))
        except MicromergeError as error:
            # the corpus readers are finetune's and name its flag, as the subject (with the spec,
            # its location or a file in it) or in a hint of what to type; here the user typed another
            said = "--data "
            if corpus is None or said not in str(error):
                raise
            flag = "--base-data " if index == 0 else "--ft-data "
            raise MicromergeError(str(error).replace(said, flag)) from error
    return StatisticsInput(tuple(values for values, _ in computed), [described for _, described in computed])


def _cached_statistics(path: Path) -> dict[str, torch.Tensor] | None:
    """The cached statistics, or None (so they are computed again) when missing or damaged on disk:
    a cut file was safetensors' traceback on every later merge."""
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except (SafetensorError, OSError):
        return None
