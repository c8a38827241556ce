"""The merge-method registry: one line per method. Adding a method = one file + one line here."""

from __future__ import annotations

from merging.methods import linear, slerp, task_vectors, wise_ft
from merging.methods.base import MergeMethod, MethodParams
from micromerge.errors import MicromergeError

METHODS: dict[str, MergeMethod] = {
    method.name: method
    for method in (
        linear.METHOD,
        wise_ft.METHOD,
        task_vectors.TASK_ARITHMETIC,
        task_vectors.TIES,
        task_vectors.DARE,
        slerp.METHOD,
    )
}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise MicromergeError(
            f"--method {name}: unknown merge method; choose one of {sorted(METHODS)}"
        ) from None


__all__ = ["METHODS", "MergeMethod", "MethodParams", "get_method"]
