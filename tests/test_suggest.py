"""The name suggested when a name is refused: found whatever the case it was typed in.

difflib's ratio is case-sensitive: `TIES` scored nothing against `ties`, so `--method TIES` was
refused without a suggestion, and only `--arch` looked for another case (by a check of its own).
"""

from __future__ import annotations

import pytest

from micromerge.core.errors import MicromergeError
from micromerge.core.suggest import closest, meant
from micromerge.merging.methods import get_method


@pytest.mark.parametrize(
    "typed, meant_name",
    [
        ("TIES", "ties"),  # another case: found whole
        ("Wise-FT", "wise-ft"),
        ("Desnity", "density"),  # a typo in another case: the ratio of the case-folded names
        ("desnity", "density"),  # as before
        ("vit-b-32", "ViT-B-32"),  # the suggestion keeps the choice's own case
        ("kather", None),  # a prefix is still no typo
    ],
)
def test_the_closest_name_is_found_whatever_its_case(typed, meant_name):
    choices = ["ties", "wise-ft", "density", "ViT-B-32", "ViT-S-32", "kather_et_al_2016"]
    assert closest(typed, choices) == meant_name
    assert meant(typed, choices) == (f" (did you mean {meant_name}?)" if meant_name else "")


def test_a_method_typed_in_capitals_is_suggested_in_its_own_case():
    with pytest.raises(
        MicromergeError, match=r"^--method TIES: unknown merge method \(did you mean ties\?\)"
    ):
        get_method("TIES")
