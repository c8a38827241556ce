"""Results-store rows into runs (analysis/tables.py): the name a run is shown by, and which
evaluated checkpoints stand as its base and specialist. The report tests use stores whose rows
carry explicit labels and one data set; these cover what a store written by `sweep` and `eval`
holds (mutation audit round 12)."""

from __future__ import annotations

import hashlib
import json
import warnings

import pandas as pd
import pytest
from safetensors.torch import save_file

from micromerge.analysis.tables import load_runs, run_label
from micromerge.eval.store import ResultStore
from tests.helpers import random_state_dict
from tests.test_analysis import write_store


def _row(base: str, finetuned: list[str], **extra) -> dict:
    return {"method": "wise-ft", "model": {"base": base, "finetuned": finetuned}, **extra}


@pytest.mark.parametrize(
    "row, label",
    [
        (_row("m0.safetensors", ["m1.safetensors"]), "wise-ft: m0 + m1"),
        # a run folder's model.safetensors is named by its folder (finetune writes runs/NAME/model.safetensors)
        (
            _row("runs/base/model.safetensors", ["runs/pathology/model.safetensors", "x/ft.safetensors"]),
            "wise-ft: base + pathology + ft",
        ),
        # a zoo name, hub id or folder is not a checkpoint file: a dot in it is not a suffix
        (_row("hf-hub:org/clip.v2", ["hf-hub:org/quilt.b32"]), "wise-ft: hf-hub:org/clip.v2 + quilt.b32"),
        (
            _row("runs/base", ["runs/plip-local", "plip"], protocol="ubench"),
            "wise-ft [ubench]: runs/base + plip-local + plip",
        ),
        (_row("ckpt/open_clip_model.safetensors", ["e/epoch_3.pt"]), "wise-ft: ckpt + epoch_3"),
        (_row("model.safetensors", ["m1.safetensors"]), "wise-ft: model + m1"),  # in the working folder
        (_row("m0.safetensors", ["m1.safetensors"], label="my run"), "my run"),
    ],
)
def test_a_run_is_named_by_its_label_else_by_its_checkpoints(row, label):
    assert run_label(row) == label


def test_single_point_runs_load_without_a_missing_curve_warning(tmp_path):
    """An `eval` of one model and a greedy soup are one point by design; a sweep with one alpha is
    worth a warning (its report has no curve)."""
    store = write_store(tmp_path / "r.jsonl", alphas=(0.5,), method="greedy-soup")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (soup,) = load_runs(store)
    assert soup.method == "greedy-soup"
    with pytest.warns(UserWarning, match="a single alpha, so no curve"):
        load_runs(write_store(tmp_path / "s.jsonl", alphas=(0.5,)))


def _rows(
    tmp_path,
    run_id: str,
    method: str,
    alphas: tuple,
    model: dict,
    fingerprint="F",
    protocol="ubench",
    **fields,
):
    """write_store's rows as `eval` (alpha null) or `sweep` writes them, with inputs' digests."""
    rows = ResultStore(
        write_store(tmp_path / f"{run_id}.jsonl", alphas=alphas, run_id=run_id, method=method)
    ).rows()
    dataset = {"source": "fixture", "fingerprint": fingerprint}
    alpha = {"alpha": None} if method == "none" else {}
    return [
        {**row, "model": model, "dataset": dataset, "protocol": protocol, **alpha, **fields} for row in rows
    ]


