"""`micromerge report` on the models a store holds `eval` runs of: a store of evaluations only (the
μ-Bench paper's main comparison: several models zero-shot, nothing merged) was refused with "no
sweep runs"; a report with sweeps did not show the evaluations side by side either."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
from click.testing import CliRunner

from micromerge.cli import cli
from micromerge.eval.store import ResultStore
from tests.test_analysis import write_store

# (task, level, domain) -> accuracy, per model; the specialist was not evaluated on "golgi"
TASKS = {
    ("modality", "coarse", "all"): {"base": 0.80, "specialist": 0.50},
    ("domain", "coarse", "all"): {"base": 0.70, "specialist": 0.40},
    ("colon", "fine", "pathology"): {"base": 0.40, "specialist": 0.90},
    ("breast", "fine", "pathology"): {"base": 0.50, "specialist": 0.70},
    ("golgi", "fine", "biology"): {"base": 0.60},
}
HEADLINE = {"base": (0.75, 0.45), "specialist": (0.45, 0.80)}  # (coarse, fine), the ubench protocol


def _evaluation_rows(
    model: str, protocol: str = "ubench", copy: str = "abc", headline: tuple[float, float] | None = None
) -> list[dict]:
    common = {
        "run_id": f"{model}-{protocol}-{copy}",
        "alpha": None,
        "method": "none",
        "parameters": {},
        "protocol": protocol,
        "model": {"base": f"runs/{model}/model.safetensors", "finetuned": []},
        "dataset": {"source": "fixture", "fingerprint": copy},
        "n_images": 100,
        "n_corrupt": 0,
        "n_classes": 3,
    }
    rows = []
    for (task, level, domain), values in TASKS.items():
        if model not in values:
            continue
        groups = {"level": level, "domain": domain, "modality": "light microscopy", "scale": "tissue"}
        for split in ("all", "select", "report"):
            value = values[model]
            rows.append({**common, "task": task, "level": level, "split": split, "metric": "accuracy",
                         "groups": groups, "value": value, "ci_low": value - 0.05, "ci_high": value + 0.05})  # fmt: skip
    if protocol == "ubench":
        for name, value in zip(("coarse", "fine"), headline or HEADLINE[model], strict=True):
            rows.append({**common, "task": f"ubench:{name}", "level": "headline", "split": "all",
                         "metric": "accuracy", "groups": {"level": "headline"}, "value": value,
                         "ci_low": value - 0.01, "ci_high": value + 0.01, "bootstrap": 100})  # fmt: skip
    return rows


def _store(path: Path) -> Path:
    ResultStore(path).append(_evaluation_rows("base") + _evaluation_rows("specialist"))
    return path


def _report(store: Path, out: Path, *flags: str) -> str:
    result = CliRunner().invoke(cli, ["report", str(store), "--out", str(out), *flags])
    assert result.exit_code == 0, result.output
    return (out / "report.md").read_text()


def test_a_store_of_evaluations_only_reports_the_models_side_by_side(tmp_path):
    markdown = _report(_store(tmp_path / "r.jsonl"), tmp_path / "report")
    assert markdown.startswith("# micromerge report: zero-shot evaluation")
    assert "## Headline" not in markdown and "α selection" not in markdown, "no sweep: no merge sections"
    tables = tmp_path / "report" / "tables"
    models = pd.read_csv(tables / "models.csv").set_index("model")
    assert list(models.index) == ["base [ubench]", "specialist [ubench]"]
    # hand-computed: the mean of each model's own tasks, in percent
    assert models.loc["base [ubench]", "tasks"] == 5 and models.loc["specialist [ubench]", "tasks"] == 4
    assert math.isclose(models.loc["base [ubench]", "all tasks (accuracy %)"], 60.0)
    assert math.isclose(models.loc["specialist [ubench]", "all tasks (accuracy %)"], 62.5)
    assert math.isclose(models.loc["specialist [ubench]", "coarse tasks %"], 45.0)
    assert math.isclose(models.loc["base [ubench]", "fine tasks %"], 50.0)
    assert models.loc["specialist [ubench]", "paper fine %"] == 80.0
    assert models.loc["specialist [ubench]", "paper fine 95% CI"] == "[79.0, 81.0]"
    groups = pd.read_csv(tables / "models_groups.csv").set_index("group")
    assert list(groups.index) == [  # the levels, then the rest by name (not a set's order)
        "level:coarse",
        "level:fine",
        "domain:biology",
        "domain:pathology",
        "modality:light microscopy",
        "scale:tissue",
    ]
    assert math.isclose(groups.loc["domain:pathology", "specialist [ubench]"], 80.0)
    assert math.isclose(groups.loc["domain:biology", "base [ubench]"], 60.0)
    assert math.isnan(groups.loc["domain:biology", "specialist [ubench]"]), "not evaluated: empty, not 0"
    tasks = pd.read_csv(tables / "models_tasks.csv").set_index("task")
    assert tasks.loc["colon", "specialist [ubench]"] == 90.0 and math.isnan(
        tasks.loc["golgi", "specialist [ubench]"]
    )
    assert tasks.loc["golgi", "domain"] == "biology"
    assert (tmp_path / "report" / "figures" / "models.png").is_file()
    assert "| specialist [ubench] | ubench | 4 | 62.5 | 45.0 | 80.0 | 45.0 |" in markdown
    assert "- **2 evaluated models**: no merge sweep in this store" in markdown
    assert not re.search(r"\|\s*nan\s*\|", markdown), "a model not evaluated on a group is an empty cell"
    ResultStore(tmp_path / "one.jsonl").append(_evaluation_rows("base"))
    assert "- **1 evaluated model**: no merge sweep" in _report(tmp_path / "one.jsonl", tmp_path / "one")
    ResultStore(tmp_path / "one.jsonl").append(_evaluation_rows("base", protocol="closed-set"))
    closed_set = _report(tmp_path / "one.jsonl", tmp_path / "two")  # no paper numbers: empty cells
    assert "| base [closed-set] | closed-set |" in closed_set and not re.search(r"\|\s*nan\s*\|", closed_set)


def test_evaluations_of_one_model_under_two_protocols_are_two_columns_and_runs_picks_among_them(tmp_path):
    store = _store(tmp_path / "r.jsonl")
    ResultStore(store).append(_evaluation_rows("base", "closed-set"))
    _report(store, tmp_path / "all")
    models = pd.read_csv(tmp_path / "all" / "tables" / "models.csv")
    assert list(models["model"]) == ["base [ubench]", "specialist [ubench]", "base [closed-set]"]
    assert math.isnan(models.set_index("model").loc["base [closed-set]", "paper coarse %"]), (
        "closed-set: none"
    )
    _report(store, tmp_path / "picked", "--runs", "*closed-set*")
    picked = pd.read_csv(tmp_path / "picked" / "tables" / "models.csv")
    assert list(picked["model"]) == ["base [closed-set]"]


def test_a_report_of_sweeps_shows_the_evaluations_beside_them(tmp_path):
    store = write_store(tmp_path / "r.jsonl")
    ResultStore(store).append(_evaluation_rows("base"))
    markdown = _report(store, tmp_path / "report", "--target", "domain:pathology")
    assert markdown.startswith("# micromerge report: forgetting and recovery")
    assert (
        markdown.index("## Headline") < markdown.index("## Evaluated models") < markdown.index("α selection")
    )
    models = pd.read_csv(tmp_path / "report" / "tables" / "models.csv")
    assert list(models["model"]) == ["base [ubench]"], "the sweep is not an evaluated model"
    store_without = write_store(tmp_path / "sweeps-only.jsonl")
    markdown = _report(store_without, tmp_path / "plain", "--target", "domain:pathology")
    assert (
        "## Evaluated models" not in markdown and not (tmp_path / "plain" / "tables" / "models.csv").exists()
    )


def test_one_model_on_two_copies_of_the_data_is_two_rows_each_with_its_own_headline(tmp_path):
    """Two evaluations of one label (the same model and protocol on another copy of μ-Bench) are
    told apart by run id, and each keeps its own paper numbers (they were matched by label)."""
    store = tmp_path / "r.jsonl"
    ResultStore(store).append(
        _evaluation_rows("base") + _evaluation_rows("base", copy="def", headline=(0.2, 0.3))
    )
    _report(store, tmp_path / "report")
    models = pd.read_csv(tmp_path / "report" / "tables" / "models.csv")
    assert list(models["model"]) == ["base [ubench] (base-ubench-abc)", "base [ubench] (base-ubench-def)"]
    assert list(models["paper coarse %"]) == [75.0, 20.0] and list(models["paper fine %"]) == [45.0, 30.0]


def test_a_models_task_count_is_of_the_tasks_scored_on_all_its_images(tmp_path):
    """A task with too few images for a half has rows on all images only (eval leaves an empty half
    out): it is one of the model's tasks all the same."""
    rows = [r for r in _evaluation_rows("base") if r["task"] != "golgi" or r["split"] == "all"]
    store = tmp_path / "r.jsonl"
    ResultStore(store).append(rows)
    _report(store, tmp_path / "report")
    models = pd.read_csv(tmp_path / "report" / "tables" / "models.csv").set_index("model")
    assert models.loc["base [ubench]", "tasks"] == 5


