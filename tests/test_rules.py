"""Which keys a merge touches, and how hard (merging/rules.py): `--include`, `--exclude` and
`--alpha-rule PATTERN=VALUE`, on their own and through `merge`."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from micromerge.cli import merge_command
from micromerge.core.errors import MicromergeError
from micromerge.merging.rules import KeyRules, parse_strength_rule
from tests.helpers import write_checkpoint


def test_an_excluded_key_is_not_merged_even_when_included():
    rules = KeyRules(include=("visual.*",), exclude=("visual.proj", "re:ln_"))
    assert rules.is_merged("visual.conv1.weight")
    assert not rules.is_merged("visual.proj")
    assert not rules.is_merged("visual.ln_post.weight")
    assert not rules.is_merged("token_embedding.weight")  # not included
    assert KeyRules(exclude=("visual.*",)).is_merged("logit_scale")


def test_several_include_patterns_merge_what_any_of_them_matches():
    rules = KeyRules(include=("visual.*", "re:^logit_scale$"))
    assert rules.is_merged("visual.proj") and rules.is_merged("logit_scale")
    assert not rules.is_merged("token_embedding.weight")


def test_globs_are_case_sensitive_like_the_keys():
    """`Visual.*` is a typo, not another spelling: open_clip keys are lower case and a glob that
    matched them case-insensitively would merge what the user did not name."""
    assert not KeyRules(include=("Visual.*",)).is_merged("visual.proj")
    assert KeyRules(include=("Visual.*",)).unused_patterns(["visual.proj"]) == ["Visual.*"]


def test_every_kind_of_pattern_that_matches_no_key_is_reported():
    rules = KeyRules(include=("visual.*",), exclude=("txt.*",), strength_rules=(("visul.*", 0.3),))
    assert rules.unused_patterns(["visual.proj", "text_projection"]) == ["txt.*", "visul.*"]


def test_an_alpha_rule_that_sets_no_keys_alpha_is_found_with_what_took_its_keys():
    keys = ["visual.proj", "visual.conv1.weight", "text_projection", "logit_scale"]
    rules = KeyRules(
        exclude=("logit_scale",),
        strength_rules=(("visual.*", 0.3), ("re:proj", 0.9), ("visual.proj", 0.1), ("logit_*", 0.5)),
    )
    found = rules.shadowed_strength_rules(keys)
    assert [(pattern, value) for pattern, value, _ in found] == [("visual.proj", 0.1), ("logit_*", 0.5)]
    assert "the earlier --alpha-rule 'visual.*'" in found[0][2] and "--include/--exclude" in found[1][2]
    # re:proj sets text_projection's alpha, so it is not shadowed though visual.* takes visual.proj
    assert rules.strength_for("text_projection", 1.0) == 0.9
    assert KeyRules(strength_rules=(("nothing.*", 0.2),)).shadowed_strength_rules(keys) == [], (
        "unused, not shadowed"
    )


def test_an_alpha_rule_splits_at_its_last_equals_sign():
    """A regular expression may itself hold '=': only the text after the last one is the value."""
    assert parse_strength_rule("re:a=b=0.3") == ("re:a=b", 0.3)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("=0.3", r"--alpha-rule '=0.3': expected PATTERN=VALUE"),
        ("visual.*", r"--alpha-rule 'visual.\*': expected PATTERN=VALUE"),
        ("visual.*=high", r"'high' is not a number"),
    ],
)
def test_an_alpha_rule_without_a_pattern_or_a_number_is_refused(text, message):
    with pytest.raises(MicromergeError, match=message):
        parse_strength_rule(text)


def test_merge_leaves_excluded_keys_at_the_base(tmp_path):
    base = write_checkpoint(tmp_path / "base.safetensors", 0)
    ft = write_checkpoint(tmp_path / "ft.safetensors", 1)
    out = tmp_path / "m.safetensors"
    args = ["--base", tmp_path / "base.safetensors", "--ft", tmp_path / "ft.safetensors", "--alpha", "0.5"]
    args += ["--exclude", "visual.transformer.*", "--out", out, "--quiet"]
    result = CliRunner().invoke(merge_command, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    merged = load_file(str(out))
    excluded = [k for k in base if k.startswith("visual.transformer.")]
    assert excluded
    for key in excluded:
        assert torch.equal(merged[key], base[key]), key
    key = "visual.proj"
    torch.testing.assert_close(merged[key], 0.5 * base[key] + 0.5 * ft[key], atol=1e-6, rtol=0)
