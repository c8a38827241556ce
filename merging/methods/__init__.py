"""The merge-method registry: one line per method. Adding a method = one file + one line here."""

from __future__ import annotations

from micromerge.core.errors import MicromergeError
from micromerge.core.suggest import meant
from micromerge.merging.methods import (
    breadcrumbs,
    della,
    fisher,
    iso_c,
    learned,
    linear,
    lines,
    model_stock,
    regmean,
    slerp,
    task_vectors,
    tsv,
    wise_ft,
)
from micromerge.merging.methods.base import (
    GRANULARITIES,
    SEARCHES,
    TUNABLE,
    MergeMethod,
    MethodParams,
    ModelScan,
)

METHODS: dict[str, MergeMethod] = {
    method.name: method
    for method in (
        linear.METHOD,
        wise_ft.METHOD,
        task_vectors.TASK_ARITHMETIC,
        task_vectors.TIES,
        task_vectors.DARE,
        task_vectors.DARE_TIES,
        slerp.METHOD,
        lines.LINES,
        lines.LINES_TIES,
        model_stock.METHOD,
        breadcrumbs.METHOD,
        breadcrumbs.TIES,
        della.METHOD,
        della.LINEAR,
        tsv.METHOD,
        iso_c.METHOD,
        fisher.METHOD,
        regmean.METHOD,
        learned.ADAMERGING,
        learned.SUPERVISED,
    )
}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        if name == "greedy-soup":
            raise MicromergeError(
                "--method greedy-soup: a soup chooses its ingredients with data; run `micromerge soup` "
                '(or list "greedy-soup" in an ablation\'s methods)'
            ) from None
        raise MicromergeError(
            f"--method {name}: unknown merge method{meant(name, METHODS)}; choose one of {sorted(METHODS)}"
        ) from None


__all__ = [
    "GRANULARITIES",
    "METHODS",
    "SEARCHES",
    "TUNABLE",
    "MergeMethod",
    "MethodParams",
    "ModelScan",
    "get_method",
]