def test_runs_of_one_pair_show_only_the_evaluations_of_that_pairs_models(tmp_path):
    """`report --runs 'clip+plip / *'` of an ablation store showed the evaluations of every pair's
    models beside the one pair; now only the models the chosen sweeps merge (by sha256), and those
    `--runs` names itself, with a note of how many were left out."""
    store = tmp_path / "r.jsonl"
    for run_id, label, base, specialist in (
        ("s1", "clip+plip", "aa", "bb"),
        ("s2", "clip16+quilt", "cc", "dd"),
    ):
        model = {"base": f"{base}.safetensors", "finetuned": [f"{specialist}.safetensors"]}
        write_store(store, run_id=run_id, label=f"{label} / wise-ft",
                    fields={"model": {**model, "base_sha256": [base], "finetuned_sha256": [specialist]}})  # fmt: skip
    for name, digest in (("clip", "aa"), ("plip", "bb"), ("clip16", "cc"), ("quilt", "dd")):
        rows = _evaluation_rows("base")
        model = {"base": f"runs/{name}/model.safetensors", "finetuned": [], "base_sha256": [digest]}
        ResultStore(store).append([{**r, "run_id": f"eval-{name}", "model": model} for r in rows])

    def shown(out: str, *patterns: str) -> tuple[list[str], str]:
        flags = [flag for pattern in patterns for flag in ("--runs", pattern)]
        markdown = _report(store, tmp_path / out, "--target", "domain:pathology", *flags)
        return list(pd.read_csv(tmp_path / out / "tables" / "models.csv")["model"]), markdown

    every, _ = shown("all")
    assert every == ["clip [ubench]", "plip [ubench]", "clip16 [ubench]", "quilt [ubench]"]
    pair, markdown = shown("pair", "clip+plip / *")
    assert pair == ["clip [ubench]", "plip [ubench]"]
    assert "2 evaluated model(s) that no selected run merges are left out" in markdown
    named, _ = shown("named", "clip+plip / *", "eval-quilt")
    assert named == ["clip [ubench]", "plip [ubench]", "quilt [ubench]"]
    both, markdown = shown("both", "clip+plip / *", "clip16+quilt / *")
    assert both == every and "left out" not in markdown


