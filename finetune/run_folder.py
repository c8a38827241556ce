"""The run folder's rules: one run writes it at a time, a run's files are not replaced by another
run's without --force, and --resume continues only the run that is there, under its settings.

Kept apart from the training loop: these decide, before any training, whether this run may use
the folder and from which saved state it goes on.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from micromerge.core.errors import FolderInUse, MicromergeError
from micromerge.core.folder_lock import sole_writer
from micromerge.core.hashing import sha256_json
from micromerge.core.json_text import parse_json
from micromerge.finetune.config import RUN_GUARDS, FinetuneConfig
from micromerge.finetune.saved_state import read_saved_state, schedule_in_json

if TYPE_CHECKING:
    from accelerate import Accelerator


UNREADABLE_LIST = "unreadable.txt"
"""The unreadable samples a run left out, by name (finetune/unreadable.py)."""
RUN_FILES = (
    "manifest.json",
    "model.safetensors",
    "head.safetensors",
    "train_log.jsonl",
    "README.md",
    UNREADABLE_LIST,
)


def refuse_base_inside_out(cfg: FinetuneConfig) -> None:
    """A base inside --out (the folder of an earlier run, or a model.safetensors put there) was
    replaced by the fine-tuned model, or deleted by --force before it was read."""
    base = Path(cfg.base)
    if not base.exists():  # a zoo name or hub id
        return
    base, out = base.resolve(), cfg.out.resolve()
    if base == out or out in base.parents:
        raise MicromergeError(
            f"--base {cfg.base} lies inside --out {cfg.out}: the run would replace it (--force would "
            "delete it first); choose another --out"
        )


def check_output_dir(cfg: FinetuneConfig, is_main: bool) -> Path | None:
    """The latest resumable state, after refusing to mix runs in one folder, or to replace files
    of the names a run writes (a model.safetensors of the user's was silently overwritten)."""
    state_dir = cfg.out / "state"
    holds = [name for name in RUN_FILES if (cfg.out / name).exists()]
    holds += ["state/"] if state_dir.exists() else []
    if holds and cfg.force:
        if is_main:
            shutil.rmtree(state_dir, ignore_errors=True)
            for name in RUN_FILES:
                (cfg.out / name).unlink(missing_ok=True)
        return None
    if holds and not cfg.resume:
        raise MicromergeError(
            f"--out {cfg.out}: holds {', '.join(holds)} (another run, or files of yours); pass --resume "
            "to continue a run or --force to replace them"
        )
    latest = state_dir / "LATEST"
    if cfg.resume and latest.is_file():
        resume_from, saved = read_saved_state(cfg, latest)
        # states saved before 0.1.14 digest every hyper-parameter, the guards included
        if saved["config_digest"] not in (cfg.resume_digest(), sha256_json(cfg.hyperparameters())):
            raise MicromergeError(
                f"--resume {cfg.out}: the run there used other settings; use the same flags or --force"
            )
        schedule_in_json(cfg, resume_from, saved, is_main)
        return resume_from
    return None


def check_finished_settings(cfg: FinetuneConfig) -> None:
    """Resuming a finished run hands back its model, so only under the settings it was trained
    with: under others the model would be passed off as theirs (a demo or script that changed
    --epochs would sweep the old specialist)."""
    manifest_path = cfg.out / "manifest.json"
    try:
        trained = parse_json(manifest_path.read_text()).get("hyperparameters") or {}
        if not isinstance(trained, dict):
            raise ValueError(f"its hyperparameters are a JSON {type(trained).__name__}, not an object")
    except (OSError, ValueError, AttributeError) as exc:
        raise MicromergeError(
            f"--resume {cfg.out}: {manifest_path.name} is unreadable ({exc}); start over with --force"
        ) from exc
    wanted = json.loads(json.dumps(cfg.hyperparameters(), default=str))
    changed = sorted(
        k for k in set(wanted) | set(trained) if k not in RUN_GUARDS and wanted.get(k) != trained.get(k)
    )
    if changed:
        raise MicromergeError(
            f"--resume {cfg.out}: that run finished with other settings ({', '.join(changed[:4])}); "
            "use the same flags, or --force to train again"
        )


@contextlib.contextmanager
def one_run_per_folder(cfg: FinetuneConfig, accelerator: Accelerator) -> Iterator[None]:
    """--out locked for the whole run, before its folder check (a --force or --resume into a
    running run's folder would delete or load the state it is writing). Only the main process
    locks: the launch's other processes are the same run. Its refusal reaches every process, which
    would otherwise go on alone past the folder check until the next collective, there to hang."""
    with contextlib.ExitStack() as held:
        refusal = None
        if accelerator.is_main_process:
            try:
                held.enter_context(sole_writer(cfg.out, "--out"))
            except FolderInUse as exc:
                refusal = str(exc)
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            [refusal] = broadcast_object_list([refusal])
        if refusal is not None:
            raise FolderInUse(refusal)
        yield
