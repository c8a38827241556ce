"""Fisher merging and RegMean (issue 14): their formulas by hand, their statistics honest about the
data they see (select-half images only), cached, and recorded in every manifest and result row.

Facts from the public reference (FusionBench 0.2.33, read through the search tool and its
source): `merging_with_fisher_weights` (Fisher + 1e-6, models weighted by the inverse L2 norm of
their Fishers, normalised), `merging_with_regmean_weights` (W = (sum G_i)^-1 sum G_i W_i^T,
transposed back; off-diagonals scaled by `reduce_non_diagonal_ratio`, 0.95 for CLIP; every other
parameter the mean), Gram = mean of x^T x over the rows of a Linear layer's input.
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

from micromerge.cli import cli
from micromerge.eval.engine import prepare
from micromerge.eval.evaluator import Evaluator
from micromerge.eval.images import DECODE_IDENTITY
from micromerge.eval.questions import option_log_probs
from micromerge.eval.settings import EvalSettings
from micromerge.eval.statistics import StatisticsRequest, gram_matrices, model_statistics, select_questions
from micromerge.eval.store import ResultStore
from micromerge.merging.in_memory import merge_state_dicts
from micromerge.merging.methods import MethodParams
from micromerge.merging.models import load_model
from micromerge.merging.sources import open_source
from tests.helpers import write_checkpoint
from tests.ubench_fixture import write_fixture


def test_fisher_with_equal_fishers_is_the_simple_mean():
    torch.manual_seed(0)
    base = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    ft = {k: v + torch.randn_like(v) for k, v in base.items()}
    fisher = {k: torch.rand_like(v) for k, v in base.items()}
    merged = merge_state_dicts(
        "fisher", base, [ft], MethodParams(), strength=0.5, statistics=(fisher, fisher)
    )
    for key in base:
        torch.testing.assert_close(merged[key], (base[key] + ft[key]) / 2, atol=1e-6, rtol=0)


def test_fisher_leans_on_the_model_that_is_sure_and_alpha_ends_are_the_models():
    base, ft = {"w": torch.zeros(3)}, {"w": torch.ones(3)}
    sure_base = ({"w": torch.tensor([100.0, 1.0, 1.0])}, {"w": torch.tensor([1e-6, 1.0, 1.0])})
    merged = merge_state_dicts("fisher", base, [ft], MethodParams(), strength=0.5, statistics=sure_base)["w"]
    assert merged[0] < 0.05 and abs(merged[1] - merged[2]) < 1e-6
    for alpha, expected in ((0.0, 0.0), (1.0, 1.0)):
        ends = merge_state_dicts("fisher", base, [ft], MethodParams(), strength=alpha, statistics=sure_base)[
            "w"
        ]
        torch.testing.assert_close(ends, torch.full((3,), expected), atol=1e-6, rtol=0)


def test_regmean_on_one_linear_layer_is_the_least_squares_solution():
    """min_W sum_i |X_i W^T - X_i W_i^T|^2, solved by numpy's lstsq on the stacked inputs."""
    rng = np.random.default_rng(3)
    inputs = [rng.normal(size=(40, 6)), rng.normal(size=(40, 6)) * [1, 2, 3, 1, 1, 0.5]]
    weights = [rng.normal(size=(5, 6)), rng.normal(size=(5, 6))]
    stacked = np.concatenate(inputs)
    targets = np.concatenate([x @ w.T for x, w in zip(inputs, weights, strict=True)])
    expected = np.linalg.lstsq(stacked, targets, rcond=None)[0].T
    grams = tuple({"layer.weight": torch.tensor(x.T @ x / len(x), dtype=torch.float32)} for x in inputs)
    base, ft = ({"layer.weight": torch.tensor(w, dtype=torch.float32)} for w in weights)
    merged = merge_state_dicts(
        "regmean", base, [ft], MethodParams(offdiag_scale=1.0), strength=0.5, statistics=grams
    )
    torch.testing.assert_close(
        merged["layer.weight"], torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=0
    )
    at_zero = merge_state_dicts("regmean", base, [ft], MethodParams(), strength=0.0, statistics=grams)
    torch.testing.assert_close(at_zero["layer.weight"], base["layer.weight"], atol=1e-5, rtol=0)


def test_fishers_that_differ_only_in_scale_count_alike():
    """FusionBench divides each model's Fisher by its global L2 norm (normalised over models): a
    specialist whose Fisher is 1000 times the base's everywhere gets no more say for it."""
    torch.manual_seed(2)
    base, ft = {"w": torch.zeros(4, 3)}, {"w": torch.ones(4, 3)}
    fisher = torch.rand(4, 3) + 0.1
    scaled = ({"w": fisher}, {"w": 1000 * fisher})
    merged = merge_state_dicts("fisher", base, [ft], MethodParams(), strength=0.5, statistics=scaled)["w"]
    torch.testing.assert_close(merged, torch.full((4, 3), 0.5), atol=1e-5, rtol=0)


