"""Data-aware merges learn from the select half of the halves --seed draws, and are held to it.

The select/report halves are a permutation of the images seeded by --seed (`eval.evaluator.Evaluator`).
Fisher, RegMean, AdaMerging and the supervised α learn from the select half, so their report-half
numbers are held out only under the same halves. Before 0.1.6 neither the statistics' cache key
nor their record said which halves: `merge --seed 3` learned on seed 0's select half and recorded
"seed 3", a later `sweep --seed 3` reused that table (measured: the same coefficients_sha256) and
reported on seed 3's report half, half of which the table had learned from, labels included for
the supervised α; and a merged checkpoint evaluated under another --seed was not told apart.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

from micromerge.cli import cli
from micromerge.core.errors import MicromergeError
from micromerge.core.provenance import (
    LEARNED_FROM_HALVES,
    LEARNED_FROM_SELECT,
    select_half_lineage,
    select_half_mark,
)
from micromerge.eval.statistics import statistics_input
from micromerge.eval.trained_on import refuse_other_halves
from micromerge.finetune.trainer import run_finetune
from micromerge.merging.methods import MethodParams
from tests.test_data_aware import setting  # noqa: F401  (the fixture: a μ-Bench copy and two models)
from tests.test_finetune import config, write_csv_folder
from tests.ubench_fixture import write_fixture

CPU = torch.device("cpu")


@pytest.mark.parametrize("kind", ["gram", "adamerging"])
def test_statistics_and_learned_tables_are_keyed_and_recorded_by_their_halves(setting, kind):  # noqa: F811
    """The same request (samples, seed) on two seeds' halves: two entries of the one cache, each
    recording its halves, learned from other images. Before, the second reused the first."""
    settings, models = setting
    params = MethodParams(samples=12, seed=3, steps=2)
    drawn = {
        halves: statistics_input(kind, tuple(models), params, replace(settings, seed=halves), CPU)
        for halves in (0, 3)
    }
    for halves, statistics in drawn.items():
        assert {(d["split"], d["halves_seed"], d["seed"]) for d in statistics.described} == {
            ("select", halves, 3)
        }
    first, second = drawn[0].values[-1], drawn[3].values[-1]
    if kind == "adamerging":  # the one statistic is the learned table
        first, second = ({"table": torch.tensor(d.values[0].values)} for d in (drawn[0], drawn[3]))
    assert any(not torch.equal(first[k], second[k]) for k in first), "other images, other statistics"


def _invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_a_data_aware_merge_is_evaluated_only_under_the_halves_it_learned_from(tmp_path, setting):  # noqa: F811
    """`merge --seed 3` learns from seed 3's select half (as `eval --seed 3` and `sweep --seed 3`
    split the images) and says so; evaluated, swept or merged on under another --seed it is one line
    naming the seed to give; a merge or fine-tune made from it carries the fact on."""
    settings, models = setting
    common = ["--data", settings.data, "--cache-dir", str(settings.cache_dir), "--quiet"]
    merged = tmp_path / "regmean.safetensors"
    made = _invoke("merge", "--base", models[0], "--ft", models[1], "--method", "regmean", "--samples", "12",
                   "--seed", "3", "--out", str(merged), *common)  # fmt: skip
    assert made.exit_code == 0, made.output
    manifest = json.loads(merged.with_name(merged.name + ".manifest.json").read_text())
    assert [(d["split"], d["halves_seed"]) for d in manifest["statistics"]] == [("select", 3)] * 2
    evaluate = ["eval", "--store", str(tmp_path / "e.jsonl"), "--bootstrap", "0", *common]
    refused = _invoke(*evaluate, "--model", str(merged))
    assert refused.exit_code == 2, refused.output
    assert "learned from the select half of these images as --seed 3 splits them" in refused.output
    assert refused.output.strip().endswith("give --seed 3") and not (tmp_path / "e.jsonl").exists()
    held_out = _invoke(*evaluate, "--model", str(merged), "--seed", "3")
    assert held_out.exit_code == 0, held_out.output

    sweep = ["sweep", "--base", str(merged), "--ft", models[1], "--method", "wise-ft", "--alphas", "0.5",
             "--store", str(tmp_path / "s.jsonl"), "--bootstrap", "0", *common]  # fmt: skip
    refused_sweep = _invoke(*sweep)
    assert refused_sweep.exit_code == 2 and f"a sweep of {merged}" in refused_sweep.output
    assert _invoke(*sweep, "--seed", "3").exit_code == 0

    onward = tmp_path / "onward.safetensors"
    assert _invoke("merge", "--base", str(merged), "--ft", models[1], "--method", "wise-ft", "--alpha", "0.5",
                   "--out", str(onward), "--quiet").exit_code == 0  # fmt: skip
    mark = select_half_mark(
        json.loads((tmp_path / "e.jsonl").read_text().splitlines()[0])["dataset"]["fingerprint"], 3
    )
    assert json.loads(onward.with_name(onward.name + ".manifest.json").read_text())[LEARNED_FROM_HALVES] == [
        mark
    ]
    assert "give --seed 3" in _invoke(*evaluate, "--model", str(onward)).output

    tuned = run_finetune(
        config(str(merged), write_csv_folder(tmp_path / "pairs", n=12), tmp_path / "tuned", max_steps=1)
    )
    assert json.loads((tuned.parent / "manifest.json").read_text())[LEARNED_FROM_HALVES] == [mark]

    other_copy = write_fixture(tmp_path / "other", fmt="save_to_disk", per_class=3)
    elsewhere = _invoke(*evaluate, "--model", str(merged), "--data", str(other_copy), "--store",
                        str(tmp_path / "other.jsonl"))  # fmt: skip
    assert elsewhere.exit_code == 0, "another copy's images are not the ones it learned from"
    assert "It learned from" not in elsewhere.output
    assert not any(
        LEARNED_FROM_SELECT in line for line in (tmp_path / "other.jsonl").read_text().splitlines()
    )

    ordinary = tmp_path / "ties.safetensors"
    assert _invoke("merge", "--base", models[0], "--ft", models[1], "--method", "ties", "--out",
                   str(ordinary), "--quiet").exit_code == 0  # fmt: skip
    assert LEARNED_FROM_HALVES not in json.loads(
        ordinary.with_name(ordinary.name + ".manifest.json").read_text()
    )


def test_statistics_recorded_before_the_halves_seed_are_seed_0s():
    """`merge` before 0.1.6 always split the images as seed 0 does, whatever its --seed."""
    record = {
        "statistics": [
            {"split": "select", "data_fingerprint": "f00d", "seed": 3},
            {"split": "corpus", "data_fingerprint": "beef"},  # a model's own corpus: no halves
        ],
        LEARNED_FROM_HALVES: [select_half_mark("cafe", 2)],
    }
    assert select_half_lineage(record) == sorted([select_half_mark("f00d", 0), select_half_mark("cafe", 2)])
    assert select_half_lineage(None) == [] and select_half_lineage({"statistics": "junk"}) == []


def test_inputs_learned_under_two_halves_have_no_seed_to_give():
    halves = [select_half_mark("f00d", 4), select_half_mark("f00d", 1), select_half_mark("cafe", 7)]
    refuse_other_halves(halves, "beef", 0, "m")  # other data: nothing learned from its images
    for seed in (0, 1):
        with pytest.raises(MicromergeError, match="no one --seed holds its report half out"):
            refuse_other_halves(halves, "f00d", seed, "m")
    with pytest.raises(MicromergeError, match="as --seed 1, --seed 4 splits them"):
        refuse_other_halves(halves, "f00d", 0, "m")  # the seeds in order, whatever the inputs' order
    with pytest.raises(MicromergeError, match=r"as --seed 7 splits them.*give --seed 7$"):
        refuse_other_halves(halves, "cafe", 0, "m")
    refuse_other_halves(halves, "cafe", 7, "m")


def test_a_soup_records_the_half_it_was_chosen_on_and_is_held_to_it(tmp_path, setting):  # noqa: F811
    """A greedy soup is chosen on the select half's accuracy: its checkpoint says which half (before,
    its recipe named neither the data nor the halves), and is evaluated only under those halves."""
    settings, models = setting
    soup = tmp_path / "soup.safetensors"
    made = _invoke("soup", "--base", models[0], "--ft", models[1], "--data", settings.data, "--store",
                   str(tmp_path / "soup.jsonl"), "--cache-dir", str(settings.cache_dir), "--bootstrap", "0",
                   "--seed", "5", "--quiet", "--out", str(soup))  # fmt: skip
    assert made.exit_code == 0, made.output
    recipe = json.loads(soup.with_name(soup.name + ".manifest.json").read_text())["greedy-soup"]
    fingerprint = recipe["chosen_on"]["data_fingerprint"]
    assert recipe["chosen_on"] == {"data_fingerprint": fingerprint, "split": "select", "halves_seed": 5}
    evaluate = ["eval", "--model", str(soup), "--data", settings.data, "--store", str(tmp_path / "e.jsonl"),
                "--cache-dir", str(settings.cache_dir), "--bootstrap", "0", "--quiet"]  # fmt: skip
    refused = _invoke(*evaluate)
    assert refused.exit_code == 2 and refused.output.strip().endswith("give --seed 5"), refused.output
    held_out = _invoke(*evaluate, "--seed", "5")
    assert held_out.exit_code == 0
    _the_held_out_numbers_are_the_report_halfs(tmp_path, soup, held_out.output)


def _the_held_out_numbers_are_the_report_halfs(tmp_path, checkpoint, printed: str) -> None:
    """An `eval` of a checkpoint that learned from (or was chosen on) the select half of the images
    it is scored on marks its `all` and `select` rows, whose images it learned from, and says so
    under its table; its model card shows the report half's numbers (it showed all images', half of
    them learned from, on a card meant for the Hub), and a report's notes name it."""
    rows = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert {(r["split"], r.get(LEARNED_FROM_SELECT, False)) for r in rows} == {
        ("all", True), ("select", True), ("report", False)
    }  # fmt: skip
    assert "It learned from, or was chosen on, the select half of these images (--seed 5)" in printed
    exported = _invoke(
        "export", str(checkpoint), "--out", str(tmp_path / "export"), "--results", str(tmp_path / "e.jsonl")
    )
    assert exported.exit_code == 0, exported.output
    card = (tmp_path / "export" / "README.md").read_text()
    table = card.split("| task | protocol | split |")[1].split("\n\n")[0]
    cells = [line.split(" | ") for line in table.splitlines()[2:]]
    reported = {(r["task"], round(100 * r["value"], 1)) for r in rows if r["split"] == "report" and r["metric"] == "accuracy" and (r.get("caption_key") in ("all", None) or r["level"] == "headline")}  # fmt: skip
    assert {cell[2] for cell in cells} == {"report"} and len(cells) == len(reported)
    assert {(cell[0].strip("| "), float(cell[3].rstrip(" %"))) for cell in cells} == reported
    assert "the numbers are its report half's, images it never saw" in card
    report = _invoke("report", str(tmp_path / "e.jsonl"), "--out", str(tmp_path / "report"))
    assert report.exit_code == 0, report.output
    assert (
        "learned from, or chosen on, the select half of the images it was scored on"
        in (tmp_path / "report" / "report.md").read_text()
    )


