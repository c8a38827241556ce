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
    _refuse_keys_that_are_not_names(file_path, data)
    return data


def _refuse_keys_that_are_not_names(file_path: Path, data: dict[str, Any]) -> None:
    """TOML keys are strings; YAML reads an unquoted `1:`, `true:`, `2024-01-01:` or a bare `?` as
    a number, boolean, date or null, which every reader of a config compares with names (sorted
    with them, a TypeError). Walked without recursion, each container once: YAML anchors can nest
    deeply or refer to themselves."""
    stack: list[Any] = [data]
    seen: set[int] = set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            for key, value in item.items():
                if not isinstance(key, str):
                    raise MicromergeError(
                        f"{file_path}: key {key!r} is a {type(key).__name__}, not a name; quote it"
                    )
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def load_section(path: str | Path, section: str, schema: dict[str, str]) -> dict[str, Any]:
    """The `[section]` table of a config file (or its top level), checked against `schema`."""
    data = load_config_file(path)
    values = data.get(section, data)
    if not isinstance(values, dict):
        raise MicromergeError(f"{path}: [{section}] must be a table")
    return check_section(f"{path} [{section}]", values, schema)
