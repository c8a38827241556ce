"""Every merge method against its formula (1e-6) and TIES/DARE/SLERP against hand-worked examples."""

import math

import numpy as np
import pytest
import torch

from micromerge.merging.methods import METHODS, MethodParams, ModelScan
from micromerge.merging.methods.learned import CoefficientTable
from micromerge.merging.methods.task_vectors import dare_mask

torch.manual_seed(0)
BASE = torch.randn(64, 33)
FTS = [BASE + 0.1 * torch.randn(64, 33) for _ in range(3)]


def run(name, fts, strength=0.5, **params):
    return METHODS[name].merge(
        "layer.weight",
        BASE.clone(),
        [f.clone() for f in fts],
        strength,
        MethodParams(strength=strength, **params),
    )


def test_registry_holds_every_method():
    assert set(METHODS) == {
        "linear",
        "wise-ft",
        "task-arithmetic",
        "ties",
        "dare",
        "dare-ties",
        "slerp",
        "lines",
        "lines-ties",
        "model-stock",
        "breadcrumbs",
        "breadcrumbs-ties",
        "della",
        "della-linear",
        "tsv",
        "iso-c",
        "fisher",
        "regmean",
        "adamerging",
        "supervised-alpha",
    }


@pytest.mark.parametrize("command", ["merge", "sweep"])
def test_the_method_help_names_every_registered_method(command):
    """The --method help once listed the methods by hand and missed the three mergekit variants."""
    from click.testing import CliRunner

    from micromerge.cli import cli

    help_text = " ".join(CliRunner().invoke(cli, [command, "--help"]).output.split())
    listed = help_text.split("One of `micromerge methods` (")[1].split(")")[0]
    assert [name.strip() for name in listed.replace("- ", "-").split(",")] == list(METHODS)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0, 1.5])
def test_wise_ft_formula(alpha):
    expected = (1 - alpha) * BASE + alpha * FTS[0]
    torch.testing.assert_close(run("wise-ft", FTS[:1], alpha), expected, atol=1e-6, rtol=0)
    assert torch.equal(run("wise-ft", FTS[:1], 0.0), BASE)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_wise_ft_takes_the_nearer_end_as_torch_lerp_does(alpha):
    """`interpolate` computes from the nearer endpoint as torch.lerp does, from the fine-tuned end
    at alpha >= 0.5. Where the product is exact (alpha 0, 0.5, 1) that gives torch.lerp's bits; at
    0.5 the two ends' formulas round differently in about 40% of these entries. Elsewhere torch's
    kernel may fuse the multiply-add (about 5% of entries differ by one ulp at 0.3), so only these
    three are compared bit for bit."""
    merged = run("wise-ft", FTS[:1], alpha)
    torch.testing.assert_close(merged, torch.lerp(BASE, FTS[0], alpha), atol=0, rtol=0)


def test_linear_formula_uses_weights_as_given():
    weights = (0.2, 0.3, 0.1, 0.6)  # sums to 1.2 on purpose: no silent normalisation
    expected = sum(w * t for w, t in zip(weights, [BASE, *FTS], strict=True))
    torch.testing.assert_close(run("linear", FTS, weights=weights), expected, atol=1e-6, rtol=0)
    uniform = (BASE + sum(FTS)) / 4
    torch.testing.assert_close(run("linear", FTS), uniform, atol=1e-6, rtol=0)


@pytest.mark.parametrize("lam", [0.4, 1.0, -1.0])
def test_task_arithmetic_formula(lam):
    expected = BASE + lam * sum(f - BASE for f in FTS)
    torch.testing.assert_close(run("task-arithmetic", FTS, lam), expected, atol=1e-6, rtol=0)


def test_ties_hand_worked_example():
    base = torch.zeros(4)
    ft1 = torch.tensor([1.0, -2.0, 3.0, 0.5])
    ft2 = torch.tensor([-1.0, 1.0, 2.0, -4.0])
    # trim to top 50%: tau1 -> [0,-2,3,0], tau2 -> [0,0,2,-4]; elected sign [0,-1,+1,-1];
    # disjoint mean -> [0, -2, (3+2)/2, -4]; lambda 1
    merged = METHODS["ties"].merge("k", base, [ft1, ft2], 1.0, MethodParams(density=0.5))
    torch.testing.assert_close(merged, torch.tensor([0.0, -2.0, 2.5, -4.0]), atol=1e-6, rtol=0)
    half = METHODS["ties"].merge("k", base, [ft1, ft2], 0.5, MethodParams(density=0.5))
    torch.testing.assert_close(half, torch.tensor([0.0, -1.0, 1.25, -2.0]), atol=1e-6, rtol=0)


def test_ties_with_full_density_and_one_model_is_task_arithmetic():
    torch.testing.assert_close(
        run("ties", FTS[:1], 0.7, density=1.0), run("task-arithmetic", FTS[:1], 0.7), atol=1e-6, rtol=0
    )


def test_ties_keeps_ceil_density_entries():
    tau = torch.tensor([0.1, -0.5, 0.3, 0.05, -0.2])
    merged = METHODS["ties"].merge("k", torch.zeros(5), [tau], 1.0, MethodParams(density=0.4))
    assert torch.equal(merged, torch.tensor([0.0, -0.5, 0.3, 0.0, 0.0]))


