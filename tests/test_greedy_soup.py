"""Greedy soup: the recipe follows its definition step by step, the chosen soup's numbers are what
evaluating the written checkpoint gives, reruns are free, and ablations run it (and skip what a
method cannot take). Wortsman et al. 2022, Recipe 1: ingredients sorted by held-out accuracy,
each added when the held-out accuracy of the uniform soup does not drop."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from micromerge.analysis.ablate import SoupJob, grid_jobs, load_ablation, run_ablation
from micromerge.analysis.metrics import curve
from micromerge.analysis.soup import GREEDY_SOUP, SoupResult, candidate_store, greedy_soup, write_soup
from micromerge.analysis.tables import load_runs
from micromerge.cli import cli
from micromerge.core.errors import MicromergeError
from micromerge.eval import engine
from micromerge.eval.aggregate import is_task_row
from micromerge.eval.data import load_benchmark
from micromerge.eval.engine import run_eval
from micromerge.eval.settings import EvalSettings
from micromerge.eval.store import ResultStore
from micromerge.merging.rules import KeyRules
from tests.helpers import write_checkpoint
from tests.ubench_fixture import write_fixture


@pytest.fixture
def setting(tmp_path):
    bench = write_fixture(tmp_path / "bench", per_class=4)
    models = [tmp_path / f"m{seed}.safetensors" for seed in range(3)]
    for seed, path in enumerate(models):
        write_checkpoint(path, seed)
    settings = EvalSettings(
        data=str(bench),
        store=tmp_path / "results.jsonl",
        cache_dir=tmp_path / "cache",
        bootstrap=0,
        progress=False,
    )
    return settings, [str(m) for m in models]


def test_the_soup_follows_the_recipe_and_its_rows_are_the_written_soups(tmp_path, setting, monkeypatch):
    settings, models = setting
    loads = []
    monkeypatch.setattr(engine, "load_benchmark", lambda *a, **k: loads.append(a) or load_benchmark(*a, **k))
    result = greedy_soup(models[0], tuple(models[1:]), settings, torch.device("cpu"))
    assert len(loads) == 1, "the benchmark is read once for every candidate (a sweep each), not per sweep"
    own = result.own_select
    for model in models:  # each ingredient alone, evaluated as a plain checkpoint: its select-half mean
        rows = run_eval(model, replace(settings, store=tmp_path / "alone.jsonl"), torch.device("cpu"))
        alone = [
            r["value"] for r in rows if is_task_row(r) and (r["split"], r["metric"]) == ("select", "accuracy")
        ]
        assert own[model] == pytest.approx(sum(alone) / len(alone), abs=1e-6)
    order = [step.ingredient for step in result.steps]
    assert order == sorted(models, key=lambda m: (-own[m], models.index(m)))
    best, members = result.steps[0].select_mean, [order[0]]
    assert result.steps[0].weights == tuple(float(m == order[0]) for m in models)
    for step in result.steps[1:]:
        tried = [*members, step.ingredient]
        assert step.weights == tuple(1 / len(tried) if m in tried else 0.0 for m in models), (
            "the trial's soup"
        )
        assert step.kept == (step.select_mean >= best)
        if step.kept:
            best, members = step.select_mean, [*members, step.ingredient]
    assert result.select_mean == best
    assert result.weights == tuple(1 / len(members) if m in members else 0.0 for m in models)

    run = next(r for r in load_runs(settings.store) if r.run_id == result.run_id)
    assert run.method == GREEDY_SOUP and run.parameters["weights"] == list(result.weights)
    assert not any("label" in row for row in ResultStore(settings.store).rows(result.run_id))
    # unlabelled, a soup is named as a sweep is: its protocol, its checkpoints (runs/X/model.safetensors
    # by X, where it said "model + model"), not its last candidate's label
    assert run.label == f"{GREEDY_SOUP} [{settings.protocol}]: m0 + m1 + m2"
    assert run.parameters["order"] == order and run.parameters["ingredients"] == models
    assert curve(run, None, "accuracy", "report")["value"].iloc[0] == pytest.approx(result.report_mean)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        candidates = {repr(r.parameters["weights"]) for r in load_runs(candidate_store(settings.store))}
    assert len(candidates) == 3 + len(result.steps) - 1, "each ingredient alone, then one candidate per step"

    written = write_soup(result, tmp_path / "soup.safetensors", force=False)
    soup, inputs = load_file(str(written.path)), [load_file(m) for m in models]
    for key in ("visual.proj", "text_projection"):
        expected = sum(w * state[key] for w, state in zip(result.weights, inputs, strict=True))
        torch.testing.assert_close(soup[key], expected, atol=1e-6, rtol=0)
    assert written.manifest[GREEDY_SOUP]["weights"] == list(result.weights)

    evaluated = CliRunner().invoke(
        cli,
        ["eval", "--model", str(written.path), "--data", settings.data, "--store", str(tmp_path / "e.jsonl"),
         "--cache-dir", str(settings.cache_dir), "--bootstrap", "0", "--device", "cpu", "--quiet"],
    )  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    plain = next(r for r in load_runs(tmp_path / "e.jsonl")).table
    accuracy = plain[plain["metric"] == "accuracy"]
    assert accuracy[accuracy["split"] == "select"]["value"].mean() == pytest.approx(
        result.select_mean, abs=1e-6
    )
    assert accuracy[accuracy["split"] == "report"]["value"].mean() == pytest.approx(
        result.report_mean, abs=1e-6
    )

    size = Path(settings.store).stat().st_size
    again = greedy_soup(models[0], tuple(models[1:]), settings, torch.device("cpu"))
    assert again == result and Path(settings.store).stat().st_size == size, "a rerun adds nothing"


def test_soup_command_prints_the_steps_and_writes_the_checkpoint(tmp_path, setting):
    settings, models = setting
    args = ["soup", "--base", models[0], "--ft", models[1], "--ft", models[2], "--data", settings.data]
    args += ["--store", str(settings.store), "--cache-dir", str(settings.cache_dir), "--bootstrap", "0"]
    result = CliRunner().invoke(
        cli, [*args, "--device", "cpu", "--quiet", "--out", str(tmp_path / "s.safetensors")]
    )
    assert result.exit_code == 0, result.output
    assert "report half" in result.output and (tmp_path / "s.safetensors").is_file()
    refused = CliRunner().invoke(cli, [*args, "--include", "visual.*", "--exclude", "visual.*"])
    assert refused.exit_code == 2 and "leave no key" in refused.output
    again = CliRunner().invoke(cli, [*args, "--quiet", "--out", str(tmp_path / "s.safetensors")])
    assert again.exit_code == 0, "an earlier soup's output is left for the write to reuse"


def test_the_soup_command_says_a_warning_once(tmp_path, setting):
    """An ingredient with the base's weights was named once for every candidate evaluated (five
    lines): the soup's candidates change the warning filters, which reset Python's own
    once-per-place memory. A command says each warning once."""
    settings, models = setting
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(Path(models[0]).read_bytes())
    args = ["soup", "--base", models[0], "--ft", str(copy), "--ft", models[1], "--data", settings.data]
    args += ["--store", str(settings.store), "--cache-dir", str(settings.cache_dir), "--bootstrap", "0"]
    result = CliRunner().invoke(cli, [*args, "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.output.count(f"warning: --ft {copy}: the same weights as --base") == 1, result.output


def test_an_out_the_soup_cannot_write_is_refused_before_any_candidate_is_evaluated(tmp_path, setting):
    """`--out` was looked at only after the search (every candidate evaluated, minutes to hours),
    then refused for existing; a file of the user's, or an input, is refused first."""
    settings, models = setting
    args = ["soup", "--base", models[0], "--ft", models[1], "--data", settings.data, "--quiet"]
    args += ["--store", str(settings.store), "--cache-dir", str(settings.cache_dir), "--bootstrap", "0"]
    (tmp_path / "mine.safetensors").write_bytes(b"the user's")
    for out, message in (
        (tmp_path / "mine.safetensors", "exists (not a soup's output); pass --force"),
        (Path(models[1]), "is an input"),
        (tmp_path / "soup.pt", "the merged checkpoint is safetensors; end its name in .safetensors"),
    ):
        result = CliRunner().invoke(cli, [*args, "--out", str(out)])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not Path(settings.store).exists() and not candidate_store(Path(settings.store)).exists()
    assert (tmp_path / "mine.safetensors").read_bytes() == b"the user's"


