"""The name a user most likely meant, for the one-line errors that refuse a name.

A misspelt task, method, zoo name, config key or report group was answered with the whole list
of valid names (37 config keys, 23 tasks, 21 methods) to search by eye; the closest one is named
first. difflib's ratio, at its default cutoff of 0.6: `desnity` finds `density`, `kather` does not
find `kather_et_al_2016` (a prefix is not a typo). Case is no typo either: a name typed in
another case (`TIES`, `vit-b-32` for `ViT-B-32`) is found whole, and the ratio is taken between
case-folded names, so `Desnity` finds `density` as `desnity` does.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(value: str, choices: Iterable[str]) -> str | None:
    """The choice closest to `value`, or None when none is close."""
    by_folded: dict[str, str] = {}
    for choice in choices:
        by_folded.setdefault(choice.casefold(), choice)
    folded = value.casefold()
    if folded in by_folded:
        return by_folded[folded]
    found = difflib.get_close_matches(folded, list(by_folded), n=1)
    return by_folded[found[0]] if found else None


def meant(value: str, choices: Iterable[str]) -> str:
    """` (did you mean X?)`, or "" when no choice is close: for the end of a message's first clause."""
    found = closest(value, choices)
    return f" (did you mean {found}?)" if found else ""
