"""How a merge job is built from flags, a config file or a mapping (`merging/job.py`).

Each test here was written against a hand-made fault the rest of the suite let pass (mutation
audit round 11): a missing `--base` or `--ft`, a config's single `finetuned` string or its
`alpha_rules` table, the default alpha, `--alphas` parsing (three parts, step 0, rounding, repeats,
the size limit), the file name per alpha, and the default output names.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from micromerge.core.errors import MicromergeError
from micromerge.merging.job import MAX_ALPHAS, job_from_mapping
from tests.helpers import write_checkpoint
from tests.test_hardening_merge import _merge
from tests.test_merge_cli import invoke, one_line_error


@pytest.fixture
def pair(tmp_path):
    write_checkpoint(tmp_path / "base.safetensors", 0)
    write_checkpoint(tmp_path / "ft.safetensors", 1)
    return tmp_path


def _tensors(path):
    return load_file(str(path))


def test_a_merge_without_base_or_ft_is_one_line(pair, monkeypatch):
    monkeypatch.chdir(pair)  # where a default output would land
    one_line_error(invoke("--ft", pair / "ft.safetensors"), "--base is required")
    one_line_error(invoke("--base", pair / "base.safetensors"), "at least one --ft is required")
    assert sorted(p.name for p in pair.iterdir()) == ["base.safetensors", "ft.safetensors"], "nothing written"


def test_a_config_may_name_one_finetuned_model_as_a_string_and_rules_as_a_table(pair):
    """MERGE_SCHEMA allows `finetuned = "x"` and `alpha_rules = {PATTERN = VALUE}`: both work."""
    config = pair / "merge.toml"
    config.write_text(
        f'[merge]\nbase = "{pair / "base.safetensors"}"\nfinetuned = "{pair / "ft.safetensors"}"\n'
        f'alpha = 0.5\nout = "{pair / "m.safetensors"}"\n[merge.alpha_rules]\n"visual.*" = 0.25\n'
    )
    result = invoke("--config", config)
    assert result.exit_code == 0, result.output
    base, ft, merged = (_tensors(pair / n) for n in ("base.safetensors", "ft.safetensors", "m.safetensors"))
    torch.testing.assert_close(
        merged["visual.proj"], 0.75 * base["visual.proj"] + 0.25 * ft["visual.proj"], atol=1e-6, rtol=0
    )
    text_key = next(k for k in merged if k.startswith("transformer.") and merged[k].is_floating_point())
    torch.testing.assert_close(merged[text_key], 0.5 * base[text_key] + 0.5 * ft[text_key], atol=1e-6, rtol=0)


def test_a_config_may_write_rules_as_a_list_and_weights_as_numbers_or_text(pair):
    """MERGE_SCHEMA's other forms: `alpha_rules` as "PATTERN=VALUE" strings and [PATTERN, VALUE]
    pairs, `weights` as a list of numbers or the flag's "a,b" text. Each merges as its flag does."""
    base, ft = _tensors(pair / "base.safetensors"), _tensors(pair / "ft.safetensors")
    text_key = next(k for k in base if k.startswith("transformer.") and base[k].is_floating_point())
    head = f'[merge]\nbase = "{pair / "base.safetensors"}"\nfinetuned = ["{pair / "ft.safetensors"}"]\n'
    for name, body, expected in [
        ("rules", 'alpha = 0.5\nalpha_rules = ["visual.*=0.25", ["transformer.*", 1.0]]', (0.25, 1.0)),
        ("numbers", 'method = "linear"\nweights = [0.3, 0.7]', (0.7, 0.7)),
        ("text", 'method = "linear"\nweights = "0.2,0.8"', (0.8, 0.8)),
    ]:
        config = pair / f"{name}.toml"
        config.write_text(head + body + f'\nout = "{pair / name}.safetensors"\n')
        result = invoke("--config", config)
        assert result.exit_code == 0, result.output
        merged = _tensors(pair / f"{name}.safetensors")
        for key, alpha in zip(("visual.proj", text_key), expected, strict=True):
            torch.testing.assert_close(
                merged[key], (1 - alpha) * base[key] + alpha * ft[key], atol=1e-6, rtol=0
            )


