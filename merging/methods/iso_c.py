"""Iso-C (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces").

The summed task matrix M = U S V^T is replaced by mean(S) U V^T: a flat spectrum, so no
direction of any one task dominates the merge. With one specialist it flattens that
specialist's own spectrum.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from micromerge.merging.methods.spectral import SpectralMerge
from micromerge.merging.methods.task_vectors import summed

if TYPE_CHECKING:
    import torch


class IsotropicMerge(SpectralMerge):
    def merge_matrices(self, taus: list[torch.Tensor]) -> torch.Tensor:
        import torch

        u, s, vh = torch.linalg.svd(summed(taus), full_matrices=False)
        return (u * s.mean()) @ vh


METHOD = IsotropicMerge(
    "iso-c",
    "Iso-C: per layer, the summed task matrix with its singular values replaced by their mean, scaled by --alpha",
    1,
    None,
    ("strength",),
    default_strength=1.0,
)
