"""Results-store rows into runs (analysis/tables.py): the name a run is shown by, and which
evaluated checkpoints stand as its base and specialist. The report tests use stores whose rows
carry explicit labels and one data set; these cover what a store written by `sweep` and `eval`
holds (mutation audit round 12)."""

from __future__ import annotations

import warnings

import pytest

from micromerge.analysis.tables import load_runs, run_label
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
