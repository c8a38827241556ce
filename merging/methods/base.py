"""What a merge method is: a per-tensor function of the base and the fine-tuned tensors.

Methods see float32 arrays on the compute device, one key at a time, so the executor can
stream checkpoints and the sweep engine can write merged weights straight into a resident
model. `strength` is the method's scalar (WiSE-FT alpha, task-arithmetic lambda, SLERP t),
which per-key rules may override.

A few methods need a statistic of the whole model before any tensor is merged (TIES's
whole-model top-k cut-off, LiNeS's block depth). They compute it in `prepare`, from a
`ModelScan` that reads the task vectors key by key (so the streaming executor still holds
one tensor per input at a time), and receive it back as `context` in every `merge` call.
A context never depends on `strength`, so a sweep prepares once for all its alphas.

An `elementwise` method uses arithmetic operators and `out[...] =` only, so the same code runs
on torch tensors and numpy arrays with the same float32 operations in the same order: the
numpy engine (no torch import) and the torch engine write identical bytes. Methods that need
torch's functions (TIES, DARE, SLERP) import it inside those functions, so the registry
itself loads without torch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Array = Any
"""A torch.Tensor (torch engine, sweeps) or, for elementwise methods, a numpy.ndarray."""


@dataclass(frozen=True)
class MethodParams:
    """Every knob any method reads; each method documents which ones it uses."""

    strength: float = 0.5
    weights: tuple[float, ...] | None = None
    density: float = 0.2
    drop_rate: float = 0.9
    seed: int = 0
    topk_scope: str = "model"
    """TIES/Breadcrumbs: rank magnitudes over the whole task vector ("model", the TIES paper) or per tensor."""
    slerp_scope: str = "tensor"
    """SLERP: one angle per tensor (mergekit <= 0.1.4) or per output row ("row", mergekit 0.1.5)."""
    gamma: float = 0.01
    """Breadcrumbs: fraction of the largest task-vector magnitudes dropped (mergekit's default)."""
    epsilon: float = 0.15
    """DELLA: keep probabilities span density +/- epsilon from the smallest to the largest rank."""
    rescale: str | None = None
    """DARE/DELLA: kept entries divided by their keep probability ("inverse", the papers) or each
    tensor's L1 norm restored ("l1", mergekit); None: the method's own (DARE "inverse", as its paper;
    DELLA "l1", as mergekit defines it), which `param_defaults` also fills in for the CLI."""
    beta: float = 0.5
    """LiNeS: the last block's scale minus the first block's."""
    samples: int = 256
    """Fisher/RegMean: select-half questions the statistics are estimated on (FusionBench's default)."""
    offdiag_scale: float = 0.95
    """RegMean: Gram off-diagonals multiplied by this (FusionBench's CLIP default)."""
    granularity: str = "layer"
    """AdaMerging/supervised α: one coefficient per specialist ("task"), per residual block ("block")
    or per parameter tensor ("layer")."""
    search: str = "gradient"
    """Supervised α: Adam on the zero-shot cross-entropy ("gradient") or a coordinate grid search ("grid")."""
    steps: int = 200
    """AdaMerging/supervised α: Adam steps (FusionBench runs 1000 on GPUs; 200 suits the embedded default)."""
    learning_rate: float = 1e-3
    """AdaMerging/supervised α: Adam's learning rate (FusionBench's CLIP default)."""
    init: float = 0.3
    """AdaMerging/supervised α: every coefficient's starting value (AdaMerging's prior)."""


GRANULARITIES = ("task", "block", "layer")
"""Learned coefficients: one per specialist, per residual block (and each tower's embeddings and
head), or per parameter tensor."""
SEARCHES = ("gradient", "grid")

TUNABLE = (
    "density",
    "drop_rate",
    "topk_scope",
    "slerp_scope",
    "gamma",
    "epsilon",
    "rescale",
    "beta",
    "samples",
    "offdiag_scale",
    "granularity",
    "search",
    "steps",
    "learning_rate",
    "init",
)
"""The MethodParams fields a user sets by name: `merge`/`sweep` flags (--drop-rate for drop_rate) and
config keys. strength (--alpha), weights and seed have flags of their own."""


@dataclass(frozen=True)
class ModelScan:
    """What `prepare` may read: the merged keys in checkpoint order and their float32 tensors.

    `read(key)` returns (base, [fine-tuned ...]) on the compute device; the order of
    `merged_keys` is the order in which ties at a whole-model cut-off are broken.
    """

    all_keys: tuple[str, ...]
    merged_keys: tuple[str, ...]
    read: Callable[[str], tuple[Array, list[Array]]]
    numel: Callable[[str], int]
    statistics: tuple[dict[str, Any], ...] | None = None
    """Data-aware methods: per model (base first), statistics keyed by state-dict key."""

    def task_vectors(self, key: str) -> list[Array]:
        base, finetuned = self.read(key)
        return [tensor - base for tensor in finetuned]


def single_tensor_scan(key: str, base: Array, finetuned: list[Array]) -> ModelScan:
    """A scan of a model made of this one tensor: what per-tensor scope and direct calls use."""
    return ModelScan((key,), (key,), lambda _key: (base, finetuned), lambda _key: math.prod(base.shape))


@dataclass(frozen=True)
class MergeMethod:
    name: str
    summary: str
    min_finetuned: int
    max_finetuned: int | None
    uses: tuple[str, ...]
    stochastic: bool = False
    elementwise: bool = False
    default_strength: float = 0.5
    """The --alpha used when none is given (1.0 where the paper's method has no scalar)."""
    statistics: str | None = None
    """What a data-aware method merges with: per-model statistics ("fisher", "gram") or coefficients
    learned on the select half ("adamerging", "supervised"); None: data-free."""
    param_defaults: tuple[tuple[str, Any], ...] = ()
    """MethodParams defaults this method sets otherwise (the supervised α's granularity is "block")."""
    same_with_one_finetuned: str | None = None
    """The method this one equals when merging a single fine-tuned model (a sign election over one
    model keeps every entry): an ablation that runs both skips this one on a one-specialist pair."""

    @property
    def takes_alpha(self) -> bool:
        """Whether --alpha (and so a sweep over α) changes its merge: linear weighs by --weights."""
        return "strength" in self.uses

    def prepare(self, scan: ModelScan, params: MethodParams) -> Any:
        """Whole-model statistics `merge` needs as `context`; None for per-tensor methods."""
        return None

    def conventions(self, params: MethodParams) -> dict[str, str]:
        """The choices that another tool may make differently, recorded in every manifest."""
        return {}

    def merge(
        self,
        key: str,
        base: Array,
        finetuned: list[Array],
        strength: float,
        params: MethodParams,
        out: Array | None = None,
        context: Any = None,
    ) -> Array:
        raise NotImplementedError


def key_seed(seed: int, key: str, index: int) -> int:
    """A per-(seed, tensor, model) RNG seed, so stochastic merges do not depend on key order or device."""
    digest = hashlib.sha256(f"{seed}|{key}|{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def finish(result: Array, out: Array | None) -> Array:
    if out is None:
        return result
    out[...] = result
    return out
