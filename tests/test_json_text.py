"""JSON read from files goes through `parse_json`: Python's parser raises RecursionError (no
ValueError) for JSON nested deep enough (1,000 levels on Python 3.10 and 3.11, 10,000 on 3.13),
which every reader's `except ValueError` let through as a traceback (a results store, a data check
report, a corpus's JSONL line)."""

from __future__ import annotations

import ast
import json

import pytest

from micromerge.core.json_text import parse_json
from tests.test_layers import ROOT, package_files

# json.loads of text micromerge itself made a moment before, or of the package's own model configs
OWN_TEXT = {
    ("merging/execute.py", "json.dumps"),
    ("finetune/run_folder.py", "json.dumps"),
    ("analysis/report.py", "frame.to_json"),
    ("merging/zoo.py", "(CONFIG_DIR / self.arch_config).read_text"),
    ("merging/models.py", "text"),
    ("micromerge/core/json_text.py", "text"),
}


def test_json_nested_past_the_parser_is_a_json_decode_error_that_says_so():
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(RecursionError):
        json.loads(deep)  # what every reader met before
    for text in (deep, deep.encode()):
        with pytest.raises(json.JSONDecodeError) as caught:
            parse_json(text)
        assert str(caught.value) == "nested too deeply to read"
    assert parse_json(b'{"a": [1, 2.5, null]}') == {"a": [1, 2.5, None]}


def test_every_json_loads_in_the_package_reads_its_own_text():
    """A new reader of a file calls parse_json: json.loads is left only where the text is the
    package's own (a JSON round trip, a model config shipped with it)."""
    calls = set()
    for path in package_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "json.loads":
                argument = node.args[0]
                text = ast.unparse(argument.func if isinstance(argument, ast.Call) else argument)
                calls.add((path.relative_to(ROOT).as_posix(), text))
    assert calls == OWN_TEXT
