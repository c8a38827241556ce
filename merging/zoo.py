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


REQUIRED = {
    "open_clip_tag": ("open_clip_name", "tag"),
    "open_clip_hub": ("repo",),
    "transformers_hub": ("repo",),
}


def load_zoo(path: Path = ZOO_FILE) -> dict[str, ZooEntry]:
    """Every entry checked when the zoo is read: a hand-edited zoo names its bad entry here, not
    as an AttributeError or a download of `hf-hub:None` when a merge asks for that checkpoint."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise MicromergeError(f"{path}: not a readable zoo ({exc}); fix the entry you edited") from exc
    entries = {name: _entry(path, name, fields) for name, fields in data.items()}
    if not entries:
        raise MicromergeError(f"{path}: the zoo has no entries; add a [name] table per checkpoint")
    for entry in entries.values():
        if entry.finetuned_from is not None and entry.finetuned_from not in entries:
            raise MicromergeError(
                f"{path}: [{entry.name}] finetuned_from = {entry.finetuned_from!r} names no zoo entry"
            )
    return entries


def _entry(path: Path, name: str, fields: Any) -> ZooEntry:
    if not isinstance(fields, dict):
        raise MicromergeError(
            f"{path}: {name} = {fields!r} is not a table; write it as [{name}] with its fields"
        )
    if fields.get("format") not in FORMATS:
        raise MicromergeError(f"{path}: [{name}] format must be one of {FORMATS}")
    not_text = [key for key, value in fields.items() if not isinstance(value, str)]
    if not_text:
        raise MicromergeError(f"{path}: [{name}] {not_text[0]} must be a quoted string")
    missing = [key for key in REQUIRED[fields["format"]] if not fields.get(key)]
    if missing:
        raise MicromergeError(f"{path}: [{name}] format {fields['format']!r} needs {' and '.join(missing)}")
    try:
        entry = ZooEntry(name=name, **fields)
    except TypeError as exc:
        raise MicromergeError(f"{path}: [{name}] {exc}") from exc
    if entry.arch_config and not (CONFIG_DIR / entry.arch_config).is_file():
        raise MicromergeError(
            f"{path}: [{name}] arch_config {entry.arch_config!r}: no such file in {CONFIG_DIR}"
        )
    return entry
