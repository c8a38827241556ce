"""mergekit's sign-electing and linear variants (dare-ties, breadcrumbs-ties, della-linear) and the
two ways DARE and DELLA rescale what they keep (`--rescale inverse|l1`), each against a hand-worked
example.

Facts taken from the public reference code (read through the search tool and the wheels on PyPI):
- mergekit 0.1.4 `merge_methods/registry.py`: `dare_ties` = random sparsification, sign consensus
  "sum", rescale on, normalize off; `breadcrumbs_ties` = magnitude_outliers, consensus "sum",
  normalize off; `della_linear` = della_magprune, no consensus, normalize off, rescale on.
- mergekit 0.1.4 `generalized_task_arithmetic.get_mask`: elected sign = (sum >= 0) * 2 - 1, an entry
  kept where its sign equals it (a zero entry never does); without normalize the kept entries are
  summed. `sparsify.rescaled_masked_tensor` with RescaleNorm.l1 (what `rescale: true` selects)
  scales the masked tensor back to the L1 norm of the unmasked one, unless either is below 1e-7.
- DARE (Yu et al., ICML 2024) and FusionBench 0.2.33 `method/dare/utils.param_random_drop_`:
  survivors divided by 1 - p. DELLA (Deep et al., 2024): MagPrune rescales each survivor by
  1 / (1 - p_i), p_i its own drop probability.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from micromerge.analysis.ablate import load_ablation, plan_grid
from micromerge.cli import merge_command
from micromerge.merging.methods import METHODS, MethodParams
from micromerge.merging.methods.della import keep_probabilities
from micromerge.merging.methods.task_vectors import dare_mask
from tests.helpers import write_checkpoint


def merge(name: str, base: torch.Tensor, fts: list[torch.Tensor], strength: float, **params) -> torch.Tensor:
    return METHODS[name].merge("k", base, fts, strength, MethodParams(**params))


def test_dare_ties_sums_the_entries_that_agree_with_the_elected_sign():
    base = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    tau1 = torch.tensor([1.0, -2.0, 3.0, 0.0, 1.0])
    tau2 = torch.tensor([2.0, 1.0, -1.0, -1.0, -1.0])
    # sums 3, -1, 2, -1, 0: elected +, -, +, -, and + where the sum is exactly zero (mergekit's >= 0)
    expected = base + 0.5 * torch.tensor([3.0, -2.0, 3.0, -1.0, 1.0])
    merged = merge("dare-ties", base, [base + tau1, base + tau2], 0.5, drop_rate=0.0)
    torch.testing.assert_close(merged, expected, atol=1e-6, rtol=0)
    # TIES averages the agreeing entries and breaks the zero sum by the majority sign instead
    ties = merge("ties", base, [base + tau1, base + tau2], 0.5, density=1.0)
    assert not torch.allclose(ties, expected)


def test_dare_ties_drops_with_dares_masks_before_it_elects():
    base = torch.zeros(400)
    fts = [torch.randn(400, generator=torch.Generator().manual_seed(seed)) for seed in (1, 2)]
    merged = merge("dare-ties", base, fts, 1.0, drop_rate=0.5, seed=7)
    kept = [ft * dare_mask(ft.shape, 0.5, 7, "k", index) / 0.5 for index, ft in enumerate(fts)]
    stacked = torch.stack(kept)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    expected = torch.where(torch.sign(stacked) == elected, stacked, torch.zeros(())).sum(0)
    torch.testing.assert_close(merged, expected, atol=1e-6, rtol=0)


def test_breadcrumbs_ties_elects_over_breadcrumbs_masks():
    base = torch.zeros(20)
    tau1 = torch.linspace(-1.0, 1.0, 20)
    tau2 = -0.5 * torch.linspace(1.0, -1.0, 20).roll(3)
    params = {"density": 0.5, "gamma": 0.1, "topk_scope": "tensor"}
    masked = [merge("breadcrumbs", base, [tau], 1.0, **params) for tau in (tau1, tau2)]
    stacked = torch.stack(masked)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    expected = torch.where(torch.sign(stacked) == elected, stacked, torch.zeros(())).sum(0)
    merged = merge("breadcrumbs-ties", base, [tau1, tau2], 1.0, **params)
    torch.testing.assert_close(merged, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(merged, stacked.sum(0)), "the election dropped something"


def test_della_linear_sums_dellas_samples_without_an_election():
    base = torch.zeros(3, 40)
    fts = [torch.randn(3, 40, generator=torch.Generator().manual_seed(seed)) for seed in (3, 4)]
    params = {"density": 0.5, "epsilon": 0.2, "seed": 1}
    alone = [merge("della", base, [ft], 1.0, **params) for ft in fts]  # della over one model: its sample
    merged = merge("della-linear", base, fts, 0.7, **params)
    # each model's sample is drawn from (seed, key, model index): index 1 for the second model
    second = METHODS["della"].merge(
        "k", base, [torch.zeros_like(fts[1]), fts[1]], 1.0, MethodParams(**params)
    )
    torch.testing.assert_close(merged, 0.7 * (alone[0] + second), atol=1e-6, rtol=0)
    assert not torch.allclose(merged, merge("della", base, fts, 0.7, **params))


@pytest.mark.parametrize(
    "variant, method, params",
    [
        ("dare-ties", "dare", {"drop_rate": 0.6, "seed": 2}),
        ("dare-ties", "dare", {"drop_rate": 0.6, "seed": 2, "rescale": "l1"}),
        ("breadcrumbs-ties", "breadcrumbs", {"density": 0.3, "gamma": 0.05}),
        ("della-linear", "della", {"density": 0.4, "epsilon": 0.1, "seed": 2}),
    ],
)
def test_with_one_finetuned_model_a_variant_is_the_method_it_varies(variant, method, params):
    assert METHODS[variant].same_with_one_finetuned == method
    base = torch.randn(6, 30, generator=torch.Generator().manual_seed(0))
    ft = base + torch.randn(6, 30, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        merge(variant, base, [ft], 0.8, **params), merge(method, base, [ft], 0.8, **params)
    )


def test_dare_rescales_by_the_keep_probability_or_restores_the_l1_norm():
    tau = torch.randn(8, 500, generator=torch.Generator().manual_seed(5))
    base = torch.zeros_like(tau)
    mask = dare_mask(tau.shape, 0.7, 4, "k", 0)
    paper = merge("dare", base, [tau], 1.0, drop_rate=0.7, seed=4)
    torch.testing.assert_close(paper, tau * mask / 0.3, atol=1e-6, rtol=0)
    assert paper.equal(merge("dare", base, [tau], 1.0, drop_rate=0.7, seed=4, rescale="inverse"))
    l1 = merge("dare", base, [tau], 1.0, drop_rate=0.7, seed=4, rescale="l1")
    assert math.isclose(l1.abs().sum().item(), tau.abs().sum().item(), rel_tol=1e-5)
    torch.testing.assert_close(
        l1, tau * mask * (tau.abs().sum() / (tau * mask).abs().sum()), atol=1e-6, rtol=0
    )
    assert not torch.allclose(l1, paper), "the two conventions differ per tensor"


def test_della_rescales_each_survivor_by_its_own_keep_probability_when_asked():
    tau = torch.randn(4, 300, generator=torch.Generator().manual_seed(6))
    base = torch.zeros_like(tau)
    params = {"density": 0.4, "epsilon": 0.2, "seed": 3}
    mergekit = merge("della", base, [tau], 1.0, **params)
    assert mergekit.equal(merge("della", base, [tau], 1.0, rescale="l1", **params)), "DELLA's default is l1"
    paper = merge("della", base, [tau], 1.0, rescale="inverse", **params)
    kept = paper != 0
    assert kept.equal(mergekit != 0), "the same draw, only the scale differs"
    probabilities = keep_probabilities(tau, 0.4, 0.2)
    torch.testing.assert_close(paper[kept], tau[kept] / probabilities[kept], atol=1e-6, rtol=0)


def test_rescale_is_a_flag_of_dare_and_della_only_and_the_manifest_records_it(tmp_path):
    base, ft, ft2 = (tmp_path / f"{name}.safetensors" for name in ("base", "ft", "ft2"))
    for seed, path in enumerate((base, ft, ft2)):
        write_checkpoint(path, seed)
    common = ["--base", str(base), "--ft", str(ft), "--quiet"]
    for method, extra, expected in [
        ("dare", [], "the DARE and DELLA papers"),
        ("dare-ties", ["--ft", str(ft2), "--rescale", "l1"], "L1 norm restored"),
        ("della", [], "L1 norm restored"),
        ("della-linear", ["--rescale", "inverse"], "the DARE and DELLA papers"),
    ]:
        out = tmp_path / f"{method}.safetensors"
        result = CliRunner().invoke(merge_command, [*common, "--method", method, *extra, "--out", str(out)])
        assert result.exit_code == 0, result.output
        parameters = json.loads(Path(f"{out}.manifest.json").read_text())["parameters"]
        assert parameters["rescale"] in ("inverse", "l1")
        assert expected in parameters["conventions"]["rescale"]
    result = CliRunner().invoke(merge_command, [*common, "--method", "ties", "--rescale", "l1"])
    assert result.exit_code == 2 and "--rescale: ties does not use it" in result.output


def test_an_ablation_skips_a_variant_only_where_it_repeats_a_merge_of_the_grid(tmp_path):
    config = tmp_path / "grid.toml"
    config.write_text(
        """
