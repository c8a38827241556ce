"""Provenance records attached to every artefact (checkpoint, result row, report)."""

from __future__ import annotations

import importlib
import platform
from typing import Any

import micromerge


def provenance(
    *,
    method: str,
    parameters: dict[str, Any],
    inputs: dict[str, str],
    seed: int | None,
    array_library: str = "torch",
) -> dict[str, Any]:
    """What made an artefact: inputs' sha256, method, parameters, seed and versions.

    `array_library` is the library that computed it (torch, or numpy for the torch-free merge
    engine); its version is recorded as `<library>_version`. Deliberately free of timestamps
    and host names so the same inputs give the same bytes; timing goes in the sidecar manifest.
    """
    library = importlib.import_module(array_library)
    return {
        "micromerge_version": micromerge.__version__,
        f"{array_library}_version": library.__version__,
        "python_version": platform.python_version(),
        "method": method,
        "parameters": parameters,
        "inputs_sha256": inputs,
        "seed": seed,
    }


def has_interval(row: Any) -> bool:
    """Whether a result row holds a bootstrap interval, by the bootstrap count it records: with
    --bootstrap 0 its ci_low and ci_high are its point value, which no table prints as an interval."""
    return row.get("bootstrap") != 0
