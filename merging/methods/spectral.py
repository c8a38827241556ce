"""What TSV-Merge and Iso-C share: merges that work on the spectrum of each layer's task matrix.

Both treat every 2-D tensor except `text_projection` as a task matrix (as their authors' CLIP
code does, and FusionBench after it); every other tensor (biases, norms, embeddings of other
ranks, the logit scale) gets the mean of the task vectors. theta = theta_base + alpha * merged.

SVDs run in float32 on the merge device. The result does not depend on the SVD's sign choices,
but CPU and CUDA LAPACK differ in the last bits: the two agree to about 1e-5, not bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from micromerge.merging.methods.base import Array, MergeMethod, MethodParams, finish
from micromerge.merging.methods.task_vectors import summed

if TYPE_CHECKING:
    import torch

EXCLUDED_MATRICES = ("text_projection",)


def is_task_matrix(key: str, tensor: torch.Tensor) -> bool:
    return tensor.dim() == 2 and key not in EXCLUDED_MATRICES


def mean_task_vector(taus: list[torch.Tensor]) -> torch.Tensor:
    return summed(taus) / len(taus)


class SpectralMerge(MergeMethod):
    """Task matrices go through `merge_matrices`; every other tensor gets the mean task vector."""

    def merge_matrices(self, taus: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def conventions(self, params: MethodParams) -> dict[str, str]:
        return {
            "task_matrices": "every 2-D tensor except text_projection; other tensors: mean task vector",
            "svd": "torch.linalg.svd in float32 on the merge device",
        }

    def merge(self, key, base, finetuned, strength, params: MethodParams, out=None, context=None) -> Array:
        taus = [ft - base for ft in finetuned]
        merged = self.merge_matrices(taus) if is_task_matrix(key, base) else mean_task_vector(taus)
        merged *= strength
        merged += base
        return finish(merged, out)
