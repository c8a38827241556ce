"""Issue #11 on the merge path: each test fails on the code before the fix and passes after.

Data loss (L1, L2, L4, L6), silent wrong results (M1, M4, M5), typed config files (S2, M11),
hostile safetensors headers (C1) and number parsing (C3): one line, exit 2, nothing written.
"""

from __future__ import annotations

import gc
import json
import os
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from micromerge.analysis.ablate import load_ablation
from micromerge.core.atomic import atomic_output
from micromerge.core.errors import MicromergeError
from micromerge.merging.sources import open_source
from tests.helpers import random_state_dict, write_checkpoint
from tests.test_merge_cli import invoke, one_line_error


@pytest.fixture
def pair(tmp_path):
    write_checkpoint(tmp_path / "base.safetensors", 0)
    write_checkpoint(tmp_path / "ft.safetensors", 1)
    return tmp_path


def _merge(tmp, *extra):
    return invoke("--base", tmp / "base.safetensors", "--ft", tmp / "ft.safetensors", *extra)


# ---- data loss ----


def test_force_replaces_only_regular_files(pair):
    fifo = pair / "pipe.safetensors"
    os.mkfifo(fifo)
    one_line_error(_merge(pair, "--out", fifo, "--force"), "not a regular file")
    assert fifo.is_fifo()
    (pair / "folder.safetensors").mkdir()
    one_line_error(_merge(pair, "--out", pair / "folder.safetensors", "--force"), "not a regular file")


@pytest.mark.parametrize("name", ["merged.pt", "merged", "merged.bin"])
def test_an_out_not_named_safetensors_is_refused_before_anything_is_written(pair, name):
    """The merge wrote safetensors bytes under any name; a reader then took `merged.pt` for a
    pickle ("holds Python objects ... --allow-pickle") and `merged` for an unknown format."""
    one_line_error(
        _merge(pair, "--out", pair / name), f"--out {pair / name}: the merged checkpoint is safetensors"
    )
    assert not (pair / name).exists() and not list(pair.glob(name + "*"))


@pytest.mark.parametrize("provenance", [None, "null", "[1, 2]", "not json"])
def test_an_existing_checkpoint_made_elsewhere_is_neither_kept_nor_overwritten(pair, provenance):
    """Another tool's safetensors file at --out (no provenance, or one that is not our record) is
    not this merge's output: one line, and the file as it was."""
    out = pair / "theirs.safetensors"
    metadata = {} if provenance is None else {"micromerge.core.provenance": provenance}
    save_file({"w": torch.zeros(2)}, str(out), metadata=metadata)
    before = out.read_bytes()
    one_line_error(_merge(pair, "--out", out), "output exists (not from these inputs and parameters)")
    assert out.read_bytes() == before


def test_two_writers_to_one_name_do_not_both_win(tmp_path):
    """The existence check and the publish are one step: the later writer fails, nothing is lost."""
    target = tmp_path / "out.bin"
    with (
        pytest.raises(MicromergeError, match="output exists"),
        atomic_output(target, "wb", force=False) as first,
    ):
        with atomic_output(target, "wb", force=False) as second:  # finishes while the first still writes
            second.write(b"second")
        first.write(b"first")
    assert target.read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"], "no temporary left behind"


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    stale = tmp_path / ".out.bin.999999999.abcd.tmp"  # a pid that is not running
    stale.write_bytes(b"x" * 1000)
    live = tmp_path / f".out.bin.{os.getpid()}.efgh.tmp"
    live.write_bytes(b"y")
    with atomic_output(tmp_path / "out.bin", "wb") as handle:
        handle.write(b"ok")
    assert not stale.exists() and live.exists()


def test_outputs_get_the_permissions_any_new_file_gets(pair):
    """A temporary file is created 0600; the published checkpoint, its manifest and every other
    output get what open() would give them under the umask, so a lab group can read them."""
    previous = os.umask(0o027)
    try:
        result = _merge(pair, "--out", pair / "m.safetensors")
        assert result.exit_code == 0, result.output
        with atomic_output(pair / "note.txt", "w") as handle:
            handle.write("x")
    finally:
        os.umask(previous)
    for name in ("m.safetensors", "m.safetensors.manifest.json", "note.txt"):
        assert (pair / name).stat().st_mode & 0o777 == 0o640, name


def test_distinct_alphas_get_distinct_files(pair):
    """Also alphas equal to six significant digits (`%g` would give both one name)."""
    result = _merge(pair, "--alphas", "0.00001,0.00002,0.1234567,0.1234568", "--out", pair / "tiny")
    assert result.exit_code == 0, result.output
    assert len(list((pair / "tiny").glob("*.safetensors"))) == 4


