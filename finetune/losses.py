"""Losses: CLIP's symmetric InfoNCE, and cross-entropy through a zero-shot-initialised head."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from micromerge.merging.models import ClipModel

IGNORED = -100  # the target cross_entropy leaves out of its mean (its ignore_index)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    across_ranks: bool = False,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy over the in-batch similarities.

    Across ranks (DDP), every rank's features join the batch, as open_clip's ClipLoss does: each
    image's negatives are the whole global batch, so N processes of batch B train like one of
    batch N x B (without it, DDP would train N separate B-way contrastive tasks). The features are
    gathered with their gradient, so after DDP's averaging every rank holds the gradient of the
    global loss.

    `keep` (one flag per row of the whole batch, every rank's included) leaves the unreadable
    samples of a stream out (finetune/unreadable.py): the loss is then exactly the loss over the
    kept pairs alone, and the left-out rows get no gradient. A kept row is not compared with a
    left-out one (its logit is -inf, so it adds nothing to the softmax); a left-out row is ignored
    by the cross-entropy and left unmasked, so no row is all -inf and no NaN reaches a gradient.
    With every row kept, the numbers are the unmasked ones, bit for bit."""
    if across_ranks:
        image_features = _GatherWithGradient.apply(image_features)
        text_features = _GatherWithGradient.apply(text_features)
    logits = logit_scale * image_features @ text_features.T
    targets = torch.arange(len(logits), device=logits.device)
    by_text = logits.T
    if keep is not None:
        left_out = keep[:, None] & ~keep[None, :]
        logits, by_text = logits.masked_fill(left_out, -torch.inf), by_text.masked_fill(left_out, -torch.inf)
        targets = targets.masked_fill(~keep, IGNORED)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(by_text, targets)) / 2


class _GatherWithGradient(torch.autograd.Function):
    """Every rank's rows, concatenated in rank order; the gradient of the whole goes back to each
    rank's own rows, summed over the ranks (each rank's loss uses every row). The same as
    `torch.distributed.nn.functional.all_gather`, which torch 2.14 deprecates for a private API."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        ctx.rank, ctx.count = dist.get_rank(), len(rows)
        gathered = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, rows.contiguous())
        return torch.cat(gathered)

    @staticmethod
    def backward(ctx: Any, gradient: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        gradient = gradient.contiguous()
        dist.all_reduce(gradient)
        return gradient[ctx.rank * ctx.count : (ctx.rank + 1) * ctx.count]


class ZeroShotHead(torch.nn.Module):
    """A linear head over normalised image features, initialised from class text embeddings (WiSE-FT's head)."""

    def __init__(self, class_embeddings: torch.Tensor, logit_scale: float):
        super().__init__()
        self.weight = torch.nn.Parameter(class_embeddings.clone() * logit_scale)
        self.bias = torch.nn.Parameter(torch.zeros(len(class_embeddings)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features, dim=-1) @ self.weight.T + self.bias


class ImageClassifier(torch.nn.Module):
    """The CLIP model (text tower unused) plus the head: what supervised fine-tuning trains."""

    def __init__(self, clip: ClipModel, head: ZeroShotHead):
        super().__init__()
        self.clip = clip
        self.head = head

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.clip.encode_image(pixels))