[ablation]
data = "bench"
store = "results.jsonl"
report = "report"
alphas = "0,1"
methods = ["dare", "dare-ties", "della-linear"]

[ablation.method_parameters.dare]
drop_rate = 0.5

[ablation.method_parameters.dare-ties]
drop_rate = 0.5

[[ablation.pairs]]
name = "one"
base = "base.safetensors"
finetuned = ["ft.safetensors"]

[[ablation.pairs]]
name = "two"
base = "base.safetensors"
finetuned = ["ft.safetensors", "ft2.safetensors"]

[ablation.rule_sets.all]
"""
    )
    with pytest.warns(UserWarning) as said:
        labels = [label for label, _ in plan_grid(load_ablation(config))[0]]
    said = {str(warning.message) for warning in said}
    assert any(
        m.startswith("one / dare-ties / all: skipped (with one fine-tuned model dare-ties is dare")
        for m in said
    )
    # run as asked (its twin is not in the grid), and said to be that twin's merge
    assert (
        "one / della-linear / all: with one fine-tuned model della-linear is the same merge as della" in said
    )
    assert not any(m.startswith("two / ") for m in said), "two specialists: the variants differ"
    # della-linear's della is not in the grid, and the two-specialist pair elects for real
    assert labels == [
        "one / dare / all",
        "one / della-linear / all",
        "two / dare / all",
        "two / dare-ties / all",
        "two / della-linear / all",
    ]
    config.write_text(
        config.read_text().replace("[ablation.method_parameters.dare-ties]\ndrop_rate = 0.5", "")
    )
    with pytest.warns(UserWarning) as said:
        labels = [label for label, _ in plan_grid(load_ablation(config))[0]]
    assert "one / dare-ties / all: with one fine-tuned model dare-ties is the same merge as dare" in {
        str(warning.message) for warning in said
    }
    assert "one / dare-ties / all" in labels, "another drop rate is another merge"


def test_merge_says_when_a_variant_with_one_finetuned_model_is_the_method_it_varies(tmp_path):
    """`merge --method breadcrumbs-ties` with one --ft wrote breadcrumbs' merge without a word."""
    base, ft, ft2 = (tmp_path / f"{name}.safetensors" for name in ("base", "ft", "ft2"))
    for seed, path in enumerate((base, ft, ft2)):
        write_checkpoint(path, seed)
    common = ["--base", str(base), "--ft", str(ft), "--method", "breadcrumbs-ties", "--quiet"]
    one = CliRunner().invoke(merge_command, [*common, "--out", str(tmp_path / "one.safetensors")])
    assert one.exit_code == 0, one.output
    assert "warning: breadcrumbs-ties with one --ft is the same merge as breadcrumbs" in one.output
    two = CliRunner().invoke(
        merge_command, [*common, "--ft", str(ft2), "--out", str(tmp_path / "two.safetensors")]
    )
    assert two.exit_code == 0 and "warning" not in two.output, two.output
