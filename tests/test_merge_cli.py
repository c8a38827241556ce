"""`merge` end to end on small open_clip checkpoints, and every bad input the issue lists."""

import json
import math
import resource
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from micromerge.cli import cli, merge_command
from tests.helpers import random_state_dict, write_checkpoint


@pytest.fixture
def pair(tmp_path):
    base = write_checkpoint(tmp_path / "base.safetensors", 0)
    ft = write_checkpoint(tmp_path / "ft.safetensors", 1)
    return tmp_path, base, ft


def invoke(*args):
    return CliRunner().invoke(merge_command, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_wise_ft_end_to_end_with_manifest_and_provenance(pair):
    tmp, base, ft = pair
    out = tmp / "m.safetensors"
    started = time.perf_counter()
    result = invoke(
        "--base",
        tmp / "base.safetensors",
        "--ft",
        tmp / "ft.safetensors",
        "--alpha",
        0.25,
        "--out",
        out,
        "--quiet",
    )
    wall = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    merged = load_file(str(out))
    for key in base:
        expected = 0.75 * base[key] + 0.25 * ft[key]
        if key == "logit_scale":
            expected = expected.clamp(max=math.log(100))
        torch.testing.assert_close(merged[key], expected, atol=1e-6, rtol=0)
    manifest = json.loads((tmp / "m.safetensors.manifest.json").read_text())
    assert manifest["method"] == "wise-ft" and manifest["parameters"]["alpha"] == 0.25
    digests = manifest["inputs_sha256"]
    import hashlib

    assert set(digests.values()) == {
        hashlib.sha256((tmp / n).read_bytes()).hexdigest() for n in ("base.safetensors", "ft.safetensors")
    }
    assert manifest["micromerge_version"]
    assert 0 <= manifest["seconds"] <= round(wall, 3) + 0.001, (
        "the merge's own duration, within the command's"
    )
    with safe_open(str(out), "pt") as handle:
        meta = handle.metadata()
    assert json.loads(meta["micromerge.core.provenance"])["inputs_sha256"] == digests
    assert meta["micromerge.arch"] == "nano-clip"
    assert (manifest["merged_keys"], manifest["copied_keys"]) == (len(base), 0)
    only_visual = tmp / "visual.safetensors"
    args = ["--base", tmp / "base.safetensors", "--ft", tmp / "ft.safetensors", "--include", "visual.*"]
    assert invoke(*args, "--out", only_visual, "--quiet").exit_code == 0
    manifest = json.loads((tmp / "visual.safetensors.manifest.json").read_text())
    visual = sum(key.startswith("visual.") for key in base)
    assert 0 < visual < len(base) and (manifest["merged_keys"], manifest["copied_keys"]) == (
        visual,
        len(base) - visual,
    )


@pytest.mark.parametrize("method", ["dare", "dare-ties", "della", "della-linear"])
def test_same_inputs_same_bytes(pair, method):
    """DARE and DELLA (and their variants) draw their drop masks from --seed: the same seed gives
    the same bytes, another seed other weights, and the seed is in the provenance, so the
    checkpoint says how to make it again. WiSE-FT draws nothing: its seed is none (null), so two
    seeds give one file."""
    tmp, _, _ = pair
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert (
            invoke(
                "--base",
                tmp / "base.safetensors",
                "--ft",
                tmp / "ft.safetensors",
                "--method",
                method,
                "--seed",
                seed,
                "--out",
                tmp / f"{name}.safetensors",
            ).exit_code
            == 0
        )
    assert (tmp / "a.safetensors").read_bytes() == (tmp / "b.safetensors").read_bytes()
    a, c = load_file(str(tmp / "a.safetensors")), load_file(str(tmp / "c.safetensors"))
    assert any(not torch.equal(a[key], c[key]) for key in a), "another seed, other drop masks"
    for name, seed in (("a", 3), ("c", 4)):
        with safe_open(str(tmp / f"{name}.safetensors"), "pt") as handle:
            assert json.loads(handle.metadata()["micromerge.core.provenance"])["seed"] == seed
        assert json.loads((tmp / f"{name}.safetensors.manifest.json").read_text())["seed"] == seed
    for seed in (3, 4):  # a method that draws nothing: the seed is no input, the bytes stay the same
        args = ["--base", tmp / "base.safetensors", "--ft", tmp / "ft.safetensors", "--seed", seed]
        assert invoke(*args, "--out", tmp / f"wise-{seed}.safetensors").exit_code == 0
        assert json.loads((tmp / f"wise-{seed}.safetensors.manifest.json").read_text())["seed"] is None
    assert (tmp / "wise-3.safetensors").read_bytes() == (tmp / "wise-4.safetensors").read_bytes()


def test_alphas_write_one_checkpoint_per_alpha(pair):
    tmp, base, ft = pair
    result = invoke(
        "--base",
        tmp / "base.safetensors",
        "--ft",
        tmp / "ft.safetensors",
        "--alphas",
        "0:1:0.5",
        "--out",
        tmp / "sweep",
    )
    assert result.exit_code == 0, result.output
    files = sorted((tmp / "sweep").glob("*.safetensors"))
    assert [f.name for f in files] == [
        "alpha-0.0.safetensors",
        "alpha-0.5.safetensors",
        "alpha-1.0.safetensors",
    ]
    assert torch.equal(load_file(str(files[0]))["visual.proj"], base["visual.proj"])
    assert torch.equal(load_file(str(files[2]))["visual.proj"], ft["visual.proj"])


def test_several_alphas_given_to_alpha_point_to_alphas(pair):
    """`--alpha 0.5,0.7` was "not a valid float", not a word of the --alphas that takes it."""
    tmp, _, _ = pair
    for typed, hint in (("0.5,0.7", True), ("0:1:0.5", True), ("half", False)):
        result = invoke("--base", tmp / "base.safetensors", "--ft", tmp / "ft.safetensors", "--alpha", typed)
        assert result.exit_code == 2 and f"'{typed}' is not one number" in result.output, result.output
        assert ("several alphas go to --alphas" in result.output) == hint, result.output


def test_task_arithmetic_ties_with_several_ft_and_rules(pair):
    """Alpha rules are tried in order and the first match wins (a general rule after a specific
    one does not override it); a `re:` pattern is searched anywhere in the key, not anchored."""
    tmp, base, ft = pair
    ft2 = write_checkpoint(tmp / "ft2.safetensors", 2)
    out = tmp / "ta.safetensors"
    rules = ["visual.transformer.resblocks.0.*=0.1", r"re:resblocks\.1\.mlp=0.3", "visual.transformer.*=0.9"]
    result = invoke(
        "--base",
        tmp / "base.safetensors",
        "--ft",
        tmp / "ft.safetensors",
        "--ft",
        tmp / "ft2.safetensors",
        "--method",
        "task-arithmetic",
        "--alpha",
        0.5,
        "--include",
        "visual.*",
        *[part for rule in rules for part in ("--alpha-rule", rule)],
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    merged = load_file(str(out))
    assert torch.equal(merged["token_embedding.weight"], base["token_embedding.weight"]), (
        "text tower not merged"
    )
    for key, strength in (
        ("visual.transformer.resblocks.0.mlp.c_fc.weight", 0.1),
        ("visual.transformer.resblocks.1.mlp.c_fc.weight", 0.3),
        ("visual.transformer.resblocks.1.attn.in_proj_weight", 0.9),
        ("visual.proj", 0.5),
    ):
        expected = base[key] + strength * ((ft[key] - base[key]) + (ft2[key] - base[key]))
        torch.testing.assert_close(merged[key], expected, atol=1e-6, rtol=0, msg=key)
    result = invoke(
        "--base",
        tmp / "base.safetensors",
        "--ft",
        tmp / "ft.safetensors",
        "--ft",
        tmp / "ft2.safetensors",
        "--method",
        "ties",
        "--alpha",
        1.0,
        "--out",
        tmp / "ties.safetensors",
    )
    assert result.exit_code == 0, result.output


def test_config_file_and_dtype(pair):
    tmp, base, ft = pair
    config = tmp / "merge.toml"
    config.write_text(
        f'[merge]\nbase = "{tmp / "base.safetensors"}"\nfinetuned = ["{tmp / "ft.safetensors"}"]\nmethod = "slerp"\n'
        f'alpha = 0.3\ndtype = "bfloat16"\nout = "{tmp / "cfg.safetensors"}"\n'
    )
    result = invoke("--config", config)
    assert result.exit_code == 0, result.output
    merged = load_file(str(tmp / "cfg.safetensors"))
    assert merged["visual.proj"].dtype == torch.bfloat16
    manifest = json.loads((tmp / "cfg.safetensors.manifest.json").read_text())
    assert manifest["method"] == "slerp", "a flag's default (wise-ft) must not override the file"
    yaml_config = tmp / "merge.yaml"
    yaml_config.write_text(
        f"merge:\n  base: {tmp / 'base.safetensors'}\n  finetuned: [{tmp / 'ft.safetensors'}]\n  alpha: 0.9\n"
    )
    result = invoke("--config", yaml_config, "--alpha", 0.2, "--out", tmp / "y.safetensors")  # the flag wins
    assert result.exit_code == 0, result.output
    torch.testing.assert_close(
        load_file(str(tmp / "y.safetensors"))["visual.proj"],
        0.8 * base["visual.proj"] + 0.2 * ft["visual.proj"],
        atol=1e-6,
        rtol=0,
    )


def test_integer_tensors_are_copied_from_the_base(tmp_path):
    base, ft = random_state_dict(0), random_state_dict(1)
    base["position_ids"] = torch.arange(16)
    ft["position_ids"] = torch.arange(16) * 7
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(ft, str(tmp_path / "f.safetensors"))
    assert (
        invoke(
            "--base",
            tmp_path / "b.safetensors",
            "--ft",
            tmp_path / "f.safetensors",
            "--out",
            tmp_path / "o.safetensors",
        ).exit_code
        == 0
    )
    assert torch.equal(load_file(str(tmp_path / "o.safetensors"))["position_ids"], torch.arange(16))


# ---- bad input: one line, exit 2, nothing written ----


def test_missing_file(pair):
    tmp, _, _ = pair
    one_line_error(
        invoke(
            "--base", tmp / "nope.safetensors", "--ft", tmp / "ft.safetensors", "--out", tmp / "o.safetensors"
        ),
        "nope.safetensors",
    )
    assert not (tmp / "o.safetensors").exists()


def test_truncated_and_corrupt_safetensors(pair):
    tmp, _, _ = pair
    data = (tmp / "ft.safetensors").read_bytes()
    (tmp / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    one_line_error(
        invoke(
            "--base",
            tmp / "base.safetensors",
            "--ft",
            tmp / "trunc.safetensors",
            "--out",
            tmp / "o.safetensors",
        ),
        "trunc.safetensors",
        "truncated",
    )
    (tmp / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    one_line_error(
        invoke(
            "--base", tmp / "junk.safetensors", "--ft", tmp / "ft.safetensors", "--out", tmp / "o.safetensors"
        ),
        "junk.safetensors",
        "corrupt",
    )
    assert not list(tmp.glob("o.safetensors*")) and not list(tmp.glob(".o.safetensors*"))


def test_pickle_needing_code_is_refused_without_flag(pair, tmp_path):
    tmp, _, _ = pair

    class Holder:
        pass

    holder = Holder()
    holder.weights = load_file(str(tmp / "ft.safetensors"))
    Holder.__module__ = "some_research_code.models"
    Holder.__qualname__ = "Holder"
    sys.modules.setdefault("some_research_code", type(sys)("some_research_code"))
    sys.modules["some_research_code.models"] = type(sys)("some_research_code.models")
    sys.modules["some_research_code.models"].Holder = Holder
    torch.save(holder, tmp / "obj.pt")
    del sys.modules["some_research_code.models"]
    one_line_error(
        invoke("--base", tmp / "base.safetensors", "--ft", tmp / "obj.pt", "--out", tmp / "o.safetensors"),
        "obj.pt",
        "--allow-pickle",
    )
    result = invoke(
        "--base",
        tmp / "base.safetensors",
        "--ft",
        tmp / "obj.pt",
        "--allow-pickle",
        "--out",
        tmp / "o.safetensors",
    )
    # read with stand-ins: its tensors sit under `weights.`, so the names do not match the base
    one_line_error(result, "does not match the base")


def test_different_architectures_name_keys_shapes_and_counts(tmp_path):
    write_checkpoint(tmp_path / "nano.safetensors", 0, "nano-clip")
    write_checkpoint(tmp_path / "micro.safetensors", 0, "micro-clip")
    line = one_line_error(
        invoke(
            "--base",
            tmp_path / "nano.safetensors",
            "--ft",
            tmp_path / "micro.safetensors",
            "--out",
            tmp_path / "o.safetensors",
        ),
        "micro.safetensors",
        "shape mismatch",
    )
    assert "key(s) not in the base" in line and "vs" in line


def test_nonfinite_input_refused_or_warned(pair):
    tmp, _, ft = pair
    ft["visual.proj"][0, 0] = float("nan")
    save_file(ft, str(tmp / "nan.safetensors"))
    one_line_error(
        invoke(
            "--base",
            tmp / "base.safetensors",
            "--ft",
            tmp / "nan.safetensors",
            "--out",
            tmp / "o.safetensors",
        ),
        "visual.proj",
        "NaN",
        "--allow-nonfinite",
    )
    result = invoke(
        "--base",
        tmp / "base.safetensors",
        "--ft",
        tmp / "nan.safetensors",
        "--allow-nonfinite",
        "--out",
        tmp / "o.safetensors",
    )
    assert result.exit_code == 0 and "warning:" in result.stderr and "NaN" in result.stderr


def test_alpha_outside_unit_interval_warns_extrapolation_for_the_command_only(pair, monkeypatch):
    """The warning is one `warning:` line, printed only while the command runs: whoever called the
    CLI (a notebook, a test runner) has its own warning display back afterwards."""

    def callers_display(*args, **kwargs):
        pass

    monkeypatch.setattr(warnings, "showwarning", callers_display)
    tmp, _, _ = pair
    result = invoke(
        "--base",
        tmp / "base.safetensors",
        "--ft",
        tmp / "ft.safetensors",
        "--alpha",
        "1.5",
        "--out",
        tmp / "o.safetensors",
    )
    assert result.exit_code == 0 and "warning:" in result.stderr and "extrapolates" in result.stderr
    assert warnings.showwarning is callers_display


def test_existing_output_refused_unless_force(pair):
    tmp, _, _ = pair
    (tmp / "o.safetensors").write_bytes(b"precious")
    one_line_error(
        invoke(
            "--base", tmp / "base.safetensors", "--ft", tmp / "ft.safetensors", "--out", tmp / "o.safetensors"
        ),
        "--force",
    )
    assert (tmp / "o.safetensors").read_bytes() == b"precious"
    assert (
        invoke(
            "--base",
            tmp / "base.safetensors",
            "--ft",
            tmp / "ft.safetensors",
            "--out",
            tmp / "o.safetensors",
            "--force",
        ).exit_code
        == 0
    )


def test_bad_method_and_wrong_model_count(pair):
    tmp, _, _ = pair
    one_line_error(
        invoke("--base", tmp / "base.safetensors", "--ft", tmp / "ft.safetensors", "--method", "soup"), "soup"
    )
    write_checkpoint(tmp / "ft2.safetensors", 2)
    one_line_error(
        invoke(
            "--base",
            tmp / "base.safetensors",
            "--ft",
            tmp / "ft.safetensors",
            "--ft",
            tmp / "ft2.safetensors",
            "--method",
            "wise-ft",
        ),
        "exactly 1",
    )


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_disk_full_mid_write_leaves_no_file(tmp_path):
    """RLIMIT_FSIZE makes writes past 200 kB fail with EFBIG, like a disk filling up."""
    write_checkpoint(tmp_path / "b.safetensors", 0, "micro-clip")
    write_checkpoint(tmp_path / "f.safetensors", 1, "micro-clip")
    out = tmp_path / "out" / "m.safetensors"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from micromerge.cli import merge_main; merge_main()",
            "--base",
            str(tmp_path / "b.safetensors"),
            "--ft",
            str(tmp_path / "f.safetensors"),
            "--out",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        preexec_fn=_limit_file_size,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert "no file was left behind" in proc.stderr and proc.stderr.count("\n") == 1
    assert list((tmp_path / "out").iterdir()) == []


def test_top_level_cli_lists_zoo():
    result = CliRunner().invoke(cli, ["zoo"])
    assert (
        result.exit_code == 0 and "plip" in result.output and "hf-hub:wisdomik/QuiltNet-B-16" in result.output
    )
    lines = result.output.splitlines()
    arch = {line.split()[0]: line.split()[1] for line in lines[1:]}
    assert arch["plip"] == "ViT-B-32-quickgelu" and arch["biomedclip"] == "config:biomedclip.json"
    # every column starts where its heading does (BiomedCLIP's config name once pushed its row out)
    for heading in ("arch", "domain", "source"):
        column = lines[0].index(heading)
        assert all(line[column - 2 : column] == "  " and line[column] != " " for line in lines[1:]), heading


def _peak_rss_mb(args, cwd):
    code = (
        "import resource, sys\nfrom micromerge.cli import merge_main\nsys.argv=['merge']+sys.argv[1:]\n"
        "try:\n    merge_main()\nexcept SystemExit:\n    pass\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=cwd, check=True
    )
    return int(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_streaming_peak_memory_is_far_below_loading_every_input(tmp_path, engine):
    """Two 256 MB checkpoints: naive merging holds ~768 MB extra; streaming holds a few tensors."""
    for seed, name in ((0, "big_a"), (1, "big_b")):
        generator = torch.Generator().manual_seed(seed)
        save_file(
            {f"layer{i}.weight": torch.randn(2048, 2048, generator=generator) for i in range(16)},
            str(tmp_path / f"{name}.safetensors"),
        )
        save_file(
            {f"layer{i}.weight": torch.randn(8, 8, generator=generator) for i in range(16)},
            str(tmp_path / f"{name}_small.safetensors"),
        )
    checkpoint_mb = (tmp_path / "big_a.safetensors").stat().st_size / 2**20
    baseline = _peak_rss_mb(
        [
            "--base",
            "big_a_small.safetensors",
            "--ft",
            "big_b_small.safetensors",
            "--out",
            "s.safetensors",
            "--quiet",
            "--engine",
            engine,
        ],
        tmp_path,
    )
    peak = _peak_rss_mb(
        [
            "--base",
            "big_a.safetensors",
            "--ft",
            "big_b.safetensors",
            "--out",
            "m.safetensors",
            "--quiet",
            "--engine",
            engine,
        ],
        tmp_path,
    )
    extra = peak - baseline
    assert extra < 0.5 * checkpoint_mb, (
        f"merge held {extra} MB over baseline for {checkpoint_mb:.0f} MB checkpoints"
    )


def test_the_merge_carries_the_bases_model_config_so_it_loads_without_a_name(tmp_path):
    """A checkpoint known only by its full model config (a fine-tuned run's, a converted hub model's)
    gives a merge that carries that config and builds again from it alone."""
    from micromerge.merging.models import get_model_config, load_model
    from micromerge.merging.sources import open_source

    config = get_model_config("nano-clip")
    config["vision_cfg"]["layers"] = 1  # not any named architecture's config
    for name, seed in (("base", 0), ("ft", 1)):
        tensors = random_state_dict(seed)
        tensors = {k: v for k, v in tensors.items() if not k.startswith("visual.transformer.resblocks.1.")}
        save_file(
            tensors, str(tmp_path / f"{name}.safetensors"), {"micromerge.model_config": json.dumps(config)}
        )
    args = ["--base", tmp_path / "base.safetensors", "--ft", tmp_path / "ft.safetensors"]
    assert invoke(*args, "--out", tmp_path / "m.safetensors", "--quiet").exit_code == 0
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["micromerge.model_config"]) == config and "micromerge.arch" not in metadata
    with open_source(str(tmp_path / "m.safetensors")) as merged:
        model, _ = load_model(merged)
    assert len(model.visual.transformer.resblocks) == 1


def test_a_specialist_with_the_bases_or_another_specialists_weights_is_named(pair):
    """`--ft` typed as the base (or a copy of it) has a zero task vector: the merge is the base at
    every alpha, and nothing said so; a specialist given twice is counted twice in a sum or a vote.
    Both are warned about (by content, so a copy under another name too); distinct inputs are not."""
    import shutil

    tmp, _, _ = pair
    copy = tmp / "copy-of-base.safetensors"
    shutil.copyfile(tmp / "base.safetensors", copy)
    ft = tmp / "ft.safetensors"
    same = invoke(
        "--base", tmp / "base.safetensors", "--ft", copy, "--alpha", 0.5, "--out", tmp / "a.safetensors"
    )
    assert same.exit_code == 0 and f"--ft {copy}: the same weights as --base" in same.stderr
    assert "its task vector is zero" in same.stderr
    twice = invoke("--base", tmp / "base.safetensors", "--ft", ft, "--ft", ft, "--method", "task-arithmetic",
                   "--alpha", 0.5, "--out", tmp / "b.safetensors")  # fmt: skip
    assert twice.exit_code == 0 and f"--ft {ft}: the same weights as --ft {ft}" in twice.stderr
    plain = invoke(
        "--base", tmp / "base.safetensors", "--ft", ft, "--alpha", 0.5, "--out", tmp / "c.safetensors"
    )
    assert plain.exit_code == 0 and "the same weights" not in plain.stderr


def test_a_command_ends_the_process_group_a_launch_started(tmp_path):
    """Under `accelerate launch` every command leaves the process group itself (torch.distributed's
    documented exit) rather than leave the communicators to the interpreter's shutdown: shown here
    on a one-process gloo group, the same call a rank of a launch makes, for a command that works
    and one that fails."""
    import torch.distributed as dist

    for args, code in ((["methods"], 0), (["merge", "--base", str(tmp_path / "missing.safetensors")], 2)):
        store = dist.FileStore(str(tmp_path / f"store-{code}"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            result = CliRunner().invoke(cli, args)
            assert result.exit_code == code, result.output
            assert not dist.is_initialized()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


@pytest.mark.parametrize("module", ["micromerge.cli", "micromerge"])
def test_a_usage_error_on_the_command_line_is_one_line_on_stderr_with_exit_2(tmp_path, module):
    """The console entry (`micromerge …`, as `python -m micromerge.cli` runs it, and `python -m
    micromerge` where the scripts folder is not on the PATH) turns click's three-line usage error
    into one line on stderr, exit 2, nothing on stdout; a bare group prints its help on stdout and
    exits 0, as click would."""
    import subprocess
    import sys

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=tmp_path
        )

    bad = run("merge", "--no-such-flag")
    assert bad.returncode == 2 and bad.stdout == "", bad
    assert bad.stderr.startswith("error: ") and "--no-such-flag" in bad.stderr
    assert bad.stderr.endswith(" (see `micromerge merge --help`)\n") and bad.stderr.count("\n") == 1
    bare = run("finetune")
    assert bare.returncode == 0 and bare.stderr == "" and bare.stdout.startswith("Usage: micromerge finetune")


def test_the_shell_completes_commands_options_and_method_names_from_the_registry():
    """`eval "$(_MICROMERGE_COMPLETE=bash_source micromerge)"` (README): click completes commands and
    options; --method, not a Choice (an unknown name gets the registry's nearest names), completes
    from the method registry."""
    import os
    import subprocess
    import sys

    from micromerge.merging.methods import METHODS

    def complete(*words: str) -> list[str]:
        env = {**os.environ, "COMP_WORDS": " ".join(("micromerge", *words)), "COMP_CWORD": str(len(words)),
               "_MICROMERGE_COMPLETE": "bash_complete"}  # fmt: skip
        done = subprocess.run([sys.executable, "-m", "micromerge"], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return [line.partition(",")[2] for line in done.stdout.splitlines()]

    assert complete("fine") == ["finetune"]
    assert complete("sweep", "--method", "ti") == ["ties"]
    assert complete("merge", "--method", "") == list(METHODS)


def test_quiet_leaves_out_the_progress_lines_and_only_them(pair):
    """Off a terminal a merge's bar is two lines on stderr (start, end); --quiet leaves them out,
    and the output is the same file either way."""
    tmp, _, _ = pair
    inputs = ("--base", tmp / "base.safetensors", "--ft", tmp / "ft.safetensors")
    shown = invoke(*inputs, "--out", tmp / "shown.safetensors")
    quiet = invoke(*inputs, "--out", tmp / "quiet.safetensors", "--quiet")
    assert shown.exit_code == quiet.exit_code == 0
    assert "merge (wise-ft): 100%" in shown.stderr and quiet.stderr == "", quiet.stderr
    assert (tmp / "shown.safetensors").read_bytes() == (tmp / "quiet.safetensors").read_bytes()


def test_every_option_of_every_command_says_what_it_is_for_and_shared_inputs_say_it_alike():
    """`--help` is where a new user learns a flag: each option has its own line (sweep's --base and
    --ft, eval's --batch-size, report's --metric, finetune's --lr and the demo's epochs had none),
    and the merge inputs `merge` and `sweep` both take are described in the same words."""
    import click

    def commands(group: click.Group, path: str) -> list[tuple[str, click.Command]]:
        found: list[tuple[str, click.Command]] = []
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                found += commands(command, f"{path} {name}")
            else:
                found.append((f"{path} {name}", command))
        return found

    every = commands(cli, "micromerge")
    assert len(every) >= 15  # every command, finetune's two modes and data's included
    silent = [
        f"{path} {option.opts[0]}"
        for path, command in every
        for option in command.params
        if isinstance(option, click.Option) and not (option.help or "").strip()
    ]
    assert silent == []

    def helps(name: str) -> dict[str, str]:
        return {o.opts[0]: o.help or "" for o in cli.commands[name].params if isinstance(o, click.Option)}

    merge, sweep = helps("merge"), helps("sweep")
    for shared in ("--base", "--ft", "--weights"):
        assert merge[shared] == sweep[shared], shared