def test_fisher_models_are_weighed_by_the_inverse_global_l2_norm_of_their_fishers():
    """c_i = l_i (1 / |F_i|) / sum_j (1 / |F_j|), |F| the L2 norm over every key of the model (not
    per tensor, not L1), then theta = sum c_i (F_i + 1e-6) theta_i / sum c_i (F_i + 1e-6): by
    hand in float64."""
    base = {"w": torch.tensor([0.0, 1.0, -1.0]), "b": torch.tensor([2.0])}
    ft = {"w": torch.tensor([1.0, -1.0, 3.0]), "b": torch.tensor([0.0])}
    fishers = (
        {"w": torch.tensor([4.0, 0.0, 0.0]), "b": torch.tensor([3.0])},  # L2 5, L1 7
        {"w": torch.tensor([2.0, 2.0, 2.0]), "b": torch.tensor([1.0])},  # L2 sqrt(13), L1 7
    )
    merged = merge_state_dicts("fisher", base, [ft], MethodParams(), strength=0.5, statistics=fishers)
    inverse = np.array([1 / 5, 1 / np.sqrt(13)])
    c = 0.5 * inverse / inverse.sum()
    for key in base:
        f = [fisher[key].double().numpy() + 1e-6 for fisher in fishers]
        models = [base[key].double().numpy(), ft[key].double().numpy()]
        expected = (c[0] * f[0] * models[0] + c[1] * f[1] * models[1]) / (c[0] * f[0] + c[1] * f[1])
        torch.testing.assert_close(merged[key].double(), torch.from_numpy(expected), atol=1e-6, rtol=0)


def test_fisher_with_two_specialists_weighs_base_one_minus_alpha_and_each_alpha_over_two():
    torch.manual_seed(3)
    models = [{"w": torch.randn(5)} for _ in range(3)]
    fisher = {"w": torch.rand(5) + 0.1}
    merged = merge_state_dicts(
        "fisher", models[0], models[1:], MethodParams(), strength=0.6, statistics=(fisher,) * 3
    )["w"]
    expected = 0.4 * models[0]["w"] + 0.3 * models[1]["w"] + 0.3 * models[2]["w"]
    torch.testing.assert_close(merged, expected, atol=1e-6, rtol=0)


def test_tensors_the_statistics_leave_out_are_the_models_weighted_mean():
    """FusionBench merges what a model's statistics do not cover (a buffer a Fisher lacks; for
    RegMean anything but a linear layer's weight) as the models' weighted mean: (1 - alpha) for the
    base, alpha / T each specialist. Here a 1-D tensor one Fisher of three lacks, and RegMean's
    1-D tensor and a 2-D one without a Gram."""
    torch.manual_seed(5)
    models = [{"w": torch.randn(3, 4), "v": torch.randn(4), "u": torch.randn(2, 3)} for _ in range(3)]
    fishers = tuple({"w": torch.rand(3, 4) + 0.1, "v": torch.rand(4) + 0.1} for _ in range(3))
    fishers[2].pop("v")
    grams = tuple({"w": torch.eye(4) + 0.1, "v": torch.eye(4)} for _ in range(3))
    for method, statistics, left_out in (("fisher", fishers, ("v",)), ("regmean", grams, ("v", "u"))):
        merged = merge_state_dicts(
            method, models[0], models[1:], MethodParams(), strength=0.6, statistics=statistics
        )
        for key in left_out:
            expected = 0.4 * models[0][key] + 0.3 * models[1][key] + 0.3 * models[2][key]
            torch.testing.assert_close(merged[key], expected, atol=1e-6, rtol=0, msg=f"{method} {key}")


