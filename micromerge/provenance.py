"""Provenance records attached to every artefact (checkpoint, result row, report)."""

from __future__ import annotations

import platform
from typing import Any

import micromerge


def provenance(
    *, method: str, parameters: dict[str, Any], inputs: dict[str, str], seed: int | None
) -> dict[str, Any]:
    """What made an artefact: inputs' sha256, method, parameters, seed and versions.

    Deliberately free of timestamps and host names so the same inputs give the same bytes;
    timing goes in the sidecar manifest, not in the artefact itself.
    """
    import torch

    return {
        "micromerge_version": micromerge.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "method": method,
        "parameters": parameters,
        "inputs_sha256": inputs,
        "seed": seed,
    }
