"""`zoo`, `export` and `push`: the checkpoints themselves, listed and handed to other tools."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from micromerge.cli.errors import friendly_errors, writes_nothing
from micromerge.cli.options import ALLOW_PICKLE, ARCH
from micromerge.core.errors import MicromergeError

if TYPE_CHECKING:
    from micromerge.merging.sources import CheckpointAccess


@click.command("zoo")
@friendly_errors
@writes_nothing
def zoo_command() -> None:
    """List the checkpoint zoo: names, architectures, sources and formats."""
    from micromerge.merging.zoo import load_zoo

    rows = [("name", "arch", "domain", "source")] + [
        (e.name, e.arch or (e.arch_config and f"config:{e.arch_config}") or "?", e.domain or "", e.source)
        for e in load_zoo().values()
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]  # the source goes last, unpadded
    for *padded, source in rows:
        click.echo("".join(f"{cell:<{width}}  " for cell, width in zip(padded, widths, strict=True)) + source)


@click.command("export")
@click.argument("checkpoint")
@click.option("--out", required=True, type=click.Path(), help="Folder to write.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["transformers", "open_clip"]),
    default="transformers",
    show_default=True,
    help="transformers: CLIPModel + CLIPProcessor files; open_clip: what `local-dir:`/`hf-hub:` load.",
)
@ARCH
@ALLOW_PICKLE
@click.option(
    "--results", type=click.Path(), help="A results store: put this checkpoint's `eval` in its model card."
)
@click.option("--force", is_flag=True, help="Overwrite an existing folder's files.")
@friendly_errors
def export_command(
    checkpoint: str,
    out: str,
    fmt: str,
    arch: str | None,
    allow_pickle: bool,
    results: str | None,
    force: bool,
) -> None:
    """Export a checkpoint as a folder other tools open (e.g. a merged PLIP), with its model card."""
    from micromerge.merging.export import export_checkpoint
    from micromerge.merging.sources import CheckpointAccess

    access = CheckpointAccess(allow_pickle, arch)
    evaluation = _evaluation_of(checkpoint, results, access) if results else None
    path = export_checkpoint(checkpoint, out, fmt, access, force=force, evaluation=evaluation)
    click.echo(f"wrote {path} ({fmt}, with README.md)")


def _evaluation_of(checkpoint: str, store: str, access: CheckpointAccess) -> list[dict[str, Any]]:
    """The checkpoint's own `eval` rows in the store (matched by sha256): each task's accuracy on
    all its images (pooled over its caption keys) and the paper's two headline numbers; per
    protocol, the store's latest run of it (an earlier run, on other data or settings, would put a
    second, different number beside each task). A checkpoint that learned from, or was chosen on,
    the select half of those images (LEARNED_FROM_SELECT): its report half's, the held-out numbers;
    on all images, the card showed numbers half made of images it had learned from."""
    from micromerge.core.provenance import LEARNED_FROM_SELECT
    from micromerge.eval.evaluator import HEADLINE_COARSE, HEADLINE_FINE, POOLED
    from micromerge.eval.store import ResultStore
    from micromerge.merging.execute import input_hashes

    results = ResultStore(Path(store))
    results.check_readable("--results")
    with access.open(checkpoint) as source:
        digests = sorted(input_hashes([source]).values())
    rows = [
        r
        for r in results.rows()
        if r.get("method") == "none"
        and sorted(r["model"].get("base_sha256") or []) == digests
        and r["metric"] == "accuracy"
        and r["split"] in ("all", "report")
        and (r["task"] in (HEADLINE_COARSE, HEADLINE_FINE) or r.get("caption_key") in (POOLED, None))
    ]
    if not rows:
        raise MicromergeError(
            f"--results {store}: no `micromerge eval` of {checkpoint} in it (matched by sha256)"
        )
    latest = {r.get("protocol"): r["run_id"] for r in rows}
    older = sorted({r["run_id"] for r in rows} - set(latest.values()))
    if older:
        warnings.warn(
            f"--results {store}: {len(older)} earlier eval run(s) of {checkpoint} left out of the card "
            f"(the latest per protocol is used): {', '.join(older)}",
            stacklevel=2,
        )
    rows = [r for r in rows if latest[r.get("protocol")] == r["run_id"]]
    learned = {r["run_id"] for r in rows if r.get(LEARNED_FROM_SELECT)}
    chosen = [r for r in rows if r["split"] == ("report" if r["run_id"] in learned else "all")]
    return sorted(chosen, key=lambda r: r["task"] not in (HEADLINE_COARSE, HEADLINE_FINE))  # headlines first


@click.command("push")
@click.argument("folder", type=click.Path())
@click.option("--repo", required=True, help="The Hugging Face repo id to create or update (org/name).")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--token", envvar="HF_TOKEN", help="A Hugging Face token with write access [env HF_TOKEN].")
@friendly_errors
def push_command(folder: str, repo: str, private: bool, token: str | None) -> None:
    """Upload an exported folder (weights, configs, model card) to the Hugging Face Hub."""
    from micromerge.merging.push import push_folder

    click.echo(f"pushed {folder} to {repo}: {push_folder(folder, repo, private, token)}")
