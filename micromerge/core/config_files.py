"""Read TOML or YAML configuration files into plain dicts (dataclasses are built by each stage)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from micromerge.core.config_schema import check_section
from micromerge.core.errors import MicromergeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def load_config_file(path: str | Path) -> dict[str, Any]:
    file_path = Path(path)
    if not file_path.is_file():
        raise MicromergeError(f"{file_path}: config file not found")
    try:
        text = file_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MicromergeError(f"{file_path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
    except OSError as exc:
        raise MicromergeError(f"{file_path}: cannot read ({exc.strerror or exc})") from exc
    try:
        if file_path.suffix == ".toml":
            data = tomllib.loads(text)
        elif file_path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            raise MicromergeError(f"{file_path}: config must end in .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, RecursionError) as exc:
        raise MicromergeError(
            f"{file_path}: not valid {file_path.suffix[1:].upper()}: {exc}".splitlines()[0]
        ) from exc
    if not isinstance(data, dict):
        raise MicromergeError(f"{file_path}: top level must be a table/mapping")
    return data


def load_section(path: str | Path, section: str, schema: dict[str, str]) -> dict[str, Any]:
    """The `[section]` table of a config file (or its top level), checked against `schema`."""
    data = load_config_file(path)
    values = data.get(section, data)
    if not isinstance(values, dict):
        raise MicromergeError(f"{path}: [{section}] must be a table")
    return check_section(f"{path} [{section}]", values, schema)
