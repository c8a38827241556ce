"""Which keys are merged and with what strength: include/exclude patterns and per-pattern alpha.

Patterns are shell globs on open_clip keys (`visual.*`, `visual.transformer.resblocks.1[01].*`)
or regular expressions prefixed with `re:`. Alpha rules are ordered; the first match wins.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from micromerge.core.errors import MicromergeError

Matcher = Callable[[str], bool]


def _matcher(pattern: str) -> Matcher:
    if pattern.startswith("re:"):
        try:
            compiled = re.compile(pattern[3:])
        except re.error as exc:
            raise MicromergeError(f"rule pattern {pattern!r}: invalid regular expression ({exc})") from exc
        return lambda key: compiled.search(key) is not None
    return lambda key: fnmatch.fnmatchcase(key, pattern)


@dataclass(frozen=True)
class KeyRules:
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    strength_rules: tuple[tuple[str, float], ...] = ()
    # compiled once, when the rules are made (a bad regular expression is refused then)
    _include: list[Matcher] = field(init=False, repr=False, compare=False)
    _exclude: list[Matcher] = field(init=False, repr=False, compare=False)
    _strength: list[tuple[Matcher, float]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_include", [_matcher(p) for p in self.include])
        object.__setattr__(self, "_exclude", [_matcher(p) for p in self.exclude])
        object.__setattr__(self, "_strength", [(_matcher(p), v) for p, v in self.strength_rules])

    def is_merged(self, key: str) -> bool:
        if self._include and not any(match(key) for match in self._include):
            return False
        return not any(match(key) for match in self._exclude)

    def strength_for(self, key: str, default: float) -> float:
        for match, value in self._strength:
            if match(key):
                return value
        return default

    def unused_patterns(self, keys: list[str]) -> list[str]:
        """Patterns that match no key: almost always a typo the user wants to hear about."""
        patterns = [*self.include, *self.exclude, *(p for p, _ in self.strength_rules)]
        return [p for p in patterns if not any(_matcher(p)(k) for k in keys)]

    def shadowed_strength_rules(self, keys: list[str]) -> list[tuple[str, float, str]]:
        """Alpha rules that match keys but set the alpha of none, each with why: an earlier rule
        took its keys (the first match wins), or the include/exclude rules left them out.
        `--alpha-rule 'visual.*=0.3' --alpha-rule 'visual.proj=0.9'` merged visual.proj at 0.3
        without a word."""
        rules = list(zip(self.strength_rules, self._strength, strict=True))
        merged = [key for key in keys if self.is_merged(key)]
        winner = {
            key: next((i for i, (_, (match, _)) in enumerate(rules) if match(key)), None) for key in merged
        }
        shadowed = []
        for index, ((pattern, value), (match, _)) in enumerate(rules):
            matched = [key for key in keys if match(key)]
            if not matched or index in winner.values():
                continue
            taken = [won for key in matched if (won := winner.get(key)) is not None]
            why = (
                f"every key it matches is taken by the earlier --alpha-rule {self.strength_rules[taken[0]][0]!r} "
                "(the first matching rule wins: put the narrower rule first)"
                if taken
                else "every key it matches is left out of the merge by --include/--exclude"
            )
            shadowed.append((pattern, value, why))
        return shadowed


def parse_strength_rule(text: str) -> tuple[str, float]:
    """`PATTERN=VALUE` from the command line."""
    pattern, sep, value = text.rpartition("=")
    if not sep or not pattern:
        raise MicromergeError(f"--alpha-rule {text!r}: expected PATTERN=VALUE, e.g. 'visual.*=0.3'")
    try:
        return pattern, float(value)
    except ValueError:
        raise MicromergeError(f"--alpha-rule {text!r}: {value!r} is not a number") from None
