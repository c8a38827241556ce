"""AdaMerging and the supervised per-block α (issue 14): coefficients learned on the select half
only, merged by their formula, saved beside every output and plotted in the report.

Facts from the public references (read through the search tool): AdaMerging (Yang et al., ICLR
2024) merges theta = theta_0 + sum_i lambda_i tau_i (task-wise) or lambda_i^l per layer,
learning lambda by minimising the entropy of predictions on unlabeled test images; FusionBench's
`config/method/adamerging/clip.yaml`: Adam, lr 1e-3, init_values 0.3, clamp_weights false,
batch 16 per task, 1000 steps.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from micromerge.analysis.ablate import load_ablation, run_ablation
from micromerge.analysis.report import build_report
from micromerge.cli import cli
from micromerge.core.errors import MicromergeError
from micromerge.eval.coefficients import FunctionalMerge, _Scorer, learned_coefficients
from micromerge.eval.engine import prepare
from micromerge.eval.evaluator import Evaluator
from micromerge.eval.images import DECODE_IDENTITY
from micromerge.eval.statistics import select_questions
from micromerge.eval.store import ResultStore, coefficients_file
from micromerge.merging.methods import MethodParams
from micromerge.merging.methods.learned import CoefficientTable, coefficient_group
from micromerge.merging.models import load_model
from micromerge.merging.sources import open_source
from tests.test_data_aware import setting, write_noise_png  # noqa: F401 (a fixture)

CPU = torch.device("cpu")


@pytest.fixture
def three(setting, tmp_path):  # noqa: F811 (the fixture above)
    """The shared setting with a second specialist: a base and two task vectors."""
    from tests.helpers import write_checkpoint

    settings, models = setting
    write_checkpoint(tmp_path / "m2.safetensors", 2)
    return settings, (*models, str(tmp_path / "m2.safetensors"))


def test_groups_are_one_per_task_block_or_tensor():
    keys = [
        "positional_embedding",
        "visual.conv1.weight",
        "visual.transformer.resblocks.3.mlp.c_fc.weight",
        "transformer.resblocks.0.attn.in_proj_weight",
        "visual.proj",
        "logit_scale",
    ]
    assert {coefficient_group(k, "task") for k in keys} == {"all"}
    assert [coefficient_group(k, "block") for k in keys] == [
        "text.embeddings",
        "visual.embeddings",
        "visual.transformer.resblocks.3",
        "transformer.resblocks.0",
        "visual.head",
        "text.head",
    ]
    assert [coefficient_group(k, "layer") for k in keys] == keys


def test_questions_drawn_for_a_label_free_learner_carry_no_answers(setting):  # noqa: F811
    """AdaMerging, Fisher and RegMean learn from the model's own predictions: the questions drawn
    for them hold no answer to read by mistake; only the supervised α's carry the select half's."""
    settings, models = setting
    prepared = prepare(settings, writes_results=False)
    with open_source(models[0]) as source:
        _, config = load_model(source)
    evaluator = Evaluator(prepared.bench, prepared.tasks, config, settings, CPU)
    assert select_questions(evaluator, 64, seed=0).answers is None
    labelled = select_questions(evaluator, 64, seed=0, labelled=True)
    assert labelled.answers is not None and len(labelled.answers) == len(labelled) == 64


def _select_scores(coefficients, settings, models, granularity="layer"):
    """Log-probabilities of every drawn select-half question's options under the merge with these
    coefficients (at the base model's temperature), and the questions with their answers."""
    prepared = prepare(settings, writes_results=False)
    with open_source(models[0]) as source:
        model, config = load_model(source)
    finetuned = [load_file(m) for m in models[1:]]
    evaluator = Evaluator(prepared.bench, prepared.tasks, config, settings, CPU)
    questions = select_questions(evaluator, 256, seed=0, labelled=True)
    merge = FunctionalMerge(model.requires_grad_(False), finetuned, granularity)
    with torch.no_grad():
        log_probs = torch.func.functional_call(_Scorer(model, evaluator), merge(coefficients), (questions,))
    return log_probs, questions


def _entropy_at(coefficients, settings, models) -> float:
    """Mean entropy over the questions, by torch.distributions rather than the code under test."""
    log_probs, _ = _select_scores(coefficients, settings, models)
    return float(torch.distributions.Categorical(logits=log_probs).entropy().mean())


def test_questions_are_scored_at_the_base_models_temperature_whatever_the_merge_makes_it(setting):  # noqa: F811
    """A merge that raises the logit scale sharpens every distribution and lowers the entropy
    without changing a prediction; AdaMerging would learn exactly that. The scorer holds the base
    model's temperature, so a merge with a specialist whose scale is e^1 times the base's scores
    as the merged weights at the base's scale, not at their own."""
    import copy

    from micromerge.eval.questions import option_log_probs

    settings, models = setting
    prepared = prepare(settings, writes_results=False)
    with open_source(models[0]) as source:
        model, config = load_model(source)
    model.requires_grad_(False)
    evaluator = Evaluator(prepared.bench, prepared.tasks, config, settings, CPU)
    questions = select_questions(evaluator, 32, seed=0)
    specialist = load_file(models[1])
    specialist["logit_scale"] = model.logit_scale.detach() + 1.0
    merge = FunctionalMerge(model, [specialist], "task")
    merged = merge(torch.ones(1, 1))
    with torch.no_grad():
        scored = torch.func.functional_call(_Scorer(model, evaluator), merged, (questions,))
        merged_model = copy.deepcopy(model)
        merged_model.load_state_dict({k.removeprefix("model."): v for k, v in merged.items()}, strict=False)
        at_base_scale = option_log_probs(
            merged_model, evaluator, questions, 0, len(questions), model.logit_scale
        )
        at_own_scale = option_log_probs(merged_model, evaluator, questions, 0, len(questions))
    assert torch.allclose(merged_model.logit_scale, model.logit_scale + 1.0)
    assert torch.allclose(scored, at_base_scale, atol=1e-5)
    assert not torch.allclose(scored, at_own_scale, atol=1e-2)


def test_adamerging_lowers_the_entropy_and_moves_its_coefficients(three):
    settings, models = three
    params = MethodParams(steps=40, learning_rate=0.05)
    learned = learned_coefficients("adamerging", models, params, settings, CPU)
    (table,) = learned.values
    values = torch.tensor(table.values)
    assert values.shape == (len(table.groups), 2) and len(table.groups) > 20, "layer-wise: one per tensor"
    moved = (values - 0.3).abs()
    assert moved.max() > 0.05, "coefficients moved from their start"
    logit_scale = table.key_groups["logit_scale"]
    assert torch.equal(values[logit_scale], torch.full((2,), 0.3)), "temperature held: no gradient"
    before = _entropy_at(torch.full_like(values, 0.3), settings, models)
    after = _entropy_at(values, settings, models)
    assert after < before - 0.05, (before, after)
    described = learned.described[0]
    assert described["split"] == "select" and described["objective"].endswith("(no labels)")
    assert described["loss"]["last"] < described["loss"]["first"]


@pytest.mark.parametrize("kind", ["adamerging", "supervised"])
def test_learning_that_diverges_is_one_line_and_caches_nothing(setting, kind):  # noqa: F811
    """`--learning-rate 1e6` cached a table of NaN coefficients; the merge then stopped on its NaN
    output naming --allow-nonfinite, and every later run read the NaN table back. At 1e30, not 1e6:
    whether 1e6 overflows in 3 steps depends on the CPU's kernels (it did not on one CI machine);
    coefficients near 1e30 overflow float32 activations on any."""
    settings, models = setting
    params = MethodParams(steps=3, learning_rate=1e30, samples=32)
    with pytest.raises(
        MicromergeError,
        match=r"learning diverged \(a loss or coefficient became NaN or inf at --learning-rate 1e\+30\)",
    ):
        learned_coefficients(kind, models, params, settings, CPU)
    assert not list((Path(settings.cache_dir) / "statistics").glob(f"{kind}-*.json"))


def test_a_learned_merge_is_its_formula_and_keeps_its_coefficients_beside_the_checkpoint(tmp_path, three):
    settings, models = three
    out = tmp_path / "ada.safetensors"
    args = ["merge", "--base", models[0], "--ft", models[1], "--ft", models[2], "--method", "adamerging"]
    args += ["--granularity", "block", "--steps", "5", "--learning-rate", "0.05", "--data", settings.data]
    args += ["--cache-dir", str(settings.cache_dir), "--out", str(out), "--quiet"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "ada.safetensors.manifest.json").read_text())
    saved = json.loads((tmp_path / "ada.safetensors.coefficients.json").read_text())
    assert manifest["coefficients"] == "ada.safetensors.coefficients.json"
    assert manifest["statistics"] == [saved["described"]]
    assert manifest["parameters"]["granularity"] == "block" and manifest["parameters"]["steps"] == 5
    assert len(saved["history"]) == 5
    merged, base = load_file(str(out)), load_file(models[0])
    specialists = [load_file(m) for m in models[1:]]
    groups, values = saved["table"]["keys"], saved["table"]["values"]
    for key, tensor in base.items():
        expected = tensor + sum(values[groups[key]][i] * (s[key] - tensor) for i, s in enumerate(specialists))
        torch.testing.assert_close(merged[key], expected, atol=1e-6, rtol=0, msg=key)
    coefficients = tmp_path / "ada.safetensors.coefficients.json"
    kept_bytes = coefficients.read_bytes()
    coefficients.unlink()  # a run killed after the checkpoint, before the files beside it
    (tmp_path / "ada.safetensors.manifest.json").unlink()
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and "kept" in again.output, again.output
    assert coefficients.read_bytes() == kept_bytes, "the kept checkpoint gets its coefficients back"