def test_an_output_that_is_an_input_is_refused(pair):
    before = (pair / "ft.safetensors").read_bytes()
    one_line_error(_merge(pair, "--out", pair / "ft.safetensors", "--force"), "is an input")
    assert (pair / "ft.safetensors").read_bytes() == before


# ---- silent wrong results ----


@pytest.mark.parametrize(
    "flags, needle",
    [
        (("--alpha", "nan"), "--alpha nan: must be a finite number"),
        (("--alpha", "inf"), "--alpha inf: must be a finite number"),
        (("--alphas", "nan,0"), "--alphas 'nan'"),
        (("--alphas", "0:nan:0.1"), "--alphas '0:nan:0.1': must be a finite number"),
        (("--alphas", "0:inf:1"), "--alphas '0:inf:1': must be a finite number"),
        (("--alphas", "0:x:1"), "--alphas '0:x:1': expected a number"),
        (("--alphas", "0:1:1e-9"), "at most 10,000"),
        (("--alphas", ","), "no values"),
        (("--method", "linear", "--weights", "nan,1"), "--weights 'nan'"),
        (("--weights", "0.5,0.5"), "only the linear method takes weights"),
        (("--alpha-rule", "visual.*=nan"), "--alpha-rule 'visual.*=nan': must be a finite number"),
        (("--alpha-rule", "visual.*=x"), "--alpha-rule 'visual.*=x': 'x' is not a number"),
        (("--method", "linear", "--weights", "0.2,0.3,0.5"), "linear needs 2 weights"),
        (("--method", "linear", "--alpha-rule", "visual.*=0.1"), "--alpha-rule does not apply to linear"),
        # linear read past these: `--alphas 0,1` wrote the same merge twice, named for two alphas
        (
            ("--method", "linear", "--alpha", "0.3"),
            "--alpha: linear takes no alpha (it weighs the models by --weights)",
        ),
        (("--method", "linear", "--alphas", "0,1"), "--alphas: linear takes no alpha"),
        (
            ("--alpha", "0.3", "--alphas", "0,1"),
            "--alpha and --alphas: one merge at one alpha, or one per alpha",
        ),
    ],
)
def test_non_finite_or_meaningless_parameters_are_refused(pair, flags, needle):
    one_line_error(_merge(pair, *flags, "--out", pair / "o.safetensors"), needle)
    assert not list(pair.glob("o.safetensors*"))


def test_a_rule_pattern_that_matches_no_key_is_said(pair):
    """`--exclude visul.*` (a typo) would otherwise merge everything without a word."""
    result = _merge(pair, "--exclude", "visul.*", "--out", pair / "o.safetensors")
    assert result.exit_code == 0, result.output
    assert "warning: rule pattern 'visul.*' matches no key" in result.stderr


def test_an_alpha_rule_that_an_earlier_rule_or_the_exclusions_shadow_is_said(pair):
    """The first matching rule wins: `visual.*=0.3` before `visual.proj=0.9` merged visual.proj
    at 0.3, and the second rule, which matches keys, set nothing without a word."""
    shadowed = ("--alpha-rule", "visual.*=0.3", "--alpha-rule", "visual.proj=0.9")
    result = _merge(pair, *shadowed, "--out", pair / "o.safetensors")
    assert result.exit_code == 0, result.output
    assert (
        "warning: --alpha-rule visual.proj=0.9 sets no key's alpha: every key it matches is taken by the earlier "
        "--alpha-rule 'visual.*' (the first matching rule wins: put the narrower rule first)"
    ) in result.stderr
    excluded = ("--exclude", "visual.*", "--alpha-rule", "visual.proj=0.9")
    result = _merge(pair, *excluded, "--out", pair / "x.safetensors")
    assert result.exit_code == 0, result.output
    assert (
        "visual.proj=0.9 sets no key's alpha: every key it matches is left out of the merge by --include"
        in (result.stderr)
    )
    narrow_first = ("--alpha-rule", "visual.proj=0.9", "--alpha-rule", "visual.*=0.3")
    result = _merge(pair, *narrow_first, "--out", pair / "n.safetensors")
    assert result.exit_code == 0 and "warning" not in result.stderr, result.output


