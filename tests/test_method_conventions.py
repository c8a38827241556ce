"""The conventions issue #13 asks for, each against a brute-force or hand-worked reference.

Facts taken from the public reference code (read through the search tool):
- TIES authors' code (prateeksr/TIES-Merging, `ties_minimal.ipynb` / FusionBench 0.2.33
  `ties_merging_utils.py`): the task vectors are flattened over the whole model before
  `topk_values_mask`; `resolve_zero_signs(..., "majority")` replaces an elected sign of 0 by
  sign(sum of all elected signs); `disjoint_merge` averages the entries agreeing with the sign.
- mergekit 0.1.4 `sparsify.magnitude`: top-k per tensor; `get_mask`: elected sign (sum >= 0).
- mergekit 0.1.5 `merge_methods/slerp.py`: one angle per row of the leading axis, norms at or
  below 1e-8 replaced by 1, lerp where |cos| > 0.9995.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from micromerge.merging.in_memory import merge_state_dicts
from micromerge.merging.methods import METHODS, MethodParams, ModelScan
from micromerge.merging.methods.topk import select_top
from tests.helpers import write_checkpoint


@pytest.fixture
def tiny_checkpoints(tmp_path):
    base = tmp_path / "base.safetensors"
    write_checkpoint(base, 0)
    fts = [tmp_path / f"ft{i}.safetensors" for i in (1, 2)]
    for seed, path in enumerate(fts, start=1):
        write_checkpoint(path, seed)
    return base, fts


def brute_force_ties(base: dict, fts: list[dict], density: float, strength: float) -> dict:
    """TIES over the flattened model, written from the paper's description with numpy."""
    keys = list(base)
    flat_base = np.concatenate([base[k].numpy().ravel() for k in keys])
    # task vectors in float32, as every implementation subtracts them
    taus = [
        (np.concatenate([ft[k].numpy().ravel() for k in keys]) - flat_base).astype(np.float64) for ft in fts
    ]
    flat_base = flat_base.astype(np.float64)
    n = flat_base.size
    k = min(n, math.ceil(density * n))
    trimmed = []
    for tau in taus:
        order = np.lexsort((np.arange(n), -np.abs(tau).astype(np.float32)))  # magnitude desc, index asc
        keep = np.zeros(n, dtype=bool)
        keep[order[:k]] = True
        trimmed.append(np.where(keep, tau, 0.0))
    stacked = np.stack(trimmed)
    elected = np.sign(stacked.sum(0))
    majority = np.sign(elected.sum())
    elected[elected == 0] = majority
    agree = (np.sign(stacked) == elected) & (stacked != 0)
    merged = np.where(agree, stacked, 0).sum(0) / np.maximum(agree.sum(0), 1)
    flat = flat_base + strength * merged
    out, start = {}, 0
    for key in keys:
        size = base[key].numel()
        out[key] = torch.from_numpy(flat[start : start + size].reshape(base[key].shape)).float()
        start += size
    return out


def quantised_model(seed: int, shapes: dict[str, tuple[int, ...]], count: int):
    """Task vectors on a coarse grid, so many magnitudes tie at any cut-off."""
    generator = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(shape, generator=generator) for k, shape in shapes.items()}
    fts = [
        {
            k: base[k] + torch.randint(-4, 5, shape, generator=generator).float() / 8
            for k, shape in shapes.items()
        }
        for _ in range(count)
    ]
    return base, fts


SHAPES = {
    "visual.conv1.weight": (6, 3, 2, 2),
    "visual.transformer.resblocks.0.mlp.c_fc.weight": (9, 5),
    "logit_scale": (),
}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 1.0])
def test_whole_model_ties_equals_the_flattened_reference(seed, density):
    base, fts = quantised_model(seed, SHAPES, count=3)
    ours = merge_state_dicts("ties", base, fts, MethodParams(density=density), strength=0.7)
    reference = brute_force_ties(base, fts, density, 0.7)
    for key in base:
        torch.testing.assert_close(ours[key], reference[key], atol=1e-6, rtol=0)