def _poison(settings, tmp_path, rows: set[int], name: str):
    """A copy of the benchmark whose `rows` have noise for images and every caption's answer moved."""
    dataset = datasets.load_from_disk(settings.data)
    dataset = dataset.cast_column("image", datasets.Image(decode=False))  # corrupt images pass as bytes
    noise = write_noise_png()

    def poison(row, index):
        if index not in rows:
            return {"image": row["image"], "captions": row["captions"]}
        captions = {
            key: None
            if value is None
            else {**value, "answer_idx": str((int(value["answer_idx"]) + 1) % len(value["options"]))}
            for key, value in row["captions"].items()
        }
        return {"image": {"bytes": noise, "path": None}, "captions": captions}

    dataset.map(poison, with_indices=True).save_to_disk(str(tmp_path / name))
    return replace(settings, data=str(tmp_path / name))


@pytest.mark.parametrize(
    "search, params",
    [("gradient", {"steps": 10, "learning_rate": 0.05}), ("grid", {"samples": 24})],
)
def test_the_supervised_alpha_never_reads_the_report_half(tmp_path, setting, search, params):  # noqa: F811
    """Poison the report half (noise images, wrong answers): the coefficients do not change.
    Poison the select half instead: they do, so the test can see what the search reads."""
    settings, models = setting
    prepared = prepare(settings, writes_results=False)
    with open_source(models[0]) as source:
        _, config = load_model(source)
    select = Evaluator(prepared.bench, prepared.tasks, config, settings, CPU).select_half
    method = MethodParams(granularity="block", search=search, **params)

    def learn(chosen):
        return learned_coefficients("supervised", tuple(models), method, chosen, CPU)

    clean = learn(settings)
    report_poisoned = learn(_poison(settings, tmp_path, set(np.flatnonzero(~select).tolist()), "report"))
    select_poisoned = learn(_poison(settings, tmp_path, set(np.flatnonzero(select).tolist()), "select"))
    assert report_poisoned.described[0]["data_fingerprint"] != clean.described[0]["data_fingerprint"]
    assert clean.described[0]["decode"] == DECODE_IDENTITY, "keyed on how the pixels were decoded"
    assert report_poisoned.values[0].values == clean.values[0].values
    assert select_poisoned.values[0].values != clean.values[0].values
    if search == "grid":
        trace = clean.attachment["history"]
        assert trace == sorted(trace), "a coordinate step never lowers select-half accuracy"


