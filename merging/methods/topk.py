"""Exact top-k of task-vector magnitudes over a whole model, streamed key by key, the same on every device.

The TIES paper (and its authors' code, and FusionBench) keeps the top `density` of the whole
flattened task vector, not of each tensor. Flattening a ViT-B model's task vector costs 600 MB
per specialist and breaks the streaming executor, so the cut-off is found by an exact radix
select over float32 bit patterns instead: for non-negative floats the int32 bit pattern orders
exactly like the value, so one histogram of the high 16 bits and one of the low 16 bits inside
the chosen bin give the k-th largest magnitude, reading each tensor twice and holding two
65,536-bin histograms. A third read counts, per key, the entries equal to the cut-off.

Ties at the cut-off are broken by position (keys in checkpoint order, then flat index within a
key), never by `torch.topk`, whose choice among equal values differs between CPU and CUDA.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from micromerge.merging.methods.base import ModelScan

if TYPE_CHECKING:
    import torch

BINS = 1 << 16


def magnitude_bits(tensor: torch.Tensor) -> torch.Tensor:
    """|tensor| as flat int32 bit patterns, which order exactly like the magnitudes."""
    import torch

    return tensor.detach().to(torch.float32).abs().contiguous().reshape(-1).view(torch.int32)


@dataclass(frozen=True)
class TopSet:
    """The `size` largest-magnitude entries of one task vector across a scan's keys.

    Entries above `cutoff_bits` are in; of the entries equal to it, key `k` holds the first
    `ties[k]` in flat-index order. `cutoff_bits` None is the empty set; `everything` the full one.
    """

    cutoff_bits: int | None
    ties: Mapping[str, int] = field(default_factory=dict)
    everything: bool = False

    def mask(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """Which entries of `tensor` (this task vector at `key`) are in the set, as a bool tensor."""
        import torch

        if self.everything:
            return torch.ones(tensor.shape, dtype=torch.bool, device=tensor.device)
        if self.cutoff_bits is None:
            return torch.zeros(tensor.shape, dtype=torch.bool, device=tensor.device)
        bits = magnitude_bits(tensor)
        keep = bits > self.cutoff_bits
        quota = self.ties.get(key, 0)
        if quota:
            equal = bits == self.cutoff_bits
            keep |= equal & (equal.cumsum(0) <= quota)
        return keep.view(tensor.shape)


def _bin_from_top(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """(bin holding the `rank`-th largest entry (1-based), count of entries in higher bins)."""
    import torch

    from_top = hist.flip(0).cumsum(0)
    index = int(torch.searchsorted(from_top, torch.tensor([rank], device=hist.device)).item())
    chosen = BINS - 1 - index
    return chosen, int(from_top[index].item()) - int(hist[chosen].item())


def select_top(scan: ModelScan, sizes: list[list[int]]) -> list[list[TopSet]]:
    """`sizes[i]` lists the set sizes wanted for task vector i; returns the TopSets in the same shape.

    Three reads of every merged key (all task vectors at once), whatever the number of sizes.
    """
    import torch

    keys = scan.merged_keys
    total = sum(scan.numel(key) for key in keys)
    results: list[list[TopSet | None]] = [
        [
            TopSet(None) if size <= 0 else TopSet(None, everything=True) if size >= total else None
            for size in row
        ]
        for row in sizes
    ]
    pending = [
        (i, j, size) for i, row in enumerate(sizes) for j, size in enumerate(row) if results[i][j] is None
    ]
    if not pending:
        return results  # type: ignore[return-value]

    high: dict[int, torch.Tensor] = {}  # per task vector
    for key in keys:
        for i, tau in enumerate(scan.task_vectors(key)):
            counts = torch.bincount(magnitude_bits(tau) >> 16, minlength=BINS)
            high[i] = high[i] + counts if i in high else counts
    chosen = {(i, j): _bin_from_top(high[i], size) for i, j, size in pending}

    low: dict[tuple[int, int], torch.Tensor] = {}
    for key in keys:
        for i, tau in enumerate(scan.task_vectors(key)):
            bits = magnitude_bits(tau)
            for (mi, j), (high_bin, _) in chosen.items():
                if mi != i:
                    continue
                inside = bits[(bits >> 16) == high_bin] & (BINS - 1)
                counts = torch.bincount(inside, minlength=BINS)
                low[(i, j)] = counts if (i, j) not in low else low[(i, j)] + counts
    cutoffs: dict[tuple[int, int], tuple[int, int]] = {}
    for i, j, size in pending:
        high_bin, above_high = chosen[(i, j)]
        low_bin, above_low = _bin_from_top(low[(i, j)], size - above_high)
        cutoffs[(i, j)] = ((high_bin << 16) | low_bin, size - above_high - above_low)

    remaining = {slot: ties for slot, (_, ties) in cutoffs.items()}
    quotas: dict[tuple[int, int], dict[str, int]] = {slot: {} for slot in cutoffs}
    for key in keys:
        taus = scan.task_vectors(key)
        for (i, j), (cutoff, _) in cutoffs.items():
            if remaining[(i, j)] == 0:
                continue
            equal = int((magnitude_bits(taus[i]) == cutoff).sum().item())
            take = min(equal, remaining[(i, j)])
            if take:
                quotas[(i, j)][key] = take
                remaining[(i, j)] -= take
    for (i, j), (cutoff, _) in cutoffs.items():
        results[i][j] = TopSet(cutoff, quotas[(i, j)])
    return results  # type: ignore[return-value]
