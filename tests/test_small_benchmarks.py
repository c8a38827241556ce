"""A benchmark (or a --tasks subset) too small for both halves to hold an image: the empty half has
no accuracy, so it gets no result rows, and whatever needs that half (choosing alpha, choosing a
soup) says so in one line.

Before: every task wrote NaN rows for the empty half (numpy's 'invalid value' warnings); means over
tasks skipped them silently, `micromerge report` died in pandas' argmax, and the greedy soup ranked
its ingredients by NaN. Found by the mutation audit, round 12: the soup's guard for an empty half
could never fire, because the half was never empty, only NaN."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from micromerge.analysis.metrics import summarise
from micromerge.analysis.soup import greedy_soup
from micromerge.analysis.tables import load_runs
from micromerge.cli import cli
from micromerge.core.errors import MicromergeError
from micromerge.eval.engine import run_eval
from micromerge.eval.evaluator import POOLED
from micromerge.eval.hub_layout import write_hub_layout
from micromerge.eval.settings import EvalSettings
from micromerge.eval.store import ResultStore
from tests.helpers import write_checkpoint
from tests.test_analysis import write_store
from tests.ubench_fixture import fixture_dataset


@pytest.fixture
def one_image(tmp_path):
    """The fixture benchmark cut to its first image, in the Hub's layout; two checkpoints."""
    bench = write_hub_layout(
        fixture_dataset(per_class=2, corrupt=0).select([0]), tmp_path / "b" / "perception" / "0.1.0", 1
    )
    models = []
    for seed in range(2):
        write_checkpoint(tmp_path / f"m{seed}.safetensors", seed)
        models.append(str(tmp_path / f"m{seed}.safetensors"))
    settings = EvalSettings(
        data=str(bench), store=tmp_path / "r.jsonl", cache_dir=tmp_path / "cache", bootstrap=0, progress=False
    )
    return settings, models


def test_the_empty_half_gets_no_rows_and_no_nan(one_image):
    settings, models = one_image
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        run_eval(models[0], settings, torch.device("cpu"))
    rows = ResultStore(settings.store).rows()
    splits = {row["split"] for row in rows}
    assert "all" in splits and len(splits) == 2, "the image's own half, and no other"
    assert all(np.isfinite(row["value"]) and row["n_images"] == 1 for row in rows)


def test_a_soup_needs_every_split_and_says_so(one_image):
    settings, models = one_image
    with pytest.raises(
        MicromergeError,
        match=r"perception/0\.1\.0: none of the evaluated tasks' images is in the (select|report) half",
    ):
        greedy_soup(models[0], (models[1],), settings, torch.device("cpu"))


