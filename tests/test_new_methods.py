"""The methods issue #13 adds, each against a hand-worked example or an independent numpy formula,
and every method through the three engines that run merges (file, in memory, resident sweep).

Facts taken from the public reference code (read through the search tool):
- LiNeS authors' `LiNeS_scaling`: lambda = alpha + beta * l / (L - 1) for block l (0-based) of
  L; keys outside the blocks are scaled by alpha.
- mergekit 0.1.4 `model_stock.py`: mean pairwise cosine of the flattened task vectors (norm
  products clamped at 1e-6, cosines to [-1, 1]); t = k cos / (1 + (k - 1) cos);
  w = t * w_avg + (1 - t) * w_0.
- mergekit 0.1.4 `sparsify.magnitude_outliers`: int(density n) kept after the int(gamma n)
  largest are removed; `breadcrumbs`: no consensus, no normalise, no rescale.
- mergekit 0.1.4 `sparsify.della_magprune`: ranks along each row, probabilities
  (density - eps) + 2 eps (rank - min) / (max - min), L1 rescale; `della`: sign consensus,
  normalise (mean of the agreeing entries).
- TSV-Merge authors' `compute_and_sum_svd_mem_reduction` and Iso-C's `iso_c` (as in FusionBench
  0.2.33): 2-D tensors except text_projection are task matrices, every other tensor the mean.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from micromerge.merging.blocks import block_depths
from micromerge.merging.execute import StatisticsInput
from micromerge.merging.in_memory import merge_state_dicts
from micromerge.merging.job import job_from_mapping, run_merge_job
from micromerge.merging.methods import METHODS, MethodParams
from micromerge.merging.methods.della import keep_probabilities
from micromerge.merging.methods.learned import CoefficientTable, coefficient_group
from micromerge.merging.models import load_model
from micromerge.merging.plan import LOGIT_SCALE_KEY, LOGIT_SCALE_MAX, MergeSpec
from micromerge.merging.resident import ResidentMerge
from micromerge.merging.sources import open_source
from tests.helpers import random_state_dict, write_checkpoint


def test_lines_depths_are_per_tower_and_outside_blocks_is_alpha():
    keys = (
        "visual.conv1.weight",
        "visual.transformer.resblocks.0.attn.in_proj_weight",
        "visual.transformer.resblocks.1.mlp.c_fc.bias",
        "visual.transformer.resblocks.3.ln_1.weight",
        "transformer.resblocks.0.attn.out_proj.weight",
        "transformer.resblocks.1.attn.out_proj.weight",
        "visual.proj",
    )
    assert block_depths(keys) == {
        "visual.transformer.resblocks.0.attn.in_proj_weight": 0.0,
        "visual.transformer.resblocks.1.mlp.c_fc.bias": 1 / 3,
        "visual.transformer.resblocks.3.ln_1.weight": 1.0,
        "transformer.resblocks.0.attn.out_proj.weight": 0.0,
        "transformer.resblocks.1.attn.out_proj.weight": 1.0,
    }


@pytest.fixture(scope="module")
def nano():
    base = random_state_dict(0)
    fts = [random_state_dict(seed) for seed in (1, 2)]
    return base, fts


def test_lines_scales_the_summed_task_vector_by_depth(nano):
    base, fts = nano
    alpha, beta = 0.2, 0.6
    merged = merge_state_dicts("lines", base, fts, MethodParams(beta=beta), strength=alpha)
    depth = block_depths(tuple(base))
    for key in base:
        scale = alpha + beta * depth.get(key, 0.0)
        expected = base[key] + scale * sum(ft[key] - base[key] for ft in fts)
        torch.testing.assert_close(merged[key], expected, atol=1e-5, rtol=1e-6, msg=key)


def test_lines_over_ties_scales_ties_merged_task_vector(nano):
    base, fts = nano
    params = MethodParams(beta=0.5, density=0.3)
    ties = merge_state_dicts("ties", base, fts, params, strength=1.0)
    merged = merge_state_dicts("lines-ties", base, fts, params, strength=0.4)
    depth = block_depths(tuple(base))
    for key in base:
        expected = base[key] + (0.4 + 0.5 * depth.get(key, 0.0)) * (ties[key] - base[key])
        torch.testing.assert_close(merged[key], expected, atol=1e-5, rtol=1e-6, msg=key)


def test_model_stock_hand_worked():
    base = torch.tensor([1.0, 1.0])
    fts = [base + torch.tensor([1.0, 0.0]), base + torch.tensor([1.0, 1.0])]
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)
    expected = base + t * torch.tensor([1.0, 0.5])  # t * mean(theta_i) + (1 - t) * theta_0
    merged = METHODS["model-stock"].merge("k", base, fts, 1.0, MethodParams())
    torch.testing.assert_close(merged, expected, atol=1e-6, rtol=0)
    orthogonal = METHODS["model-stock"].merge(
        "k", base, [base + torch.tensor([1.0, 0.0]), base + torch.tensor([0.0, 2.0])], 1.0, MethodParams()
    )
    torch.testing.assert_close(orthogonal, base, atol=1e-6, rtol=0)  # cos 0: t 0, the base


def test_model_stock_three_models_use_the_mean_pairwise_cosine():
    torch.manual_seed(3)
    base = torch.randn(40)
    taus = [torch.randn(40) for _ in range(3)]
    cosines = [
        float(torch.nn.functional.cosine_similarity(taus[i], taus[j], dim=0))
        for i, j in ((0, 1), (0, 2), (1, 2))
    ]
    cos = sum(cosines) / 3
    t = 3 * cos / (1 + 2 * cos)
    merged = METHODS["model-stock"].merge("k", base, [base + tau for tau in taus], 0.5, MethodParams())
    torch.testing.assert_close(merged, base + 0.5 * t * sum(taus) / 3, atol=1e-5, rtol=0)


def test_model_stock_leaves_a_tensor_no_specialist_changed_at_the_base():
    """A tensor a fine-tune froze (a text tower locked, as open_clip's --lock-text does) has a zero
    task vector: mergekit clamps the norm product at 1e-6, so the cosine is 0, t is 0 and the merge
    is the base there, not a division by zero."""
    base = torch.tensor([1.0, -2.0, 3.0])
    for fts in ([base.clone(), base.clone()], [base.clone(), base + torch.tensor([0.5, 0.0, 1.0])]):
        merged = METHODS["model-stock"].merge("k", base, fts, 1.0, MethodParams())
        assert torch.equal(merged, base)


def test_breadcrumbs_drops_the_outliers_and_the_smallest():
    tau = torch.tensor([10.0, -9.0, 8.0, 7.0, -6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    params = MethodParams(density=0.5, gamma=0.1)
    merged = METHODS["breadcrumbs"].merge("k", torch.zeros(10), [tau], 1.0, params)
    assert merged.tolist() == [0.0, -9.0, 8.0, 7.0, -6.0, 5.0, 0.0, 0.0, 0.0, 0.0]
    crowded = METHODS["breadcrumbs"].merge(
        "k", torch.zeros(10), [tau], 1.0, MethodParams(density=0.95, gamma=0.1)
    )
    assert crowded.tolist() == [0.0, *tau[1:].tolist()]  # 9 kept: only 1 outlier can go... and it is 10
    overfull = METHODS["breadcrumbs"].merge(
        "k", torch.zeros(10), [tau], 1.0, MethodParams(density=0.9, gamma=0.2)
    )
    assert overfull.tolist() == crowded.tolist(), (
        "9 kept + 2 outliers > 10: one outlier fewer, never fewer kept"
    )
    two = METHODS["breadcrumbs"].merge("k", torch.zeros(10), [tau, -tau], 0.5, params)
    assert two.tolist() == [0.0] * 10  # summed, no sign election


def test_breadcrumbs_scope_model_ranks_over_every_tensor():
    base = {"a": torch.zeros(5), "b": torch.zeros(5)}
    ft = {"a": torch.tensor([10.0, 9.0, 8.0, 7.0, 6.0]), "b": torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])}
    params = MethodParams(density=0.4, gamma=0.1)
    model = merge_state_dicts("breadcrumbs", base, [ft], params, strength=1.0)
    assert model["a"].tolist() == [0.0, 9.0, 8.0, 7.0, 6.0] and model["b"].tolist() == [0.0] * 5
    tensor = merge_state_dicts(
        "breadcrumbs", base, [ft], MethodParams(density=0.4, gamma=0.1, topk_scope="tensor"), strength=1.0
    )
    assert tensor["a"].tolist() == [10.0, 9.0, 0.0, 0.0, 0.0] and tensor["b"].tolist() == [
        5.0,
        4.0,
        0.0,
        0.0,
        0.0,
    ]


def test_della_probabilities_rise_with_rank_per_row():
    tau = torch.tensor([[0.1, -3.0, 2.0, 0.5], [4.0, 1.0, -2.0, 3.0]])
    probabilities = keep_probabilities(tau, density=0.5, epsilon=0.2)
    ranks = torch.tensor([[0, 3, 2, 1], [3, 0, 1, 2]], dtype=torch.float32)
    torch.testing.assert_close(probabilities, 0.3 + 0.4 * ranks / 3, atol=1e-6, rtol=0)
    torch.testing.assert_close(keep_probabilities(torch.tensor([5.0]), 0.5, 0.2), torch.tensor([0.5]))
    # two entries already span the range: only a single entry has no rank to spread
    torch.testing.assert_close(
        keep_probabilities(torch.tensor([0.3, -2.0]), 0.5, 0.2), torch.tensor([0.3, 0.7])
    )


def test_della_samples_by_rank_and_keeps_the_l1_norm():
    torch.manual_seed(0)
    tau = torch.randn(4, 50_000)
    params = MethodParams(density=0.4, epsilon=0.3, seed=5)
    merged = METHODS["della"].merge("w", torch.zeros_like(tau), [tau], 1.0, params)
    kept = merged != 0
    probabilities = keep_probabilities(tau, 0.4, 0.3)
    low, high = probabilities < 0.2, probabilities > 0.6
    assert abs(kept[low].float().mean().item() - probabilities[low].mean().item()) < 0.01
    assert abs(kept[high].float().mean().item() - probabilities[high].mean().item()) < 0.01
    assert math.isclose(merged.abs().sum().item(), tau.abs().sum().item(), rel_tol=1e-4)
    assert torch.equal(merged, METHODS["della"].merge("w", torch.zeros_like(tau), [tau], 1.0, params))
    ratio = merged[kept] / tau[kept]  # one rescale factor for the whole tensor
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()), atol=0, rtol=1e-5)


def test_della_inverse_rescale_divides_each_kept_entry_by_its_keep_probability():
    """`--rescale inverse` (the DELLA paper's MagPrune): with epsilon 0 every entry keeps with
    probability `density`, so each kept entry is tau / density and each dropped one 0."""
    torch.manual_seed(1)
    tau = torch.randn(8, 300)
    params = MethodParams(density=0.25, epsilon=0.0, rescale="inverse", seed=2)
    merged = METHODS["della"].merge("w", torch.zeros_like(tau), [tau], 1.0, params)
    kept = merged != 0
    assert 0.2 < kept.float().mean().item() < 0.3
    torch.testing.assert_close(merged[kept], tau[kept] / 0.25, atol=1e-6, rtol=1e-6)


def numpy_tsv(taus: list[np.ndarray]) -> np.ndarray:
    rank = min(taus[0].shape)
    kept = int(rank / len(taus))
    u_cat = np.zeros((taus[0].shape[0], rank))
    s_cat = np.zeros(rank)
    v_cat = np.zeros((rank, taus[0].shape[1]))
    for i, tau in enumerate(taus):
        u, s, vt = np.linalg.svd(tau.astype(np.float64), full_matrices=False)
        u_cat[:, i * kept : (i + 1) * kept] = u[:, :kept]
        s_cat[i * kept : (i + 1) * kept] = s[:kept]
        v_cat[i * kept : (i + 1) * kept] = vt[:kept]

    def polar(matrix):
        p, _, qt = np.linalg.svd(matrix, full_matrices=False)
        return p @ qt

    return polar(u_cat) @ np.diag(s_cat) @ polar(v_cat)


def numpy_iso_c(taus: list[np.ndarray]) -> np.ndarray:
    u, s, vt = np.linalg.svd(sum(t.astype(np.float64) for t in taus), full_matrices=False)
    return s.mean() * u @ vt


@pytest.mark.parametrize("name, formula", [("tsv", numpy_tsv), ("iso-c", numpy_iso_c)])
def test_spectral_methods_match_numpy(name, formula):
    torch.manual_seed(7)
    base = {"w": torch.randn(12, 9), "text_projection": torch.randn(6, 6), "b": torch.randn(9)}
    fts = [{k: v + 0.3 * torch.randn_like(v) for k, v in base.items()} for _ in range(3)]
    merged = merge_state_dicts(name, base, fts, MethodParams(), strength=0.8)
    taus = {k: [(ft[k] - base[k]).numpy() for ft in fts] for k in base}
    expected_w = base["w"].double() + 0.8 * torch.from_numpy(formula(taus["w"]))
    torch.testing.assert_close(merged["w"].double(), expected_w, atol=1e-5, rtol=0)
    for key in ("text_projection", "b"):  # not task matrices: the mean task vector
        mean = sum(ft[key] - base[key] for ft in fts) / 3
        torch.testing.assert_close(merged[key], base[key] + 0.8 * mean, atol=1e-5, rtol=0)


def test_iso_c_flattens_the_spectrum_and_tsv_of_one_model_is_task_arithmetic():
    torch.manual_seed(2)
    base, tau = torch.randn(10, 6), torch.randn(10, 6)
    iso = METHODS["iso-c"].merge("w", base, [base + tau], 1.0, MethodParams())
    singular = torch.linalg.svdvals(iso - base)
    torch.testing.assert_close(
        singular, torch.full_like(singular, torch.linalg.svdvals(tau).mean().item()), atol=1e-5, rtol=0
    )
    tsv = METHODS["tsv"].merge("w", base, [base + tau], 1.0, MethodParams())
    torch.testing.assert_close(tsv, base + tau, atol=1e-5, rtol=0)


@pytest.fixture
def checkpoint_files(tmp_path):
    paths = [tmp_path / f"m{seed}.safetensors" for seed in range(3)]
    for seed, path in enumerate(paths):
        write_checkpoint(path, seed)
    return paths


ALL_PARAMS = {"density": 0.3, "beta": 0.4, "gamma": 0.05, "epsilon": 0.1, "seed": 4}


def made_up_statistics(kind: str | None, states: list[dict]) -> StatisticsInput | None:
    """Positive Fishers / positive-definite Grams of the right shapes, different per model, or a
    learned table with a coefficient per residual block and specialist."""
    if kind is None:
        return None
    generator = torch.Generator().manual_seed(0)
    if kind in ("adamerging", "supervised"):
        keys = [k for k, v in states[0].items() if v.is_floating_point()]
        groups: dict[str, int] = {}
        key_groups = {k: groups.setdefault(coefficient_group(k, "block"), len(groups)) for k in keys}
        values = tuple(
            tuple(0.1 * (g + 1) + 0.05 * t for t in range(len(states) - 1)) for g in range(len(groups))
        )
        return StatisticsInput(
            (CoefficientTable(tuple(groups), key_groups, values),), [{"kind": kind, "made_up": True}]
        )
    values = []
    for state in states:
        if kind == "fisher":
            values.append(
                {
                    k: torch.rand(v.shape, generator=generator)
                    for k, v in state.items()
                    if v.is_floating_point()
                }
            )
        else:
            grams = {}
            for key, tensor in state.items():
                if tensor.dim() == 2 and key.endswith(("c_fc.weight", "c_proj.weight", "in_proj_weight")):
                    x = torch.randn(4 * tensor.shape[1], tensor.shape[1], generator=generator)
                    grams[key] = x.T @ x / len(x)
            values.append(grams)
    return StatisticsInput(tuple(values), [{"kind": kind, "made_up": True}] * len(states))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_is_the_same_from_a_file_in_memory_and_in_a_resident_sweep(
    tmp_path, checkpoint_files, name
):
    """The streaming executor, merge_state_dicts and the sweep's in-place merge agree for every method."""
    method = METHODS[name]
    fts = checkpoint_files[1:] if method.max_finetuned is None else checkpoint_files[1:2]
    alpha = 0.6
    uses = {k: v for k, v in ALL_PARAMS.items() if k in method.uses}
    values = {
        "base": str(checkpoint_files[0]),
        "finetuned": [str(f) for f in fts],
        "method": name,
        "engine": "torch",
        **uses,
    }
    if name != "linear":
        values["alpha"] = alpha
    job = job_from_mapping({**values, "out": str(tmp_path / "out.safetensors")})
    base_state = load_file(str(checkpoint_files[0]))
    ft_states = [load_file(str(f)) for f in fts]
    statistics = made_up_statistics(method.statistics, [base_state, *ft_states])
    (output,) = run_merge_job(job, progress=False, statistics=statistics)
    from_file = load_file(str(output.path))

    values_only = statistics.values if statistics else None
    in_memory = merge_state_dicts(name, base_state, ft_states, job.spec.params, statistics=values_only)
    in_memory[LOGIT_SCALE_KEY] = in_memory[LOGIT_SCALE_KEY].clamp(max=LOGIT_SCALE_MAX)

    with open_source(str(checkpoint_files[0])) as base, open_source(str(fts[0])) as first:
        others = [first] + [open_source(str(f)) for f in fts[1:]]
        model, _ = load_model(base)
        spec = MergeSpec(method=name, params=job.spec.params)
        resident = ResidentMerge(model, spec, base, others, torch.device("cpu"), values_only)
        resident.apply(job.spec.params.strength)
        swept = {k: v.detach().clone() for k, v in resident.model.state_dict().items()}
        for source in others[1:]:
            source.close()
    for key, tensor in from_file.items():
        torch.testing.assert_close(in_memory[key], tensor, atol=1e-6, rtol=0, msg=f"{name} {key} in memory")
        torch.testing.assert_close(swept[key], tensor, atol=1e-6, rtol=0, msg=f"{name} {key} resident")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "model-stock"], "takes at least 2 --ft"),
        (
            ["--method", "della", "--density", "0.4", "--epsilon", "0.5"],
            "density - epsilon and density + epsilon",
        ),
        (["--method", "breadcrumbs", "--gamma", "1.5"], "--gamma 1.5: must be in [0, 1)"),
        (["--method", "ties", "--topk-scope", "layer"], "'layer' is not one of 'model', 'tensor'"),
        (["--method", "slerp", "--slerp-scope", "col"], "'col' is not one of 'tensor', 'row'"),
        (["--method", "lines", "--beta", "nan"], "--beta nan: must be a finite number"),
        (["--method", "greedy-soup"], "run `micromerge soup`"),
    ],
)
def test_bad_method_parameters_are_one_line_usage_errors(tmp_path, checkpoint_files, extra, message):
    from click.testing import CliRunner

    from micromerge.cli import cli

    args = ["merge", "--base", str(checkpoint_files[0]), "--ft", str(checkpoint_files[1]), *extra]
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "o.safetensors")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "o.safetensors").exists()


