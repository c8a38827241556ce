"""Which labelled benchmark data a set of checkpoints was trained on, read from their provenance.

A supervised fine-tune on one μ-Bench task trains on that task's own images, so on the same
benchmark that task's accuracy, and that of every task sharing its images, is no longer zero-shot.
Nothing in the weights says so; the provenance does (`core.provenance.supervised_lineage`), and
every checkpoint made from others carries its inputs' lineage on (`SUPERVISED_ON`): a merge or a
further fine-tune of a leaked specialist is known to be leaked too. Likewise the select halves of
μ-Bench that data-aware merges learned from (`LEARNED_FROM_HALVES`): evaluated with other halves,
their report half is not held out (`eval.trained_on.refuse_other_halves`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from micromerge.core.provenance import select_half_lineage, supervised_lineage
from micromerge.merging.model_card import checkpoint_provenance
from micromerge.merging.tensor_source import TensorSource


def sources_lineage(sources: Iterable[TensorSource]) -> list[str]:
    """The union of the sources' supervised lineages (none for a checkpoint micromerge did not make)."""
    return _union(sources, supervised_lineage)


def sources_select_halves(sources: Iterable[TensorSource]) -> list[str]:
    """The union of the select halves the sources' weights were learned from (`select_half_lineage`)."""
    return _union(sources, select_half_lineage)


def _union(sources: Iterable[TensorSource], lineage_of: Callable[[Any], list[str]]) -> list[str]:
    found: set[str] = set()
    for source in sources:
        found.update(lineage_of(checkpoint_provenance([Path(f) for f in source.files])))
    return sorted(found)