@pytest.mark.parametrize("search, params", [("gradient", {"steps": 30, "learning_rate": 0.05}), ("grid", {})])
def test_the_supervised_alpha_improves_what_it_optimises_on_the_select_half(setting, search, params):  # noqa: F811
    """By gradient it lowers the answers' cross-entropy; by grid it ends at the best select-half
    accuracy it found, never below where it started. Both recomputed here from the log-probabilities."""
    settings, models = setting
    method = MethodParams(granularity="task", search=search, **params)
    learned = learned_coefficients("supervised", tuple(models), method, settings, CPU)
    values = torch.tensor(learned.values[0].values)
    start, _ = _select_scores(torch.full_like(values, 0.3), settings, models, "task")
    end, questions = _select_scores(values, settings, models, "task")
    answers = torch.from_numpy(questions.answers)[:, None]
    if search == "gradient":
        before, after = (-scores.gather(1, answers).mean() for scores in (start, end))
        assert after < before - 0.01, (float(before), float(after))
    else:
        before, after = (
            (scores.argmax(dim=1, keepdim=True) == answers).float().mean() for scores in (start, end)
        )
        history = learned.attachment["history"]
        assert float(after) == pytest.approx(history[-1]) and after >= before, (history, float(after))
    # what the coefficients file says was optimised is what was
    said = learned.described[0]["objective"]
    assert ("cross-entropy" in said) == (search == "gradient") and ("accuracy" in said) == (search == "grid")