def test_integer_tensors_keep_the_bases_values_and_dtype(tmp_path):
    """A counter or index buffer (BatchNorm's num_batches_tracked, position ids) is no weight: never
    interpolated, and never cast by --dtype, which applies to float tensors only."""
    for name, seed in (("a", 0), ("b", 1)):
        tensors = {
            **random_state_dict(seed),
            "visual.steps_tracked": torch.tensor([10 + seed, 7], dtype=torch.int64),
        }
        save_file(tensors, str(tmp_path / f"{name}.safetensors"), metadata={"micromerge.arch": "nano-clip"})
    out = tmp_path / "o.safetensors"
    args = ["--base", tmp_path / "a.safetensors", "--ft", tmp_path / "b.safetensors", "--alpha", "0.5"]
    assert invoke(*args, "--dtype", "bfloat16", "--out", out).exit_code == 0
    merged = load_file(str(out))
    assert merged["visual.steps_tracked"].dtype == torch.int64  # torch.equal ignores dtypes
    assert merged["visual.steps_tracked"].tolist() == [10, 7]
    assert merged["visual.proj"].dtype == torch.bfloat16


def test_a_merge_that_overflows_the_output_dtype_is_refused(tmp_path):
    big = {k: v * 0 + 6e4 if v.is_floating_point() else v for k, v in random_state_dict(0).items()}
    save_file(big, str(tmp_path / "a.safetensors"), metadata={"micromerge.arch": "nano-clip"})
    save_file(big, str(tmp_path / "b.safetensors"), metadata={"micromerge.arch": "nano-clip"})
    args = ["--base", tmp_path / "a.safetensors", "--ft", tmp_path / "b.safetensors"]
    args += ["--method", "task-arithmetic", "--alpha", "1", "--dtype", "float16"]
    for engine in ("numpy", "torch"):  # 6e4 + 1 * (6e4 - 6e4) fits; linear 1 + 1 overflows below
        result = invoke(*args, "--engine", engine, "--out", tmp_path / f"{engine}.safetensors")
        assert result.exit_code == 0, result.output
    linear = ["--base", tmp_path / "a.safetensors", "--ft", tmp_path / "b.safetensors", "--method", "linear"]
    linear += ["--weights", "1,1", "--dtype", "float16"]
    for engine in ("numpy", "torch"):
        out = tmp_path / f"over-{engine}.safetensors"
        one_line_error(invoke(*linear, "--engine", engine, "--out", out), "NaN or Inf", "--allow-nonfinite")
        assert not out.exists()


def test_merge_alphas_resume_after_a_kill_and_recover_a_lost_manifest(pair):
    assert _merge(pair, "--alphas", "0:1:0.5", "--out", pair / "full").exit_code == 0
    assert _merge(pair, "--alphas", "0:1:0.5", "--out", pair / "killed").exit_code == 0
    (pair / "killed" / "alpha-1.0.safetensors").unlink()  # the kill landed before this one
    (pair / "killed" / "alpha-1.0.safetensors.manifest.json").unlink()
    (pair / "killed" / "alpha-0.5.safetensors.manifest.json").unlink()  # between rename and manifest
    rerun = _merge(pair, "--alphas", "0:1:0.5", "--out", pair / "killed")
    assert rerun.exit_code == 0, rerun.output
    assert rerun.output.count("kept") == 2 and rerun.output.count("wrote") == 1
    for name in ("alpha-0.0.safetensors", "alpha-0.5.safetensors", "alpha-1.0.safetensors"):
        assert (pair / "killed" / name).read_bytes() == (pair / "full" / name).read_bytes(), name
    recovered = json.loads((pair / "killed" / "alpha-0.5.safetensors.manifest.json").read_text())
    assert recovered["recovered_from_header"] and recovered["parameters"]["alpha"] == 0.5
    assert len(recovered["inputs_sha256"]) == 2
    # a manifest damaged on disk (not UTF-8 was a traceback; a JSON list was kept) is written again
    for damaged in (b"\xff\xfe", b"[1, 2]"):
        (pair / "killed" / "alpha-0.5.safetensors.manifest.json").write_bytes(damaged)
        rerun = _merge(pair, "--alphas", "0:1:0.5", "--out", pair / "killed")
        assert rerun.exit_code == 0 and rerun.output.count("kept") == 3, rerun.output
        again = json.loads((pair / "killed" / "alpha-0.5.safetensors.manifest.json").read_text())
        assert again == recovered
    for other in (  # anything else that makes the bytes or says how they were made: not kept
        ("--include", "visual.*"),
        ("--method", "task-arithmetic"),  # one specialist: wise-ft's numbers, another provenance
        ("--dtype", "float16"),
    ):
        changed = _merge(pair, "--alphas", "0:1:0.5", "--out", pair / "killed", *other)
        one_line_error(changed, "output exists (not from these inputs and parameters)")
    write_checkpoint(pair / "ft.safetensors", 2)  # another specialist at the same path
    changed = _merge(pair, "--alphas", "0:1:0.5", "--out", pair / "killed")
    one_line_error(changed, "output exists (not from these inputs and parameters)")