def test_regmean_with_two_specialists_follows_the_closed_form_at_any_offdiag_scale():
    """Model weights l = (1 - alpha, alpha / 2, alpha / 2). With r = 0 only the Grams' diagonals
    remain, so each input column j is the mean of the models' columns weighted by l_i G_i[j, j];
    with r = 0.95 (FusionBench's CLIP default) W = (sum l_i W_i G~_i)(sum l_i G~_i)^-1 with
    G~ = r G + (1 - r) diag(G), computed here in float64 numpy."""
    rng = np.random.default_rng(4)
    inputs = [rng.normal(size=(30, 4)) * s for s in ([1, 1, 1, 1], [2, 1, 0.5, 1], [1, 3, 1, 0.2])]
    grams = [x.T @ x / len(x) for x in inputs]
    weights = [rng.normal(size=(3, 4)) for _ in range(3)]
    shares = [0.4, 0.3, 0.3]
    statistics = tuple({"layer.weight": torch.tensor(g, dtype=torch.float32)} for g in grams)
    models = [{"layer.weight": torch.tensor(w, dtype=torch.float32)} for w in weights]

    def merged(ratio: float) -> torch.Tensor:
        params = MethodParams(offdiag_scale=ratio)
        return merge_state_dicts(
            "regmean", models[0], models[1:], params, strength=0.6, statistics=statistics
        )["layer.weight"]

    column_weights = np.array(
        [[share * g[j, j] for j in range(4)] for share, g in zip(shares, grams, strict=True)]
    )
    diagonal = sum(w * column_weights[i] for i, w in enumerate(weights)) / column_weights.sum(axis=0)
    torch.testing.assert_close(merged(0.0), torch.tensor(diagonal, dtype=torch.float32), atol=1e-5, rtol=0)
    tilde = [0.95 * g + 0.05 * np.diag(np.diag(g)) for g in grams]
    closed = sum(share * w @ t for share, w, t in zip(shares, weights, tilde, strict=True)) @ np.linalg.inv(
        sum(share * t for share, t in zip(shares, tilde, strict=True))
    )
    torch.testing.assert_close(merged(0.95), torch.tensor(closed, dtype=torch.float32), atol=1e-5, rtol=0)


@pytest.fixture
def setting(tmp_path):
    bench = write_fixture(tmp_path / "bench", fmt="save_to_disk", per_class=4)
    for seed in range(2):
        write_checkpoint(tmp_path / f"m{seed}.safetensors", seed)
    settings = EvalSettings(
        data=str(bench), store=tmp_path / "s.jsonl", cache_dir=tmp_path / "cache", bootstrap=0, progress=False
    )
    return settings, [str(tmp_path / f"m{seed}.safetensors") for seed in range(2)]


def _model_and_evaluator(settings, checkpoint):
    """A model and the evaluator of the setting's μ-Bench copy for it, on CPU."""
    prepared = prepare(settings)
    with open_source(checkpoint) as source:
        model, config = load_model(source)
    return model, Evaluator(prepared.bench, prepared.tasks, config, settings, torch.device("cpu"))


def test_grams_are_the_mean_outer_product_of_each_layers_input(setting):
    settings, models = setting
    model, evaluator = _model_and_evaluator(settings, models[0])
    questions = select_questions(evaluator, 12, seed=0)
    grams = gram_matrices(model, evaluator, questions, batch_size=5)
    seen = []  # every question's image once, in one batch: the reference does not batch as grams do
    block = model.visual.transformer.resblocks[0]
    handle = block.ln_2.register_forward_hook(
        lambda _m, _i, output: seen.append(output.detach().reshape(-1, output.shape[-1]))
    )
    with torch.no_grad():
        model.encode_image(evaluator.pixels.take(questions.positions))
    handle.remove()
    x = torch.cat(seen)  # ln_2's output is c_fc's input
    torch.testing.assert_close(
        grams["visual.transformer.resblocks.0.mlp.c_fc.weight"], x.T @ x / len(x), atol=1e-5, rtol=1e-5
    )
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in grams
    assert "transformer.resblocks.0.mlp.c_proj.weight" in grams, "the text tower's layers too"
    assert not any("out_proj" in key for key in grams), "open_clip's fused attention hides out_proj's input"