def test_topk_scope_model_and_tensor_keep_different_entries():
    base = {"a": torch.zeros(2), "b": torch.zeros(2)}
    ft = {"a": torch.tensor([10.0, 9.0]), "b": torch.tensor([1.0, 2.0])}
    model = merge_state_dicts("ties", base, [ft], MethodParams(density=0.5), strength=1.0)
    tensor = merge_state_dicts(
        "ties", base, [ft], MethodParams(density=0.5, topk_scope="tensor"), strength=1.0
    )
    assert model["a"].tolist() == [10.0, 9.0] and model["b"].tolist() == [0.0, 0.0]
    assert tensor["a"].tolist() == [10.0, 0.0] and tensor["b"].tolist() == [0.0, 2.0]


def test_an_elected_sign_of_zero_takes_the_majority_sign():
    base = torch.zeros(4)
    fts = [torch.tensor([1.0, -3.0, -2.0, -1.0]), torch.tensor([-1.0, -1.0, -2.0, -1.0])]
    # entry 0: sum 0 -> elected 0 -> majority of elected signs (-1): the mean of the agreeing -1
    merged = METHODS["ties"].merge("k", base, fts, 1.0, MethodParams(density=1.0))
    assert merged.tolist() == [-1.0, -2.0, -2.0, -1.0]
    flipped = METHODS["ties"].merge("k", base, [-f for f in fts], 1.0, MethodParams(density=1.0))
    assert flipped.tolist() == [1.0, 2.0, 2.0, 1.0]


def test_ties_at_the_cut_off_go_to_the_lower_position():
    tau = torch.tensor([1.0, -1.0, 1.0, 1.0])
    merged = METHODS["ties"].merge("k", torch.zeros(4), [tau], 1.0, MethodParams(density=0.5))
    assert merged.tolist() == [1.0, -1.0, 0.0, 0.0]
    base = {"first": torch.zeros(2), "second": torch.zeros(2)}
    ft = {"first": torch.tensor([0.5, 1.0]), "second": torch.tensor([1.0, 1.0])}
    kept = merge_state_dicts("ties", base, [ft], MethodParams(density=0.5), strength=1.0)
    assert kept["first"].tolist() == [0.0, 1.0] and kept["second"].tolist() == [1.0, 0.0]


def test_radix_select_is_exact_on_awkward_floats():
    """Zeros of both signs, subnormals, huge and tiny exponents, long runs of equal values."""
    values = torch.tensor(
        [
            0.0,
            -0.0,
            1e-45,
            -1e-45,
            1e-38,
            3.4e38,
            -3.4e38,
            1.0,
            1.0,
            -1.0,
            1.0,
            2.0**-20,
            7.0,
            7.0,
            -7.0,
            0.5,
        ],
        dtype=torch.float32,
    )
    scan = ModelScan(("x",), ("x",), lambda key: (torch.zeros(16), [values]), lambda key: 16)
    sizes = list(range(17))
    tops = select_top(scan, [sizes])[0]
    order = sorted(range(16), key=lambda i: (-abs(values[i].item()), i))
    for size, top in zip(sizes, tops, strict=True):
        expected = torch.zeros(16, dtype=torch.bool)
        expected[order[:size]] = True
        assert torch.equal(top.mask("x", values), expected), size


def numpy_slerp_rows(v0: np.ndarray, v1: np.ndarray, t: float) -> np.ndarray:
    a, b = v0.reshape(v0.shape[0], -1).astype(np.float64), v1.reshape(v1.shape[0], -1).astype(np.float64)
    out = np.empty_like(a)
    for row in range(a.shape[0]):
        na, nb = np.linalg.norm(a[row]), np.linalg.norm(b[row])
        cos = np.clip((a[row] / (na if na > 1e-8 else 1)) @ (b[row] / (nb if nb > 1e-8 else 1)), -1, 1)
        if abs(cos) > 0.9995:
            out[row] = (1 - t) * a[row] + t * b[row]
        else:
            theta = np.arccos(cos)
            out[row] = (np.sin((1 - t) * theta) * a[row] + np.sin(t * theta) * b[row]) / np.sin(theta)
    return out.reshape(v0.shape)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_per_row_matches_the_row_formula(t):
    torch.manual_seed(1)
    v0, v1 = torch.randn(7, 5, 2), torch.randn(7, 5, 2)
    v1[2] = 3 * v0[2]  # a colinear row: lerp there
    v0[4] = 0  # a zero row: its norm counts as 1 (mergekit's eps), so its angle is 90°, not NaN
    v0[5] *= 1e-10  # a row of norm <= 1e-8 counts as 1 too: nearly orthogonal, whatever its direction
    v1[6] = -2 * v0[6]  # opposite directions: colinear, lerp
    merged = METHODS["slerp"].merge("k", v0, [v1], t, MethodParams(slerp_scope="row"))
    expected = torch.from_numpy(numpy_slerp_rows(v0.numpy(), v1.numpy(), t)).float()
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
    per_tensor = METHODS["slerp"].merge("k", v0, [v1], t, MethodParams())
    if 0 < t < 1:
        assert not torch.allclose(merged, per_tensor, atol=1e-4)