def test_the_grid_keeps_the_start_where_every_value_ties(tmp_path, setting):  # noqa: F811
    """Specialists equal to the base: every alpha merges to the base, so every grid value ties and
    each coefficient keeps its start (a search taking ties would end on the grid's last value).
    Written for the tie rule, this test found 0.1.0's learner holding every specialist tensor as a
    view of one reused read buffer: its task vectors were garbage, and here it moved to 0.1."""
    settings, models = setting
    copies = []
    for name in ("same_a", "same_b"):
        (tmp_path / f"{name}.safetensors").write_bytes(Path(models[0]).read_bytes())
        copies.append(str(tmp_path / f"{name}.safetensors"))
    method = MethodParams(granularity="task", search="grid", samples=64)
    learned = learned_coefficients("supervised", (models[0], *copies), method, settings, CPU)
    np.testing.assert_allclose(learned.values[0].values, [[0.3, 0.3]], rtol=1e-6)  # a float32 0.3


def test_a_sweep_keeps_the_coefficients_beside_its_store_and_the_report_plots_them(tmp_path, setting):  # noqa: F811
    settings, models = setting
    args = ["sweep", "--base", models[0], "--ft", models[1], "--method", "supervised-alpha"]
    args += ["--steps", "5", "--alphas", "0,0.5,1", "--data", settings.data, "--store", str(settings.store)]
    args += ["--cache-dir", str(settings.cache_dir), "--bootstrap", "0", "--device", "cpu", "--quiet"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    rows = ResultStore(settings.store).rows()
    described = rows[0]["parameters"]["statistics"][0]
    assert described["kind"] == "supervised" and described["granularity"] == "block"
    assert all(r["parameters"]["statistics"] == [described] for r in rows)
    saved = json.loads(coefficients_file(settings.store, described).read_text())
    assert saved["described"] == described
    build_report(settings.store, tmp_path / "report")
    assert (tmp_path / "report" / "figures" / "coefficients_run0.png").is_file()
    assert "coefficients_run0.png" in (tmp_path / "report" / "report.md").read_text()
    from micromerge.analysis.report import REPORT_FILES

    figures = [f"figures/{p.name}" for p in (tmp_path / "report" / "figures").iterdir()]
    assert all(REPORT_FILES.fullmatch(name) for name in figures), figures


def test_an_ablation_runs_both_learned_methods(tmp_path, setting):  # noqa: F811
    settings, models = setting
    config = tmp_path / "grid.toml"
    config.write_text(
        f"""[ablation]
data = "{settings.data}"
store = "{tmp_path / "grid.jsonl"}"
report = "{tmp_path / "report"}"
alphas = "0,1"
methods = ["adamerging", "supervised-alpha"]
bootstrap = 0
target = "domain:pathology"

[ablation.method_parameters.adamerging]
steps = 3
granularity = "task"

[ablation.method_parameters.supervised-alpha]
search = "grid"
samples = 8

[[ablation.pairs]]
name = "one"
base = "{models[0]}"
finetuned = ["{models[1]}"]
"""
    )
    ablation = load_ablation(config)
    run_ablation(ablation, tmp_path / "cache", CPU, progress=False)
    kinds = {
        r["method"]: r["parameters"]["statistics"][0]
        for r in ResultStore(ablation.store).rows()
        if r["alpha"] is not None
    }
    assert kinds["adamerging"]["granularity"] == "task" and kinds["adamerging"]["steps"] == 3
    assert (
        kinds["supervised-alpha"]["search"] == "grid" and kinds["supervised-alpha"]["granularity"] == "block"
    )
    assert (tmp_path / "report" / "figures" / "coefficients_run1.png").is_file()


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--learning-rate", "0"], "--learning-rate 0.0: must be positive"),
        (["--steps", "0"], "--steps 0: must be a positive integer"),
        (["--granularity", "neuron"], "'neuron' is not one of"),
    ],
)
def test_bad_learning_settings_are_one_line(tmp_path, extra, needle):
    from tests.helpers import write_checkpoint

    for seed in range(2):
        write_checkpoint(tmp_path / f"m{seed}.safetensors", seed)
    args = ["--base", str(tmp_path / "m0.safetensors"), "--ft", str(tmp_path / "m1.safetensors")]
    result = CliRunner().invoke(cli, ["merge", *args, "--method", "adamerging", "--data", "x", *extra])
    assert result.exit_code == 2 and needle in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 or "Usage" in result.output
    assert not list(tmp_path.glob("*merged*"))