def test_dare_equals_its_formula_with_the_seeded_masks():
    p, lam, seed = 0.7, 0.8, 11
    merged = run("dare", FTS[:2], lam, drop_rate=p, seed=seed)
    masks = [dare_mask(BASE.shape, p, seed, "layer.weight", i) for i in range(2)]
    expected = BASE + lam * sum(m * (f - BASE) / (1 - p) for m, f in zip(masks, FTS[:2], strict=True))
    torch.testing.assert_close(merged, expected, atol=1e-6, rtol=0)
    assert torch.equal(merged, run("dare", FTS[:2], lam, drop_rate=p, seed=seed)), "same seed, same result"
    assert not torch.equal(merged, run("dare", FTS[:2], lam, drop_rate=p, seed=seed + 1))
    # each model's task vector and each tensor is dropped independently (Yu et al.'s per-model
    # random drop): one mask for all models would drop an entry from every task at once
    assert not torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[0], dare_mask(BASE.shape, p, seed, "other.weight", 0))


def test_dare_drops_about_p_and_preserves_the_mean():
    base = torch.zeros(200_000)
    ft = torch.ones(200_000)
    merged = METHODS["dare"].merge("k", base, [ft], 1.0, MethodParams(drop_rate=0.9, seed=3))
    kept = merged != 0
    assert abs(kept.float().mean().item() - 0.1) < 0.005
    assert torch.allclose(merged[kept], torch.full_like(merged[kept], 10.0))
    assert abs(merged.mean().item() - 1.0) < 0.05
    torch.testing.assert_close(
        METHODS["dare"].merge("k", BASE, FTS, 1.0, MethodParams(drop_rate=0.0)),
        run("task-arithmetic", FTS, 1.0),
        atol=1e-6,
        rtol=0,
    )


def _numpy_slerp(v0, v1, t):
    a, b = v0.ravel().astype(np.float64), v1.ravel().astype(np.float64)
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    theta = np.arccos(cos)
    return (np.sin((1 - t) * theta) * v0 + np.sin(t * theta) * v1) / np.sin(theta)


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 1.0])
def test_slerp_formula(t):
    other = torch.randn_like(BASE)
    merged = METHODS["slerp"].merge("k", BASE, [other], t, MethodParams())
    expected = torch.from_numpy(_numpy_slerp(BASE.numpy(), other.numpy(), t)).float()
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)


def test_slerp_orthogonal_unit_vectors_and_colinear_fallback():
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = METHODS["slerp"].merge("k", e0, [e1], 0.5, MethodParams())
    torch.testing.assert_close(mid, torch.tensor([1.0, 1.0]) / math.sqrt(2), atol=1e-6, rtol=0)
    colinear = METHODS["slerp"].merge("k", e0, [2 * e0], 0.5, MethodParams())
    torch.testing.assert_close(colinear, torch.tensor([1.5, 0.0]), atol=1e-6, rtol=0)
    # opposite directions are colinear too (mergekit tests |cos|): lerp, not a division by sin(pi)
    opposite = METHODS["slerp"].merge("k", e0, [-3 * e0], 0.25, MethodParams())
    torch.testing.assert_close(opposite, torch.tensor([0.0, 0.0]), atol=1e-6, rtol=0)
    # a zero tensor on either side (a bias initialised at zero) has no angle: lerp
    zero = METHODS["slerp"].merge("k", torch.zeros(2), [e1], 0.25, MethodParams())
    torch.testing.assert_close(zero, torch.tensor([0.0, 0.25]), atol=1e-6, rtol=0)


def made_up_statistics(kind: str | None, count: int) -> tuple[dict, ...] | None:
    """Positive Fishers or positive-definite Grams for the one key "k", different per model, or a
    learned coefficient table (one coefficient per specialist)."""
    if kind is None:
        return None
    generator = torch.Generator().manual_seed(1)
    if kind in ("adamerging", "supervised"):
        coefficients = tuple(0.2 + 0.3 * i for i in range(count - 1))
        return (CoefficientTable(("k",), {"k": 0}, (coefficients,)),)
    if kind == "fisher":
        return tuple({"k": torch.rand(BASE.shape, generator=generator)} for _ in range(count))
    inputs = [torch.randn(100, BASE.shape[1], generator=generator) for _ in range(count)]
    return tuple({"k": x.T @ x / len(x)} for x in inputs)


def test_out_parameter_writes_in_place():
    out = torch.empty_like(BASE)
    for name, method in METHODS.items():
        fts = FTS[: method.min_finetuned]
        statistics = made_up_statistics(method.statistics, len(fts) + 1)
        scan = ModelScan(
            ("k",), ("k",), lambda _key, fts=fts: (BASE, fts), lambda _key: BASE.numel(), statistics
        )
        context = method.prepare(scan, MethodParams())
        result = method.merge("k", BASE, fts, 0.4, MethodParams(), out=out, context=context)
        assert result.data_ptr() == out.data_ptr()
        expected = method.merge("k", BASE, fts, 0.4, MethodParams(), context=context)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0, msg=name)