@pytest.mark.slow  # 12 sweeps and a report: 36-59 s
def test_ablation_runs_soups_and_skips_what_a_method_cannot_take(tmp_path, setting):
    settings, models = setting
    config = tmp_path / "grid.toml"
    config.write_text(
        f"""[ablation]
data = "{settings.data}"
store = "{tmp_path / "grid.jsonl"}"
report = "{tmp_path / "report"}"
alphas = "0,1"
methods = ["greedy-soup", "model-stock", "lines", "regmean"]
bootstrap = 0
target = "domain:pathology"

[[ablation.pairs]]
name = "one"
base = "{models[0]}"
finetuned = ["{models[1]}"]

[[ablation.pairs]]
name = "two"
base = "{models[0]}"
finetuned = ["{models[1]}", "{models[2]}"]

[ablation.rule_sets.all]

[ablation.rule_sets.ruled]
alpha_rules = {{ "visual.*" = 0.5 }}
"""
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ablation = load_ablation(config)
    skipped = sorted(str(w.message).split(":")[0] for w in caught if "skipped" in str(w.message))
    assert skipped == ["one / greedy-soup / ruled", "one / model-stock / all", "one / model-stock / ruled",
                       "two / greedy-soup / ruled"]  # fmt: skip
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        labels = [label for label, _ in grid_jobs(ablation)]
        assert len(labels) == 16 - 4
        assert isinstance(dict(grid_jobs(ablation))["two / greedy-soup / all"], SoupJob)
        run_ablation(ablation, tmp_path / "cache", torch.device("cpu"), progress=False)
    assert not [w for w in again if "skipped" in str(w.message)], "said once, when the grid is read"
    runs = {r.label for r in load_runs(ablation.store) if r.method != "none"}
    assert runs == set(labels)
    rows = ResultStore(ablation.store).rows()
    assert {r["method"] for r in rows} >= {GREEDY_SOUP, "model-stock", "lines", "regmean"}
    assert all(
        r["parameters"]["statistics"][0]["split"] == "select" for r in rows if r["method"] == "regmean"
    )


def test_an_ingredient_that_ties_the_soup_joins_it(tmp_path, setting):
    """Recipe 1 adds an ingredient when the soup's held-out accuracy does not drop: three copies of
    one checkpoint tie at every step, so all three join (a strict rule would keep the first only)."""
    settings, models = setting
    copies = [tmp_path / f"copy{i}.safetensors" for i in range(2)]
    for copy in copies:
        copy.write_bytes(Path(models[0]).read_bytes())
    with pytest.warns(
        UserWarning,
        match=r"copy[01]\.safetensors: the same weights as --base .* gives the base a larger share",
    ):
        result = greedy_soup(models[0], tuple(map(str, copies)), settings, torch.device("cpu"))
    assert [step.ingredient for step in result.steps] == [models[0], *map(str, copies)], "ties: base first"
    assert [step.kept for step in result.steps] == [True, True, True]
    assert result.weights == pytest.approx((1 / 3, 1 / 3, 1 / 3))


def test_alpha_rules_are_refused_before_any_candidate_is_evaluated(setting):
    """A soup is a uniform average: per-key alphas have no meaning in it (the ablation grid skips
    them; a script calling greedy_soup gets one line, and no candidate is evaluated)."""
    settings, models = setting
    rules = KeyRules(strength_rules=(("visual.*", 0.5),))
    with pytest.raises(MicromergeError, match="alpha rules do not apply"):
        greedy_soup(models[0], (models[1],), settings, torch.device("cpu"), rules)
    assert not Path(settings.store).exists() and not candidate_store(Path(settings.store)).exists()


def test_a_soup_with_include_and_exclude_keeps_them_in_its_rows_and_its_checkpoint(tmp_path, setting):
    """Keys the rules leave out keep the base's values in every candidate and in the written soup,
    and the rules are part of the recipe a reader of the results sees."""
    settings, models = setting
    rules = KeyRules(include=("visual.*",), exclude=("visual.proj",))
    result = greedy_soup(models[0], tuple(models[1:]), settings, torch.device("cpu"), rules)
    run = next(r for r in load_runs(settings.store) if r.run_id == result.run_id)
    assert (run.parameters["include"], run.parameters["exclude"]) == (["visual.*"], ["visual.proj"])

    written = write_soup(result, tmp_path / "soup.safetensors", force=False, rules=rules)
    soup, inputs = load_file(str(written.path)), [load_file(m) for m in models]
    mixed = [k for k in soup if rules.is_merged(k)]
    assert mixed and len(mixed) < len(soup)
    for key, value in soup.items():
        expected = (
            sum(w * state[key] for w, state in zip(result.weights, inputs, strict=True))
            if rules.is_merged(key)
            else inputs[0][key]
        )
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=0, msg=key)