def test_a_key_without_a_learned_coefficient_takes_each_tasks_mean_over_the_groups():
    table = CoefficientTable(("block.0", "block.1"), {"x": 0, "y": 1}, ((0.2, 1.0), (0.4, 0.0)))
    assert table.for_key("y") == (0.4, 0.0)
    assert table.for_key("a_buffer") == pytest.approx((0.3, 0.5))


class _ToyScorer(torch.nn.Module):
    """A one-weight 'model' asked two-option questions: option 1's logit is the weight, option 0's
    is 0, so p(option 1) = sigmoid(w) and every number of the learners can be written by hand. It
    records the questions of every call, as the learners batch them."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(self.model.weight)
        self.seen: list[list[int]] = []

    def forward(self, questions):
        self.seen.append(questions.positions.tolist())
        w = self.model.weight[0, 0].expand(len(questions))
        return torch.stack([torch.zeros_like(w), w], dim=1).log_softmax(dim=1)


def _toy(count: int = 200):
    from micromerge.eval.questions import Questions

    scorer = _ToyScorer()
    merge = FunctionalMerge(scorer.model, [{"weight": torch.ones(1, 1)}], "task")  # tau = +1
    options = np.tile(np.array([0, 1]), (count, 1))
    return scorer, merge, Questions(np.arange(count), options, np.ones(count, dtype=np.int64))


def test_gradient_learning_draws_a_seeded_batch_per_step_and_minimises_the_labelled_cross_entropy():
    """Each step takes BATCH (64) distinct questions drawn with the seed, sorted; the supervised
    loss is the cross-entropy of each question's own answer (here option 1): at the start
    (lambda = init = 0.3, so w = 0.3) it is log(1 + e^-0.3), and learning raises lambda. AdaMerging's
    entropy at the start is the Bernoulli entropy of sigmoid(0.3)."""
    import math

    from micromerge.eval.coefficients import BATCH, LearningRequest, learn_by_gradient

    request = LearningRequest(
        "supervised", "task", "gradient", samples=200, seed=5, steps=3, learning_rate=0.1
    )
    scorer, merge, questions = _toy()
    coefficients, history = learn_by_gradient(request, scorer, merge, questions, progress=False)
    assert len(history) == 3 and len(scorer.seen) == 3 and BATCH == 64
    for batch in scorer.seen:
        assert len(set(batch)) == BATCH and batch == sorted(batch)
    assert scorer.seen[0] != scorer.seen[1], "another batch each step"
    assert history[0] == pytest.approx(math.log1p(math.exp(-0.3)), rel=1e-6)
    started = learn_by_gradient(replace(request, init=0.8, steps=1), _toy()[0], merge, questions, False)
    assert started[1][0] == pytest.approx(math.log1p(math.exp(-0.8)), rel=1e-6), "--init is where it starts"
    assert float(coefficients[0, 0]) > 0.3 and history[-1] < history[0]
    again, _, _ = _toy()
    learn_by_gradient(request, again, merge, questions, progress=False)
    assert again.seen == scorer.seen, "the same seed, the same batches"
    other, _, _ = _toy()
    learn_by_gradient(replace(request, seed=6), other, merge, questions, progress=False)
    assert other.seen != scorer.seen, "another seed, other batches"
    p = 1 / (1 + math.exp(-0.3))
    entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    request = replace(request, kind="adamerging")
    assert learn_by_gradient(request, _toy()[0], merge, questions, progress=False)[1][0] == pytest.approx(
        entropy, rel=1e-6
    )


def test_the_grid_search_records_select_accuracy_as_a_fraction_once_per_coefficient_and_pass():
    from micromerge.eval.coefficients import GRID_PASSES, LearningRequest, learn_by_grid

    scorer, merge, questions = _toy(10)
    request = LearningRequest("supervised", "task", "grid")
    coefficients, history = learn_by_grid(request, scorer, merge, questions, progress=False)
    assert GRID_PASSES == 2 and len(history) == 1 + GRID_PASSES * 1, "the start, then each pass's one cell"
    assert history == [1.0, 1.0, 1.0], "w = 0.3 > 0 answers every question: accuracy 1, kept"
    assert float(coefficients[0, 0]) == pytest.approx(0.3)


def test_the_grid_search_reaches_values_above_its_start():
    """The toy's base weight is -0.85 and its task vector +1, so w = lambda - 0.85: only lambda 0.9
    and 1.0 answer the questions (accuracy 1; 0 below). From the start 0.3 the search must look past
    its own value to find 0.9, the first of the best (a tie keeps the value it has). Each pass scores
    the 10 grid values other than the cell's own (the float32 table's 0.3 is the grid's 0.3)."""
    from micromerge.eval.coefficients import LearningRequest, learn_by_grid
    from micromerge.eval.questions import Questions

    scorer = _ToyScorer()
    with torch.no_grad():
        scorer.model.weight.fill_(-0.85)
    merge = FunctionalMerge(scorer.model, [{"weight": torch.full((1, 1), 0.15)}], "task")
    questions = Questions(np.arange(10), np.tile(np.array([0, 1]), (10, 1)), np.ones(10, dtype=np.int64))
    request = LearningRequest("supervised", "task", "grid")
    coefficients, history = learn_by_grid(request, scorer, merge, questions, progress=False)
    assert float(coefficients[0, 0]) == pytest.approx(0.9) and history == [0.0, 1.0, 1.0]
    assert len(scorer.seen) == 1 + 2 * 10, "the start, then 10 values a pass (one batch of 10 questions each)"