def test_weights_may_end_with_a_comma_like_alphas(pair):
    result = _merge(pair, "--method", "linear", "--weights", "0.3,0.7,", "--out", pair / "w.safetensors")
    assert result.exit_code == 0, result.output
    base, ft = _tensors(pair / "base.safetensors"), _tensors(pair / "ft.safetensors")
    torch.testing.assert_close(
        _tensors(pair / "w.safetensors")["visual.proj"],
        0.3 * base["visual.proj"] + 0.7 * ft["visual.proj"],
        atol=1e-6,
        rtol=0,
    )


def test_without_alpha_each_method_uses_its_documented_default(pair):
    """`--alpha` defaults to 0.5 (WiSE-FT's midpoint); 1.0 for model-stock, tsv and iso-c (cli help)."""
    result = _merge(pair, "--out", pair / "d.safetensors")
    assert result.exit_code == 0, result.output
    base, ft = _tensors(pair / "base.safetensors"), _tensors(pair / "ft.safetensors")
    torch.testing.assert_close(
        _tensors(pair / "d.safetensors")["visual.proj"],
        0.5 * (base["visual.proj"] + ft["visual.proj"]),
        atol=1e-6,
        rtol=0,
    )
    strengths = {
        method: job_from_mapping(
            {"base": "b", "finetuned": ["f", "g"], "method": method}
        ).spec.params.strength
        for method in ("wise-ft", "ties", "model-stock", "tsv", "iso-c")
    }
    assert strengths == {"wise-ft": 0.5, "ties": 0.5, "model-stock": 1.0, "tsv": 1.0, "iso-c": 1.0}


def test_a_methods_own_parameter_defaults_apply():
    """The supervised α searches per block; AdaMerging keeps MethodParams' per-layer default."""
    params = {
        method: job_from_mapping({"base": "b", "finetuned": ["f"], "method": method}).spec.params
        for method in ("supervised-alpha", "adamerging")
    }
    assert params["supervised-alpha"].granularity == "block"
    assert params["adamerging"].granularity == "layer"


@pytest.mark.parametrize(
    "flags, needle",
    [
        (("--seed", "-1"), "--seed -1: must be a non-negative integer"),
        (("--method", "adamerging", "--steps", "0"), "--steps 0: must be a positive integer"),
        (("--alphas", "0:1"), "expected START:STOP:STEP"),
        (("--alphas", "0:1:0"), "STEP must be > 0"),
        (("--alphas", "1:0:0.5"), "STOP >= START"),
        # an unset shell variable: it merged once, at the method's default alpha
        (("--alphas", ""), "--alphas '': empty (an unset variable?)"),
        (("--alphas", ",".join(["0.5"] * (MAX_ALPHAS + 1))), "at most 10,000"),
        (("--alphas", "0,1", "--out", "sweep.safetensors"), "with --alphas, --out is a folder"),
        (("--device", "tpu"), "--device tpu: expected auto, cpu, cuda or cuda:N"),
        # checked before AdaMerging's statistics are learned (minutes), not after
        (("--method", "adamerging", "--learning-rate", "0"), "--learning-rate 0.0: must be positive"),
        # a knob the method does not read would merge as if it had been applied
        (("--density", "0.2"), "--density: wise-ft does not use it; remove it"),
        (
            ("--method", "ties", "--samples", "10"),
            "--samples: ties does not use it (it takes --density, --topk-scope)",
        ),
        (
            ("--method", "task-arithmetic", "--granularity", "layer"),
            "--granularity: task-arithmetic does not use it",
        ),
    ],
)
def test_bad_counts_seeds_and_alphas_are_one_line(pair, flags, needle, monkeypatch):
    monkeypatch.chdir(pair)  # default and relative outputs would land here
    one_line_error(_merge(pair, *flags), needle)
    assert sorted(p.name for p in pair.iterdir()) == ["base.safetensors", "ft.safetensors"]