def test_baseline_compares_each_model_with_it_group_by_group(tmp_path):
    """`report --baseline`: the μ-Bench paper's comparison of a specialist with its base (PLIP against
    CLIP), in points per group; hand-computed from TASKS. Models scored otherwise (closed-set against
    a ubench baseline) are not compared but named; a baseline that names no model, or several, is one
    line; a later report without it leaves no stale change table."""
    store = tmp_path / "r.jsonl"  # the model scored otherwise comes between the two compared
    rows = (
        _evaluation_rows("base")
        + _evaluation_rows("specialist", "closed-set")
        + _evaluation_rows("specialist")
    )
    ResultStore(store).append(rows)
    markdown = _report(store, tmp_path / "report", "--baseline", "base [ubench]")
    change = pd.read_csv(tmp_path / "report" / "tables" / "models_change.csv").set_index("group")
    assert list(change.columns) == ["specialist [ubench] − base [ubench]"]
    column = change["specialist [ubench] − base [ubench]"]
    assert math.isclose(column["domain:pathology"], 80.0 - 45.0)  # (0.9 + 0.7) / 2 against (0.4 + 0.5) / 2
    assert math.isclose(column["level:coarse"], 45.0 - 75.0)
    assert math.isnan(column["domain:biology"]), "the specialist was not evaluated there: empty, not a number"
    assert "Against base [ubench], group by group" in markdown
    assert "specialist [closed-set] scored otherwise than base [ubench]" in markdown
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.count("<table") == 3 and not re.search(r"<tr>\s*<th>\d+</th>", page), (
        "models tables, no index"
    )
    for pattern, message in (
        ("clip", "matches no evaluated model"),
        ("*ubench*", "matches 2 evaluated models"),
    ):
        wrong = CliRunner().invoke(
            cli, ["report", str(store), "--out", str(tmp_path / "x"), "--baseline", pattern]
        )
        assert wrong.exit_code == 2 and f"--baseline {pattern}: {message}" in wrong.output, wrong.output
    _report(store, tmp_path / "report")
    assert not (tmp_path / "report" / "tables" / "models_change.csv").exists()