def test_write_soup_writes_the_recipes_weights_in_the_models_order(tmp_path, setting):
    """A recipe whose weights are not symmetric (what a search on the fixture rarely gives), so a
    weight applied to the wrong model shows; an existing output is kept unless force is passed."""
    _, models = setting
    result = SoupResult(
        models=tuple(models),
        own_select={m: 0.0 for m in models},
        steps=(),
        weights=(0.5, 0.5, 0.0),
        select_mean=0.0,
        report_mean=0.0,
        run_id="r",
        chosen_on={"data_fingerprint": "f00d", "split": "select", "halves_seed": 0},
    )
    out = tmp_path / "soup.safetensors"
    written = write_soup(result, out, force=False, progress=False)
    soup, inputs = load_file(str(out)), [load_file(m) for m in models]
    for key in soup:
        torch.testing.assert_close(soup[key], 0.5 * inputs[0][key] + 0.5 * inputs[1][key], atol=1e-6, rtol=0)
    assert written.manifest[GREEDY_SOUP]["run_id"] == "r"
    before = out.read_bytes()
    with pytest.raises(MicromergeError, match="force"):
        write_soup(replace(result, weights=(0.0, 0.5, 0.5)), out, force=False, progress=False)
    assert out.read_bytes() == before
    write_soup(replace(result, weights=(0.0, 0.5, 0.5)), out, force=True, progress=False)
    torch.testing.assert_close(
        load_file(str(out))["visual.proj"], 0.5 * inputs[1]["visual.proj"] + 0.5 * inputs[2]["visual.proj"]
    )


