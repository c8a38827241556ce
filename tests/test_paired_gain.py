"""The paired interval on "method A's gain over method B" (issue 14: gains of data-aware merges over
the best data-free one, with intervals): its value by hand, its interval against explicit
question- and image-resampling bootstraps, and the per-question outcomes it pairs against the
evaluator's rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from micromerge.eval.engine import prepare
from micromerge.eval.evaluator import POOLED, Evaluator
from micromerge.eval.metrics import paired_task_mean_difference
from micromerge.merging.models import load_model
from micromerge.merging.sources import open_source
from tests.test_data_aware import setting  # noqa: F401 (a fixture)


def test_the_point_value_is_the_mean_of_per_task_accuracy_differences():
    a = [np.array([1, 1, 0, 1]), np.array([1, 0])]
    b = [np.array([1, 0, 0, 0]), np.array([1, 1])]
    result = paired_task_mean_difference(list(zip(a, b, strict=True)), bootstrap=0)
    assert result["value"] == pytest.approx(((3 - 1) / 4 + (1 - 2) / 2) / 2, abs=1e-12)
    same = paired_task_mean_difference([(a[0], a[0]), (a[1], a[1])], bootstrap=500)
    assert same == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0}, "identical models: no spread at all"


def test_the_interval_matches_resampling_questions():
    rng = np.random.default_rng(0)
    pairs = []
    for n, pa, pb in ((300, 0.7, 0.6), (120, 0.5, 0.55), (80, 0.9, 0.8)):
        shared = rng.random(n)
        pairs.append((shared < pa, (shared + rng.normal(0, 0.2, n)) < pb))  # correlated, as merges are
    fast = paired_task_mean_difference(pairs, bootstrap=20_000, seed=1)
    explicit = np.zeros(20_000)
    for a, b in pairs:
        picks = rng.integers(0, len(a), (20_000, len(a)))
        explicit += (a[picks].mean(axis=1) - b[picks].mean(axis=1)) / len(pairs)
    low, high = np.percentile(explicit, [2.5, 97.5])
    assert fast["ci_low"] == pytest.approx(low, abs=0.006) and fast["ci_high"] == pytest.approx(
        high, abs=0.006
    )
    assert fast["ci_low"] < fast["value"] < fast["ci_high"]


def test_paired_outcomes_are_the_evaluators_report_half(setting):  # noqa: F811
    settings, models = setting
    prepared = prepare(settings)
    with open_source(models[1]) as source:
        model, config = load_model(source)
    evaluator = Evaluator(prepared.bench, prepared.tasks, config, settings, torch.device("cpu"))
    paired = evaluator.task_correctness(model, "report")
    rows = {
        r["task"]: r["value"]
        for r in evaluator.evaluate(model)
        if r["split"] == "report" and r["caption_key"] == POOLED and r["metric"] == "accuracy"
    }
    assert set(paired) == set(rows) and paired
    for task, (correct, images) in paired.items():
        assert correct.mean() == pytest.approx(rows[task], abs=1e-12), task
        assert len(images) == len(correct) and len(np.unique(images)) < len(images), (
            "several questions an image"
        )


def test_the_interval_resamples_images_with_all_their_questions():
    """Two questions about each image, answered alike (as `_0` and `_1` mostly are): the interval is
    brute-force resampling of images, as wide as one question per image gives, and wider than
    resampling the questions one by one would make it."""
    rng = np.random.default_rng(3)
    a, b = rng.random(150) < 0.75, rng.random(150) < 0.6
    images = np.repeat(np.arange(150), 2)
    by_image = paired_task_mean_difference([(np.repeat(a, 2), np.repeat(b, 2), images)], 20_000, seed=1)
    once = paired_task_mean_difference([(a, b)], 20_000, seed=1)
    by_question = paired_task_mean_difference([(np.repeat(a, 2), np.repeat(b, 2))], 20_000, seed=1)
    picks = np.random.default_rng(5).integers(0, 150, (20_000, 150))
    low, high = np.percentile(a[picks].mean(axis=1) - b[picks].mean(axis=1), [2.5, 97.5])
    assert by_image["ci_low"] == pytest.approx(low, abs=0.008) and by_image["ci_high"] == pytest.approx(
        high, abs=0.008
    )
    width = by_image["ci_high"] - by_image["ci_low"]
    assert width == pytest.approx(once["ci_high"] - once["ci_low"], abs=0.01)
    assert by_question["ci_high"] - by_question["ci_low"] < 0.8 * width
    unique = paired_task_mean_difference([(a, b, np.arange(150))], 500, seed=2)
    assert unique == paired_task_mean_difference([(a, b)], 500, seed=2), "one question per image: as before"
