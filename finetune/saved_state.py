"""A fine-tuning run's saved state (`OUT/state/step-NNNNNNNN/`, named by `state/LATEST`), read back
for `--resume`: what accelerate saved (model as safetensors, optimizer and random states read with
`torch.load(weights_only=True)`) and `trainer_state.json` (position, settings digest, inputs and
the learning-rate schedule). Nothing in it may run code, and a damaged one is one line.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from micromerge.core.atomic import write_json_atomic
from micromerge.core.config_schema import is_count
from micromerge.core.errors import MicromergeError
from micromerge.core.json_text import parse_json
from micromerge.finetune.config import FinetuneConfig

if TYPE_CHECKING:
    from accelerate import Accelerator


def schedule_in_json(cfg: FinetuneConfig, folder: Path, saved: dict[str, Any], is_main: bool) -> None:
    """Keep the schedule of an earlier micromerge's state in trainer_state.json. accelerate saved the
    registered scheduler as `custom_checkpoint_0.pkl` and loads it with weights_only=False, running
    whatever code the file holds; its state_dict is numbers and lists, which torch.load reads with
    weights_only=True, so it is read so, moved into trainer_state.json and the pickle removed. A
    pickle torch will not read so, or one beside a schedule already saved as JSON, is refused. The
    main process alone does it (the others wait for it before they read the state)."""
    pickles = sorted(folder.glob("custom_checkpoint_*.pkl")) if is_main else []
    if not pickles:
        return
    if "scheduler" in saved or [p.name for p in pickles] != ["custom_checkpoint_0.pkl"]:
        raise MicromergeError(
            f"--resume {cfg.out}: state/{folder.name} holds {pickles[-1].name}, which no micromerge run "
            "writes (loading it would run its code); remove it, or start over with --force"
        )
    try:
        with warnings.catch_warnings():  # torch's note on a payload's pickle protocol: refused below
            warnings.simplefilter("ignore")
            schedule = torch.load(pickles[0], map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's refusal of a payload, or a damaged file
        raise MicromergeError(
            f"--resume {cfg.out}: state/{folder.name}/{pickles[0].name} is not a learning-rate schedule "
            f"torch reads without running code ({type(exc).__name__}); start over with --force"
        ) from exc
    if not isinstance(schedule, dict) or not isinstance(schedule.get("last_epoch"), int):
        raise MicromergeError(
            f"--resume {cfg.out}: state/{folder.name}/{pickles[0].name} is not a learning-rate schedule; "
            "start over with --force"
        )
    write_json_atomic(folder / "trainer_state.json", {**saved, "scheduler": schedule})
    pickles[0].unlink()


def load_saved_state(accelerator: Accelerator, cfg: FinetuneConfig, folder: Path) -> None:
    """Model, optimizer and random states back through accelerate (safetensors, and torch.load with
    weights_only); a damaged or foreign file among them is one line, not torch's traceback."""
    try:
        with warnings.catch_warnings():  # torch's note on a file's pickle protocol: refused below
            warnings.simplefilter("ignore")
            accelerator.load_state(str(folder))
    except Exception as exc:  # torch, safetensors and accelerate raise their own types
        first = (str(exc).strip().splitlines() or [""])[0][:120]
        raise MicromergeError(
            f"--resume {cfg.out}: state/{folder.name} could not be loaded ({type(exc).__name__}: {first}); "
            "it is damaged or was not written by micromerge: start over with --force"
        ) from exc


def read_saved_state(cfg: FinetuneConfig, latest: Path) -> tuple[Path, dict[str, Any]]:
    """The state LATEST names and its trainer_state.json. A state folder copied in part, edited or
    damaged on disk was a traceback (FileNotFoundError, JSONDecodeError, KeyError); LATEST naming
    anything but a step folder of this run's state/ is refused too."""
    name = latest.read_text(errors="replace").strip()
    folder = latest.parent / name
    try:
        if not re.fullmatch(r"step-\d{8}", name):
            raise ValueError(f"LATEST names {name[:40]!r}, not a step-NNNNNNNN folder")
        saved = parse_json((folder / "trainer_state.json").read_text())
        if not isinstance(saved, dict) or not {"config_digest", "micro_step", "step"} <= saved.keys():
            raise ValueError("trainer_state.json lacks config_digest, micro_step or step")
        counts = (saved["micro_step"], saved["step"])
        if not all(is_count(n) for n in counts):
            raise ValueError(f"trainer_state.json: micro_step and step must be counts, not {counts!r}"[:120])
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise MicromergeError(
            f"--resume {cfg.out}: its saved state state/{name[:40]} is unreadable or incomplete ({reason}); "
            "start over with --force"
        ) from exc
    return folder, saved


def restore_schedule(
    cfg: FinetuneConfig, scheduler: torch.optim.lr_scheduler.LRScheduler, saved: dict
) -> None:
    """Put the learning-rate schedule back where the saved state left it. Its JSON must have the
    fields, types and lengths of this run's own schedule: an edited or damaged one was a KeyError from
    inside torch, or, worse, loaded with another number of groups and trained at the wrong rates."""
    expected, given = scheduler.state_dict(), saved.get("scheduler")

    def same_shape(a: Any, b: Any) -> bool:
        if isinstance(a, bool) or isinstance(b, bool):
            return isinstance(a, bool) and isinstance(b, bool)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return isinstance(a, float) or isinstance(b, int)  # an int field stays an int
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(same_shape(x, y) for x, y in zip(a, b, strict=True))
        return a is None and b is None if a is None or b is None else type(a) is type(b)

    if (
        not isinstance(given, dict)
        or set(given) != set(expected)
        or not all(same_shape(expected[key], given[key]) for key in expected)
    ):
        raise MicromergeError(
            f"--resume {cfg.out}: the learning-rate schedule in its trainer_state.json is not this run's "
            "(fields, types or number of parameter groups differ); start over with --force"
        )
    scheduler.load_state_dict(given)


def read_log(path: Path) -> list[dict[str, Any]]:
    """The loss log of the steps trained so far (`train_log.jsonl`, rewritten whole at each save).
    Lines that are not a step's record (damaged on disk, edited) are dropped with one warning: the
    log feeds the manifest's loss summary, not the weights, so it is no reason to stop a resume."""
    if not path.is_file():
        return []
    rows, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = parse_json(line) if line.strip() else None
        except ValueError:
            row = None
        if (
            isinstance(row, dict)
            and isinstance(row.get("step"), int)
            and isinstance(row.get("loss"), (int, float))
        ):
            rows.append(row)
        elif line.strip():
            dropped += 1
    if dropped:
        warnings.warn(f"{path}: {dropped} line(s) that are not a step's loss record dropped", stacklevel=2)
    return rows
