"""What an evaluation or a sweep is asked to do, as plain frozen dataclasses: the flags of `eval`,
`sweep` and `soup` (EvalSettings) and a sweep's models, method and alphas (SweepPlan), each checked
where it is made, so a bad value stops a command before any work."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from micromerge.core.errors import MicromergeError
from micromerge.eval.setting_values import PRECISIONS, PROMPTS, PROTOCOLS
from micromerge.merging.plan import MergeSpec
from micromerge.merging.sources import CheckpointAccess

HALVES = "per-image"
"""How the benchmark is split into select and report halves; part of every run id, so results of
the earlier per-task split are never mixed with these."""
MAX_BOOTSTRAP = 100_000
MIN_BOOTSTRAP = 40
"""The fewest resamples whose 2.5 % tails hold one draw each: `--bootstrap 1` printed an interval
of zero width around one resample's value, an interval no reader should be shown."""


def check_bootstrap(resamples: int) -> None:
    """The resample count every evaluation takes; checked where a command starts (the demo's
    sweeps come after minutes of training)."""
    if not 0 <= resamples <= MAX_BOOTSTRAP:
        raise MicromergeError(f"--bootstrap {resamples}: must be in [0, {MAX_BOOTSTRAP:,}] (0: no intervals)")
    if 0 < resamples < MIN_BOOTSTRAP:
        raise MicromergeError(
            f"--bootstrap {resamples}: a 95% percentile interval needs at least {MIN_BOOTSTRAP} resamples "
            "(fewer leave a 2.5% tail less than one draw; 1000 is usual), or 0 for no intervals"
        )


def select_half(settings: EvalSettings) -> dict[str, Any]:
    """Which images statistics, learned coefficients and a soup's choice draw from: the select half
    of the halves --seed draws (`Evaluator`). Part of their cache key and provenance: without the seed, a
    sweep under --seed 3 reused a table `merge --seed 3` had learned on seed 0's select half, half
    of whose images are in seed 3's report half (`eval.trained_on.refuse_other_halves`)."""
    return {"split": "select", "halves_seed": settings.seed}


@dataclass(frozen=True)
class EvalSettings:
    data: str
    store: Path
    cache_dir: Path
    tasks: str = "all"
    batch_size: int = 256
    precision: str = "bf16"
    bootstrap: int = 1000
    seed: int = 0
    prompts: str = "names"
    protocol: str = "ubench"
    sources: Path | None = None  # overrides of the source metadata table
    progress: bool = True
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise MicromergeError(f"--batch-size {self.batch_size}: must be at least 1")
        check_bootstrap(self.bootstrap)
        if self.seed < 0:
            raise MicromergeError(f"--seed {self.seed}: must be non-negative")
        if self.protocol not in PROTOCOLS:
            raise MicromergeError(f"--protocol {self.protocol!r}: expected one of {', '.join(PROTOCOLS)}")
        if self.precision not in PRECISIONS:
            raise MicromergeError(f"--precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.prompts not in PROMPTS:
            raise MicromergeError(f"--prompts {self.prompts!r}: expected one of {', '.join(PROMPTS)}")
        if self.protocol == "ubench" and self.prompts != "names":
            # it changed nothing but the run id: the same numbers stored again as another run
            raise MicromergeError(
                f"--prompts {self.prompts}: applies to --protocol closed-set only (the ubench protocol "
                "scores each image against its own caption options, not prompts)"
            )


@dataclass(frozen=True)
class SweepPlan:
    base: str
    finetuned: tuple[str, ...]
    spec: MergeSpec
    alphas: tuple[float, ...]
    access: CheckpointAccess = CheckpointAccess()
    label: str | None = (
        None  # a name for reports (ablations name pair/method/rule set); not part of the run id
    )
    model_data: tuple[str | None, ...] = ()  # Fisher/RegMean: per model (base first), a corpus of its own
    # the process the first alpha is dealt to: a grid of sweeps deals each on from where the last
    # left off, so its processes finish together (from process 0 each time, process 0 took the
    # remainder of every sweep, and the others waited on it at the grid's end)
    first_process: int = 0
