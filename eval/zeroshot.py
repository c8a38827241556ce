"""CLIP zero-shot classification: prompt-ensembled class embeddings, cosine logits, argmax."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from micromerge.eval.images import PixelFeed
from micromerge.eval.tasks import Task

if TYPE_CHECKING:
    from micromerge.merging.models import ClipModel, Tokenizer


def effective_precision(device: torch.device, precision: str) -> str:
    """What the image forward runs in: bf16 autocast on a GPU when asked; on CPU it is slower here,
    so fp32 whatever was asked."""
    return "bf16" if device.type == "cuda" and precision == "bf16" else "fp32"


def autocast_for(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    if effective_precision(device, precision) == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def class_embeddings(
    model: ClipModel,
    tokenizer: Tokenizer,
    task: Task,
    device: torch.device,
    prompts: str = "names",
    token_cache: dict | None = None,
) -> torch.Tensor:
    """[C, D]: per class, the mean of its normalised prompt embeddings, renormalised."""
    if prompts == "captions":
        texts_per_class = [[caption] for caption in task.class_captions]
    else:
        texts_per_class = [
            [template.format(text) for template in task.templates] for text in task.class_texts
        ]
    flat = [t for texts in texts_per_class for t in texts]
    key = (id(tokenizer), tuple(flat))
    tokens = token_cache.get(key) if token_cache is not None else None
    if tokens is None:
        tokens = tokenizer(flat)
        if token_cache is not None:
            token_cache[key] = tokens
    embeddings = F.normalize(model.encode_text(tokens.to(device)).float(), dim=-1)
    per_class = embeddings.split([len(texts) for texts in texts_per_class])
    return F.normalize(torch.stack([e.mean(dim=0) for e in per_class]), dim=-1)


@torch.no_grad()
def image_embeddings(
    model: ClipModel, pixels: PixelFeed, batch_size: int = 256, precision: str = "fp32"
) -> torch.Tensor:
    """[N, D] normalised image embeddings for the feed's rows, in large batches."""
    outputs = []
    with autocast_for(pixels.device, precision):
        for start in range(0, len(pixels), batch_size):
            batch = pixels.batch(start, start + batch_size)
            outputs.append(F.normalize(model.encode_image(batch).float(), dim=-1))
    return torch.cat(outputs) if outputs else torch.empty(0)


def predict(image_emb: torch.Tensor, class_emb: torch.Tensor) -> np.ndarray:
    return (image_emb @ class_emb.T).argmax(dim=1).cpu().numpy()


@torch.no_grad()
def text_embeddings(
    model: ClipModel,
    tokenizer: Tokenizer,
    texts: list[str],
    device: torch.device,
    token_cache: dict,
    batch_size: int = 1024,
) -> torch.Tensor:
    """[T, D] normalised embeddings of distinct texts; tokens are cached across models (alphas)."""
    key = (id(tokenizer), "texts", len(texts), hash(tuple(texts)))
    tokens = token_cache.get(key)
    if tokens is None:
        tokens = token_cache[key] = tokenizer(texts)
    outputs = [
        F.normalize(model.encode_text(tokens[start : start + batch_size].to(device)).float(), dim=-1)
        for start in range(0, len(texts), batch_size)
    ]
    return torch.cat(outputs)


def option_correct(
    image_emb: torch.Tensor, text_emb: torch.Tensor, options: torch.Tensor, answers: torch.Tensor
) -> np.ndarray:
    """Per image, argmax of cosine similarity over ITS OWN options (ids into `text_emb`, -1 =
    padding), compared with its answer index: the μ-Bench authors' rule for CLIP-style models."""
    scores = (image_emb @ text_emb.T).gather(1, options.clamp(min=0))
    scores = scores.masked_fill(options < 0, float("-inf"))
    return (scores.argmax(dim=1) == answers).cpu().numpy()
