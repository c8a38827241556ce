"""Fine-tuning configuration: flags and/or a [finetune] config table become this frozen dataclass."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from micromerge.core.config_schema import refuse_blank, refuse_unknown_keys
from micromerge.core.errors import MicromergeError
from micromerge.core.hashing import sha256_json

# Recorded with the hyper-parameters, but guards of a run rather than what it trains: a run stopped
# by --max-bad-fraction (a stream that met more unreadable images than it allows) is resumed with
# a larger one, not trained again from the start.
RUN_GUARDS = frozenset({"max_bad_fraction"})

DEFAULT_MAX_BAD_FRACTION = 0.05
"""The fraction of unreadable samples a fine-tune takes in its stride (and `data check` judges by)."""


@dataclass(frozen=True)
class FinetuneConfig:
    mode: str  # contrastive | supervised
    base: str
    data: str
    out: Path
    task: str | None = None
    arch: str | None = None
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 64
    accum_steps: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.1
    warmup_steps: int = 0
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "bf16"
    device: str = "auto"
    save_every: int = 0
    freeze_text: bool | None = None  # default: True for supervised, False for contrastive
    freeze: tuple[str, ...] = ()
    lp_epochs: int = 0
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION
    resume: bool = False
    force: bool = False
    allow_pickle: bool = False
    progress: bool = True
    domain: str | None = None  # what the specialist is for (recorded in the manifest, used by analysis)
    data_in_memory: str = "auto"  # auto | yes | no: decode everything once, or stream (finetune.streaming)
    augment: tuple[str, ...] = ()  # names from finetune.augment.AUGMENTATIONS, applied in order
    workers: int = 2  # DataLoader worker processes on the streaming path

    def __post_init__(self) -> None:
        if self.mode not in ("contrastive", "supervised"):
            raise MicromergeError(f"finetune mode {self.mode!r}: expected contrastive or supervised")
        if self.mode == "supervised" and not self.task:
            raise MicromergeError(
                "finetune supervised: --task is required (a task name from `micromerge tasks --data ...`)"
            )
        for name, low in (("epochs", 1), ("batch_size", 1), ("accum_steps", 1), ("max_steps", 1),
                          ("warmup_steps", 0), ("save_every", 0), ("lp_epochs", 0), ("seed", 0)):  # fmt: skip
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise MicromergeError(
                    f"--{name.replace('_', '-')} {value}: must be an integer of at least {low}"
                )
        for name, floor, strict in (
            ("lr", 0.0, True),
            ("weight_decay", 0.0, False),
            ("grad_clip", 0.0, False),
        ):
            value = getattr(self, name)
            if not math.isfinite(value) or value < floor or (strict and value == floor):
                bound = f"> {floor:g}" if strict else f">= {floor:g}"
                raise MicromergeError(f"--{name.replace('_', '-')} {value}: must be a finite number {bound}")
        if self.resume and self.force:
            # --force discarded the run --resume was asked to continue: a script that always resumes
            # lost its checkpoints the day --force was added to it
            raise MicromergeError(
                "--resume and --force: one continues the run in --out, the other discards it; give one"
            )
        if self.precision not in ("no", "bf16", "fp16"):
            raise MicromergeError(f"--precision {self.precision}: expected no, bf16 or fp16")
        if not 0 <= self.max_bad_fraction <= 1:
            raise MicromergeError(f"--max-bad-fraction {self.max_bad_fraction}: must be in [0, 1]")
        if self.device not in ("auto", "cpu", "cuda"):
            # accelerate places each process on its own GPU: a `cuda:1` was trained on cuda:0
            raise MicromergeError(
                f"--device {self.device}: expected auto, cpu or cuda (fine-tuning runs on the GPU accelerate "
                "gives each process; choose one with CUDA_VISIBLE_DEVICES=N)"
            )
        if self.data_in_memory not in ("auto", "yes", "no"):
            raise MicromergeError(f"--data-in-memory {self.data_in_memory}: expected auto, yes or no")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise MicromergeError(f"--workers {self.workers}: must be an integer of at least 0")
        if self.mode == "supervised" and self.freeze_text is False:
            # the head scores the images: the text tower is not in the forward pass, so it got no
            # gradient and came out as it went in, while the manifest recorded it as trained
            raise MicromergeError(
                "finetune supervised: --train-text would train nothing (the head, not the text tower, scores "
                "the images, so the text tower gets no gradient); drop it, or train the text tower with "
                "`finetune contrastive`"
            )
        if self.mode == "contrastive" and (self.task or self.lp_epochs):
            given = "task" if self.task else "lp_epochs"
            raise MicromergeError(
                f"finetune contrastive: {given} applies to supervised fine-tuning only (a task's labels, "
                "a linear-probe head); remove it, or run `finetune supervised`"
            )
        from micromerge.finetune.augment import check_augment

        check_augment(self.augment)

    @property
    def text_frozen(self) -> bool:
        return self.mode == "supervised" if self.freeze_text is None else self.freeze_text

    def hyperparameters(self) -> dict[str, Any]:
        # how the data is read (in memory or streamed, by how many workers) does not change a result
        skip = {"out", "resume", "force", "progress", "allow_pickle", "device", "data_in_memory", "workers"}
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        if not self.augment:  # runs from before augmentation existed keep their digest
            del values["augment"]
        else:
            values["augment"] = list(self.augment)
        values["freeze"] = list(self.freeze)
        values["freeze_text"] = self.text_frozen
        return values

    def resume_digest(self) -> str:
        """What a saved state must match to be resumed with these settings: the hyper-parameters
        but the run's guards (RUN_GUARDS)."""
        return sha256_json({k: v for k, v in self.hyperparameters().items() if k not in RUN_GUARDS})


def config_from_mapping(values: dict[str, Any]) -> FinetuneConfig:
    known = {f.name for f in fields(FinetuneConfig)}
    refuse_unknown_keys("finetune config", values, known)
    refuse_blank(values, {})
    for required in ("mode", "base", "data", "out"):
        if not values.get(required):
            raise MicromergeError(f"finetune: --{required} is required")
    values = dict(values)
    values["out"] = Path(values["out"])
    values["freeze"] = tuple(values.get("freeze") or ())
    values["augment"] = tuple(values.get("augment") or ())
    return FinetuneConfig(**values)