def test_ctrl_c_keeps_the_finished_alphas_says_so_in_one_line_and_the_rerun_resumes(pair, monkeypatch):
    """Ctrl-C in the middle of writing the second alpha's tensors: exit 130 (a shell's code for
    SIGINT), one line on stderr that says what was kept, nothing on stdout for it, the first
    alpha's file whole and no temporary file left; the same command again keeps that one and
    writes the other two, the same bytes as a run never interrupted."""
    from micromerge.merging.numpy_backend import NumpyBackend

    assert _merge(pair, "--alphas", "0:1:0.5", "--out", pair / "full").exit_code == 0
    tensors = len(load_file(str(pair / "base.safetensors")))
    real, calls = NumpyBackend.host_bytes, []

    def cut_in_the_second_file(self, array, dtype):
        calls.append(1)
        if len(calls) == tensors + tensors // 2:
            raise KeyboardInterrupt
        return real(self, array, dtype)

    monkeypatch.setattr(NumpyBackend, "host_bytes", cut_in_the_second_file)
    result = _merge(pair, "--alphas", "0:1:0.5", "--out", pair / "cut")
    assert result.exit_code == 130, result.output
    assert result.stderr.splitlines()[-1] == (
        "interrupted: finished work is kept; run the same command again to resume"
    )
    assert "interrupted" not in result.stdout
    assert sorted(p.name for p in (pair / "cut").iterdir()) == [
        "alpha-0.0.safetensors",
        "alpha-0.0.safetensors.manifest.json",
    ]
    monkeypatch.setattr(NumpyBackend, "host_bytes", real)
    rerun = _merge(pair, "--alphas", "0:1:0.5", "--out", pair / "cut")
    assert rerun.exit_code == 0 and rerun.output.count("kept") == 1 and rerun.output.count("wrote") == 2
    for name in ("alpha-0.0.safetensors", "alpha-0.5.safetensors", "alpha-1.0.safetensors"):
        assert (pair / "cut" / name).read_bytes() == (pair / "full" / name).read_bytes(), name


# ---- config files: one typed schema per command ----


@pytest.mark.parametrize(
    "body, needle",
    [
        ('allow_pickle = "false"', "allow_pickle must be a boolean"),
        ('force = "false"', "force must be a boolean"),
        ('include = "visual.*"', "include must be a list of strings"),
        ('alpha = "abc"', "alpha must be a finite number"),
        ("alpha = nan", "alpha must be a finite number"),  # TOML's nan and inf are floats
        ("seed = true", "seed must be an integer"),  # a boolean is an int to Python
        ('alpha_rules = [["visual.*", 0.5, 1]]', "alpha_rules must be a table"),
        ('alpha_rules = { "visual.*" = "half" }', "alpha_rules must be a table"),
        # one good entry does not vouch for the rest
        ('alpha_rules = { "visual.*" = 0.5, "text.*" = "half" }', "alpha_rules must be a table"),
        ('weights = [0.5, "half"]', "weights must be a list of finite numbers"),
        ("samples = 2.5", "samples must be an integer"),
        ("finetuned = 5", "finetuned must be a string or a list of strings"),
        ("bogus = 1", "unknown key(s) ['bogus']; allowed: ["),
        # a key written as its flag, and a typo, are each answered with the key meant
        (
            'ft = ["x"]\ndesnity = 0.2',
            "unknown key(s) ['desnity', 'ft'] (did you mean density for desnity, finetuned for ft?)",
        ),
        ("alpha_rule = { a = 1 }", "(did you mean alpha_rules for alpha_rule?)"),
    ],
)
def test_merge_config_values_of_the_wrong_type_are_one_line(pair, body, needle):
    config = pair / "merge.toml"
    config.write_text(
        f'[merge]\nbase = "{pair / "base.safetensors"}"\nft_unused = 0\n'.replace("ft_unused = 0\n", "")
        + body
        + "\n"
    )
    one_line_error(invoke("--config", config, "--out", pair / "o.safetensors"), "merge.toml", needle)


def test_non_utf8_yaml_is_one_line(pair):
    config = pair / "merge.yaml"
    config.write_bytes(b"merge:\n  base: \xff\xfe\n")
    one_line_error(invoke("--config", config), "merge.yaml: not UTF-8")