def test_slerp_per_row_lerps_a_bias():
    bias0, bias1 = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([2.0, 2.0, -1.0])
    merged = METHODS["slerp"].merge("b", bias0, [bias1], 0.25, MethodParams(slerp_scope="row"))
    torch.testing.assert_close(merged, 0.75 * bias0 + 0.25 * bias1, atol=1e-6, rtol=0)


def test_the_manifest_records_every_convention(tmp_path, tiny_checkpoints):
    from micromerge.merging.job import job_from_mapping, run_merge_job

    base, fts = tiny_checkpoints
    for method, extra, expected in [
        ("ties", {}, {"topk_scope": "model"}),
        ("ties", {"topk_scope": "tensor"}, {"topk_scope": "tensor"}),
        ("slerp", {"slerp_scope": "row"}, {"slerp_scope": "row"}),
    ]:
        job = job_from_mapping(
            {
                "base": str(base),
                "finetuned": [str(fts[0])],
                "method": method,
                "out": str(tmp_path / f"{method}.safetensors"),
                "force": True,
                **extra,
            }
        )
        (output,) = run_merge_job(job, progress=False)
        manifest = json.loads(output.manifest_path.read_text())
        conventions = manifest["parameters"]["conventions"]
        for key, value in expected.items():
            assert conventions[key] == value
        if method == "ties":
            assert (
                "majority" in conventions["zero_elected_sign"]
                and "lower position" in conventions["tie_break"]
            )


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(st.floats(-4, 4, width=32).map(lambda v: round(v * 4) / 4), min_size=1, max_size=9),
        min_size=1,
        max_size=4,
    ),
    st.data(),
)
def test_radix_select_equals_sorting_for_any_split_into_keys(chunks, data):
    """Any values, any split into keys, any size: the set is the `size` largest, earlier positions first."""
    keys = tuple(f"k{i}" for i in range(len(chunks)))
    tensors = {
        key: torch.tensor(values, dtype=torch.float32) for key, values in zip(keys, chunks, strict=True)
    }
    total = sum(len(c) for c in chunks)
    size = data.draw(st.integers(0, total))
    scan = ModelScan(
        keys,
        keys,
        lambda key: (torch.zeros_like(tensors[key]), [tensors[key]]),
        lambda key: len(tensors[key]),
    )
    (top,) = select_top(scan, [[size]])[0]
    flat = torch.cat([tensors[k] for k in keys])
    order = sorted(range(total), key=lambda i: (-abs(flat[i].item()), i))
    expected = torch.zeros(total, dtype=torch.bool)
    expected[order[:size]] = True
    assert torch.equal(torch.cat([top.mask(k, tensors[k]) for k in keys]), expected)


@pytest.mark.parametrize(
    ("method", "field", "accepted", "refused", "message"),
    [
        ("ties", "density", (1.0,), (0.0, 1.01), "--density {}: must be in (0, 1]"),
        ("dare", "drop_rate", (0.0, 0.99), (1.0, -0.1), "--drop-rate {}: must be in [0, 1)"),
        ("breadcrumbs", "gamma", (0.0,), (1.0, -0.1), "--gamma {}: must be in [0, 1)"),
        ("regmean", "offdiag_scale", (0.0, 1.0), (1.5, -0.1), "--offdiag-scale {}: must be in [0, 1]"),
    ],
)
def test_each_method_parameter_is_held_to_its_range_at_both_ends(method, field, accepted, refused, message):
    """A drop rate of 1 drops every entry (DARE's 1/(1-p) divides by zero); a γ of 1 drops every
    magnitude; RegMean's off-diagonal scale interpolates between the Gram and its diagonal."""
    from micromerge.core.errors import MicromergeError
    from micromerge.merging.methods import get_method
    from micromerge.merging.plan import check_method_params

    for value in accepted:
        check_method_params(get_method(method), MethodParams(**{field: value}))
    for value in refused:
        with pytest.raises(MicromergeError, match=f"^{re.escape(message.format(value))}$"):
            check_method_params(get_method(method), MethodParams(**{field: value}))


