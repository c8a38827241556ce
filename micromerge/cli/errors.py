"""Every way a command ends, as one line: a MicromergeError is `error: ...` and exit code 2, a
usage error the same (instead of click's three lines), Ctrl-C is `interrupted: ...` with how to go
on and exit 130, and each warning is one `warning:` line, once."""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any, TextIO

import click

from micromerge.core.errors import MicromergeError


def _warning_printer() -> Callable[..., None]:
    """`warnings.showwarning` for one command: each message once, as one line. Python's own
    once-per-place rule does not hold for a whole command: every change of the warning filters
    (a `catch_warnings` block, in our code or a library's) clears what it remembers, and a soup
    said the same line once for every candidate it evaluated."""
    shown: set[str] = set()

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        text = str(message)
        if text not in shown:
            shown.add(text)
            click.echo(f"warning: {text}", err=True)

    return show


def friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user-fixable errors into a one-line message and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # Scoped to the command: a caller that imports the CLI (tests, notebooks, click's
        # CliRunner) gets its own warning display back afterwards.
        try:
            _refuse_blank_parameters(click.get_current_context())
            with warnings.catch_warnings():
                warnings.showwarning = _warning_printer()
                return func(*args, **kwargs)
        except MicromergeError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo(f"interrupted: {_how_to_go_on(click.get_current_context())}", err=True)
            sys.exit(130)
        finally:
            _leave_process_group()

    return wrapper


WRITES_NOTHING = "micromerge_writes_nothing"


def writes_nothing(func: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a command that only reads and prints (below `friendly_errors`, which carries the mark):
    interrupted, it has no finished work to keep or resume."""
    setattr(func, WRITES_NOTHING, True)
    return func


def writes_nothing_without(option: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a command that keeps its finished work only in the file its `option` names: interrupted
    without it, it says how to keep the work the next time."""

    def mark(func: Callable[..., Any]) -> Callable[..., Any]:
        setattr(func, WRITES_NOTHING, option)
        return func

    return mark


def _how_to_go_on(ctx: click.Context) -> str:
    """What an interrupted command kept and how to continue it. A fine-tune keeps its last
    checkpoint and continues only with --resume (run again as it was, it refuses the folder it
    left), so saying "run the same command again" cost a fine-tuner a second try."""
    mark = getattr(ctx.command.callback, WRITES_NOTHING, None)
    if mark is True:
        return "this command writes no files; run it again to start over"
    if isinstance(mark, str) and not ctx.params.get(mark):
        flag = "--" + mark.replace("_", "-")
        return f"nothing was kept; run it again to start over, with {flag} FILE to keep what it finishes"
    if "resume" not in ctx.params:
        return "finished work is kept; run the same command again to resume"
    again = "again" if ctx.params["resume"] else "with --resume"
    return f"the last checkpoint (saved every --save-every steps) is kept; run the same command {again} to continue from it"


def _leave_process_group() -> None:
    """End the process group `accelerate launch` started (torch.distributed's documented exit). Left
    to the interpreter's shutdown, gloo's worker threads may still hold tensors whose release then
    needs the GIL of an interpreter being torn down, and the process dies of SIGABRT
    (pytorch/pytorch#179291), as a rank of the two-process fine-tune test once did at its end in
    CI. Nothing to do in a plain run, and torch is not imported for it."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


def _refuse_blank_parameters(ctx: click.Context) -> None:
    """An empty option or argument as typed (`--out "$OUT"` with the variable unset) in one line:
    read as 'not given' it silently ran a default (`report --target ""`), read as a path it was the
    working folder (`report --out ""` wrote report.html there). An empty environment variable
    (HF_TOKEN=) keeps its usual meaning, unset: click does not read it."""
    from micromerge.core.config_schema import is_blank

    for param in ctx.command.params:
        name = param.name or ""
        value = ctx.params.get(name)
        value = list(value) if isinstance(value, tuple) else value
        if not is_blank(value):
            continue
        shown = param.human_readable_name if isinstance(param, click.Argument) else max(param.opts, key=len)
        what = "empty" if isinstance(value, str) else "an empty entry"
        fix = "give a value" if param.required else f"give a value, or drop {shown} for its default"
        raise MicromergeError(f"{shown} {value!r}: {what} (an unset variable?); {fix}")


def run_command(command: click.Command, prog_name: str) -> None:
    """Run a click command with usage errors as one line (`error: ...`, exit 2), like every other
    bad input, instead of click's three (usage, hint, error). Off a terminal, the libraries' own
    progress bars (datasets, huggingface_hub) stay quiet, as ours print a few lines."""
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        command.main(prog_name=prog_name, standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:  # a bare group: its help, as click prints it
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else prog_name
        click.echo(f"error: {exc.format_message()} (see `{where} --help`)", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
