"""Merge in place into one resident model: what the sweep engine does for every alpha.

Base and fine-tuned float32 copies of the merged keys stay on the device; `apply(alpha)`
writes each merged tensor straight into the model's parameter storage (no re-instantiation,
no state-dict copies per alpha).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from micromerge.merging.methods import ModelScan, get_method
from micromerge.merging.plan import LOGIT_SCALE_KEY, LOGIT_SCALE_MAX, MergeSpec, plan_merge
from micromerge.merging.tensor_source import TensorSource


class ResidentMerge:
    def __init__(
        self,
        model: torch.nn.Module,
        spec: MergeSpec,
        base: TensorSource,
        finetuned: list[TensorSource],
        device: torch.device,
        statistics: tuple[dict[str, Any], ...] | None = None,
    ):
        self.model = model.to(device)
        self.spec = spec
        self.method = get_method(spec.method)
        self.targets = {k: v for k, v in model.state_dict(keep_vars=True).items()}
        plans = [p for p in plan_merge(spec, base, finetuned) if p.merged and p.key in self.targets]
        self.keys = [p.key for p in plans]
        self.base = {k: base.read(k).to(device=device, dtype=torch.float32).clone() for k in self.keys}
        self.finetuned = [
            {k: s.read(k).to(device=device, dtype=torch.float32).clone() for k in self.keys}
            for s in finetuned
        ]
        scan = ModelScan(
            tuple(base.keys()),
            tuple(self.keys),
            lambda key: (self.base[key], [ft[key] for ft in self.finetuned]),
            lambda key: self.base[key].numel(),
            statistics,
        )
        self.context = self.method.prepare(scan, spec.params)  # independent of alpha: once per sweep

    @torch.no_grad()
    def apply(self, alpha: float) -> None:
        params = replace(self.spec.params, strength=alpha)
        for key in self.keys:
            target = self.targets[key].data
            strength = self.spec.rules.strength_for(key, alpha)
            others = [ft[key] for ft in self.finetuned]
            if target.dtype == torch.float32:
                self.method.merge(
                    key, self.base[key], others, strength, params, out=target, context=self.context
                )
            else:
                target.copy_(
                    self.method.merge(key, self.base[key], others, strength, params, context=self.context)
                )
            if key == LOGIT_SCALE_KEY:
                target.clamp_(max=LOGIT_SCALE_MAX)

    @torch.no_grad()
    def holds_the_base(self) -> bool:
        """Whether the last `apply` left the base's own weights, bit for bit (alpha 0 of every method
        without per-block rules): the rows evaluated then are the base's, and what the specialists
        were trained on says nothing about them (eval.trained_on)."""
        return all(
            torch.equal(self.targets[key].data, self.base[key].to(self.targets[key].dtype))
            for key in self.keys
        )
