"""The checkpoint zoo: names -> (format, source, architecture), read from checkpoints/zoo.toml."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from micromerge.checkpoints import CONFIG_DIR, ZOO_FILE
from micromerge.core.errors import MicromergeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

FORMATS = ("open_clip_tag", "open_clip_hub", "transformers_hub")


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    format: str
    arch: str | None = None
    arch_config: str | None = None
    open_clip_name: str | None = None
    tag: str | None = None
    repo: str | None = None
    finetuned_from: str | None = None
    domain: str | None = None

    @property
    def source(self) -> str:
        if self.format == "open_clip_tag":
            return f"open_clip {self.open_clip_name} pretrained='{self.tag}'"
        prefix = "hf-hub:" if self.format == "open_clip_hub" else "transformers hf-hub:"
        return f"{prefix}{self.repo}"

    def model_config(self) -> dict[str, Any] | None:
        """The shipped architecture config (BiomedCLIP), with its local text-tower config path."""
        if not self.arch_config:
            return None
        config = json.loads((CONFIG_DIR / self.arch_config).read_text())
        text_cfg = config.get("text_cfg", {})
        name = text_cfg.get("hf_model_name", "")
        if name.startswith("@configs/"):
            text_cfg["hf_model_name"] = str(CONFIG_DIR / name[len("@configs/") :])
        return config


def load_zoo(path: Path = ZOO_FILE) -> dict[str, ZooEntry]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise MicromergeError(f"{path}: not a readable zoo ({exc}); fix the entry you edited") from exc
    entries: dict[str, ZooEntry] = {}
    for name, fields in data.items():
        if fields.get("format") not in FORMATS:
            raise MicromergeError(f"{path}: [{name}] format must be one of {FORMATS}")
        try:
            entries[name] = ZooEntry(name=name, **fields)
        except TypeError as exc:
            raise MicromergeError(f"{path}: [{name}] {exc}") from exc
    return entries