def test_a_learner_refuses_what_it_cannot_learn_from():
    from micromerge.core.errors import MicromergeError
    from micromerge.eval.coefficients import LearningRequest

    with pytest.raises(MicromergeError, match="AdaMerging learns by gradient"):
        LearningRequest("adamerging", "task", "grid")
    with pytest.raises(MicromergeError, match="a fine-tuned checkpoint has no tensor 'weight'"):
        FunctionalMerge(_ToyScorer().model, [{"other": torch.ones(1, 1)}], "task")
    with pytest.raises(MicromergeError, match="a fine-tuned checkpoint has no tensor 'weight'"):
        FunctionalMerge(
            _ToyScorer().model, [{"weight": torch.ones(1, 1)}, {"other": torch.ones(1, 1)}], "task"
        )


def test_the_functional_merge_gives_each_task_vector_its_own_coefficient():
    """theta = theta_0 + lambda_1 tau_1 + lambda_2 tau_2, per group (here one group: task-wise)."""
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.constant_(model.weight, 1.0)
    first, second = {"weight": torch.tensor([[3.0, 1.0]])}, {"weight": torch.tensor([[1.0, 5.0]])}
    merge = FunctionalMerge(model, [first, second], "task")
    merged = merge(torch.tensor([[0.5, 0.25]]))["model.weight"]
    expected = torch.tensor([[1.0 + 0.5 * 2.0 + 0.25 * 0.0, 1.0 + 0.5 * 0.0 + 0.25 * 4.0]])
    torch.testing.assert_close(merged, expected, atol=1e-6, rtol=0)


