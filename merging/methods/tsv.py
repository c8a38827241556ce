"""TSV-Merge (Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task Interference in
Model Merging").

Each task matrix keeps its top r = int(min(m, n) / T) singular triplets (T tasks); the kept U
columns and V rows are concatenated in task order, each concatenation replaced by its nearest
orthogonal matrix (the polar factor P Q^T of its SVD P S Q^T: the decorrelation step), and the
matrix rebuilt with the concatenated singular values. With one specialist every triplet is
kept and the result is task arithmetic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from micromerge.merging.methods.spectral import SpectralMerge

if TYPE_CHECKING:
    import torch


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal matrix nearest to `matrix`: P Q^T from its thin SVD P S Q^T."""
    import torch

    left, _, right = torch.linalg.svd(matrix, full_matrices=False)
    return left @ right


class TaskSingularVectors(SpectralMerge):
    def merge_matrices(self, taus: list[torch.Tensor]) -> torch.Tensor:
        import torch

        first = taus[0]
        rank = min(first.shape)
        kept = int(rank * (1.0 / len(taus)))
        left = torch.zeros(first.shape[0], rank, dtype=first.dtype, device=first.device)
        values = torch.zeros(rank, dtype=first.dtype, device=first.device)
        right = torch.zeros(rank, first.shape[1], dtype=first.dtype, device=first.device)
        for index, tau in enumerate(taus):
            u, s, vh = torch.linalg.svd(tau, full_matrices=False)
            span = slice(index * kept, (index + 1) * kept)
            left[:, span], values[span], right[span, :] = u[:, :kept], s[:kept], vh[:kept, :]
        return polar_factor(left) @ torch.diag(values) @ polar_factor(right)


METHOD = TaskSingularVectors(
    "tsv",
    "TSV-Merge: per layer, each task's top 1/T singular triplets, decorrelated (polar factors), scaled by --alpha",
    1,
    None,
    ("strength",),
    default_strength=1.0,
)