def test_config_file_method_parameters_are_checked(tmp_path, checkpoint_files):
    from click.testing import CliRunner

    from micromerge.cli import cli

    config = tmp_path / "m.toml"
    config.write_text(
        f'[merge]\nbase = "{checkpoint_files[0]}"\nfinetuned = ["{checkpoint_files[1]}"]\n'
        f'method = "ties"\ntopk_scope = "everything"\nout = "{tmp_path / "o.safetensors"}"\n'
    )
    result = CliRunner().invoke(cli, ["merge", "--config", str(config)])
    assert (
        result.exit_code == 2
        and "--topk-scope 'everything': choose one of ['model', 'tensor']" in result.output
    )


def test_methods_command_lists_every_method_with_its_engines():
    from click.testing import CliRunner

    from micromerge.cli import cli

    result = CliRunner().invoke(cli, ["methods"])
    assert result.exit_code == 0
    lines = {
        line.split()[0]: line for line in result.output.splitlines()[1:] if line and not line[0].isspace()
    }
    assert set(lines) == set(METHODS)
    assert "numpy, torch" in lines["lines"] and "numpy" not in lines["tsv"] and "2+" in lines["model-stock"]
    assert lines["wise-ft"].split()[-1] == "--alpha", "the strength is --alpha on the command line"
    assert lines["ties"].endswith("--alpha, --density, --topk-scope"), (
        "each parameter as the flag that sets it"
    )
    column = result.output.splitlines()[0].index("flags")  # every row's text starts under its heading
    assert all(line[column - 1] == " " and line[column] != " " for line in result.output.splitlines()[1:])