def test_an_output_spelled_otherwise_than_its_input_is_still_refused(pair, monkeypatch):
    """`--out ft.safetensors` from the input's folder, or through `..`, is the input: --force
    would replace the fine-tuned model with the merge."""
    monkeypatch.chdir(pair)
    before = (pair / "ft.safetensors").read_bytes()
    (pair / "sub").mkdir()
    for out in ("ft.safetensors", pair / "sub" / ".." / "ft.safetensors"):
        one_line_error(_merge(pair, "--out", out, "--force"), "is an input")
    assert (pair / "ft.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    "values, needle",
    [
        ({"alhpa": 0.5}, "unknown key(s) ['alhpa']"),
        ({"seed": True}, "--seed True: must be a non-negative integer"),
        ({"method": "adamerging", "steps": True}, "--steps True: must be a positive integer"),
        # read past in silence before: the user believed the merge had learned from it
        ({"method": "ties", "data": "ubench"}, "--data: ties learns from no data; remove it"),
    ],
)
def test_a_job_mapping_from_a_script_is_checked_like_flags(values, needle):
    """Ablation scripts and the demo build jobs from mappings: the same checks as the CLI's."""
    with pytest.raises(MicromergeError) as caught:
        job_from_mapping({"base": "b", "finetuned": ["f"], **values})
    assert needle in str(caught.value)


def test_a_count_of_one_is_taken():
    """--steps and --samples must be positive: one is."""
    job = job_from_mapping(
        {"base": "b", "finetuned": ["f"], "method": "adamerging", "steps": 1, "samples": 1, "data": "ubench"}
    )
    assert (job.spec.params.steps, job.spec.params.samples) == (1, 1)


def test_alphas_are_rounded_and_repeats_written_once(pair):
    """0:0.3:0.1 is 0, 0.1, 0.2, 0.3 (not 0.30000000000000004); a repeated alpha is one output."""
    result = _merge(pair, "--alphas", "0:0.3:0.1", "--out", pair / "sweep", "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (pair / "sweep").glob("*.safetensors")) == [
        "alpha-0.0.safetensors",
        "alpha-0.1.safetensors",
        "alpha-0.2.safetensors",
        "alpha-0.3.safetensors",
    ]
    manifest = json.loads((pair / "sweep" / "alpha-0.3.safetensors.manifest.json").read_text())
    assert manifest["parameters"]["alpha"] == 0.3
    repeated = _merge(pair, "--alphas", "0.5,1,0.5", "--out", pair / "twice", "--quiet")
    assert repeated.exit_code == 0, repeated.output
    assert repeated.output.count("wrote") == 2 and "kept" not in repeated.output, repeated.output
    assert sorted(p.name for p in (pair / "twice").glob("*.safetensors")) == [
        "alpha-0.5.safetensors",
        "alpha-1.0.safetensors",
    ]


def test_default_output_names_say_the_method_and_its_alpha(pair, monkeypatch):
    """Without --out: checkpoints/merged/<base>+<ft>-<method>[-a<alpha>].safetensors, each model
    named by its file's stem cut to 40 characters; linear has weights, not an alpha, so its name
    carries none."""
    monkeypatch.chdir(pair)
    long_name = "pathology-specialist-" + "x" * 40
    write_checkpoint(pair / f"{long_name}.safetensors", 2)
    long = invoke("--base", pair / "base.safetensors", "--ft", pair / f"{long_name}.safetensors", "--quiet")
    assert long.exit_code == 0, long.output
    assert _merge(pair, "--alpha", "0.3", "--quiet").exit_code == 0
    assert _merge(pair, "--method", "linear", "--quiet").exit_code == 0
    assert _merge(pair, "--alphas", "0,1", "--quiet").exit_code == 0
    merged = pair / "checkpoints" / "merged"
    assert sorted(p.name for p in merged.glob("*.safetensors")) == [
        "base+ft-linear.safetensors",
        "base+ft-wise-ft-a0.3.safetensors",
        f"base+{long_name[:40]}-wise-ft-a0.5.safetensors",
    ]
    assert sorted(p.name for p in (merged / "base+ft-wise-ft").glob("*.safetensors")) == [
        "alpha-0.0.safetensors",
        "alpha-1.0.safetensors",
    ]