def test_an_ablation_refuses_a_checkpoint_held_to_other_halves_before_it_evaluates(tmp_path, setting):  # noqa: F811
    """A grid whose second pair holds a `merge --seed 3` checkpoint, run with seed 0: each reference
    evaluation checked only its own model, so the first pair's were evaluated and stored before the
    refusal, and `--dry-run` passed the grid. Both now refuse it first, writing nothing."""
    settings, models = setting
    merged = tmp_path / "regmean.safetensors"
    made = _invoke("merge", "--base", models[0], "--ft", models[1], "--method", "regmean", "--samples", "12",
                   "--seed", "3", "--out", str(merged), "--data", settings.data, "--cache-dir",
                   str(settings.cache_dir), "--quiet")  # fmt: skip
    assert made.exit_code == 0, made.output
    store, report = tmp_path / "grid.jsonl", tmp_path / "report"
    grid = tmp_path / "grid.toml"

    def ablate(seed: int, *flags: str):
        grid.write_text(
            f'[ablation]\ndata = "{settings.data}"\nstore = "{store}"\nreport = "{report}"\nalphas = "0.5"\n'
            f'methods = ["wise-ft"]\nbootstrap = 0\nseed = {seed}\n'
            f'[[ablation.pairs]]\nbase = "{models[0]}"\nfinetuned = "{models[1]}"\n'
            f'[[ablation.pairs]]\nbase = "{merged}"\nfinetuned = "{models[1]}"\n'
        )
        return _invoke("ablate", str(grid), "--device", "cpu", "--quiet", "--cache-dir", str(settings.cache_dir),
                       *flags)  # fmt: skip

    for flags in (("--dry-run",), ()):
        refused = ablate(0, *flags)
        assert refused.exit_code == 2, refused.output
        assert refused.output.splitlines()[-1] == (
            f"error: {merged}: a data-aware merge (it, or an input) learned from the select half of these "
            "images as --seed 3 splits them, and under --seed 0 half of the report half is images it learned "
            "from: give --seed 3"
        )
        assert not store.exists() and not report.exists(), "nothing evaluated, nothing written"
    held_out = ablate(3, "--dry-run")
    assert held_out.exit_code == 0, held_out.output
    assert "2 runs (2 sweeps of 1 alphas, 0 soups)" in held_out.output
