"""Every `micromerge …` and `merge …` command README.md shows names only options the command has.

A renamed or removed flag left the README's example failing with "No such option" for the one
reader who copies it; the README is the user's documentation of every capability, so its commands
are checked here as the CLI parses them (with `--help` appended: click rejects an unknown option
while parsing, before the eager `--help` ends the command, so nothing runs and no file is needed).
The other documentation a user reads, `--help`, is checked to say every default that is a value.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from micromerge.cli import cli, merge_command

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[list[str]]:
    """The README's shell commands that run micromerge, continuation lines joined, comments cut;
    those with a placeholder (…) left out."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] in ("micromerge", "merge") and "…" not in line:
                commands.append(words)
    return commands


def test_the_readme_shows_the_commands_of_every_capability():
    shown = {" ".join(words[:3] if words[1] == "finetune" else words[:2]) for words in readme_commands()}
    for command in ("merge --base", "micromerge eval", "micromerge sweep", "micromerge soup"):
        assert command in shown, command
    for command in ("micromerge report", "micromerge ablate", "micromerge export", "micromerge tasks"):
        assert command in shown, command
    assert {"micromerge finetune contrastive", "micromerge finetune supervised"} <= shown


@pytest.mark.parametrize("words", readme_commands(), ids=lambda words: " ".join(words)[:80])
def test_each_readme_command_names_only_options_its_command_has(words):
    command, args = (merge_command, words[1:]) if words[0] == "merge" else (cli, words[1:])
    result = CliRunner().invoke(command, [*args, "--help"])
    assert result.exit_code == 0, f"{' '.join(words)}\n{result.output}"


def _commands(group: click.Group, path: tuple[str, ...] = ("micromerge",)):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield " ".join((*path, name)), command


def test_every_option_with_a_default_value_shows_it_in_its_help():
    """`--help` is where a user reads what an option does when left out: each option whose default
    is a value (a method, a device, a seed, a format) says it, as `[default: …]`; options left out
    to mean "the method's own" or "none" have no value to show."""
    checked, unset = 0, getattr(click.core, "UNSET", None)  # click >= 8.3's "no default given"
    for path, command in _commands(cli):
        context = click.Context(command, info_name=path)
        for param in command.params:
            if not isinstance(param, click.Option) or param.is_flag:
                continue
            default = param.get_default(context, call=False)
            if default is None or default is unset or default == () or callable(default):
                continue
            record = param.get_help_record(context)
            assert record and "[default: " in record[1], (
                f"{path} {param.opts[0]}: default {default!r} not shown"
            )
            checked += 1
    assert checked >= 20, checked
