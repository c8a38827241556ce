"""micromerge against the outputs FusionBench 0.2.33 and mergekit 0.1.4 / 0.1.5 produced on the
same inputs, recorded by `tests/reference/make_reference_values.py` (which says how: those
packages do not install offline with their dependencies, so their own merge functions were run
on their own source and the results kept here with the versions). mergekit's random sparsifiers
(DARE, DELLA) were run with micromerge's draws in place of `torch.bernoulli`'s, so their cases hold
micromerge to everything around the draw: mergekit's L1 rescale, sign election and sum."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from micromerge.merging.in_memory import merge_state_dicts
from micromerge.merging.methods import MethodParams
from micromerge.merging.methods.della import keep_probabilities

RECORD = json.loads((Path(__file__).parent / "reference" / "reference_values.json").read_text())
CASES = RECORD["cases"]
METHOD_OF_CASE = {
    "ties_model_scope": "ties",
    "ties_tensor_scope": "ties",
    "breadcrumbs": "breadcrumbs",
    "breadcrumbs_ties": "breadcrumbs-ties",
    "dare_linear": "dare",
    "dare_ties": "dare-ties",
    "della_linear": "della-linear",
    "tsv": "tsv",
    "iso-c": "iso-c",
    "model-stock": "model-stock",
    "slerp_tensor": "slerp",
    "slerp_row": "slerp",
}


def tensors(listed: dict) -> dict[str, torch.Tensor]:
    return {
        key: torch.tensor(entry["values"], dtype=torch.float32).reshape(entry["shape"])
        for key, entry in listed.items()
    }


def test_the_record_names_the_reference_versions():
    assert RECORD["versions"]["fusion-bench"] == "0.2.33"
    assert RECORD["versions"]["mergekit"] == ["0.1.4", "0.1.5"]
    assert set(METHOD_OF_CASE) | {"della_probabilities"} == set(CASES)


@pytest.mark.parametrize("case", sorted(METHOD_OF_CASE))
def test_merge_equals_the_reference_output(case):
    record = CASES[case]
    parameters = dict(record["params"])
    alpha = parameters.pop("alpha")
    base = tensors(record["base"])
    finetuned = [tensors(ft) for ft in record["finetuned"]]
    merged = merge_state_dicts(
        METHOD_OF_CASE[case], base, finetuned, MethodParams(**parameters), strength=alpha
    )
    tolerance = 1e-5 if case in ("tsv", "iso-c") else 1e-6  # SVDs: LAPACK builds differ in the last bits
    for key, expected in tensors(record["merged"]).items():
        torch.testing.assert_close(merged[key], expected, atol=tolerance, rtol=0, msg=f"{case} {key}")


def test_della_keep_probabilities_equal_mergekits():
    record = CASES["della_probabilities"]
    inputs, expected = tensors(record["tensors"]), tensors(record["probabilities"])
    for key, tau in inputs.items():
        ours = keep_probabilities(tau, record["params"]["density"], record["params"]["epsilon"])
        torch.testing.assert_close(ours, expected[key], atol=1e-6, rtol=0, msg=key)
