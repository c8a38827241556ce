"""`tasks`, `data verify` and `data check`: what a μ-Bench copy holds, whether it is the published
one, and which samples of a fine-tuning corpus a fine-tune would leave out."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click
from tqdm import tqdm

from micromerge.cli.errors import friendly_errors, writes_nothing, writes_nothing_without
from micromerge.cli.options import QUIET, SOURCES_HELP, UBENCH_DATA_HELP
from micromerge.core.errors import MicromergeError
from micromerge.core.json_text import parse_json
from micromerge.finetune.config import DEFAULT_MAX_BAD_FRACTION


@click.command("tasks")
@click.option("--data", default="ubench", show_default=True, help=UBENCH_DATA_HELP)
@click.option("--sources", type=click.Path(), help=SOURCES_HELP)
@click.option(
    "--tasks",
    "wanted",
    default="all",
    show_default=True,
    help="List only these (as eval's --tasks reads them): what a selection would score, before it runs.",
)
@friendly_errors
@writes_nothing
def tasks_command(data: str, sources: str | None, wanted: str) -> None:
    """List every task with its images, classes, caption keys and metadata groups."""
    from micromerge.eval.data import load_benchmark
    from micromerge.eval.source_metadata import load_source_table
    from micromerge.eval.task_selection import select_tasks
    from micromerge.eval.tasks import discover_tasks

    bench = load_benchmark(data)
    every = discover_tasks(bench.dataset, load_source_table(Path(sources) if sources else None))
    chosen = select_tasks(every, wanted)
    width = max([34, *(len(task.name) for task in chosen)])  # real names reach 36 (eulenberg…)
    click.echo(
        f"{'task':<{width}} {'level':<6} {'images':>7} {'classes':>7}  {'caption keys':<34} "
        "domain / subdomain / modality / scale / taxonomy / in paper"
    )
    for task in chosen:
        g = task.groups
        keys = ",".join(q.key for q in task.questions) or "-"
        click.echo(
            f"{task.name:<{width}} {task.level:<6} {task.n_images:>7} {len(task.classes):>7}  {keys:<34} "
            f"{g.get('domain')} / {g.get('subdomain')} / {g.get('modality')} / {g.get('scale')} / "
            f"{g.get('taxonomy')} / {g.get('paper')}"
        )
        for note in task.notes:
            click.echo(f"  note: {note}")


@click.group("data")
def data_group() -> None:
    """Local copies of μ-Bench, and fine-tuning corpora."""


@data_group.command("verify")
@click.argument("path", type=click.Path())
@click.option(
    "--expected",
    type=click.Path(exists=True, dir_okay=False),
    help="JSON {shard name: sha256} to check against instead of the published checksums.",
)
@friendly_errors
@writes_nothing
def data_verify_command(path: str, expected: str | None) -> None:
    """Check a local copy's shards against the published SHA-256 of jnirschl/uBench's seven shards."""
    from micromerge.eval.hub_layout import (
        PUBLISHED_SHARDS,
        checked_checksums,
        find_hub_layout,
        first_batch_values,
        verify_shards,
    )
    from micromerge.eval.synthetic import SYNTHETIC_INSTITUTION

    if not Path(path).exists():
        raise MicromergeError(
            f"{path}: no such folder (pass a copy of the Hub's perception/0.1.0, or its parent)"
        )
    folder = find_hub_layout(Path(path)) if Path(path).is_dir() else None
    if folder is None:
        raise MicromergeError(
            f"{path}: no μ-Bench shard folder (perception/0.1.0 with dataset_info.json) here"
        )
    checksums = PUBLISHED_SHARDS
    if expected:
        try:
            loaded = parse_json(Path(expected).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise MicromergeError(
                f"--expected {expected}: not a JSON object of shard checksums ({exc})"
            ) from exc
        checksums = checked_checksums(loaded, f"--expected {expected}")
    report = []
    for name, status in verify_shards(folder, checksums):
        click.echo(f"{name}  {status}")
        report.append((name, status))
    bad = [name for name, status in report if status != "ok"]
    if bad:
        ours = not expected and first_batch_values(folder, "institution") == {SYNTHETIC_INSTITUTION}
        raise MicromergeError(
            f"{folder}: {len(bad)} of {len(report)} shard(s) differ, are missing or unexpected: {', '.join(bad)}"
            + (
                "; this is micromerge's synthetic benchmark (`micromerge demo` writes it), not a copy of "
                "jnirschl/uBench"
                if ours
                else ""
            )  # fmt: skip
        )
    click.echo(f"{folder}: all {len(report)} shards match")


@data_group.command("check")
@click.option(
    "--data",
    "corpus",
    required=True,
    help="The corpus, in any form `finetune contrastive --data` takes (captions table or folder, tar shards, "
    "a webdataset shard pattern or URL, a save_to_disk folder, a hub dataset or its local copy).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Worker processes that read and decode (0: in this process).",
)
@click.option(
    "--max-bad-fraction",
    type=click.FloatRange(0, 1),
    default=DEFAULT_MAX_BAD_FRACTION,
    show_default=True,
    help="Say whether a fine-tune with this --max-bad-fraction would train on the corpus or stop.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    help="Keep a report (JSON) here: the samples read, the unreadable ones' names, the verdict, the corpus's "
    "fingerprint. Written as the check goes, so a check stopped early, run again with the same --out, goes "
    "on from where it stopped.",
)
@QUIET
@friendly_errors
@writes_nothing_without("out")
def data_check_command(
    corpus: str, workers: int, max_bad_fraction: float, out: str | None, quiet: bool
) -> None:
    """Name the samples of a fine-tuning corpus a fine-tune would leave out, before it runs.

    Every sample is read and decoded as a fine-tune reads it; the unreadable ones are printed one a
    line, as a run's unreadable.txt names them, and the summary goes to stderr. Exit 0 when every
    sample is readable, 1 when any is not.
    """
    from micromerge.finetune.check_report import check_with_report
    from micromerge.finetune.corpus_check import check_corpus, corpus_parts
    from micromerge.finetune.unreadable import WHAT, too_many

    if out:
        say = functools.partial(click.echo, err=True)
        found = check_with_report(corpus, workers, max_bad_fraction, Path(out), not quiet, _say_now, say)
    else:
        found = check_corpus(corpus_parts(corpus, max(1, workers)), workers, not quiet, found=_say_now)
    if not found.read:  # shards that hold no sample (an indexed corpus of none is refused as it is read)
        raise MicromergeError(f"--data {corpus}: no sample in it; check the shards or the pattern")
    bad = len(found.unreadable)
    if not bad:
        every = (
            f"all {found.read} samples are readable, each"
            if found.read != 1
            else "its one sample is readable,"
        )
        click.echo(f"--data {corpus}: {every} with a caption", err=True)
        return
    verdict = (
        f"more than --max-bad-fraction {max_bad_fraction:g}: a fine-tune stops on it; fix the corpus or "
        "raise the fraction"
        if too_many(bad, found.read, max_bad_fraction)
        else f"within --max-bad-fraction {max_bad_fraction:g}: a fine-tune leaves them out and trains on the rest"
    )
    click.echo(
        f"--data {corpus}: {bad} of {found.read} samples ({bad / found.read:.1%}) are {WHAT}; {verdict}",
        err=True,
    )
    sys.exit(1)


def _say_now(name: str) -> None:
    """An unreadable sample's name on stdout as soon as it is found (an interrupted check keeps them),
    above a live progress bar."""
    tqdm.write(name, file=sys.stdout)
    sys.stdout.flush()
