"""A model card (README.md with Hugging Face metadata) for every folder micromerge hands to others.

What a reader of a merged or fine-tuned checkpoint needs, as mergekit writes it for merges: which
models went in (and their sha256), the method and its parameters, the evaluation it got if one was
run, and that the inputs' licences still apply. The facts come from the checkpoint's own provenance
(its manifest beside it, or the record in its safetensors header), never typed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import micromerge
from micromerge.core.atomic import write_text_atomic
from micromerge.core.errors import MicromergeError
from micromerge.core.json_text import parse_json
from micromerge.core.provenance import has_interval, supervised_lineage, trained_on_note
from micromerge.merging.sources import checkpoint_name
from micromerge.merging.tensor_source import parse_safetensors_header
from micromerge.merging.zoo import ZooEntry, load_zoo

LIBRARIES = {"transformers": "transformers", "open_clip": "open_clip", "micromerge": "open_clip"}


def checkpoint_provenance(files: list[Path]) -> dict[str, Any]:
    """The provenance of a checkpoint: `<file>.manifest.json`, a `manifest.json` beside it, or the
    record in its safetensors header; {} for a checkpoint micromerge did not make. Only a record
    micromerge wrote counts (a JSON object with `micromerge_version`): a folder's `manifest.json`
    may belong to another tool, and its card would then describe a merge that never happened."""
    for file in files:
        for manifest in (file.with_name(file.name + ".manifest.json"), file.with_name("manifest.json")):
            try:
                record = parse_json(manifest.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
            if _is_ours(record):
                return record
        if file.suffix == ".safetensors":
            try:
                _, metadata, _ = parse_safetensors_header(file)
                record = parse_json(metadata.get("micromerge.core.provenance", "{}"))
            except (MicromergeError, json.JSONDecodeError):
                continue
            if _is_ours(record):
                return record
    return {}


def _is_ours(record: Any) -> bool:
    return isinstance(record, dict) and "micromerge_version" in record


def _hub_ids(record: dict[str, Any]) -> list[str]:
    """Inputs that live on the Hugging Face Hub, for the card's base_model field (the Hub draws a
    model's family tree from it): hf-hub:org/name ids, and zoo names (`zoo:plip` as a merge records
    its inputs, `plip` as a fine-tune records its base) by the repo their weights come from."""
    names = [str(n) for n in (*record.get("inputs", []), record.get("base") or "") if n]
    try:
        zoo = load_zoo()
    except MicromergeError:  # a broken zoo file costs the card its base_model, not the export
        zoo = {}
    ids = set()
    for name in names:
        if name.startswith("hf-hub:"):
            ids.add(name.removeprefix("hf-hub:"))
        elif name.removeprefix("zoo:") in zoo and (name.startswith("zoo:") or not Path(name).exists()):
            repo = _zoo_repo(zoo[name.removeprefix("zoo:")])  # a bare name: a zoo one unless a path
            ids.update([repo] if repo else [])
    return sorted(ids)


def _zoo_repo(entry: ZooEntry) -> str | None:
    if entry.format != "open_clip_tag":
        return entry.repo
    from open_clip.pretrained import get_pretrained_cfg

    hub = get_pretrained_cfg(entry.open_clip_name or "", entry.tag or "").get("hf_hub", "")
    return hub.rstrip("/") or None


def model_card(
    title: str, record: dict[str, Any], library: str, evaluation: list[dict[str, Any]] | None = None
) -> str:
    method = record.get("method") or record.get("kind") or "unknown"
    header = ["---", f"library_name: {LIBRARIES[library]}", "license: other", "tags:"]
    header += [f"- {tag}" for tag in ("micromerge", "clip", "microscopy", method)]
    hub = _hub_ids(record)
    if hub:
        header += ["base_model:", *[f"- {name}" for name in hub]]
    header.append("---")
    inputs = record.get("inputs_sha256") or {}
    if not inputs and record.get("base"):  # a fine-tuned run: its base, {file: sha256}
        digest = record.get("base_sha256")
        inputs = digest if isinstance(digest, dict) else {record["base"]: digest}
    lines = [
        *header,
        "",
        f"# {title}",
        "",
        f"Made with micromerge {record.get('micromerge_version', '(version not recorded)')} (`{method}`); "
        f"this card by micromerge {micromerge.__version__}."
        if record
        else f"Exported by micromerge {micromerge.__version__}.",
        "",
        "## How it was made",
        "",
    ]
    if record:
        lines += [
            "| input | sha256 |",
            "|---|---|",
            *[f"| `{name}` | `{digest}` |" for name, digest in inputs.items()],
            "",
            "Parameters:",
            "",
            "```json",
            json.dumps(
                record.get("parameters") or record.get("hyperparameters") or {}, indent=2, sort_keys=True
            ),
            "```",
            "",
        ]
        lines += _training_lines(record)
        lineage = supervised_lineage(record)
        if lineage:
            lines += [
                "Trained with labels on benchmark data (a supervised fine-tune on a μ-Bench task, here or in "
                f"an input; task data sha256 {', '.join(f[:16] for f in lineage)}): on that benchmark its "
                "numbers for those tasks, and for tasks sharing their images, are not zero-shot.",
                "",
            ]
        if record.get("statistics"):
            lines += ["Data it learned from (select half of μ-Bench, or each model's own corpus):", ""]
            lines += ["```json", json.dumps(record["statistics"], indent=2, sort_keys=True), "```", ""]
    else:
        lines += ["No micromerge provenance was found beside this checkpoint.", ""]
    lines += ["## Evaluation", ""]
    if evaluation:
        evaluated_on = _evaluated_on(evaluation)
        lines += ["Evaluated on:", "", *evaluated_on, ""] if evaluated_on else []
        if any(r["split"] == "report" for r in evaluation):
            lines += [
                "It learned from, or was chosen on, the select half of these images: the numbers are "
                "its report half's, images it never saw.",
                "",
            ]
        lines += ["| task | protocol | split | accuracy | 95% interval |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['task']}{trained_on_note(r)} | {r.get('protocol') or '-'} | {r['split']} | {100 * r['value']:.1f} % "
            f"| {_interval(r)} |"
            for r in evaluation
        ]
        lines.append("")
    else:
        lines += ["Not evaluated here (run `micromerge eval` and export with `--results`).", ""]
    lines += [
        "## Licence",
        "",
        "A merged or fine-tuned model is derived from its inputs: the licence of every input above "
        "applies to it. Check each one's source before you share or use this model.",
        "",
    ]
    return "\n".join(lines)


def _training_lines(record: dict[str, Any]) -> list[str]:
    """A fine-tune's data and run as its manifest measured them: what it was trained on (the input
    table names only the base), how far, what of the corpus it could not read, and where its loss
    went, so a card shared on the Hub says which corpus made the specialist and a changed corpus is
    told by its fingerprint."""
    if not str(record.get("kind", "")).startswith("finetune-") or "data_fingerprint" not in record:
        return []
    how = (record.get("data_path") or {}).get("fingerprint")
    rows = [
        ("data", f"`{record.get('data')}`"),
        ("data fingerprint", f"`{record['data_fingerprint']}`" + (f" (over {how})" if how else "")),
    ]
    if record.get("domain"):
        rows.append(("domain", str(record["domain"])))
    if record.get("classes"):
        rows.append(("classes", ", ".join(str(c) for c in record["classes"])))
    if "steps" in record:
        seen = f", {record['images_seen']} images seen" if "images_seen" in record else ""
        rows.append(("steps", f"{record['steps']}{seen}"))
    if record.get("corrupt_images_skipped"):
        listed = record.get("corrupt_images_listed")
        where = f" (listed in `{listed}` beside the run's model)" if listed else ""
        rows.append(("unreadable images left out", f"{record['corrupt_images_skipped']}{where}"))
    if "processes" in record:
        rows.append(("processes", f"{record['processes']} on {record.get('device', '?')}"))
    loss = record.get("loss_summary") or {}
    if loss.get("first") is not None:
        rows.append(
            ("loss", f"{loss['first']:.4f} at the first step, {loss['last']:.4f} at the last "
                     f"(mean of the last 10: {loss['mean_last_10']:.4f})")
        )  # fmt: skip
    return ["Training:", "", "| | |", "|---|---|", *[f"| {name} | {value} |" for name, value in rows], ""]


def _evaluated_on(evaluation: list[dict[str, Any]]) -> list[str]:
    """What each evaluation run was on, from its rows: the data (its files' fingerprint) and the
    table its tasks were read under. A task's number under a `--sources` table that moved rows
    between sources is another number under the same name, and the card did not say which."""
    runs = {r["run_id"]: r for r in evaluation if "run_id" in r}
    lines = []
    for run_id, row in runs.items():
        dataset = row.get("dataset") or {}
        table = row.get("sources")
        tasks = (
            f"tasks read under `--sources {table.get('file')}` (sha256 `{table.get('sha256')}`)"
            if isinstance(table, dict)
            else "tasks as micromerge's shipped source table reads them"
        )
        lines.append(
            f"- `{row.get('protocol') or '-'}` (run `{run_id}`, micromerge {row.get('micromerge_version', '?')}): "
            f"{dataset.get('source', '?')} (data fingerprint `{dataset.get('fingerprint', '?')}`), {tasks}"
        )
    return lines


def _interval(row: dict[str, Any]) -> str:
    if not has_interval(row):
        return "not computed (--bootstrap 0)"
    return f"{100 * row['ci_low']:.1f} – {100 * row['ci_high']:.1f}"


def write_model_card(
    folder: Path,
    checkpoint: str,
    files: list[Path],
    library: str,
    evaluation: list[dict[str, Any]] | None = None,
) -> Path:
    record = checkpoint_provenance(files)
    path = folder / "README.md"
    write_text_atomic(path, model_card(checkpoint_name(checkpoint), record, library, evaluation))
    return path