def test_the_fisher_is_the_mean_squared_gradient_at_a_seeded_draw_from_the_models_own_belief(setting):
    """Matena & Raffel's diagonal Fisher, written out question by question: the target drawn from the
    model's own softmax over the question's options (a torch Generator seeded with the seed, one draw
    per question in order), the gradient of that log-probability for every parameter, squared, and
    the mean over questions (not the sum). Each draw is over the question's options padded with
    zero probability to the widest question's count, as the questions are stored: a draw never
    lands on padding, but it consumes the generator by the padded width (questions offer different
    numbers of options, and the draws after a padded one would differ over its own options alone)."""
    from micromerge.eval.statistics import fisher_diagonal

    settings, models = setting
    model, evaluator = _model_and_evaluator(settings, models[1])
    questions = select_questions(evaluator, 5, seed=7)
    fisher = fisher_diagonal(model, evaluator, questions, seed=7)
    params = dict(model.named_parameters())
    expected = {key: torch.zeros_like(p) for key, p in params.items()}
    generator = torch.Generator().manual_seed(7)
    targets = []
    for position, options in zip(questions.positions, questions.options, strict=True):
        own = options[options >= 0]
        image = model.encode_image(evaluator.pixels.take(np.array([position])))
        texts = model.encode_text(evaluator.tokenizer([evaluator.texts[i] for i in own]))
        image, texts = image / image.norm(dim=-1, keepdim=True), texts / texts.norm(dim=-1, keepdim=True)
        log_probs = (model.logit_scale.exp() * image @ texts.T).log_softmax(dim=1)[0]
        padded = torch.zeros(len(options))
        padded[: len(own)] = log_probs.detach().exp()
        drawn = int(torch.multinomial(padded, 1, generator=generator))
        targets.append(drawn)
        grads = torch.autograd.grad(log_probs[drawn], list(params.values()), allow_unused=True)
        for key, grad in zip(params, grads, strict=True):
            if grad is not None:
                expected[key] += grad**2 / len(questions)
    assert set(fisher) == set(params) and any(t != 0 for t in targets), "some draws are not the first option"
    assert (questions.options[:-1] < 0).any(), "a padded question comes before another: it moves their draws"
    for key in params:  # float32 sums in another order (the token embedding gathers many positions)
        scale = float(expected[key].abs().max())
        torch.testing.assert_close(fisher[key], expected[key], atol=1e-5 * scale, rtol=1e-4, msg=key)
    request = StatisticsRequest("fisher", samples=5, seed=7)  # the seed draws questions and targets
    cached, _ = model_statistics(models[1], request, settings, torch.device("cpu"))
    for key in params:
        torch.testing.assert_close(cached[key], fisher[key], atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("kind", ["fisher", "gram", "unknown"])
def test_a_statistics_request_needs_a_known_kind_and_at_least_one_question(kind):
    with pytest.raises(Exception, match=r"--samples 0: must be at least 1|statistics 'unknown'"):
        StatisticsRequest(kind, samples=0)
    if kind != "unknown":
        assert StatisticsRequest(kind, samples=1).samples == 1, "one question is a request"


def test_questions_are_a_seeded_draw_and_score_only_their_own_options(setting):
    """The statistics' questions: a draw fixed by the seed (another seed, other questions), each
    scored by the model's softmax over its own options at its temperature, padding never a
    candidate; checked against the rule written out with the tokenizer and model alone."""
    settings, models = setting
    model, evaluator = _model_and_evaluator(settings, models[0])
    every = select_questions(evaluator, 10**6, seed=0)
    drawn = select_questions(evaluator, 12, seed=0)
    assert len(drawn) == 12 < len(every)
    assert np.array_equal(drawn.positions, select_questions(evaluator, 12, seed=0).positions)
    other = select_questions(evaluator, 12, seed=1)
    assert not (
        np.array_equal(drawn.positions, other.positions) and np.array_equal(drawn.options, other.options)
    )
    padded = every.take(np.flatnonzero((every.options < 0).any(axis=1))[:6])
    assert len(padded), "the fixture has questions with fewer options than the widest"
    with torch.no_grad():
        scored = option_log_probs(model, evaluator, padded, 0, len(padded))
        for row, (position, options) in enumerate(zip(padded.positions, padded.options, strict=True)):
            own = options[options >= 0]
            image = model.encode_image(evaluator.pixels.take(np.array([position])))
            texts = model.encode_text(evaluator.tokenizer([evaluator.texts[i] for i in own]))
            image, texts = image / image.norm(dim=-1, keepdim=True), texts / texts.norm(dim=-1, keepdim=True)
            expected = (model.logit_scale.exp() * image @ texts.T).log_softmax(dim=1)[0]
            torch.testing.assert_close(scored[row, : len(own)], expected, atol=1e-5, rtol=0)
            assert torch.isneginf(scored[row, len(own) :]).all()


def test_statistics_never_see_the_report_half(tmp_path, setting):
    """Replace every report-half image by noise: Fishers and Grams do not change."""
    settings, models = setting
    _, evaluator = _model_and_evaluator(settings, models[1])
    report_rows = set(np.flatnonzero(~evaluator.select_half).tolist())
    dataset = datasets.load_from_disk(settings.data)
    noise = write_noise_png()

    def poison(row, index):
        return {"image": {"bytes": noise, "path": None}} if index in report_rows else {"image": row["image"]}

    poisoned = dataset.map(poison, with_indices=True)
    poisoned.save_to_disk(str(tmp_path / "poisoned"))
    other = replace(settings, data=str(tmp_path / "poisoned"))
    for kind in ("fisher", "gram"):
        request = StatisticsRequest(kind, samples=24)
        clean, described = model_statistics(models[1], request, settings, torch.device("cpu"))
        dirty, dirty_described = model_statistics(models[1], request, other, torch.device("cpu"))
        assert described["data_fingerprint"] != dirty_described["data_fingerprint"], "really other data"
        assert described["split"] == "select"
        assert described["decode"] == DECODE_IDENTITY, "keyed on how the pixels were decoded"
        for key in clean:
            torch.testing.assert_close(dirty[key], clean[key], atol=0, rtol=0, msg=f"{kind} {key}")
        other_model, other_described = model_statistics(models[0], request, settings, torch.device("cpu"))
        assert other_described["model_sha256"] != described["model_sha256"]
        assert any(not torch.equal(other_model[k], clean[k]) for k in clean), "another model's own statistics"


def test_statistics_ask_the_authors_questions_whatever_protocol_a_sweep_reports_and_take_the_merge_seed(
    tmp_path, setting
):
    """A closed-set sweep still estimates its statistics on μ-Bench's own questions (the same
    numbers as a ubench one), and the merge's --seed is the statistics' seed (another seed,
    another draw of questions and of Fisher targets)."""
    from micromerge.eval.statistics import statistics_input

    settings, models = setting
    closed = replace(settings, protocol="closed-set")
    cpu = torch.device("cpu")
    for seed in (0, 2):
        params = MethodParams(samples=8, seed=seed)
        ubench = statistics_input("fisher", tuple(models), params, settings, cpu)
        other = statistics_input(
            "fisher", tuple(models), params, replace(closed, cache_dir=tmp_path / str(seed)), cpu
        )
        assert [d["seed"] for d in ubench.described] == [seed, seed]
        for mine, theirs in zip(ubench.values, other.values, strict=True):
            for key in mine:
                torch.testing.assert_close(theirs[key], mine[key], atol=0, rtol=0)
    first, second = (statistics_input("fisher", tuple(models), MethodParams(samples=8, seed=seed), settings, cpu)
                     for seed in (0, 2))  # fmt: skip
    assert any(not torch.equal(first.values[1][k], second.values[1][k]) for k in first.values[1])


def write_noise_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
        buffer, "PNG"
    )
    return buffer.getvalue()


