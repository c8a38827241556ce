"""An empty value (`--method "$METHOD"` with the variable unset, `method = ""` in a config) is
refused in one line naming the option, before anything is read or written.

Found by fuzzing the CLI with empty values (eighteenth session): an empty string was taken as 'not
given', so `--method ""` merged with WiSE-FT, `--out ""` wrote to checkpoints/merged/, `--alphas ""`
made a sweep that evaluated nothing and said "results in STORE" (a store it never wrote), and an
ablation's `target = ""` fell back to the report's default; or it became `Path("")`, the working
folder, so `--ft ""` opened a run folder it happened to be run from and `--data ""` searched the
working folder's tree for shards."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from micromerge.cli import cli
from micromerge.core.config_schema import check_section, is_blank
from micromerge.core.errors import MicromergeError
from micromerge.eval.data import load_benchmark
from micromerge.finetune.config import config_from_mapping
from micromerge.merging.sources import open_source
from tests.helpers import write_checkpoint
from tests.test_hardening_merge import _merge
from tests.test_merge_cli import one_line_error


@pytest.fixture
def pair(tmp_path, monkeypatch):
    write_checkpoint(tmp_path / "base.safetensors", 0)
    write_checkpoint(tmp_path / "ft.safetensors", 1)
    monkeypatch.chdir(tmp_path)  # where a default output, or Path(""), would land
    return tmp_path


@pytest.mark.parametrize(
    "flags, needle",
    [
        (("--method", ""), "--method '': empty (an unset variable?); give a value, or drop --method"),
        (("--out", ""), "--out '': empty"),
        (("--arch", " "), "--arch ' ': empty"),
        (("--weights", ""), "--weights '': empty"),
        (("--device", ""), "--device '': empty"),
        (("--data", ""), "--data '': empty"),
        (("--alphas", ""), "--alphas '': empty"),
        (("--ft", ""), "--ft ["),  # a second --ft, empty
        (("--include", ""), "--include [''"),
    ],
)
def test_an_empty_merge_option_is_refused_and_nothing_is_written(pair, flags, needle):
    line = one_line_error(_merge(pair, *flags), needle)
    assert "--ft [" not in needle or "an empty entry" in line
    assert sorted(p.name for p in pair.iterdir()) == ["base.safetensors", "ft.safetensors"]


def test_a_merge_job_built_in_python_refuses_an_empty_value_too():
    """The CLI and config files check their own values; `job_from_mapping` is the API's door."""
    from micromerge.merging.job import job_from_mapping

    with pytest.raises(MicromergeError, match=r"--method '': empty \(an unset variable\?\)"):
        job_from_mapping({"base": "b", "finetuned": ["f"], "method": ""})
    with pytest.raises(MicromergeError, match=r"--ft \['f', ''\]: an empty entry"):
        job_from_mapping({"base": "b", "finetuned": ["f", ""]})


def test_an_empty_base_or_specialist_is_not_the_working_folder(pair):
    """A run folder (model.safetensors) as the working folder: `--ft ""` merged it."""
    (pair / "model.safetensors").write_bytes((pair / "ft.safetensors").read_bytes())
    base = str(pair / "base.safetensors")
    one_line_error(CliRunner().invoke(cli, ["merge", "--base", base, "--ft", ""]), "--ft [''")
    with pytest.raises(MicromergeError, match=r"checkpoint '': empty \(an unset variable\?\)"):
        open_source("")


def test_an_empty_benchmark_is_not_the_working_folder(tmp_path, monkeypatch):
    """`--data ""` searched the working folder's whole tree for .parquet/.arrow files."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MicromergeError, match=r"--data '': empty; give 'ubench' \(the Hub copy\)"):
        load_benchmark("")


def test_an_empty_value_in_a_config_file_names_the_file_and_key(pair):
    config = pair / "merge.toml"
    config.write_text(
        f'[merge]\nbase = "{pair / "base.safetensors"}"\nfinetuned = ["{pair / "ft.safetensors"}"]\n'
        'method = ""\n'
    )
    result = CliRunner().invoke(cli, ["merge", "--config", str(config)])
    one_line_error(result, "merge.toml [merge]: method = '' is empty; give a value, or remove method")
    with pytest.raises(MicromergeError, match=r"x: include = \['visual.\*', ''\] holds an empty entry"):
        check_section("x", {"include": ["visual.*", ""]}, {"include": "str_list"})


@pytest.mark.parametrize("key", ["domain", "arch", "base", "data", "out"])
def test_an_empty_finetune_option_is_refused(tmp_path, key):
    """`--domain ""` fine-tuned a specialist whose manifest records no domain (the report's
    default target); a required option given empty named itself as missing."""
    values = {"mode": "contrastive", "base": "b", "data": "d", "out": str(tmp_path / "o"), key: ""}
    with pytest.raises(MicromergeError, match=rf"--{key} '': empty \(an unset variable\?\)"):
        config_from_mapping(values)


def test_what_counts_as_blank():
    assert is_blank("") and is_blank("  ") and is_blank(["a", ""]) and is_blank([" "])
    assert not any(is_blank(v) for v in ("a", [], ["a"], 0, None, False, {"": 1}))


@pytest.mark.parametrize(
    "args, needle",
    [
        # the report's default target, silently
        (
            ["report", "r.jsonl", "--target", ""],
            "--target '': empty (an unset variable?); give a value, or drop",
        ),
        # report.html written into the working folder
        (["report", "r.jsonl", "--out", ""], "--out '': empty"),
        (["report", "", "--out", "rep"], "RESULTS '': empty (an unset variable?); give a value"),
        (["export", "", "--out", "x"], "CHECKPOINT '': empty"),
        # a required option has no default to fall back on
        (["export", "base.safetensors", "--out", ""], "--out '': empty (an unset variable?); give a value\n"),
        (["data", "verify", " "], "PATH ' ': empty"),
        (["tasks", "--data", ""], "--data '': empty"),
        (["soup", "--base", "base.safetensors", "--ft", "", "--data", "d"], "--ft ['']: an empty entry"),
    ],
)
def test_every_command_refuses_an_empty_value_as_typed(pair, args, needle):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and needle in result.output, result.output
    assert sorted(p.name for p in pair.iterdir()) == ["base.safetensors", "ft.safetensors"]


def test_an_empty_environment_variable_still_means_unset(pair):
    """HF_TOKEN= is the shell's way to unset a token: push goes on to its own checks."""
    result = CliRunner().invoke(cli, ["push", str(pair / "none"), "--repo", "a/b"], env={"HF_TOKEN": ""})
    assert result.exit_code == 2 and "none: not a folder" in result.output, result.output
