"""Stop a fine-tune that diverged before it saves anything of it.

`--lr 1e6` ran to the end, wrote a model.safetensors of NaN weights with exit code 0, and a
manifest whose loss summary held `NaN`, which strict JSON readers refuse. A non-finite loss, or
weights that became non-finite, now end the run with one line before the next save: the saved
states are the ones before the divergence. Each check is one all-reduce, so every process of a
launch stops at the same step (the processes' losses differ under the contrastive gather).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from micromerge.core.errors import MicromergeError

if TYPE_CHECKING:
    from accelerate import Accelerator

FIX = "lower --lr (or clip gradients with --grad-clip) and start over with --force"


def _count_anywhere(accelerator: Accelerator, bad: torch.Tensor) -> int:
    """How many processes saw something non-finite (the same answer on every process)."""
    return int(accelerator.reduce(bad.to(accelerator.device, torch.float32), reduction="sum").item())


def refuse_diverged_losses(
    accelerator: Accelerator, pending: list[tuple[int, float, float, torch.Tensor]]
) -> None:
    """The pending steps' losses (step, learning rate, images/s, loss) are all finite, on every process."""
    bad_here = ~torch.isfinite(torch.stack([loss.detach().float().reshape(()) for *_, loss in pending]))
    if not _count_anywhere(accelerator, bad_here.any()):
        return
    if bad_here.any():
        step, lr, _, loss = pending[int(bad_here.nonzero()[0].item())]
        what = f"the loss became {float(loss)} at step {step} (learning rate {lr:.3g})"
    else:
        what = f"another process's loss became non-finite by step {pending[-1][0]}"
    raise MicromergeError(f"{what}: training diverged; {FIX}")


def refuse_diverged_weights(accelerator: Accelerator, parameters: Iterable[torch.Tensor], step: int) -> None:
    """Every weight is finite (checked before a save: an update can overflow after a finite loss)."""
    bad = torch.zeros((), dtype=torch.bool, device=accelerator.device)
    for parameter in parameters:
        bad |= ~torch.isfinite(parameter.detach()).all()
    if _count_anywhere(accelerator, bad):
        raise MicromergeError(
            f"the weights became non-finite (NaN or inf) by step {step}: training diverged; {FIX}"
        )
