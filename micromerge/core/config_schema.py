"""One typed schema per command for config files, checked before any work starts.

A config file's values arrive as whatever TOML/YAML made of them: `"false"` is a string (and
`bool("false")` is True), `include = "visual.*"` is a string a loop would split into characters,
`alpha = "abc"` fails deep inside. Each command declares its keys' kinds here, and every value is
checked against its kind, so a wrong key, type or shape is one line naming the file, the key and
what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from micromerge.core.errors import MicromergeError
from micromerge.core.suggest import closest

Check = Callable[[Any], bool]


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_count(value: Any) -> bool:
    """A whole number of things (a JSON integer, not a boolean, not negative)."""
    return _is_int(value) and value >= 0


def is_finite_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _list_of(check: Check) -> Check:
    return lambda value: isinstance(value, list) and all(check(v) for v in value)


def _str_or_list_of_str(value: Any) -> bool:
    return _is_str(value) or _list_of(_is_str)(value)


def _alphas(value: Any) -> bool:
    return _is_str(value) or _list_of(is_finite_number)(value)


def _rules(value: Any) -> bool:
    if isinstance(value, dict):
        return all(_is_str(k) and is_finite_number(v) for k, v in value.items())
    return _list_of(
        lambda r: (
            _is_str(r) or (isinstance(r, list) and len(r) == 2 and _is_str(r[0]) and is_finite_number(r[1]))
        )
    )(value)


def _weights(value: Any) -> bool:
    return _is_str(value) or _list_of(is_finite_number)(value)


def _table(value: Any) -> bool:
    return isinstance(value, dict)


KINDS: dict[str, tuple[Check, str]] = {
    "bool": (_is_bool, "a boolean (true or false, unquoted)"),
    "int": (_is_int, "an integer"),
    "number": (is_finite_number, "a finite number"),
    "str": (_is_str, "a string"),
    "str_list": (_list_of(_is_str), 'a list of strings (e.g. ["visual.*"])'),
    "str_or_str_list": (_str_or_list_of_str, "a string or a list of strings"),
    "alphas": (_alphas, 'a list of finite numbers or a string "START:STOP:STEP" / "a,b,c"'),
    "weights": (_weights, 'a list of finite numbers or a string "a,b"'),
    "rules": (_rules, 'a table {"PATTERN" = number} or a list of "PATTERN=VALUE" strings'),
    "table": (_table, "a table"),
    "list_of_tables": (_list_of(_table), "a list of tables"),
}

MERGE_SCHEMA = {
    "base": "str",
    "finetuned": "str_or_str_list",
    "method": "str",
    "alpha": "number",
    "alphas": "alphas",
    "weights": "weights",
    "density": "number",
    "drop_rate": "number",
    "topk_scope": "str",
    "slerp_scope": "str",
    "gamma": "number",
    "epsilon": "number",
    "rescale": "str",
    "beta": "number",
    "samples": "int",
    "offdiag_scale": "number",
    "base_data": "str",
    "ft_data": "str_or_str_list",
    "granularity": "str",
    "search": "str",
    "steps": "int",
    "learning_rate": "number",
    "init": "number",
    "data": "str",
    "cache_dir": "str",
    "seed": "int",
    "include": "str_list",
    "exclude": "str_list",
    "alpha_rules": "rules",
    "dtype": "str",
    "device": "str",
    "engine": "str",
    "out": "str",
    "force": "bool",
    "allow_pickle": "bool",
    "allow_nonfinite": "bool",
    "arch": "str",
}
FINETUNE_SCHEMA = {
    "mode": "str",
    "base": "str",
    "data": "str",
    "out": "str",
    "task": "str",
    "arch": "str",
    "epochs": "int",
    "max_steps": "int",
    "batch_size": "int",
    "accum_steps": "int",
    "lr": "number",
    "weight_decay": "number",
    "warmup_steps": "int",
    "grad_clip": "number",
    "seed": "int",
    "precision": "str",
    "device": "str",
    "save_every": "int",
    "freeze_text": "bool",
    "freeze": "str_list",
    "lp_epochs": "int",
    "max_bad_fraction": "number",
    "resume": "bool",
    "force": "bool",
    "allow_pickle": "bool",
    "progress": "bool",
    "domain": "str",
    "data_in_memory": "str",
    "augment": "str_list",
    "workers": "int",
}
ABLATION_SCHEMA = {
    "data": "str",
    "store": "str",
    "report": "str",
    "alphas": "alphas",
    "pairs": "list_of_tables",
    "methods": "str_list",
    "rule_sets": "table",
    "tasks": "str",
    "protocol": "str",
    "prompts": "str",
    "sources": "str",
    "precision": "str",
    "bootstrap": "int",
    "seed": "int",
    "batch_size": "int",
    "target": "str",
    "method_parameters": "table",
    "run_figures": "bool",
}


FLAG_NAMES = {"finetuned": "--ft", "alpha_rules": "--alpha-rule"}
"""Keys whose flag has another name; every other key's flag is `--key` with dashes."""


def refuse_unknown_keys(source: str, values: dict[str, Any], allowed: Iterable[str]) -> None:
    """One line naming the keys that are not `allowed`, and the key each most likely meant: a
    config written from the flags (`ft = [...]` for `--ft`) or with a typo (`desnity`) got the
    list of 37 allowed keys to search by eye."""
    allowed = sorted(allowed)
    unknown = sorted(set(values) - set(allowed))
    if not unknown:
        return
    by_flag = {flag.lstrip("-").replace("-", "_"): key for key, flag in FLAG_NAMES.items() if key in allowed}
    guesses = {key: by_flag.get(key) or closest(key, allowed) for key in unknown}
    hints = [f"{guess} for {key}" for key, guess in guesses.items() if guess]
    raise MicromergeError(
        f"{source}: unknown key(s) {unknown}"
        + (f" (did you mean {', '.join(hints)}?)" if hints else "")
        + f"; allowed: {allowed}"
    )


def is_blank(value: Any) -> bool:
    """An empty string, or a list holding one. `key = ""` or `--option "$UNSET"` reads as a value
    but names none; taken as 'not given' it silently ran a default (`--method ""` merged with
    wise-ft, `--out ""` wrote to checkpoints/merged/), taken as a path it was the working folder."""
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, list) and any(isinstance(v, str) and not v.strip() for v in value)


def refuse_blank(values: dict[str, Any], flags: dict[str, str]) -> None:
    """One line naming the first option given an empty value (`flags`: key -> flag where the
    flag is not `--key`)."""
    for key, value in values.items():
        if is_blank(value):
            flag = flags.get(key, "--" + key.replace("_", "-"))
            what = "empty" if isinstance(value, str) else "an empty entry"
            raise MicromergeError(
                f"{flag} {value!r}: {what} (an unset variable?); give a value, or drop {flag} for its default"
            )


def check_section(source: str, values: dict[str, Any], schema: dict[str, str]) -> dict[str, Any]:
    """`values` unchanged when every key is known and every value of its kind; else one line."""
    refuse_unknown_keys(source, values, schema)
    for key, value in values.items():
        if is_blank(value):
            what = "is empty" if isinstance(value, str) else "holds an empty entry"
            raise MicromergeError(f"{source}: {key} = {value!r} {what}; give a value, or remove {key}")
        check, expected = KINDS[schema[key]]
        if not check(value):
            raise MicromergeError(f"{source}: {key} must be {expected}, not {value!r}"[:300])
    return values
