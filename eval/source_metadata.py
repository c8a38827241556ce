"""The per-source metadata table (eval/ubench_sources.toml) and the rule that names null sources.

μ-Bench has no scale or taxonomy column, and the Held et al. 2010 rows have a null `dataset`:
both are filled from one documented table, which a user may override per source.
"""

from __future__ import annotations

import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from micromerge.core.errors import MicromergeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_TABLE = Path(__file__).with_name("ubench_sources.toml")
_FIELDS = {
    "task": str,
    "taxonomy": str,
    "scale": str,
    "scale_reason": str,
    "paper_tables": bool,
    "fine_headline": bool,
    "null_dataset_match": str,
}


@dataclass(frozen=True)
class SourceInfo:
    name: str
    task: str = "unknown"
    taxonomy: str = "unknown"
    scale: str = "unknown"
    scale_reason: str = "not in the metadata table"
    paper_tables: bool = True
    fine_headline: bool = True
    null_dataset_match: str | None = None


@dataclass(frozen=True)
class SourceTable:
    sources: dict[str, SourceInfo]
    scales: dict[str, tuple[float, float]] = field(default_factory=dict)
    override_file: Path | None = None
    # the sources the override file names, less those whose entry rewrites a shipped
    # `null_dataset_match` rule: that moves rows even where its own source ends with none
    describing: tuple[str, ...] = ()
    # the sources whose `null_dataset_match` rule the override file sets
    override_rules: tuple[str, ...] = ()

    def rule_origin(self, name: str) -> str:
        """Where `name`'s null_dataset_match rule was written: `tasks` says which table moved rows."""
        return f"--sources {self.override_file}" if name in self.override_rules else "shipped table"

    def warn_unmatched_overrides(self, present: set[str]) -> None:
        """An override for a source the data does not have (a typo: `synth-blood-cell`) changed
        nothing, silently; it is named, with the sources there are."""
        unmatched = sorted(set(self.describing) - present)
        if unmatched:
            warnings.warn(
                f"--sources {self.override_file}: {unmatched} name no source of this data, so change "
                f"nothing; its sources: {sorted(present)}",
                stacklevel=3,
            )

    def info(self, name: str) -> SourceInfo:
        return self.sources.get(name, SourceInfo(name))

    def name_null_source(self, evidence: str) -> str | None:
        """The source whose `null_dataset_match` finds `evidence` (a row's classification template
        and annotation class names); None when no rule or several rules match."""
        matches = [
            s.name
            for s in self.sources.values()
            if s.null_dataset_match and re.search(s.null_dataset_match, evidence, re.IGNORECASE)
        ]
        return matches[0] if len(matches) == 1 else None

    def scale_mismatch(self, name: str, median_mpp: float | None) -> str | None:
        """A note when the source's median microns/pixel lies outside its scale's plausible range, with
        the reason the table gives for the scale (so a reader can judge which of the two is wrong)."""
        scale = self.info(name).scale
        if median_mpp is None or scale not in self.scales:
            return None
        low, high = self.scales[scale]
        if low <= median_mpp <= high:
            return None
        reason = self.info(name).scale_reason
        return (
            f"median {median_mpp:g} µm/px is outside {scale}'s {low:g}–{high:g} ({scale} because: {reason})"
        )


def _read(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise MicromergeError(f"--sources {path}: not a readable TOML file ({exc})") from exc


def _entries(data: dict, path: Path) -> dict[str, dict]:
    sources = data.get("sources", {})
    if not isinstance(sources, dict):
        raise MicromergeError(f"--sources {path}: [sources] must be a table of source tables")
    for name, entry in sources.items():
        if not isinstance(entry, dict):
            raise MicromergeError(f"--sources {path}: sources.{name} must be a table")
        for key, value in entry.items():
            expected = _FIELDS.get(key)
            if expected is None:
                raise MicromergeError(
                    f"--sources {path}: sources.{name}.{key} is not a known field ({', '.join(_FIELDS)})"
                )
            if not isinstance(value, expected):
                raise MicromergeError(
                    f"--sources {path}: sources.{name}.{key} must be a {expected.__name__}, not {value!r}"
                )
        pattern = entry.get("null_dataset_match")
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise MicromergeError(
                    f"--sources {path}: sources.{name}.null_dataset_match {pattern!r} is not a regular "
                    f"expression ({exc})"
                ) from exc
    return sources


def _scales(data: dict, path: Path) -> dict[str, tuple[float, float]]:
    """[scales]: each scale's plausible microns/pixel as [low, high]."""
    scales = data.get("scales", {})
    if not isinstance(scales, dict):
        raise MicromergeError(f"--sources {path}: [scales] must be a table of [low, high] ranges")
    ranges = {}
    for name, bounds in scales.items():
        numbers = isinstance(bounds, list) and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds
        )
        if not numbers or len(bounds) != 2 or not 0 <= bounds[0] <= bounds[1]:
            raise MicromergeError(
                f"--sources {path}: scales.{name} = {bounds!r}: expected [low, high] microns/pixel, "
                "0 <= low <= high"
            )
        ranges[name] = (float(bounds[0]), float(bounds[1]))
    return ranges


def _check_tables(data: dict, path: Path) -> dict:
    unknown = sorted(set(data) - {"sources", "scales"})
    if unknown:
        raise MicromergeError(
            f"--sources {path}: unknown table(s) {unknown}; the file has [sources.NAME] and [scales] only"
        )
    return data


def load_source_table(override: Path | None = None) -> SourceTable:
    """The shipped table, with `override`'s entries (sources and scales) replacing ours key by key
    (a scale given without its reason is explained as set in the override file)."""
    data = _check_tables(_read(DEFAULT_TABLE), DEFAULT_TABLE)
    entries = {name: dict(entry) for name, entry in _entries(data, DEFAULT_TABLE).items()}
    scales = _scales(data, DEFAULT_TABLE)
    describing: tuple[str, ...] = ()
    override_rules: tuple[str, ...] = ()
    if override is not None:
        mine = _check_tables(_read(override), override)
        for name, entry in _entries(mine, override).items():
            if "scale" in entry and "scale_reason" not in entry:  # ours would explain another scale
                entry = {**entry, "scale_reason": f"set in {override.name}"}
            shipped_rule = entries.get(name, {}).get("null_dataset_match")
            if shipped_rule is None or entry.get("null_dataset_match", shipped_rule) == shipped_rule:
                describing += (name,)
            if "null_dataset_match" in entry:
                override_rules += (name,)
            entries.setdefault(name, {}).update(entry)
        scales.update(_scales(mine, override))
    _refuse_unknown_scales(entries, scales, override or DEFAULT_TABLE)
    infos = {name: SourceInfo(name, **entry) for name, entry in entries.items()}
    return SourceTable(infos, scales, override, describing, override_rules)


def _refuse_unknown_scales(
    entries: dict[str, dict], scales: dict[str, tuple[float, float]], path: Path
) -> None:
    """`scale = "huge"` (or `"Tissue"`) was taken as a scale of its own: a report group of one
    source, left out of `scale:tissue`, and never cross-checked against microns/pixel. A scale is
    one [scales] names; a new one is added there with its range."""
    for name, entry in entries.items():
        scale = entry.get("scale")
        if scale is not None and scale not in scales:
            raise MicromergeError(
                f"--sources {path}: sources.{name}.scale {scale!r} is not a scale of [scales] "
                f"({', '.join(scales)}); use one, or add it to [scales] with its microns/pixel range"
            )
