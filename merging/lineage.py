"""Which labelled benchmark data a set of checkpoints was trained on, read from their provenance.

A supervised fine-tune on one μ-Bench task trains on that task's own images, so on the same
benchmark that task's accuracy, and that of every task sharing its images, is no longer zero-shot.
Nothing in the weights says so; the provenance does (`core.provenance.supervised_lineage`), and
every checkpoint made from others carries its inputs' lineage on (`SUPERVISED_ON`): a merge or a
further fine-tune of a leaked specialist is known to be leaked too.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from micromerge.core.provenance import supervised_lineage
from micromerge.merging.model_card import checkpoint_provenance
from micromerge.merging.tensor_source import TensorSource


def sources_lineage(sources: Iterable[TensorSource]) -> list[str]:
    """The union of the sources' supervised lineages (none for a checkpoint micromerge did not make)."""
    found: set[str] = set()
    for source in sources:
        found.update(supervised_lineage(checkpoint_provenance([Path(f) for f in source.files])))
    return sorted(found)