def test_merge_and_sweep_record_the_data_and_reuse_cached_statistics(tmp_path, setting):
    settings, models = setting
    args = ["merge", "--base", models[0], "--ft", models[1], "--method", "regmean", "--samples", "16"]
    common = ["--data", settings.data, "--cache-dir", str(settings.cache_dir), "--quiet"]
    missing = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "x.safetensors")])
    assert missing.exit_code == 2 and "give --data" in missing.output
    before = set(Path.cwd().iterdir())
    first = CliRunner().invoke(cli, [*args, *common, "--out", str(tmp_path / "r.safetensors")])
    assert first.exit_code == 0, first.output
    assert first.stderr == "", "--quiet: the statistics' bars (decoding, estimating) too"
    assert set(Path.cwd().iterdir()) == before, "estimating statistics writes nothing outside the cache"
    manifest = json.loads((tmp_path / "r.safetensors.manifest.json").read_text())
    (statistics, _) = manifest["statistics"]
    assert statistics["kind"] == "gram" and statistics["split"] == "select" and statistics["samples"] == 16
    cached = sorted((settings.cache_dir / "statistics").iterdir())
    stamps = [path.stat().st_mtime_ns for path in cached]
    again = CliRunner().invoke(cli, [*args, *common, "--out", str(tmp_path / "r.safetensors")])
    assert again.exit_code == 0 and "kept" in again.output, again.output
    sweep = ["sweep", "--base", models[0], "--ft", models[1], "--method", "regmean", "--samples", "16"]
    sweep += [
        "--alphas",
        "0,1",
        "--store",
        str(settings.store),
        "--bootstrap",
        "0",
        "--device",
        "cpu",
        *common,
    ]
    result = CliRunner().invoke(cli, sweep)
    assert result.exit_code == 0, result.output
    assert [path.stat().st_mtime_ns for path in cached] == stamps, "statistics computed once, then reused"
    rows = ResultStore(settings.store).rows()
    assert rows and all(r["parameters"]["statistics"][0]["split"] == "select" for r in rows)
    merged = load_file(str(tmp_path / "r.safetensors"))
    assert set(merged) == set(load_file(models[0]))