@pytest.mark.parametrize(
    "body, needle",
    [
        ("merge:\n  ?\n", "key None is a NoneType"),  # a bare `?`: a null key (found by Hypothesis)
        ("merge:\n  1: 0.5\n", "key 1 is a int"),
        ("merge:\n  alpha: 0.5\n  true: x\n", "key True is a bool"),
        ("merge:\n  alpha_rules:\n    2024-01-01: 0.5\n", "key datetime.date(2024, 1, 1) is a date"),
        ("anchors: &a [*a, {merge: {3: x}}]\n", "key 3 is a int"),  # a list that holds itself
        # a mapping referred to twice, met before the one with the bad key: the walk goes on past it
        ("late: {4: x}\nfirst: &s {k: v}\nagain: *s\n", "key 4 is a int"),
    ],
)
def test_yaml_keys_that_are_not_names_are_one_line(pair, body, needle):
    """YAML reads unquoted numbers, booleans, dates and a bare `?` as keys of those types; compared
    with the schema's names they were difflib's or sorted's TypeError. Quoted, each is a name."""
    config = pair / "merge.yaml"
    config.write_text(body)
    one_line_error(invoke("--config", config), "merge.yaml: " + needle + ", not a name; quote it")


def _ablation(tmp: Path, extra: str) -> Path:
    path = tmp / "grid.toml"
    path.write_text(
        f'[ablation]\ndata = "x"\nstore = "s.jsonl"\nreport = "r"\nmethods = ["wise-ft", "ties"]\n{extra}\n'
        f'[[ablation.pairs]]\nbase = "{tmp / "base.safetensors"}"\nfinetuned = ["{tmp / "ft.safetensors"}"]\n'
    )
    return path


