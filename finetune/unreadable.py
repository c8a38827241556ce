"""Unreadable samples in a stream: left out of the loss, counted, and bounded by --max-bad-fraction.

The in-memory path decodes every image first, drops the unreadable ones and refuses a corpus with
more than --max-bad-fraction of them before training. A stream cannot look ahead, and it used to
stop at the first unreadable image: on a scraped corpus of a million images (Quilt-1M, PLIP's
Twitter pairs) a few always are, so the only way on was to clean the whole corpus first.
open_clip_train skips them (webdataset's `log_and_continue` handler). Here a stream's batches keep
their size (an index plan fixes each batch's samples, and the DDP gather needs equal rows), so an
unreadable sample stays in its batch and is masked out of the loss (finetune/losses.py): the step
trains on exactly its readable samples, and a resumed run masks the same ones. The count is
checked against --max-bad-fraction at every loss read, over all the samples every process has
read so far, and recorded in the run's state and manifest. The note and the error name the first
few samples this process skipped, where the stream names them (a file, a tar member, an index row;
a hub stream's rows have no name): the count alone left a user to search a corpus for them. Every
named one is listed in the run folder's unreadable.txt, gathered from every process at each save
(kept in the saved state, so a resumed run's list holds the samples skipped before it).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from micromerge.core.errors import MicromergeError

if TYPE_CHECKING:
    from accelerate import Accelerator

WHAT = "unreadable or without a caption (none, blank, or a .json caption that is not text, such as a list)"
NAMED = 3
"""How many unreadable samples a message names."""


def first_named(names: tuple[str, ...], lead: str = " (", end: str = ")") -> str:
    """` (the first: a, b)` for a message, or nothing when the stream named none. Under a launch,
    each process names the samples it read."""
    return f"{lead}the first: {', '.join(names[:NAMED])}{end}" if names else ""


def too_many(unreadable: int, read: int, max_fraction: float) -> bool:
    """Whether a fine-tune stops: more than --max-bad-fraction of the samples read are unreadable."""
    return unreadable > max_fraction * read


@dataclass
class UnreadableCount:
    """Samples read and found unreadable: the totals over every process as of the last check (the
    same on every process), and this process's since then."""

    data: str
    max_fraction: float
    read: int = 0
    unreadable: int = 0
    listed: list[str] = field(default_factory=list)  # every process's named ones, as of the last gather
    read_here: int = 0
    unreadable_here: int = 0
    named_here: list[str] = field(default_factory=list)  # this process's since the last gather
    names: tuple[str, ...] = ()  # the first this process read since it started or resumed, for messages

    def add(self, read: int, unreadable: int, names: tuple[str, ...]) -> None:
        self.read_here += read
        self.unreadable_here += unreadable
        self.named_here.extend(names)
        self.names = (*self.names, *names[: NAMED - len(self.names)])

    def gather(self) -> None:
        """Every process's named samples since the last gather onto the list, each once (a sample
        of every epoch is read again). A collective: called by every process, at each save and at
        the end."""
        from accelerate.utils import gather_object

        # one list per process: gather_object joins the lists it is handed
        everywhere = gather_object([self.named_here])
        self.listed = list(dict.fromkeys([*self.listed, *(name for names in everywhere for name in names)]))
        self.named_here = []

    def check(self, accelerator: Accelerator, step: int, say: bool) -> None:
        """Add every process's counts since the last check (one all-reduce), and stop the run
        when more than --max-bad-fraction of the samples read so far were unreadable. The first
        time any are skipped, `say` prints how many (through tqdm, above a live progress bar)."""
        here = torch.tensor([self.read_here, self.unreadable_here], dtype=torch.float64)
        everywhere = accelerator.reduce(here.to(accelerator.device), reduction="sum").cpu()
        earlier = self.unreadable
        self.read += int(everywhere[0])
        self.unreadable += int(everywhere[1])
        self.read_here = self.unreadable_here = 0
        if too_many(self.unreadable, self.read, self.max_fraction):
            raise MicromergeError(
                f"--data {self.data}: {self.unreadable} of the {self.read} samples read by step {step} were "
                f"{WHAT} ({self.unreadable / self.read:.1%}, more than --max-bad-fraction {self.max_fraction:g}"
                f"{first_named(self.names, lead='; ', end='')}); "
                "fix the corpus, or raise --max-bad-fraction to train on the rest (with --resume: from the last "
                "checkpoint)"
            )
        if say and self.unreadable and not earlier:
            tqdm.write(
                f"note: {self.unreadable} of the {self.read} samples read by step {step} were "
                f"{WHAT}{first_named(self.names)}: "
                f"left out of the loss (up to --max-bad-fraction {self.max_fraction:g} are); the manifest "
                "counts them",
                file=sys.stderr,
            )

    def state(self) -> dict[str, Any]:
        """What a saved state records, so a resumed run goes on counting (and listing) from there."""
        return {"read": self.read, "unreadable": self.unreadable, "names": self.listed}

    def restore(self, saved: dict[str, Any] | None) -> None:
        """The counts of a saved state (none in a state written before 0.1.14: counted from zero;
        no names before 0.1.15)."""
        self.read, self.unreadable = (saved["read"], saved["unreadable"]) if saved else (0, 0)
        self.listed = list(saved.get("names", [])) if saved else []