def test_select_accuracy_counts_every_question_whatever_the_batches_leave_over():
    """65 questions are a batch of 64 and one of one: the one is counted too (w = 0.3 > 0 answers
    option 1, every answer here, so all 65 are right)."""
    from micromerge.eval.coefficients import BATCH, _accuracy

    scorer, merge, questions = _toy(BATCH + 1)
    assert _accuracy(scorer, merge, torch.full((1, 1), 0.3), questions) == 1.0
    assert [len(batch) for batch in scorer.seen] == [BATCH, 1]


def test_coefficients_learned_by_another_version_are_learned_again(setting, monkeypatch):  # noqa: F811
    """The cache key holds the package version (0.1.0 learned from corrupted task vectors)."""
    import micromerge

    settings, models = setting
    params = MethodParams(steps=2, granularity="task", samples=16)
    first = learned_coefficients("adamerging", models, params, settings, CPU)
    monkeypatch.setattr(micromerge, "__version__", "0.0.1-other")
    again = learned_coefficients("adamerging", models, params, settings, CPU)
    assert (
        first.described[0]["micromerge_version"] != again.described[0]["micromerge_version"] == "0.0.1-other"
    )
    assert len(list((settings.cache_dir / "statistics").glob("adamerging-*.json"))) == 2


def test_coefficients_are_learned_per_task_selection(setting, tmp_path):  # noqa: F811
    """The cache key and the record hold the tasks whose questions they learn from (a sweep's
    `--tasks coarse` reused coefficients learned on every task), and the questions themselves: a
    `--sources` table that moves the Held rows under kather_et_al_2016 (both rules are in
    eval/ubench_sources.toml) gives that name other questions."""
    from dataclasses import replace

    settings, models = setting
    params = MethodParams(steps=2, granularity="task", samples=16)
    every = learned_coefficients("adamerging", models, params, settings, CPU)
    coarse = learned_coefficients("adamerging", models, params, replace(settings, tasks="coarse"), CPU)
    assert every.described[0]["tasks"] == "all"
    assert coarse.described[0]["tasks"] and "kather_et_al_2016" not in coarse.described[0]["tasks"]
    table = tmp_path / "moved.toml"
    table.write_text(
        '[sources.held_et_al_2010_h2b]\nnull_dataset_match = ""\n'
        '[sources.kather_et_al_2016]\nnull_dataset_match = "h2b|chromatin"\n'
    )
    kather = replace(settings, tasks="kather_et_al_2016")
    shipped = learned_coefficients("adamerging", models, params, kather, CPU)
    moved = learned_coefficients("adamerging", models, params, replace(kather, sources=table), CPU)
    assert shipped.described[0]["tasks"] == moved.described[0]["tasks"] == ["kather_et_al_2016"]
    assert shipped.described[0]["questions"] != moved.described[0]["questions"]
    assert len(list((settings.cache_dir / "statistics").glob("adamerging-*.json"))) == 4