@pytest.mark.parametrize(
    "extra, needle",
    [
        ('bootstrap = "abc"', "bootstrap must be an integer"),
        ('methods = "wise-ft"', "methods must be a list of strings"),
        ('[ablation.method_parameters.ties]\ndensity = "abc"', "density must be a finite number"),
        ("[ablation.method_parameters.ties]\ndensity = 2", "--density 2.0: must be in (0, 1]"),
    ],
)
def test_ablation_config_types_are_checked(pair, extra, needle):
    if extra.startswith("methods"):
        path = pair / "grid.toml"
        path.write_text(f'[ablation]\ndata = "x"\nstore = "s"\nreport = "r"\n{extra}\npairs = []\n')
    else:
        path = _ablation(pair, extra)
    with pytest.raises(MicromergeError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_ablation(path)


def test_ablation_grid_is_validated_before_any_sweep(pair):
    path = _ablation(pair, "").read_text().replace('["wise-ft", "ties"]', '["wise-ft", "bogus"]')
    (pair / "grid.toml").write_text(path)
    with pytest.raises(MicromergeError, match="--method bogus: unknown merge method; choose one of"):
        load_ablation(pair / "grid.toml")
    (pair / "grid.toml").write_text(path.replace('"bogus"', '"tie"'))
    with pytest.raises(MicromergeError, match=r"--method tie: unknown merge method \(did you mean ties\?\)"):
        load_ablation(pair / "grid.toml")


def test_an_ablation_checks_every_merge_on_its_checkpoints_before_it_evaluates(pair):
    """A rule set that left no key to merge, or a specialist that does not fit its base, failed as
    its sweep began, after every sweep before it (13 s into the demo grid, hours into the paper's),
    naming neither the run nor the rule set. `ablate --dry-run` lists the grid and runs the same check."""
    from click.testing import CliRunner

    from micromerge.cli import cli

    odd = load_file(str(pair / "ft.safetensors"))
    name = next(k for k, v in odd.items() if v.ndim == 2)
    odd[name] = torch.zeros(odd[name].shape[0] + 1, odd[name].shape[1])
    save_file(odd, str(pair / "odd.safetensors"), metadata={"micromerge.arch": "nano-clip"})
    grid = _ablation(
        pair, 'alphas = "0,1"\n[ablation.rule_sets.all]\n[ablation.rule_sets.typo]\ninclude = ["visul.*"]'
    )
    store, report = pair / "s.jsonl", pair / "r"
    text = grid.read_text().replace('store = "s.jsonl"', f'store = "{store}"').replace('"r"', f'"{report}"')

    def ablate(config_text: str, *flags: str):
        grid.write_text(config_text)
        return CliRunner().invoke(cli, ["ablate", str(grid), "--device", "cpu", "--quiet", *flags])

    for flags in ((), ("--dry-run",)):
        result = ablate(text, *flags)
        assert result.exit_code == 2, result.output
        assert result.output.splitlines()[-1] == (
            f"error: {pair / 'base.safetensors'} / wise-ft / typo: the include/exclude rules leave no key to merge"
        ), result.output
        assert not store.exists() and not report.exists(), "nothing evaluated, nothing written"
    misfit = text.replace(str(pair / "ft.safetensors"), str(pair / "odd.safetensors"))
    misfit = misfit.replace('[ablation.rule_sets.typo]\ninclude = ["visul.*"]', "")
    result = ablate(misfit, "--dry-run")
    assert result.exit_code == 2 and f"/ wise-ft / all: {pair / 'odd.safetensors'}" in result.output, (
        result.output
    )
    assert name in result.output.splitlines()[-1]
    good = text.replace('include = ["visul.*"]', 'include = ["visual.*"]')
    result = ablate(good, "--dry-run")
    assert result.exit_code == 0, result.output
    runs = [line for line in result.output.splitlines() if line.endswith(": 2 alphas")]
    assert [line.split(" / ", 1)[1] for line in runs] == [
        "wise-ft / all: 2 alphas",
        "wise-ft / typo: 2 alphas",
        "ties / all: 2 alphas",
        "ties / typo: 2 alphas",
    ]
    assert "4 runs (4 sweeps of 2 alphas, 0 soups), 0 skipped, 2 reference evaluations" in result.output
    assert not store.exists() and not report.exists()


# ---- hostile safetensors headers ----


def _with_header(path: Path, header: object, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    "header, data, needle",
    [
        (
            {"__metadata__": ["a"], "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
            b"\0" * 4,
            "__metadata__",
        ),
        (
            {"__metadata__": "x", "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
            b"\0" * 4,
            "__metadata__",
        ),
        (b"[" * 100000 + b"]" * 100000, b"", "not JSON"),
        (b"[1]", b"", "not a JSON object"),
        (
            {"__metadata__": {"a": 1}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
            b"\0" * 4,
            "__metadata__ must map strings to strings",
        ),
        ({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4, "malformed shape"),
        (
            {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}},
            b"\0" * 8,
            "malformed data_offsets",
        ),
        (  # one offset a string (end minus start would be a TypeError)
            {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}},
            b"\0" * 4,
            "malformed data_offsets",
        ),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "do not match its shape"),
        (
            {"w": {"dtype": "F64X", "shape": [1], "data_offsets": [0, 8]}},
            b"\0" * 8,
            "unsupported dtype 'F64X'",
        ),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "malformed shape"),
        ({"w": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}}, b"\0" * 8, "malformed shape"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "overlap",
        ),
        (  # by a single byte
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [7, 15]},
            },
            b"\0" * 15,
            "overlap",
        ),
        (  # a zero-size tensor inside `a` does not end `a`'s span
            {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "z": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
            },
            b"\0" * 16,
            "tensors 'a' and 'b' overlap",
        ),
        (  # offsets spanning more bytes than the tensor has
            {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}},
            b"\0" * 8,
            "do not match its shape",
        ),
        (  # the data section one byte short
            {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
            b"\0" * 7,
            "truncated safetensors file",
        ),
        (
            {
                "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "__metadata__": {"micromerge.model_config": "{not json"},
            },
            b"\0" * 4,
            "model_config metadata is not JSON",
        ),
        (
            {
                "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "__metadata__": {"micromerge.model_config": "[" * 100000 + "]" * 100000},
            },
            b"\0" * 4,
            "model_config metadata is not JSON",
        ),
        (
            {
                "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "__metadata__": {"micromerge.model_config": "[1]"},
            },
            b"\0" * 4,
            "model_config metadata is not a JSON object",
        ),
    ],
)
def test_hostile_headers_are_one_line_errors(tmp_path, header, data, needle):
    path = _with_header(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(MicromergeError, match=needle):
        open_source(str(path), arrays="numpy")


def test_a_header_length_past_the_end_of_the_file_is_named(tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b'{"w": {}}')
    with pytest.raises(
        MicromergeError,
        match=r"cut.safetensors: corrupt or truncated safetensors header \(declares 1000 bytes\)",
    ):
        open_source(str(path), arrays="numpy")


def test_a_header_longer_than_any_real_one_is_refused_before_it_is_read(tmp_path):
    """safetensors caps a header at 100 MB (its Rust reader's HeaderTooLarge); a file that declares
    more, and is long enough to hold it (sparse here), is refused from its first 8 bytes, not read
    whole into memory and parsed."""
    path = tmp_path / "huge.safetensors"
    declared = (100 << 20) + 1
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", declared))
        handle.truncate(8 + declared + 16)
    with pytest.raises(
        MicromergeError,
        match=rf"huge.safetensors: corrupt or truncated safetensors header \(declares {declared} bytes\)",
    ):
        open_source(str(path), arrays="numpy")


def _open_paths() -> set[str]:
    return {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}


def test_a_closed_source_holds_no_file_open(tmp_path):
    """A streaming merge opens every input's files; closing a source closes them (a sweep of many
    pairs would otherwise run out of file descriptors, and Windows could not replace the file)."""
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    path = _with_header(tmp_path / "m.safetensors", header, struct.pack("<2f", 1.5, -2.0))
    source = open_source(str(path), arrays="numpy")
    assert source.read("w").tolist() == [1.5, -2.0]
    assert str(path.resolve()) in _open_paths()
    with warnings.catch_warnings(record=True) as caught:  # dropped unclosed, CPython closes it with this
        warnings.simplefilter("always")
        source.close()
        gc.collect()
    assert str(path.resolve()) not in _open_paths()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], "closed, not collected"


