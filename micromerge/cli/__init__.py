"""The `micromerge` command line: wires the stages together; no logic of its own.

Each module here holds the commands of one stage; this one is their registry, the one place a
command is added. Every MicromergeError becomes one line on stderr and exit code 2; warnings print
as one `warning:` line (cli/errors.py). Flags and config files become plain dataclasses in the
commands and flow down. The commands import what they run lazily: `micromerge --help` stays fast.
"""

from __future__ import annotations

import click

from micromerge import __version__
from micromerge.cli.analysis_commands import ablate_command, demo_command, report_command
from micromerge.cli.checkpoint_commands import export_command, push_command, zoo_command
from micromerge.cli.data_commands import data_group, tasks_command
from micromerge.cli.errors import run_command
from micromerge.cli.eval_commands import eval_command, soup_command, sweep_command
from micromerge.cli.finetune_commands import finetune_group
from micromerge.cli.merge_commands import merge_command, methods_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="micromerge")
def cli() -> None:
    """Fine-tune, merge and evaluate CLIP-style models on microscopy (the μ-Bench loop)."""


cli.add_command(merge_command)
cli.add_command(methods_command)
cli.add_command(zoo_command)
cli.add_command(export_command)
cli.add_command(push_command)
cli.add_command(tasks_command)
cli.add_command(data_group)
cli.add_command(eval_command)
cli.add_command(sweep_command)
cli.add_command(soup_command)
cli.add_command(finetune_group)
cli.add_command(demo_command)
cli.add_command(report_command)
cli.add_command(ablate_command)


def main() -> None:
    """The `micromerge` console command."""
    run_command(cli, "micromerge")


def merge_main() -> None:
    """The `merge` console command: `micromerge merge` on its own."""
    run_command(merge_command, "merge")
