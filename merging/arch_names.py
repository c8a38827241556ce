"""Which architecture names exist, answered without importing torch or open_clip (the numpy merge
engine must stay torch-free): this project's JSON configs, then open_clip's shipped JSON configs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from micromerge.core.errors import MicromergeError
from micromerge.core.suggest import meant

CONFIG_DIR = Path(__file__).parent / "model_configs"


def project_model_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def _open_clip_config_dir() -> Path | None:
    spec = importlib.util.find_spec("open_clip")
    return Path(spec.origin).parent / "model_configs" if spec and spec.origin else None


def require_known_architecture(name: str) -> None:
    """Refuse `--arch NAME` up front, so no command writes a checkpoint that no command can load."""
    if (CONFIG_DIR / f"{name}.json").is_file():
        return
    open_clip_dir = _open_clip_config_dir()
    if open_clip_dir is not None and (open_clip_dir / f"{name}.json").is_file():
        return
    shipped = [p.stem for p in open_clip_dir.glob("*.json")] if open_clip_dir is not None else []
    known = [*project_model_names(), *shipped]
    raise MicromergeError(  # names are case-sensitive files: another case is suggested
        f"--arch {name!r}: unknown architecture{meant(name, known)}; use an open_clip model name "
        f"(e.g. ViT-B-32) or one of {project_model_names()}"
    )