def test_coefficients_are_learned_per_specialist_not_per_base(three):
    """The cache key holds every model's sha256: another specialist on the same base learns anew."""
    settings, models = three
    params = MethodParams(steps=2, granularity="task", samples=16)
    one = learned_coefficients("adamerging", (models[0], models[1]), params, settings, CPU)
    other = learned_coefficients("adamerging", (models[0], models[2]), params, settings, CPU)
    assert one.described[0]["models_sha256"][1] != other.described[0]["models_sha256"][1]
    assert len(list((settings.cache_dir / "statistics").glob("adamerging-*.json"))) == 2


def test_under_a_launch_the_first_process_learns_and_the_others_read_what_it_cached(
    setting,  # noqa: F811
    monkeypatch,
):
    """Each process learned its own coefficients: the same minutes on every GPU, and coefficients
    that differ in a last bit between GPUs (kernels that are not deterministic) gave each
    process's rows another run id. Here the second of two processes runs in this process and its
    barrier runs the first, as a launch would order them: one learning, one run id."""
    import micromerge.eval.coefficients as coefficients
    from micromerge.eval.engine import run_sweep
    from micromerge.eval.settings import SweepPlan
    from micromerge.merging.plan import MergeSpec

    settings, models = setting
    learned = []
    real_learn = coefficients._learn
    monkeypatch.setattr(
        coefficients, "_learn", lambda *args: learned.append(args[6].rank) or real_learn(*args)
    )
    spec = MergeSpec("adamerging", MethodParams(steps=2, granularity="task", samples=16))
    plan = SweepPlan(models[0], models[1:], spec, (0.0, 1.0))
    first = replace(settings, rank=0, world_size=2)
    waited = []

    def barrier_of_the_second() -> None:  # the first process runs until its own barrier
        waited.append(run_sweep(plan, first, CPU, wait_for_everyone=lambda: None))

    second = run_sweep(plan, replace(settings, rank=1, world_size=2), CPU, barrier_of_the_second)
    assert learned == [0] and len(waited) == 1, learned  # learned once, by the first process
    assert {r["run_id"] for r in second} == {r["run_id"] for r in waited[0]}
    assert {r["process"]: r["alpha"] for r in second} == {"0/2": 0.0, "1/2": 1.0}


def test_under_a_launch_learning_that_fails_releases_the_other_processes(setting):  # noqa: F811
    """The first process learns while the others wait at a barrier: when its learning failed (here,
    diverged) it raised without reaching the barrier, and under `accelerate launch` each other
    process printed a traceback from the barrier (the process group's connection closed; seen on
    two CPU processes). It now passes the barrier first: the launcher stops the others cleanly."""
    from micromerge.eval.engine import run_sweep
    from micromerge.eval.settings import SweepPlan
    from micromerge.merging.plan import MergeSpec

    settings, models = setting
    spec = MergeSpec("adamerging", MethodParams(steps=2, granularity="task", samples=16, learning_rate=1e30))
    plan = SweepPlan(models[0], models[1:], spec, (0.0, 1.0))
    released = []
    with pytest.raises(MicromergeError, match="learning diverged"):
        run_sweep(
            plan, replace(settings, rank=0, world_size=2), CPU, wait_for_everyone=lambda: released.append(1)
        )
    assert released == [1], "the barrier the other processes wait at"
