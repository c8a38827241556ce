"""Which tasks a run scores: `--tasks` (and `finetune supervised --task`), read in the words the
report uses, so that a run on the real benchmark (22 fine-grained sources) can be limited to what
it will be reported on: `--tasks coarse,domain:pathology` instead of eight source names.

A selection is a comma-separated union of items, each one of:
- `all`, `coarse`, `fine` (also written `level:coarse`, `level:fine`);
- a task name (`kather_et_al_2016`), or a shell pattern of names (`held_et_al_2010_*`);
- a group `KIND:VALUE` of the fine-grained tasks' metadata in `report --target`'s words
  (`domain:pathology`, `modality:electron microscopy`, `scale:tissue`), and also the kinds a report
  does not group by (`paper:yes|no`, `synthetic:yes|no`, `fine_headline:yes|no`). Some values
  hold a comma (taxonomy `cell, organism or structure identification`): a run of comma-separated
  pieces that together spell a group is read as that group.
Every item must select something: a typo is an error that names it and what it could have been,
never a silently smaller run. The chosen tasks keep the benchmark's order.
"""

from __future__ import annotations

import fnmatch

from micromerge.core.errors import MicromergeError
from micromerge.core.suggest import closest
from micromerge.eval.tasks import Task

LEVELS = ("coarse", "fine")
_PATTERN_CHARACTERS = "*?["


def _groups(tasks: list[Task]) -> dict[str, set[str]]:
    """Every group kind of the fine-grained tasks and its values (coarse tasks hold `all`), and the
    levels the tasks have: `coarse` on a copy without coarse tasks selected nothing, silently."""
    kinds: dict[str, set[str]] = {"level": {task.level for task in tasks}}
    for task in tasks:
        if task.level == "fine":
            for kind, value in task.groups.items():
                if kind != "level":
                    kinds.setdefault(kind, set()).add(value)
    return kinds


def _as_group(item: str) -> tuple[str, str] | None:
    kind, colon, value = item.partition(":")
    return (kind.strip(), value.strip()) if colon else None


def _items(text: str, kinds: dict[str, set[str]]) -> list[str]:
    """`text` split at its commas, except where consecutive pieces together spell a known group."""
    pieces = text.split(",")
    items, start = [], 0
    while start < len(pieces):
        end = next(
            (
                end
                for end in range(len(pieces), start + 1, -1)
                if (group := _as_group(",".join(pieces[start:end]))) and group[1] in kinds.get(group[0], ())
            ),
            start + 1,
        )
        items.append(",".join(pieces[start:end]).strip())
        start = end
    return [item for item in items if item]


def _group_members(
    tasks: list[Task], item: str, kind: str, value: str, kinds: dict[str, set[str]], option: str
) -> set[str]:
    """The tasks of group `kind` = `value`; errors name `item`, as the user wrote it."""
    if kind not in kinds:
        raise MicromergeError(
            f"{option} {item}: {kind!r} is no group kind of these tasks; kinds: {', '.join(sorted(kinds))}"
        )
    if value not in kinds[kind]:
        raise MicromergeError(
            f"{option} {item}: no task has {kind} {value!r}; its values: {', '.join(sorted(kinds[kind]))}"
        )
    if kind == "level":
        return {t.name for t in tasks if t.level == value}
    return {t.name for t in tasks if t.level == "fine" and t.groups.get(kind) == value}


def select_tasks(tasks: list[Task], wanted: str | tuple[str, ...], option: str = "--tasks") -> list[Task]:
    """The tasks `wanted` names (module docstring), in the benchmark's order; errors name `option`,
    the flag the user typed (`finetune supervised` takes one `--task`)."""
    kinds = _groups(tasks)
    texts = [wanted] if isinstance(wanted, str) else list(wanted)
    items = [item for text in texts for item in _items(text, kinds)]
    if not items:
        raise MicromergeError(f"{option}: empty; give all, coarse, fine, task names, name patterns or groups")
    names = [t.name for t in tasks]
    chosen: set[str] = set()
    unknown = []
    for item in items:
        if item == "all":
            chosen.update(names)
        elif item in LEVELS:
            chosen |= _group_members(tasks, item, "level", item, kinds, option)
        elif item in names:
            chosen.add(item)
        elif any(c in item for c in _PATTERN_CHARACTERS):
            matched = [name for name in names if fnmatch.fnmatchcase(name, item)]
            if not matched:
                raise MicromergeError(
                    f"{option} {item}: matches no task name; task names: {', '.join(names)}"
                )
            chosen.update(matched)
        elif group := _as_group(item):
            chosen |= _group_members(tasks, item, *group, kinds, option)
        else:
            unknown.append(item)
    if unknown:
        guesses = [(item, closest(item, names)) for item in unknown]
        hints = ", ".join(f"{guess} for {item}" for item, guess in guesses if guess)
        raise MicromergeError(
            f"{option}: unknown task(s) {unknown}{f' (did you mean {hints}?)' if hints else ''}; "
            f"available: {sorted(names)} "
            "(or all, coarse, fine, a name pattern such as held_*, or a group such as domain:pathology)"
        )
    return [t for t in tasks if t.name in chosen]