def test_empty_tensors_overlap_nothing_and_a_file_cut_after_opening_is_named_at_the_read(tmp_path):
    """A zero-size tensor takes no bytes, so it overlaps nothing wherever its offsets point (here
    inside another's); a file truncated between opening and reading is a one-line error, not a
    tensor of stale bytes."""
    header = {
        "empty": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]},
        "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "__metadata__": {"micromerge.arch": "ViT-B-32"},
    }
    path = _with_header(tmp_path / "m.safetensors", header, struct.pack("<2f", 1.5, -2.0))
    source = open_source(str(path), arrays="numpy")
    assert source.arch.name == "ViT-B-32" and source.meta("empty").shape == (0,)
    assert source.read("w").tolist() == [1.5, -2.0]
    source.close()
    assert source.read("w").tolist() == [1.5, -2.0], "a closed source opens its file again"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(MicromergeError, match=r"m.safetensors: file changed or truncated while reading 'w'"):
        source.read("w")
    source.close()


def test_unknown_arch_is_refused_before_writing(pair):
    one_line_error(_merge(pair, "--arch", "bogus", "--out", pair / "o.safetensors"), "--arch 'bogus'")
    assert not (pair / "o.safetensors").exists()


def test_a_config_that_builds_no_model_is_one_line_in_eval(tmp_path):
    from micromerge.merging.models import load_model

    state = random_state_dict(0)
    save_file(
        state,
        str(tmp_path / "m.safetensors"),
        metadata={"micromerge.model_config": json.dumps({"embed_dim": "x"})},
    )
    with (
        open_source(str(tmp_path / "m.safetensors")) as source,
        pytest.raises(MicromergeError, match="does not build"),
    ):
        load_model(source)
    assert torch.is_tensor(load_file(str(tmp_path / "m.safetensors"))["logit_scale"])


def test_a_named_pipe_as_input_is_refused_not_waited_on(pair):
    fifo = pair / "ft.pt"
    os.mkfifo(fifo)
    one_line_error(
        invoke("--base", pair / "base.safetensors", "--ft", fifo, "--out", pair / "o.safetensors"),
        "not a regular file",
    )


def test_usage_errors_are_one_line_from_the_installed_commands(pair):
    import subprocess
    import sys

    for args in (["merge", "--bogus"], ["merge", "--alpha", "abc"], ["eval", "--protocol", "nope"]):
        result = subprocess.run(
            [sys.executable, "-m", "micromerge.cli", *args], capture_output=True, text=True
        )
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "--help" in lines[0], result.stderr


def test_out_that_is_a_file_is_one_line_for_report_finetune_and_export(pair):
    from click.testing import CliRunner

    from micromerge.cli import cli

    (pair / "taken").write_text("x")
    commands = (
        ["report", str(pair / "none.jsonl"), "--out", str(pair / "taken")],
        ["export", str(pair / "base.safetensors"), "--out", str(pair / "taken")],
        [
            "finetune",
            "contrastive",
            "--base",
            str(pair / "base.safetensors"),
            "--data",
            str(pair),
            "--out",
            str(pair / "taken"),
        ],  # fmt: skip
    )
    for args in commands:
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2 and "is a file, not a folder" in result.output, (args, result.output)
    assert (pair / "taken").read_text() == "x"


def test_out_that_cannot_be_written_is_one_line_before_any_work(pair, monkeypatch):
    """A read-only folder (a mounted dataset volume, another user's results), simulated at
    `os.access`, the one question `output_folder` asks."""
    from click.testing import CliRunner

    from micromerge.cli import cli
    from tests.helpers import deny_access

    (pair / "locked").mkdir()
    deny_access(monkeypatch, pair / "locked", os.W_OK)
    result = CliRunner().invoke(cli, ["report", str(pair / "none.jsonl"), "--out", str(pair / "locked")])
    assert result.exit_code == 2 and "locked: not writable; choose another folder" in result.output
    assert list((pair / "locked").iterdir()) == []


