"""Questions from an image-caption corpus: statistics estimated on each model's own data.

Fisher merging's authors estimate each model's Fisher on the data that model was trained for, and
RegMean's Gram matrices are the inputs a model sees on its own task. For a CLIP specialist that is
its fine-tuning corpus (for the base, a general corpus), in any format `finetune` reads. Each
drawn image is asked the contrastive question it was trained on: which of its own caption and up
to CORPUS_OPTIONS - 1 other distinct captions of the corpus (drawn with the seed) is it? As on
μ-Bench, no label is read: Fisher's targets are the model's own predictions among those options.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from micromerge.core.errors import MicromergeError
from micromerge.eval.images import ImageCache, PixelFeed
from micromerge.eval.pairs import PairData, decode_checked, load_pairs
from micromerge.eval.questions import Questions
from micromerge.merging.models import image_size, normalisation, tokenizer_for

CORPUS_OPTIONS = 8
MAX_BAD_FRACTION = 0.5


@dataclass(frozen=True)
class CorpusBank:
    """A corpus's drawn images and its distinct captions, as `eval.questions.QuestionBank`."""

    pixels: PixelFeed
    texts: list[str]
    tokenizer: Any
    device: torch.device


def open_corpus(spec: str) -> tuple[PairData, dict[str, Any]]:
    """The corpus and what it is (recorded, and part of the statistics cache key)."""
    pairs = load_pairs(spec)
    if len(set(pairs.captions)) < 2:
        raise MicromergeError(f"statistics data {spec}: needs at least 2 distinct captions to ask a question")
    described = {
        "data": spec,
        "data_fingerprint": pairs.fingerprint()[:16],
        "split": "corpus",
        "questions": f"each image against its own caption and up to {CORPUS_OPTIONS - 1} other distinct captions",
    }
    return pairs, described


def corpus_questions(
    pairs: PairData,
    model_config: dict[str, Any],
    samples: int,
    seed: int,
    device: torch.device,
    progress: bool,
) -> tuple[CorpusBank, Questions]:
    """`samples` seeded image-caption pairs of the corpus as questions."""
    distinct = sorted(set(pairs.captions))
    rng = np.random.default_rng(seed)
    drawn = np.sort(rng.permutation(len(pairs.payloads))[:samples])
    decoded = decode_checked(
        [pairs.payloads[i] for i in drawn],
        [pairs.captions[i] for i in drawn],
        image_size(model_config),
        MAX_BAD_FRACTION,
        pairs.source,
        progress,
    )
    index = {text: i for i, text in enumerate(distinct)}
    width = min(CORPUS_OPTIONS, len(distinct))
    options = np.empty((len(decoded.targets), width), dtype=np.int64)
    for row, caption in enumerate(decoded.targets):
        others = [i for i in rng.choice(len(distinct), size=width, replace=False) if i != index[caption]]
        options[row] = [index[caption], *others[: width - 1]]
    count = len(decoded.targets)
    feed = PixelFeed(
        ImageCache(decoded.pixels, np.ones(count, dtype=bool)),
        np.arange(count),
        *normalisation(model_config),
        device,
    )
    return CorpusBank(feed, distinct, tokenizer_for(model_config), device), Questions(
        np.arange(count), options
    )
