"""A merge plan: the validated, per-key decisions made before any tensor is read.

Config flows one way: CLI flags or a config file -> MergeSpec (frozen) -> plan -> execution.
Validation happens here so a bad input fails in milliseconds with a message that names it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

from micromerge.core.errors import MicromergeError
from micromerge.merging.dtypes import FLOAT_DTYPES, OUTPUT_DTYPES, widest_float
from micromerge.merging.methods import GRANULARITIES, SEARCHES, MergeMethod, MethodParams, get_method
from micromerge.merging.methods.task_vectors import RESCALES
from micromerge.merging.rules import KeyRules
from micromerge.merging.tensor_source import TensorMeta, TensorSource, describe_key_mismatch

TOPK_SCOPES = ("model", "tensor")
SLERP_SCOPES = ("tensor", "row")
LOGIT_SCALE_KEY = "logit_scale"
LOGIT_SCALE_MAX = math.log(100.0)


@dataclass(frozen=True)
class MergeSpec:
    method: str
    params: MethodParams = field(default_factory=MethodParams)
    rules: KeyRules = field(default_factory=KeyRules)
    out_dtype: str | None = None
    allow_nonfinite: bool = False

    def describe(self) -> dict:
        method = get_method(self.method)
        described = {
            ("alpha" if name == "strength" else name): getattr(self.params, name) for name in method.uses
        }
        if described.get("weights") is not None:
            described["weights"] = list(described["weights"])
        described.update(
            include=list(self.rules.include),
            exclude=list(self.rules.exclude),
            alpha_rules=[list(rule) for rule in self.rules.strength_rules],
        )
        conventions = method.conventions(self.params)
        if conventions:
            described["conventions"] = conventions
        return described


@dataclass(frozen=True)
class KeyPlan:
    key: str
    meta: TensorMeta
    out_dtype: str
    merged: bool
    strength: float


def check_strength(method: MergeMethod, value: float, label: str) -> None:
    if method.name in ("wise-ft", "slerp") and not 0.0 <= value <= 1.0:
        warnings.warn(
            f"{label}={value} is outside [0, 1]: this extrapolates beyond the two models, not an interpolation",
            stacklevel=2,
        )


def check_method_params(method: MergeMethod, params: MethodParams) -> None:
    """The parameters `method` reads, in range; one line naming the flag otherwise."""
    if "density" in method.uses and not 0.0 < params.density <= 1.0:
        raise MicromergeError(f"--density {params.density}: must be in (0, 1]")
    if "drop_rate" in method.uses and not 0.0 <= params.drop_rate < 1.0:
        raise MicromergeError(f"--drop-rate {params.drop_rate}: must be in [0, 1)")
    if "topk_scope" in method.uses and params.topk_scope not in TOPK_SCOPES:
        raise MicromergeError(f"--topk-scope {params.topk_scope!r}: choose one of {list(TOPK_SCOPES)}")
    if "slerp_scope" in method.uses and params.slerp_scope not in SLERP_SCOPES:
        raise MicromergeError(f"--slerp-scope {params.slerp_scope!r}: choose one of {list(SLERP_SCOPES)}")
    if "rescale" in method.uses and params.rescale is not None and params.rescale not in RESCALES:
        raise MicromergeError(f"--rescale {params.rescale!r}: choose one of {list(RESCALES)}")
    if "offdiag_scale" in method.uses and not 0.0 <= params.offdiag_scale <= 1.0:
        raise MicromergeError(f"--offdiag-scale {params.offdiag_scale}: must be in [0, 1]")
    if "granularity" in method.uses and params.granularity not in GRANULARITIES:
        raise MicromergeError(f"--granularity {params.granularity!r}: choose one of {list(GRANULARITIES)}")
    if "search" in method.uses and params.search not in SEARCHES:
        raise MicromergeError(f"--search {params.search!r}: choose one of {list(SEARCHES)}")
    if "learning_rate" in method.uses and not params.learning_rate > 0:
        raise MicromergeError(f"--learning-rate {params.learning_rate}: must be positive")
    if "gamma" in method.uses and not 0.0 <= params.gamma < 1.0:
        raise MicromergeError(f"--gamma {params.gamma}: must be in [0, 1)")
    if (
        "epsilon" in method.uses
        and params.density < 1
        and not (
            params.density - params.epsilon > 0
            and params.density + params.epsilon < 1
            and params.epsilon >= 0
        )
    ):
        raise MicromergeError(
            f"--epsilon {params.epsilon} with --density {params.density}: density - epsilon and "
            "density + epsilon must lie in (0, 1) (they are the smallest and largest keep probabilities)"
        )


def plan_merge(spec: MergeSpec, base: TensorSource, finetuned: list[TensorSource]) -> list[KeyPlan]:
    method = get_method(spec.method)
    count = len(finetuned)
    if count < method.min_finetuned or (method.max_finetuned is not None and count > method.max_finetuned):
        wanted = (
            f"exactly {method.min_finetuned}"
            if method.min_finetuned == method.max_finetuned
            else f"at least {method.min_finetuned}"
        )
        raise MicromergeError(f"--method {method.name} takes {wanted} --ft checkpoint(s), got {count}")
    if method.name == "linear":
        weights = spec.params.weights
        if weights is not None and len(weights) != count + 1:
            raise MicromergeError(
                f"--weights: linear needs {count + 1} weights (base first, then each --ft), got {len(weights)}"
            )
        if weights is not None and abs(sum(weights) - 1.0) > 1e-6:
            warnings.warn(
                f"--weights sum to {sum(weights):g}, not 1: used as given (no normalisation)", stacklevel=2
            )
        if spec.rules.strength_rules:
            raise MicromergeError(
                "--alpha-rule does not apply to linear (it uses --weights); use wise-ft or task-arithmetic"
            )
    else:
        check_strength(method, spec.params.strength, "--alpha")
        for pattern, value in spec.rules.strength_rules:
            check_strength(method, value, f"--alpha-rule {pattern}")
    check_method_params(method, spec.params)
    if spec.out_dtype is not None and spec.out_dtype not in OUTPUT_DTYPES:
        raise MicromergeError(f"--dtype {spec.out_dtype}: choose one of {sorted(OUTPUT_DTYPES)}")

    base_keys = base.keys()
    merged_keys = [k for k in base_keys if spec.rules.is_merged(k)]
    for pattern in spec.rules.unused_patterns(base_keys):
        warnings.warn(f"rule pattern {pattern!r} matches no key in {base.label}", stacklevel=2)
    if not merged_keys:
        raise MicromergeError("the include/exclude rules leave no key to merge")
    for pattern, value, why in spec.rules.shadowed_strength_rules(base_keys):
        warnings.warn(f"--alpha-rule {pattern}={value:g} sets no key's alpha: {why}", stacklevel=2)
    for source in finetuned:
        _check_compatible(base, source, merged_keys)

    plans = []
    for key in base_keys:
        meta = base.meta(key)
        is_float = meta.dtype in FLOAT_DTYPES
        merged = is_float and key in merged_keys
        out_dtype = meta.dtype
        if spec.out_dtype and is_float:
            out_dtype = OUTPUT_DTYPES[spec.out_dtype]
        elif merged:
            out_dtype = widest_float([meta.dtype, *(source.meta(key).dtype for source in finetuned)])
        plans.append(
            KeyPlan(key, meta, out_dtype, merged, spec.rules.strength_for(key, spec.params.strength))
        )
    return plans


def _check_compatible(base: TensorSource, other: TensorSource, keys: list[str]) -> None:
    """The merged keys must exist with equal shapes in `other`, which may not add keys of its own."""
    base_keys = set(base.keys())
    merged = set(keys)
    reference = {k: base.meta(k).shape for k in keys}
    seen = {k: other.meta(k).shape for k in other.keys() if k in merged or k not in base_keys}
    problem = describe_key_mismatch(reference, seen, "base", "fine-tuned checkpoint")
    if problem:
        raise MicromergeError(
            f"{other.label} does not match the base {base.label} (different architectures?): {problem}; "
            "use --include/--exclude to merge only the shared part"
        )