def test_a_baseline_named_by_its_checkpoint_alone_is_found_when_one_protocol_scored_it(tmp_path):
    """`--baseline base` is what a user types after `micromerge eval --model .../base`: it named no
    model ("its evaluated models: base [ubench]; …"). A name two protocols scored still asks for one."""
    store = tmp_path / "r.jsonl"
    rows = (
        _evaluation_rows("base")
        + _evaluation_rows("specialist", "closed-set")
        + _evaluation_rows("specialist")
    )
    ResultStore(store).append(rows)
    _report(store, tmp_path / "report", "--baseline", "base")
    change = pd.read_csv(tmp_path / "report" / "tables" / "models_change.csv")
    assert list(change.columns) == ["group", "specialist [ubench] − base [ubench]"]
    both = CliRunner().invoke(
        cli, ["report", str(store), "--out", str(tmp_path / "x"), "--baseline", "specialist"]
    )
    assert both.exit_code == 2, both.output
    assert "--baseline specialist: matches 2 evaluated models" in both.output
    assert "give one of: specialist [closed-set]; specialist [ubench]" in both.output


def test_a_baseline_matching_none_of_many_models_lists_six_and_counts_the_rest(tmp_path):
    for count in (6, 7):
        store = tmp_path / f"r{count}.jsonl"
        ResultStore(store).append([r for i in range(count) for r in _evaluation_rows("base", copy=f"c{i}")])
        wrong = CliRunner().invoke(
            cli, ["report", str(store), "--out", str(tmp_path / "x"), "--baseline", "clip"]
        )
        assert wrong.exit_code == 2, wrong.output
        listed = wrong.output.split("its evaluated models: ")[1]
        assert listed.count("base [ubench] (base-ubench-c") == 6, listed
        assert ("more)" in listed) == (count == 7) and ("(and 1 more)" in listed) == (count == 7), listed


def test_the_change_against_the_baseline_is_taken_before_rounding(tmp_path):
    """Pathology means 45.04 % (base) and 80.08 % (specialist) are shown as 45.0 and 80.1, but the
    specialist gained 35.04 points: 35.0, not the 35.1 the two shown means would give."""
    rows = _evaluation_rows("base") + _evaluation_rows("specialist")
    for row in rows:
        if row["task"] == "colon":
            row["value"] = {"base-ubench-abc": 0.4008, "specialist-ubench-abc": 0.9016}[row["run_id"]]
    ResultStore(tmp_path / "r.jsonl").append(rows)
    _report(tmp_path / "r.jsonl", tmp_path / "report", "--baseline", "base [ubench]")
    tables = tmp_path / "report" / "tables"
    groups = pd.read_csv(tables / "models_groups.csv").set_index("group")
    assert list(groups.loc["domain:pathology"]) == [45.0, 80.1]
    change = pd.read_csv(tables / "models_change.csv").set_index("group")
    assert change.loc["domain:pathology", "specialist [ubench] − base [ubench]"] == 35.0