def test_a_soup_chosen_under_other_settings_is_another_run(tmp_path, setting):
    """The run id names the chosen candidate's own run (inputs' sha256, data, bootstrap, seed), not
    only the recipe: with more bootstrap resamples the recipe is the same (intervals do not move the
    point values it is chosen on), but the rows carry other intervals and must not be skipped as
    already written."""
    settings, models = setting
    plain = greedy_soup(models[0], (models[1],), settings, torch.device("cpu"))
    resampled = greedy_soup(models[0], (models[1],), replace(settings, bootstrap=40), torch.device("cpu"))
    assert plain.describe() == resampled.describe() and plain.run_id != resampled.run_id
    rows = [r for r in ResultStore(settings.store).rows() if r["run_id"] == resampled.run_id]
    assert rows and any(r["ci_low"] < r["value"] for r in rows)


def test_soup_reads_a_specialist_that_needs_allow_pickle_when_given_it(tmp_path, setting):
    """`soup` took --allow-pickle and --arch but chose and wrote the soup without them; the
    refusal then named the very flag the user had passed."""
    import argparse

    from safetensors.torch import load_file

    settings, models = setting
    pickled = tmp_path / "m2.pt"
    torch.save({"state_dict": load_file(models[2]), "args": argparse.Namespace(lr=1e-5)}, pickled)
    args = ["soup", "--base", models[0], "--ft", models[1], "--ft", str(pickled), "--data", settings.data]
    args += ["--store", str(settings.store), "--cache-dir", str(settings.cache_dir), "--bootstrap", "0"]
    args += ["--device", "cpu", "--quiet", "--arch", "nano-clip", "--out", str(tmp_path / "s.safetensors")]
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code == 2 and "pass --allow-pickle" in refused.output
    result = CliRunner().invoke(cli, [*args, "--allow-pickle"])
    assert result.exit_code == 0, result.output
    assert "m2.pt" in result.output and (tmp_path / "s.safetensors").is_file()


def test_a_soup_on_some_tasks_chooses_on_those_even_in_a_store_that_holds_others(tmp_path, setting):
    """A run is keyed on its models, data and method, not on --tasks, so a store that already holds an
    all-task soup's candidates holds rows of every task under the candidates' run ids. A `--tasks
    coarse` soup into it chose and reported on all of them (the all-task soup's numbers to the
    digit); it must match the same soup into a fresh store, and its rows hold only its own tasks."""
    settings, models = setting
    cpu = torch.device("cpu")
    greedy_soup(models[0], tuple(models[1:]), settings, cpu)
    coarse = replace(settings, tasks="coarse")
    shared = greedy_soup(models[0], tuple(models[1:]), coarse, cpu)
    fresh = greedy_soup(models[0], tuple(models[1:]), replace(coarse, store=tmp_path / "fresh.jsonl"), cpu)
    assert shared.own_select == fresh.own_select
    assert (shared.select_mean, shared.report_mean) == (fresh.select_mean, fresh.report_mean)
    coarse_tasks = {"modality", "submodality", "domain", "subdomain", "stain", "ubench:coarse"}
    soup_rows = [r for r in ResultStore(settings.store).rows() if r["run_id"] == shared.run_id]
    assert soup_rows and {r["task"] for r in soup_rows} <= coarse_tasks
