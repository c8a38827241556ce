"""Merge state dicts already in memory: the library call behind notebooks and reference checks.

The same methods, the same whole-model `prepare` and the same per-key `merge` as the file and
sweep engines, on float32 tensors; keys are merged in the base's order (the order ties at a
whole-model cut-off are broken in). Logit-scale clamping and dtype casts are the executor's
job, not this function's.
"""

from __future__ import annotations

import torch

from micromerge.merging.methods import MethodParams, ModelScan, get_method


@torch.no_grad()
def merge_state_dicts(
    method_name: str,
    base: dict[str, torch.Tensor],
    finetuned: list[dict[str, torch.Tensor]],
    params: MethodParams,
    strength: float | None = None,
    statistics: tuple[dict[str, torch.Tensor], ...] | None = None,
) -> dict[str, torch.Tensor]:
    """{key: merged float32 tensor} for every key of `base` (all must be floating point);
    `statistics` (base first) for the data-aware methods."""
    method = get_method(method_name)
    strength = params.strength if strength is None else strength
    base32 = {key: tensor.to(torch.float32) for key, tensor in base.items()}
    others = [{key: state[key].to(torch.float32) for key in base} for state in finetuned]
    keys = tuple(base32)
    scan = ModelScan(
        keys,
        keys,
        lambda key: (base32[key], [state[key] for state in others]),
        lambda key: base32[key].numel(),
        statistics,
    )
    context = method.prepare(scan, params)
    return {
        key: method.merge(
            key, base32[key], [state[key] for state in others], strength, params, context=context
        )
        for key in keys
    }