def test_della_s_keep_probabilities_must_lie_in_0_1():
    from micromerge.core.errors import MicromergeError
    from micromerge.merging.methods import get_method
    from micromerge.merging.plan import check_method_params

    della = get_method("della")
    check_method_params(della, MethodParams(density=0.5, epsilon=0.0))
    check_method_params(della, MethodParams(density=0.8, epsilon=0.15))  # keep probabilities 0.65 to 0.95
    check_method_params(della, MethodParams(density=1.0, epsilon=0.1))  # density 1 keeps all: nothing sampled
    for density, epsilon in ((0.5, -0.1), (0.5, 0.5), (0.8, 0.2)):  # 0.8 + 0.2: a keep probability of 1
        with pytest.raises(
            MicromergeError, match=rf"^--epsilon {epsilon} with --density {density}: density - epsilon"
        ):
            check_method_params(della, MethodParams(density=density, epsilon=epsilon))


@pytest.mark.parametrize(
    ("method", "warns"), [("wise-ft", True), ("slerp", True), ("task-arithmetic", False)]
)
def test_an_interpolation_s_alpha_outside_0_1_is_said_to_extrapolate(method, warns):
    """WiSE-FT's α and SLERP's t interpolate between two models; task arithmetic's λ is a scale,
    above 1 by design in its paper's grids."""
    import warnings

    from micromerge.merging.methods import get_method
    from micromerge.merging.plan import check_strength

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_strength(get_method(method), 1.5, "--alpha")
        check_strength(get_method(method), 1.0, "--alpha")
    assert [str(w.message) for w in caught] == (
        ["--alpha=1.5 is outside [0, 1]: this extrapolates beyond the two models, not an interpolation"]
        if warns
        else []
    )


def _two_sources():
    from micromerge.merging.torch_sources import DictSource

    base = DictSource({"a.weight": torch.zeros(2, 2), "b.weight": torch.zeros(2)}, "base")
    return base, [DictSource({"a.weight": torch.ones(2, 2), "b.weight": torch.ones(2)}, "ft")]


def test_linear_weights_off_1_and_an_alpha_rule_outside_0_1_are_used_as_given_and_said():
    """Linear's weights are not normalised (a soup of weights summing to 1.1 scales the model); an
    α rule of WiSE-FT is an interpolation like --alpha: both are said, neither refused."""
    import warnings

    from micromerge.merging.plan import MergeSpec, plan_merge
    from micromerge.merging.rules import KeyRules

    specs = {
        "--weights sum to 1.1, not 1: used as given (no normalisation)": MergeSpec(
            "linear", MethodParams(weights=(0.5, 0.6))
        ),
        "--alpha-rule a.*=1.5 is outside [0, 1]: this extrapolates beyond the two models, not an interpolation": (
            MergeSpec("wise-ft", rules=KeyRules(strength_rules=(("a.*", 1.5),)))
        ),
    }
    specs[""] = MergeSpec("linear", MethodParams(weights=(0.25, 0.75)))  # summing to 1: nothing to say
    for message, spec in specs.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plans = plan_merge(spec, *_two_sources())
        assert [str(w.message) for w in caught] == ([message] if message else [])
        assert all(plan.merged for plan in plans)


def test_an_output_dtype_outside_the_choices_is_refused_by_the_plan():
    """The CLI's --dtype is a click choice; a job mapping (a script, a config file) reaches the plan
    with whatever it says, and an unknown one was a KeyError."""
    from micromerge.core.errors import MicromergeError
    from micromerge.merging.plan import MergeSpec, plan_merge

    with pytest.raises(
        MicromergeError, match=r"^--dtype float64: choose one of \['bfloat16', 'float16', 'float32'\]$"
    ):
        plan_merge(MergeSpec("wise-ft", out_dtype="float64"), *_two_sources())