def test_export_does_not_overwrite_a_config_without_force(pair):
    from click.testing import CliRunner

    from micromerge.cli import cli

    (pair / "hf").mkdir()
    (pair / "hf" / "config.json").write_text("{}")
    result = CliRunner().invoke(cli, ["export", str(pair / "base.safetensors"), "--out", str(pair / "hf")])
    assert result.exit_code == 2 and "config.json" in result.output
    assert (pair / "hf" / "config.json").read_text() == "{}"


@pytest.mark.parametrize("out", ["a-file/o.safetensors", "x" * 300 + ".safetensors"])
def test_unwritable_output_names_are_one_line(pair, out):
    (pair / "a-file").write_text("x")
    one_line_error(_merge(pair, "--out", pair / out), "choose another --out")
    assert (pair / "a-file").read_text() == "x"


def test_a_specialist_missing_a_key_or_holding_another_is_named_before_merging(pair):
    """Every merged key must be in the specialist, with the base's shape, and it may hold no key
    of its own: each difference is counted and its first example named."""
    state = load_file(str(pair / "ft.safetensors"))
    missing = {k: v for k, v in state.items() if k != "visual.proj"}
    save_file(missing, str(pair / "missing.safetensors"))
    result = invoke(
        "--base",
        pair / "base.safetensors",
        "--ft",
        pair / "missing.safetensors",
        "--out",
        pair / "o.safetensors",
    )
    one_line_error(result, "1 key(s) missing from the fine-tuned checkpoint, first ['visual.proj']")
    save_file({**state, "visual.extra": torch.zeros(2)}, str(pair / "extra.safetensors"))
    result = invoke(
        "--base",
        pair / "base.safetensors",
        "--ft",
        pair / "extra.safetensors",
        "--out",
        pair / "o.safetensors",
    )
    one_line_error(result, "1 key(s) not in the base, first ['visual.extra']")
    assert not (pair / "o.safetensors").exists()


def test_a_sharded_checkpoint_reads_each_key_from_its_shard_with_every_shards_metadata(tmp_path):
    """A safetensors index names each key's shard: each key is read from its own file, the
    metadata of every shard is kept (the arch may be in any one), and a key in two shards is refused."""
    import numpy as np
    from safetensors.numpy import save_file as save_numpy

    folder = tmp_path / "sharded"
    folder.mkdir()
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    save_numpy(
        {"a": np.array([1.0, 2.0], dtype=np.float32)}, str(folder / names[0]), {"micromerge.arch": "ViT-B-32"}
    )
    save_numpy({"b": np.array([3.0], dtype=np.float32)}, str(folder / names[1]), {"format": "pt"})
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"a": names[0], "b": names[1]}}))
    with open_source(str(index), arrays="numpy") as source:
        assert source.read("b").tolist() == [3.0] and source.read("a").tolist() == [1.0, 2.0]
        assert source.arch.name == "ViT-B-32" and source.metadata["format"] == "pt"
    save_numpy({"b": np.array([3.0], dtype=np.float32), "a": np.zeros(2, np.float32)}, str(folder / names[1]))
    with pytest.raises(
        MicromergeError, match=r"model-00002-of-00002.safetensors: tensor 'a' appears in two shards"
    ):
        open_source(str(index), arrays="numpy")


def test_an_alpha_range_of_exactly_the_limit_is_taken_and_a_trailing_comma_adds_no_alpha():
    """`START:STOP:STEP` counts STOP itself: 0:9999:1 is 10,000 alphas, the most a sweep writes. A
    list written by a script may end in a comma (`0,0.5,`): it names no further alpha."""
    from micromerge.merging.job import MAX_ALPHAS, parse_alphas

    assert len(parse_alphas(f"0:{MAX_ALPHAS - 1}:1")) == MAX_ALPHAS
    with pytest.raises(MicromergeError, match=f"--alphas '0:{MAX_ALPHAS}:1': 10,001 values; at most 10,000"):
        parse_alphas(f"0:{MAX_ALPHAS}:1")
    assert parse_alphas("0,0.5,") == [0.0, 0.5]
    assert parse_alphas("0.5:0.5:0.1") == [0.5], "STOP = START is one alpha"


@pytest.mark.parametrize("method", ["adamerging", "supervised-alpha"])
def test_a_learned_merge_takes_no_corpus_per_model(method):
    """AdaMerging and the supervised α learn their coefficients jointly on μ-Bench's select half;
    `--base-data` (a corpus per model, Fisher's and RegMean's) was accepted and read by nothing."""
    from micromerge.merging.job import job_from_mapping

    values = {"base": "b.safetensors", "finetuned": ["f.safetensors"], "method": method, "base_data": "c.csv"}
    with pytest.raises(
        MicromergeError, match=f"only fisher and regmean estimate per-model statistics \\({method}"
    ):
        job_from_mapping(values)