def test_a_sweep_takes_as_references_the_evaluations_of_its_own_inputs_on_its_data_and_protocol(tmp_path):
    """With per-block alpha rules, alpha 0 and 1 are not the base and the specialist: a sweep is
    compared with their own `micromerge eval` runs, found by sha256, on the same data and protocol,
    under the same `--sources` table. Evaluations of the same checkpoints on other data, under the
    other protocol or another table come later in the store, so a key that ignored one would pick them."""
    base, specialist = "b" * 64, "s" * 64
    evaluated = {"finetuned": [], "finetuned_sha256": []}
    table = {"file": "moved.toml", "sha256": "t" * 64}
    store = tmp_path / "all.jsonl"
    ResultStore(store).append(
        _rows(
            tmp_path, "e-base", "none", (0.0,), {"base": "b.safetensors", "base_sha256": [base], **evaluated}
        )
        + _rows(
            tmp_path,
            "e-ft",
            "none",
            (1.0,),
            {"base": "f.safetensors", "base_sha256": [specialist], **evaluated},
        )
        + _rows(
            tmp_path,
            "e-data",
            "none",
            (0.5,),
            {"base": "b", "base_sha256": [base], **evaluated},
            fingerprint="G",
        )
        + _rows(
            tmp_path,
            "e-cs",
            "none",
            (0.5,),
            {"base": "f", "base_sha256": [specialist], **evaluated},
            protocol="closed-set",
        )
        + _rows(
            tmp_path,
            "e-sources",
            "none",
            (0.0,),
            {"base": "f", "base_sha256": [specialist], **evaluated},
            sources=table,
        )
        + _rows(
            tmp_path,
            "sweep",
            "wise-ft",
            (0.0, 0.5, 1.0),
            {"base": "b", "base_sha256": [base], "finetuned": ["f"], "finetuned_sha256": [specialist]},
        )
        + _rows(
            tmp_path,
            "sweep-sources",
            "wise-ft",
            (0.0, 0.5, 1.0),
            {"base": "b", "base_sha256": [base], "finetuned": ["f"], "finetuned_sha256": [specialist]},
            sources=table,
        )
        + _rows(
            tmp_path,
            "sweep-captions",
            "wise-ft",
            (0.0, 0.5, 1.0),
            {"base": "b", "base_sha256": [base], "finetuned": ["f"], "finetuned_sha256": [specialist]},
            protocol="closed-set",
            prompts="captions",
        )
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single-point runs
        runs = {run.run_id: run for run in load_runs(store)}
    sweep = runs["sweep"]
    assert sweep.base_reference is not None and sweep.base_reference.equals(runs["e-base"].table)
    assert sweep.finetuned_reference is not None and sweep.finetuned_reference.equals(runs["e-ft"].table)
    assert runs["e-base"].base_reference is None, "an evaluation has no references of its own"
    # a --sources table names and groups the tasks otherwise: its runs are references only to its own
    moved = runs["sweep-sources"]
    assert moved.base_reference is None, "the base was evaluated under the shipped table only"
    assert moved.finetuned_reference is not None and moved.finetuned_reference.equals(runs["e-sources"].table)
    assert runs["sweep-captions"].finetuned_reference is None, "e-cs asked its questions with other prompts"
    # ... and their labels tell them apart
    assert (sweep.label, moved.label, runs["sweep-captions"].label) == (
        "wise-ft [ubench]: b + f",
        "wise-ft [ubench, sources moved.toml]: b + f",
        "wise-ft [closed-set, caption prompts]: b + f",
    )


def test_rows_written_before_the_protocol_field_are_closed_set_runs(tmp_path):
    """Stores from before `--protocol ubench` hold rows without a protocol: they were scored
    against every class of the task, so they are closed-set runs and never a ubench reference."""
    (run,) = load_runs(write_store(tmp_path / "old.jsonl"))
    assert run.protocol == "closed-set"


def test_the_specialists_domain_is_read_from_the_checkpoint_the_sweep_read(tmp_path):
    """The report's default target: the domain in the specialist's provenance. The checkpoint is
    the one whose sha256 the sweep recorded, wherever it is now (the recorded absolute path holds
    other bytes here, the copy beside the store is the one), and its own manifest speaks before its
    folder's, as for the model card; a checkpoint with its provenance in the header only is read too."""
    from micromerge.analysis.tables import Run, finetuned_domain

    def checkpoint(path, seed: int, header_domain: str | None = None) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = (
            {"micromerge.core.provenance": json.dumps({"domain": header_domain, "micromerge_version": "0.1"})}
            if header_domain
            else None
        )
        save_file(random_state_dict(seed), str(path), metadata=metadata)
        return hashlib.sha256(path.read_bytes()).hexdigest()

    store = tmp_path / "results" / "r.jsonl"
    digest = checkpoint(tmp_path / "results" / "runs" / "ft.safetensors", 1)
    (tmp_path / "results" / "runs" / "ft.safetensors.manifest.json").write_text(
        json.dumps({"domain": "pathology", "micromerge_version": "0.1"})
    )
    (tmp_path / "results" / "runs" / "manifest.json").write_text(
        json.dumps({"domain": "the folder's", "micromerge_version": "0.1"})
    )
    checkpoint(tmp_path / "moved" / "ft.safetensors", 2, header_domain="biology")
    model = {
        "finetuned": ["runs/ft.safetensors"],
        "finetuned_files": [str(tmp_path / "moved" / "ft.safetensors")],
        "finetuned_sha256": [digest],
    }
    run = Run("r", "r", "wise-ft", {}, model, {}, pd.DataFrame())
    assert finetuned_domain(run, store) == "pathology"
    header_only = checkpoint(tmp_path / "h" / "ft.safetensors", 3, header_domain="biology")
    moved = {"finetuned": [str(tmp_path / "h" / "ft.safetensors")], "finetuned_sha256": [header_only]}
    assert finetuned_domain(Run("h", "h", "wise-ft", {}, moved, {}, pd.DataFrame()), store) == "biology"
    assert (
        finetuned_domain(
            Run("x", "x", "wise-ft", {}, {**moved, "finetuned_sha256": [digest]}, {}, pd.DataFrame()), store
        )
        is None
    )
    recorded = {**moved, "finetuned": ["gone/ft.safetensors"], "finetuned_files": moved["finetuned"]}
    assert finetuned_domain(Run("a", "a", "wise-ft", {}, recorded, {}, pd.DataFrame()), store) == "biology", (
        "the relative name resolves nowhere: the absolute file the sweep read"
    )