def test_merge_and_sweep_offer_one_flag_per_tunable_parameter():
    from micromerge.cli import merge_command, sweep_command
    from micromerge.merging.methods import TUNABLE

    for command in (merge_command, sweep_command):
        names = {option.name for option in command.params}
        assert set(TUNABLE) <= names, command.name


def test_the_sweeps_in_place_merge_leaves_excluded_keys_at_the_base(checkpoint_files):
    """A sweep under `--include visual.*` merges the vision tower in place and leaves every other
    key of the model the base's, at every alpha (the streaming merge copies them from the base)."""
    from micromerge.merging.rules import KeyRules

    base_state, ft_state = (load_file(str(f)) for f in checkpoint_files[:2])
    with open_source(str(checkpoint_files[0])) as base, open_source(str(checkpoint_files[1])) as ft:
        model, _ = load_model(base)
        spec = MergeSpec(method="wise-ft", rules=KeyRules(include=("visual.*",)))
        resident = ResidentMerge(model, spec, base, [ft], torch.device("cpu"))
        resident.apply(1.0)
        merged = resident.model.state_dict()
    assert resident.keys and all(key.startswith("visual.") for key in resident.keys)
    for key, tensor in base_state.items():
        expected = ft_state[key] if key.startswith("visual.") else tensor
        torch.testing.assert_close(merged[key], expected, atol=0, rtol=0, msg=key)