def write_corpus_folder(folder: Path, seed: int, count: int = 12, kinds: int = 5) -> Path:
    """An image-caption corpus as `finetune` reads it: PNG files and captions.csv (image,caption)."""
    import csv
    import io

    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    with open(folder / "captions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for index in range(count):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
            (folder / f"{index}.png").write_bytes(buffer.getvalue())
            writer.writerow([f"{index}.png", f"a micrograph of tissue type {index % kinds} (corpus {seed})"])
    return folder


def test_a_model_can_have_statistics_on_its_own_corpus(tmp_path, setting):
    """Matena & Raffel estimate each model's Fisher on its own task's data: here the specialist's
    fine-tuning corpus. Each image is asked to choose its own caption among distinct captions."""
    from micromerge.eval.corpus_questions import CORPUS_OPTIONS, corpus_questions, open_corpus

    settings, models = setting
    corpus = write_corpus_folder(tmp_path / "corpus", seed=1)
    pairs, described = open_corpus(str(corpus))
    with open_source(models[1]) as source:
        _, config = load_model(source)
    bank, questions = corpus_questions(
        pairs, config, samples=10, seed=0, device=torch.device("cpu"), progress=False
    )
    assert len(questions) == 10 and questions.options.shape[1] == min(CORPUS_OPTIONS, 5)
    for position, options in zip(questions.positions, questions.options, strict=True):
        caption = pairs.captions[np.sort(np.random.default_rng(0).permutation(12)[:10])[position]]
        assert bank.texts[options[0]] == caption, "the image's own caption is among its options"
        assert len(set(options.tolist())) == len(options), "distinct options"
    request = StatisticsRequest("fisher", samples=10)
    own, own_described = model_statistics(models[1], request, settings, torch.device("cpu"), data=str(corpus))
    bench, _ = model_statistics(models[1], request, settings, torch.device("cpu"))
    assert own_described["split"] == "corpus" and own_described["data"] == str(corpus)
    assert own_described["data_fingerprint"] == described["data_fingerprint"]
    assert any(not torch.equal(own[k], bench[k]) for k in own), "other data, other Fishers"


def test_a_corpus_of_more_captions_than_options_draws_each_images_others_from_all(tmp_path, setting):
    """With more distinct captions than CORPUS_OPTIONS, each question is its own caption first and
    CORPUS_OPTIONS - 1 others drawn with the seed (whether or not the draw hit its own); the texts
    are the distinct captions in sorted order, so the draws do not depend on a set's order. Two
    distinct captions are the fewest a question can be asked with."""
    from micromerge.eval.corpus_questions import CORPUS_OPTIONS, corpus_questions, open_corpus

    settings, models = setting
    with open_source(models[1]) as source:
        _, config = load_model(source)
    corpus = write_corpus_folder(tmp_path / "corpus", seed=1, count=40, kinds=20)
    pairs, _ = open_corpus(str(corpus))
    bank, questions = corpus_questions(pairs, config, 40, 3, torch.device("cpu"), progress=False)
    assert bank.texts == sorted(set(pairs.captions)) and len(bank.texts) == 20 > CORPUS_OPTIONS
    assert questions.options.shape == (40, CORPUS_OPTIONS)
    for position, options in zip(questions.positions, questions.options, strict=True):
        assert bank.texts[options[0]] == pairs.captions[position], "its own caption first"
        assert len(set(options.tolist())) == CORPUS_OPTIONS, "distinct options"
    two = write_corpus_folder(tmp_path / "two", seed=1, count=4, kinds=2)
    pairs, _ = open_corpus(str(two))
    bank, questions = corpus_questions(pairs, config, 4, 0, torch.device("cpu"), progress=False)
    assert questions.options.shape == (4, 2)


def test_no_select_half_question_is_one_line(setting):
    """Tasks with questions, none of them about a select-half image (a benchmark of a few images can
    split so): statistics have nothing to be estimated on, said in one line."""
    from micromerge.core.errors import MicromergeError

    settings, models = setting
    _, evaluator = _model_and_evaluator(settings, models[0])
    evaluator.select_half[:] = False
    with pytest.raises(MicromergeError, match="no select-half questions to estimate statistics on"):
        select_questions(evaluator, 5, seed=0)


def test_a_corpus_changed_in_place_is_other_data_and_a_few_bad_images_are_skipped(tmp_path, setting):
    """The statistics cache keys on the corpus's bytes, not its path: captions rewritten in place
    are estimated again. A corpus image that does not decode is skipped (up to half of the drawn
    ones, corpus_questions.MAX_BAD_FRACTION); more is a one-line error naming the corpus."""
    from micromerge.core.errors import MicromergeError
    from micromerge.eval.corpus_questions import corpus_questions, open_corpus

    settings, models = setting
    corpus = write_corpus_folder(tmp_path / "corpus", seed=1)
    request = StatisticsRequest("gram", samples=6)
    before, first = model_statistics(models[1], request, settings, torch.device("cpu"), data=str(corpus))
    table = corpus / "captions.csv"
    table.write_text(table.read_text().replace("tissue type", "cell type"))
    after, second = model_statistics(models[1], request, settings, torch.device("cpu"), data=str(corpus))
    assert first["data_fingerprint"] != second["data_fingerprint"]
    assert any(not torch.equal(before[k], after[k]) for k in before), "estimated again on the new captions"
    with open_source(models[1]) as source:
        _, config = load_model(source)
    (corpus / "0.png").write_bytes(b"not a png")
    pairs, _ = open_corpus(str(corpus))
    bank, questions = corpus_questions(pairs, config, 12, 0, torch.device("cpu"), progress=False)
    assert len(questions) == 11, "the one unreadable image skipped"
    for index in range(1, 7):
        (corpus / f"{index}.png").write_bytes(b"not a png")
    pairs, _ = open_corpus(str(corpus))
    with pytest.raises(MicromergeError, match=r"7 of 12 images are unreadable"):
        corpus_questions(pairs, config, 12, 0, torch.device("cpu"), progress=False)


def test_merge_takes_each_models_own_corpus(tmp_path, setting):
    settings, models = setting
    general, special = (
        write_corpus_folder(tmp_path / "general", 0),
        write_corpus_folder(tmp_path / "special", 1),
    )
    args = ["merge", "--base", models[0], "--ft", models[1], "--method", "fisher", "--samples", "8"]
    args += ["--cache-dir", str(settings.cache_dir), "--quiet", "--out", str(tmp_path / "f.safetensors")]
    own = CliRunner().invoke(cli, [*args, "--base-data", str(general), "--ft-data", str(special)])
    assert own.exit_code == 0, own.output
    described = json.loads((tmp_path / "f.safetensors.manifest.json").read_text())["statistics"]
    assert [d["data"] for d in described] == [str(general), str(special)]
    swapped = CliRunner().invoke(cli, [*args, "--base-data", str(special), "--ft-data", str(general)])
    assert (
        swapped.exit_code == 2 and "output exists (not from these inputs and parameters)" in swapped.output
    ), "the same models and parameters on other data make another merge"
    mixed = CliRunner().invoke(cli, [*args, "--force", "--ft-data", str(special), "--data", settings.data])
    assert mixed.exit_code == 0, mixed.output
    described = json.loads((tmp_path / "f.safetensors.manifest.json").read_text())["statistics"]
    assert [d["split"] for d in described] == ["select", "corpus"], "the base on μ-Bench's select half"
    base_only = CliRunner().invoke(
        cli, [*args, "--force", "--base-data", str(general), "--data", settings.data]
    )
    assert base_only.exit_code == 0, base_only.output
    described = json.loads((tmp_path / "f.safetensors.manifest.json").read_text())["statistics"]
    assert [d["split"] for d in described] == ["corpus", "select"], "the specialist on the select half"
    alone = CliRunner().invoke(cli, [*args, "--force", "--ft-data", str(special)])
    assert alone.exit_code == 2 and "give --data" in alone.output
    # the base is the model left without data: the message says so, and the other way round
    assert (
        "which the models without data of their own (--base) learn from, or give --base-data" in alone.output
    )
    free = CliRunner().invoke(cli, [*args[:5], "--method", "wise-ft", "--base-data", str(general)])
    assert free.exit_code == 2 and "only fisher and regmean" in free.output
    count = CliRunner().invoke(cli, [*args, "--ft-data", str(special), "--ft-data", str(general)])
    assert count.exit_code == 2 and "one per --ft" in count.output
    for flag in (
        "--base-data",
        "--ft-data",
    ):  # the corpus readers' messages said --data, a flag of its own here
        missing = CliRunner().invoke(
            cli, [*args, "--force", flag, str(tmp_path / "gone"), "--data", settings.data]
        )
        assert missing.exit_code == 2 and f"error: {flag} {tmp_path / 'gone'}: no such file" in missing.output
        # a spec with options: the readers name its location (or a file in it), not the whole spec
        optioned = CliRunner().invoke(
            cli, [*args, "--force", flag, f"{general}/captions.csv#root=gone", "--data", settings.data]
        )
        assert optioned.exit_code == 2, optioned.output
        assert f"error: {flag} {general / 'captions.csv'}: #root=gone: no folder" in optioned.output
        # and in a hint of what to type (the folder's table is comma-separated, read as tabs here)
        hinted = CliRunner().invoke(
            cli, [*args, "--force", flag, f"{general}#sep=tab", "--data", settings.data]
        )
        assert hinted.exit_code == 2 and f"name yours: {flag} '{general}#image=COLUMN'" in hinted.output
    # the model without a corpus of its own reads --data, and a fault there names --data
    shared = CliRunner().invoke(
        cli, [*args, "--force", "--ft-data", str(special), "--data", str(tmp_path / "gone")]
    )
    assert shared.exit_code == 2 and f"--data {tmp_path / 'gone'}" in shared.output, shared.output
    assert "--base-data" not in shared.output, shared.output
    learns_nothing = CliRunner().invoke(cli, [*args[:5], "--method", "ties", "--data", settings.data])
    assert learns_nothing.exit_code == 2 and "--data: ties learns from no data" in learns_nothing.output


@pytest.mark.parametrize("method", ["regmean", "adamerging"])
def test_a_statistics_cache_damaged_on_disk_is_computed_again(tmp_path, setting, method):
    """The cached Gram/Fisher tensors (safetensors) and learned tables (JSON) are reused across runs;
    one cut short on disk was safetensors' or json's traceback on every later merge. It is computed
    again, to the same merge."""
    settings, models = setting
    args = ["merge", "--base", models[0], "--ft", models[1], "--method", method, "--data", settings.data]
    args += [
        "--cache-dir",
        str(settings.cache_dir),
        "--quiet",
        "--force",
        "--out",
        str(tmp_path / "m.safetensors"),
    ]
    args += ["--samples", "16"] if method == "regmean" else ["--steps", "2"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    first = load_file(str(tmp_path / "m.safetensors"))
    cached = sorted((settings.cache_dir / "statistics").iterdir())
    assert cached
    # cut short, or whole but not what it should hold (a JSON object without the table)
    for damage in (lambda data: data[: len(data) // 2], lambda data: b'{"described": {}}'):
        for path in cached:
            path.write_bytes(damage(path.read_bytes()))
        again = CliRunner().invoke(cli, args)
        assert again.exit_code == 0, again.output
        merged = load_file(str(tmp_path / "m.safetensors"))
        assert all(torch.equal(first[k], merged[k]) for k in first)


def test_statistics_are_keyed_and_recorded_by_the_tasks_their_questions_come_from(setting):
    """A sweep's `--tasks` limits the questions statistics are drawn from: `--tasks coarse` and the
    whole benchmark are other statistics, each cached and recorded as what it is (one cache entry
    served both, and the record did not say which). A selection of every task is `all`."""
    settings, models = setting
    cpu = torch.device("cpu")
    coarse_settings = replace(settings, tasks="coarse")
    coarse_tasks = [t.name for t in prepare(coarse_settings, writes_results=False).tasks]
    request = StatisticsRequest("gram", samples=24)
    every, every_described = model_statistics(models[1], request, settings, cpu)
    coarse, coarse_described = model_statistics(models[1], request, coarse_settings, cpu)
    _, spelt_out = model_statistics(models[1], request, replace(settings, tasks="coarse,fine"), cpu)
    assert every_described["tasks"] == spelt_out["tasks"] == "all"
    assert coarse_described["tasks"] == coarse_tasks and "kather_et_al_2016" not in coarse_tasks
    assert any(not torch.equal(every[k], coarse[k]) for k in every), "drawn from other questions"
    assert len(list((settings.cache_dir / "statistics").glob("gram-*.safetensors"))) == 2


def test_statistics_are_keyed_by_the_questions_not_only_the_task_names(setting, tmp_path):
    """A `--sources` table whose `null_dataset_match` rules move the Held H2B rows under
    kather_et_al_2016 (eval/ubench_sources.toml names both rules) keeps that task's name and gives it
    other questions: `--tasks kather_et_al_2016` under it and under the shipped table were one cache
    entry, so the second read the first's statistics."""
    settings, models = setting
    cpu = torch.device("cpu")
    table = tmp_path / "moved.toml"
    table.write_text(
        '[sources.held_et_al_2010_h2b]\nnull_dataset_match = ""\n'
        '[sources.kather_et_al_2016]\nnull_dataset_match = "h2b|chromatin"\n'
    )
    shipped = replace(settings, tasks="kather_et_al_2016")
    moved = replace(shipped, sources=table)
    assert len(prepare(moved, writes_results=False).tasks[0].questions[0].rows) > len(
        prepare(shipped, writes_results=False).tasks[0].questions[0].rows
    ), "the table moves rows under the same name"
    request = StatisticsRequest("gram", samples=64)
    first, first_described = model_statistics(models[1], request, shipped, cpu)
    second, second_described = model_statistics(models[1], request, moved, cpu)
    assert first_described["tasks"] == second_described["tasks"] == ["kather_et_al_2016"]
    assert first_described["questions"] != second_described["questions"]
    assert any(not torch.equal(first[k], second[k]) for k in first), "drawn from other questions"
    assert len(list((settings.cache_dir / "statistics").glob("gram-*.safetensors"))) == 2