def test_report_on_a_sweep_without_a_select_half_is_one_line(one_image, tmp_path):
    settings, models = one_image
    sweep = ["sweep", "--base", models[0], "--ft", models[1], "--alphas", "0,1", "--data", settings.data]
    sweep += ["--store", str(settings.store), "--cache-dir", str(settings.cache_dir), "--bootstrap", "0"]
    assert CliRunner().invoke(cli, [*sweep, "--device", "cpu", "--quiet"]).exit_code == 0
    result = CliRunner().invoke(cli, ["report", str(settings.store), "--out", str(tmp_path / "report")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "half has no image for" in result.output and "evaluate more tasks or images" in result.output
    assert not Path(tmp_path / "report" / "report.html").exists()


def test_closed_set_a_task_with_images_in_one_half_only_gets_rows_for_that_half(tmp_path, one_image):
    """Closed-set scoring needs two classes: two nirschl_et_al_2018 images of different classes
    and one eulenberg_et_al_2017 image. Whichever image the benchmark puts in the select half
    (each order of the three is tried), no row is NaN, and in one order the nirschl task has all
    of its images in the report half: it gets no select-half rows."""
    settings, models = one_image
    dataset = fixture_dataset(per_class=2, corrupt=0)
    rows = [r for r in range(len(dataset)) if dataset[r]["dataset"] == "nirschl_et_al_2018"]
    pair = [rows[0], next(r for r in rows if dataset[r]["label"] != dataset[rows[0]]["label"])]
    other = next(r for r in range(len(dataset)) if dataset[r]["dataset"] == "eulenberg_et_al_2017_darkfield")
    halves_seen = []
    for rotation in range(3):
        chosen = [*pair, other][rotation:] + [*pair, other][:rotation]
        bench = write_hub_layout(
            dataset.select(chosen), tmp_path / f"b{rotation}" / "perception" / "0.1.0", 1
        )
        store = tmp_path / f"closed{rotation}.jsonl"
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            run_eval(
                models[0],
                replace(settings, data=str(bench), store=store, protocol="closed-set"),
                torch.device("cpu"),
            )
        written = ResultStore(store).rows()
        assert all(np.isfinite(row["value"]) for row in written)
        halves_seen.append({row["split"] for row in written if row["task"] == "nirschl_et_al_2018"})
    assert {"all", "report"} in halves_seen, halves_seen


def test_a_question_asked_of_no_image_in_a_half_gets_no_row_there(tmp_path, one_image):
    """Every caption of a μ-Bench row is nullable (../shared/ubench/SCHEMA.md), so an image can
    hold one question of a task and not the other. Two images, one per half, the first without
    its `stain_1` caption: the stain task has images in both halves, but `stain_1` is asked in
    the second image's half only, so that question gets rows there and none (not NaN) in the other,
    and the task's row pooled over its questions is in both halves."""
    settings, models = one_image
    dataset = fixture_dataset(per_class=2, corrupt=0).select([0, 1])

    def drop_second_stain_caption(row: dict, index: int) -> dict:
        return {"captions": {**row["captions"], "stain_1": None}} if index == 0 else {}

    dataset = dataset.map(drop_second_stain_caption, with_indices=True, features=dataset.features)
    bench = write_hub_layout(dataset, tmp_path / "two" / "perception" / "0.1.0", 1)
    store = tmp_path / "two.jsonl"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        run_eval(models[0], replace(settings, data=str(bench), store=store), torch.device("cpu"))
    written = ResultStore(store).rows()
    assert all(np.isfinite(row["value"]) for row in written)
    asked = {row["split"] for row in written if row.get("caption_key") == "stain_1"}
    assert asked == {"all", "select"} or asked == {"all", "report"}, asked
    every_split = {"all", "select", "report"}
    assert {row["split"] for row in written if row.get("caption_key") == "stain_0"} == every_split
    # the task's row pooled over its keys is in both halves too
    stain_task = {row["task"] for row in written if row.get("caption_key") == "stain_1"}
    pooled = {
        row["split"] for row in written if row["task"] in stain_task and row.get("caption_key") == POOLED
    }
    assert pooled == every_split, pooled


@pytest.mark.parametrize("missing", ["select", "report"])
def test_summarising_a_run_without_one_half_names_that_half(tmp_path, missing):
    """`--tasks` can pick tasks whose images all fall in one half (the halves split the whole
    benchmark's images): a store without that half's rows, summarised, is one line naming it."""
    full = ResultStore(write_store(tmp_path / "full.jsonl")).rows()
    store = tmp_path / "halved.jsonl"
    ResultStore(store).append([row for row in full if row["split"] != missing])
    (run,) = load_runs(store)
    with pytest.raises(MicromergeError, match=f"the {missing} half has no image for all_task_mean"):
        summarise(run, "domain:pathology")


def test_a_run_whose_select_half_is_empty_is_found_finished_when_run_again(one_image, monkeypatch):
    """A run is finished when every task has its row on all of its images, the one split every
    evaluated task has: were it keyed on a half, a benchmark whose half holds none of a task's
    images would be evaluated again at every resume. With one image the select half (the first
    floor(n / 2) of the seeded permutation) holds none; run again, nothing is loaded."""
    import micromerge.eval.engine as engine

    settings, models = one_image
    first = run_eval(models[0], settings, torch.device("cpu"))
    assert {row["split"] for row in first} == {"all", "report"}
    monkeypatch.setattr(engine, "load_model", lambda *_: pytest.fail("evaluated again"))
    again = run_eval(models[0], settings, torch.device("cpu"))
    assert {ResultStore.identity(r): r["value"] for r in again} == {
        ResultStore.identity(r): r["value"] for r in first
    }
