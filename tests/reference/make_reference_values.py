"""Record what the public reference implementations output on small inputs (run by hand, once).

Neither FusionBench nor mergekit installs cleanly and offline in a test (their dependency trees
pull transformers, lightning, hydra ...), so their merge functions are executed here, on their
own source, and the inputs and outputs recorded in `reference_values.json` beside this file;
`tests/test_reference_values.py` holds micromerge to them. Only the reference's own functions
run (extracted by name from its source file with `ast`); the few lines that glue them together
are written here and cite where the reference does the same.

    pip download --no-deps mergekit==0.1.4 mergekit==0.1.5 fusion-bench==0.2.33 -d wheels
    for w in wheels/*.whl; do d=${w%-py3-none-any.whl}; mkdir -p $d; unzip -q -o $w -d $d; done
    python tests/reference/make_reference_values.py --mergekit-014 wheels/mergekit-0.1.4 \\
        --mergekit-015 wheels/mergekit-0.1.5 --fusion-bench wheels/fusion_bench-0.2.33
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Union  # noqa: F401, UP035  (names the reference code uses)

import numpy as np
import torch
from torch import Tensor, nn  # noqa: F401

from micromerge.merging.methods.base import key_seed  # the draws both sides share
from micromerge.merging.methods.task_vectors import dare_mask

OUT = Path(__file__).with_name("reference_values.json")


def functions(path: Path, *names: str, **extra: Any) -> dict[str, Any]:
    """The named top-level functions of a reference source file, defined in a namespace of their own."""
    tree = ast.parse(path.read_text())
    wanted = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in names]
    missing = set(names) - {node.name for node in wanted}
    if missing:
        raise SystemExit(f"{path}: no function(s) {sorted(missing)}")
    namespace: dict[str, Any] = {
        "torch": torch,
        "np": np,
        "math": math,
        "copy": copy,
        "nn": nn,
        "Tensor": Tensor,
        "OrderedDict": OrderedDict,
        "List": List,  # noqa: UP006
        "Dict": Dict,  # noqa: UP006
        "Optional": Optional,
        "Union": Union,
        "Any": Any,
        "StateDictType": dict,
        **extra,
    }
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(path), "exec"), namespace)  # noqa: S102
    return {name: namespace[name] for name in names}


def state(seed: int, shapes: dict[str, list[int]], scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: scale * torch.randn(shape, generator=generator) for key, shape in shapes.items()}


def listed(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {key: {"shape": list(t.shape), "values": t.reshape(-1).tolist()} for key, t in tensors.items()}


class _Quiet:
    def __init__(self, *_args: Any) -> None: ...
    def __enter__(self) -> None: ...
    def __exit__(self, *_args: Any) -> None: ...


def fusion_bench_cases(root: Path) -> dict[str, Any]:
    method = root / "fusion_bench" / "method"
    ties = functions(
        method / "ties_merging" / "ties_merging_utils.py",
        "state_dict_to_vector",
        "vector_to_state_dict",
        "topk_values_mask",
        "resolve_zero_signs",
        "resolve_sign",
        "disjoint_merge",
        "ties_merging",
    )
    iso = functions(method / "isotropic_merging" / "iso_utils.py", "iso_c", timeit_context=_Quiet)
    tsv = functions(
        method / "task_singular_vector" / "utils" / "TSVM_utils.py", "compute_and_sum_svd_mem_reduction"
    )
    stock = functions(
        method / "model_stock" / "model_stock.py",
        "compute_angle",
        "compute_ratio",
        "merge_weights",
        EPS=1e-8,
        log=type("Log", (), {"info": staticmethod(print), "warning": staticmethod(print)}),
    )
    cases: dict[str, Any] = {}

    # TIES over the whole flattened model: 58 entries, density 0.2 -> 11.6, so the authors'
    # floor(d n) + 1 = 12 kept equals micromerge's ceil(d n) (continuous values: no ties).
    shapes = {"a.weight": [7, 5], "b.bias": [11], "c.weight": [3, 4]}
    base = state(0, shapes)
    fts = [{k: base[k] + t for k, t in state(10 + i, shapes, 0.1).items()} for i in range(3)]
    flat_base = ties["state_dict_to_vector"](base)
    flat_tvs = torch.stack([ties["state_dict_to_vector"](ft) - flat_base for ft in fts])
    merged_tv = ties["ties_merging"](flat_tvs, reset_thresh=20, merge_func="dis-mean")
    lam = 0.6
    merged = ties["vector_to_state_dict"](flat_base + lam * merged_tv, base)
    cases["ties_model_scope"] = {
        "reference": "fusion-bench 0.2.33 ties_merging_utils (state_dict_to_vector, ties_merging 'dis-mean')",
        "params": {"density": 0.2, "alpha": lam},
        "base": listed(base),
        "finetuned": [listed(ft) for ft in fts],
        "merged": listed(merged),
    }

    # TSV-Merge and Iso-C on two 2-D task matrices, a bias and a text_projection (the key their
    # CLIP code leaves out of the SVD), three tasks.
    shapes = {"layer.weight": [12, 9], "layer.bias": [9], "text_projection": [6, 6]}
    base = state(2, shapes)
    fts = [{k: base[k] + t for k, t in state(20 + i, shapes, 0.3).items()} for i in range(3)]
    tvs = [{k: ft[k] - base[k] for k in base} for ft in fts]
    tsv_vector = tsv["compute_and_sum_svd_mem_reduction"](
        copy.deepcopy(tvs), exclude_keys=["text_projection"], accelerator="cpu"
    )
    iso_vector = iso["iso_c"](copy.deepcopy(tvs), accelerator="cpu", exclude_keys=["text_projection"])
    for name, vector, source in (
        ("tsv", tsv_vector, "TSVM_utils.compute_and_sum_svd_mem_reduction"),
        ("iso-c", iso_vector, "iso_utils.iso_c"),
    ):
        cases[name] = {
            "reference": f"fusion-bench 0.2.33 {source}, exclude_keys=['text_projection']; theta_0 + alpha * merged",
            "params": {"alpha": 0.8},
            "base": listed(base),
            "finetuned": [listed(ft) for ft in fts],
            "merged": listed({k: base[k] + 0.8 * vector[k] for k in base}),
        }

    # Model Stock with two fine-tuned models (FusionBench's two-model path).
    shapes = {"w": [8, 6], "b": [6]}
    base = state(3, shapes)
    fts = [{k: base[k] + t for k, t in state(30 + i, shapes, 0.2).items()} for i in range(2)]
    for ft in fts:  # correlated task vectors, so t is far from 0
        ft["w"] += 0.2
    cosines = stock["compute_angle"](fts[0], fts[1], base)
    ratio = stock["compute_ratio"](cosines, k=2)
    merged = stock["merge_weights"](fts[0], fts[1], base, ratio)
    cases["model-stock"] = {
        "reference": "fusion-bench 0.2.33 model_stock (compute_angle, compute_ratio, merge_weights)",
        "params": {"alpha": 1.0},
        "base": listed(base),
        "finetuned": [listed(ft) for ft in fts],
        "merged": listed(merged),
    }
    return cases


def mergekit_014_cases(root: Path) -> dict[str, Any]:
    sparsify = functions(
        root / "mergekit" / "sparsify.py",
        "rescaled_masked_tensor",
        "magnitude",
        "magnitude_outliers",
        "bernoulli",
        "della_magprune",
        RescaleNorm=type("RescaleNorm", (), {"l1": "l1", "l2": "l2", "linf": "linf"}),
    )
    gta = functions(root / "mergekit" / "merge_methods" / "generalized_task_arithmetic.py", "get_mask")
    slerp = functions(
        root / "mergekit" / "merge_methods" / "slerp.py", "lerp", "slerp", "normalize", "maybe_torch"
    )
    cases: dict[str, Any] = {}

    def combine(deltas: list[torch.Tensor], consensus: bool, normalize: bool, lam: float) -> torch.Tensor:
        """GeneralTaskArithmeticTask.execute with weight 1 per model (generalized_task_arithmetic.py)."""
        stacked = torch.stack(deltas)
        weights = torch.ones(len(deltas)).view(-1, *([1] * (stacked.dim() - 1)))
        if consensus:
            mask = gta["get_mask"](stacked, method="sum", mask_dtype=stacked.dtype)
            mixed, divisor = (stacked * mask).sum(0), (weights * mask).sum(0)
            divisor[divisor == 0] = 1
        else:
            mixed, divisor = stacked.sum(0), weights.sum(0)
            divisor[divisor.abs() < 1e-8] = 1
        if normalize:
            mixed = mixed / divisor
        return mixed * lam

    # TIES per tensor (mergekit `ties`): 40 entries, density 0.25 -> exactly 10 kept by both.
    shapes = {"w": [8, 5], "v": [20]}
    base = state(4, shapes)
    fts = [{k: base[k] + t for k, t in state(40 + i, shapes, 0.1).items()} for i in range(3)]
    merged = {
        key: base[key]
        + combine([sparsify["magnitude"](ft[key] - base[key], 0.25, None) for ft in fts], True, True, 0.7)
        for key in base
    }
    cases["ties_tensor_scope"] = {
        "reference": "mergekit 0.1.4 sparsify.magnitude + get_mask('sum') + normalize (method 'ties')",
        "params": {"density": 0.25, "alpha": 0.7, "topk_scope": "tensor"},
        "base": listed(base),
        "finetuned": [listed(ft) for ft in fts],
        "merged": listed(merged),
    }

    # Breadcrumbs (mergekit `breadcrumbs`: no consensus, no normalise, no rescale), per tensor, and
    # `breadcrumbs_ties` (the same with sign consensus).
    for name, consensus, how in (
        ("breadcrumbs", False, ""),
        ("breadcrumbs_ties", True, " + get_mask('sum')"),
    ):
        merged = {
            key: base[key]
            + combine(
                [sparsify["magnitude_outliers"](ft[key] - base[key], 0.5, None, gamma=0.1) for ft in fts],
                consensus,
                False,
                0.9,
            )
            for key in base
        }
        cases[name] = {
            "reference": f"mergekit 0.1.4 sparsify.magnitude_outliers{how} (method '{name}')",
            "params": {"density": 0.5, "gamma": 0.1, "alpha": 0.9, "topk_scope": "tensor"},
            "base": listed(base),
            "finetuned": [listed(ft) for ft in fts],
            "merged": listed(merged),
        }

    # The random sparsifiers draw from mergekit's global RNG; each draw is replaced here by
    # micromerge's own (the same (seed, key, model) generator its methods use), so what is compared
    # is everything around the draw: mergekit's L1 rescale, sign election and sum.
    def with_draws(draw: Any, merge: Any) -> Any:
        original = torch.bernoulli
        torch.bernoulli = draw  # type: ignore[assignment]
        try:
            return merge()
        finally:
            torch.bernoulli = original

    drawn: dict[str, Any] = {}

    def dare_draw(probabilities: torch.Tensor, *_args: Any, **_kwargs: Any) -> torch.Tensor:
        drop = 1.0 - float(probabilities.reshape(-1)[0])
        return dare_mask(probabilities.shape, drop, 3, drawn["key"], drawn["index"]).to(probabilities.dtype)

    def dare_merge(key: str, consensus: bool) -> torch.Tensor:
        deltas = []
        for index, ft in enumerate(fts):
            drawn.update(key=key, index=index)
            deltas.append(sparsify["bernoulli"](ft[key] - base[key], 0.5, "l1"))
        return base[key] + combine(deltas, consensus, False, 0.8)

    for name, consensus in (("dare_linear", False), ("dare_ties", True)):
        merged = {key: with_draws(dare_draw, lambda k=key, c=consensus: dare_merge(k, c)) for key in base}
        cases[name] = {
            "reference": f"mergekit 0.1.4 sparsify.bernoulli with RescaleNorm.l1 (method '{name}'), "
            "the Bernoulli draws micromerge's dare_mask",
            "params": {"drop_rate": 0.5, "rescale": "l1", "seed": 3, "alpha": 0.8},
            "base": listed(base),
            "finetuned": [listed(ft) for ft in fts],
            "merged": listed(merged),
        }

    def della_draw(probabilities: torch.Tensor, *_args: Any, **_kwargs: Any) -> torch.Tensor:
        generator = torch.Generator().manual_seed(key_seed(2, drawn["key"], drawn["index"]))
        uniform = torch.rand(drawn["shape"], generator=generator).reshape(probabilities.shape)
        return (uniform < probabilities).to(probabilities.dtype)

    def della_merge(key: str) -> torch.Tensor:
        deltas = []
        for index, ft in enumerate(fts):
            drawn.update(key=key, index=index, shape=base[key].shape)
            deltas.append(sparsify["della_magprune"](ft[key] - base[key], 0.4, 0.15, "l1"))
        return base[key] + combine(deltas, False, False, 0.7)

    merged = {key: with_draws(della_draw, lambda k=key: della_merge(k)) for key in base}
    cases["della_linear"] = {
        "reference": "mergekit 0.1.4 sparsify.della_magprune with RescaleNorm.l1 (method 'della_linear'), "
        "the Bernoulli draws micromerge's own",
        "params": {"density": 0.4, "epsilon": 0.15, "seed": 2, "alpha": 0.7},
        "base": listed(base),
        "finetuned": [listed(ft) for ft in fts],
        "merged": listed(merged),
    }

    # DELLA's keep probabilities: the Bernoulli draw is mergekit's global RNG, so what is
    # comparable is the probability each entry is kept with (captured at torch.bernoulli).
    captured: list[torch.Tensor] = []
    original = torch.bernoulli
    torch.bernoulli = lambda p, *a, **k: (captured.append(p.clone()), torch.ones_like(p))[1]  # type: ignore[assignment]
    try:
        tau = state(5, {"t": [6, 9]})["t"]
        sparsify["della_magprune"](tau, 0.4, 0.15, None)
        bias = state(6, {"t": [12]})["t"]
        sparsify["della_magprune"](bias, 0.4, 0.15, None)
    finally:
        torch.bernoulli = original
    cases["della_probabilities"] = {
        "reference": "mergekit 0.1.4 sparsify.della_magprune, probabilities passed to torch.bernoulli",
        "params": {"density": 0.4, "epsilon": 0.15},
        "tensors": listed({"matrix": tau, "bias": bias}),
        "probabilities": listed(
            {"matrix": captured[0].reshape(tau.shape), "bias": captured[1].reshape(bias.shape)}
        ),
    }

    # SLERP, one angle per tensor.
    v0, v1 = state(7, {"w": [5, 4]})["w"], state(8, {"w": [5, 4]})["w"]
    cases["slerp_tensor"] = {
        "reference": "mergekit 0.1.4 merge_methods/slerp.slerp",
        "params": {"alpha": 0.35, "slerp_scope": "tensor"},
        "base": listed({"w": v0}),
        "finetuned": [listed({"w": v1})],
        "merged": listed({"w": torch.as_tensor(slerp["slerp"](0.35, v0, v1)).float()}),
    }
    return cases


def mergekit_015_cases(root: Path) -> dict[str, Any]:
    slerp = functions(root / "mergekit" / "merge_methods" / "slerp.py", "slerp", _CHUNK_ELEMENTS=1024 * 1024)
    v0, v1 = state(7, {"w": [5, 4]})["w"], state(8, {"w": [5, 4]})["w"]
    v1[1] = 2 * v0[1]  # a colinear row
    merged = slerp["slerp"](torch.tensor(0.35), v0, v1)
    return {
        "slerp_row": {
            "reference": "mergekit 0.1.5 merge_methods/slerp.slerp (one angle per output row)",
            "params": {"alpha": 0.35, "slerp_scope": "row"},
            "base": listed({"w": v0}),
            "finetuned": [listed({"w": v1})],
            "merged": listed({"w": merged}),
        }
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mergekit-014", type=Path, required=True)
    parser.add_argument("--mergekit-015", type=Path, required=True)
    parser.add_argument("--fusion-bench", type=Path, required=True)
    args = parser.parse_args()
    cases = {
        **fusion_bench_cases(args.fusion_bench),
        **mergekit_014_cases(args.mergekit_014),
        **mergekit_015_cases(args.mergekit_015),
    }
    record = {
        "versions": {"fusion-bench": "0.2.33", "mergekit": ["0.1.4", "0.1.5"], "torch": torch.__version__},
        "cases": cases,
    }
    OUT.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {OUT} ({len(cases)} cases)")


if __name__ == "__main__":
    main()
