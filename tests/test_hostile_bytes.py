"""Property-based tests (hypothesis) for the parsers that read hostile bytes: the safetensors header
reader, the config-file loader, the results-store reader and the `data check` report reader. Whatever the bytes, each
returns a value or raises MicromergeError (one line for the user), never another exception."""

from __future__ import annotations

import json
import math
import struct
import tempfile
import warnings
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from micromerge.core.config_files import load_section
from micromerge.core.config_schema import MERGE_SCHEMA
from micromerge.core.errors import MicromergeError
from micromerge.eval.store import ResultStore
from micromerge.finetune.check_report import COUNTS, earlier_check
from micromerge.merging.tensor_source import parse_safetensors_header

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "X9"]) | json_values,
        "shape": st.lists(st.integers(-3, 6) | st.floats(0, 4), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-8, 64), min_size=0, max_size=3) | json_values,
    },
)
headers = st.dictionaries(st.text(max_size=6), entries | json_values, max_size=4)


def _scratch(data: bytes, suffix: str) -> Path:
    with tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as handle:
        handle.write(data)
    return Path(handle.name)


@SETTINGS
@given(header=headers | json_values, tail=st.binary(max_size=64), lie=st.integers(0, 200) | st.none())
def test_safetensors_header_reader(header, tail, lie):
    raw = json.dumps(header).encode()
    path = _scratch(struct.pack("<Q", len(raw) if lie is None else lie) + raw + tail, ".safetensors")
    try:
        entries, metadata, _ = parse_safetensors_header(path)
        assert all(isinstance(v, str) for v in metadata.values())
        assert all(e.end - e.start == e.meta.nbytes >= 0 for e in entries.values())
    except MicromergeError as error:
        assert "\n" not in str(error)
    finally:
        path.unlink()


@SETTINGS
@given(data=st.binary(max_size=200))
def test_safetensors_reader_on_raw_bytes(data):
    path = _scratch(data, ".safetensors")
    try:
        parse_safetensors_header(path)
    except MicromergeError:
        pass
    finally:
        path.unlink()


@SETTINGS
@given(
    text=st.text(max_size=200)
    | st.dictionaries(st.sampled_from(sorted(MERGE_SCHEMA)), json_values, max_size=5).map(
        lambda d: json.dumps({"merge": d})
    ),
    suffix=st.sampled_from([".toml", ".yaml", ".yml", ".json"]),
    raw=st.binary(max_size=40),
)
@example(text="merge:\n  ?\n", suffix=".yaml", raw=b"")  # a null key: found by this test, kept
def test_config_loader(text, suffix, raw):
    path = _scratch(text.encode("utf-8", "surrogatepass") + raw, suffix)
    try:
        values = load_section(path, "merge", MERGE_SCHEMA)
        assert isinstance(values, dict) and set(values) <= set(MERGE_SCHEMA)
    except MicromergeError as error:
        assert "\n" not in str(error)
    finally:
        path.unlink()


store_lines = st.one_of(
    st.binary(max_size=40),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"schema": st.just(1) | json_values, "run_id": st.text(max_size=4) | json_values},
        optional={
            "alpha": json_values,
            "task": json_values,
            "metric": json_values,
            "value": json_values,
            "groups": json_values,
            "split": json_values,
        },  # fmt: skip
    ).map(lambda d: json.dumps(d).encode()),
)


@SETTINGS
@given(lines=st.lists(store_lines, max_size=8), newline=st.booleans())
@example(lines=[b"PK\x03\x04 a zip", b'{"schema": 1}'], newline=True)
@example(
    lines=[b'{"schema": 1, "run_id": "", "task": "", "metric": ""}'], newline=False
)  # no alpha: KeyError
@example(  # nested past Python's parser: a RecursionError's traceback
    lines=[b'{"schema": 1, "run_id": "x", "alpha": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"], newline=True
)
def test_results_store_reader(lines, newline):
    path = _scratch(b"\n".join(lines) + (b"\n" if newline else b""), ".jsonl")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = ResultStore(path).rows()
            for row in rows:
                ResultStore.identity(row)
                assert isinstance(row["run_id"], str) and isinstance(row["task"], str)
            reader = ResultStore(path)  # one run's rows, through the index of run lines
            for run_id in {r["run_id"] for r in rows} | {"x"}:
                assert reader.rows(run_id) == [r for r in rows if r["run_id"] == run_id], run_id
            before = path.read_bytes()
            try:
                ResultStore(path).append(
                    [{"run_id": "x", "alpha": 0.5, "task": "t", "metric": "accuracy", "value": 1.0}]
                )
            except (
                MicromergeError
            ) as error:  # a checkpoint's first bytes, or a line of no JSON: refused, untouched
                assert "is a checkpoint" in str(error) or "not a results store" in str(error)
                assert path.read_bytes() == before
            else:
                kept = before if before.endswith(b"\n") else before[: before.rfind(b"\n") + 1]
                tail = before[len(kept) :]
                torn = tail.lstrip(b"\x00").startswith(b"{") or not tail.strip(b"\x00 \t\r")
                assert path.read_bytes().startswith(before if not torn else kept), "only a torn row is cut"
                assert any(r["run_id"] == "x" for r in ResultStore(path).rows())
                assert [r["alpha"] for r in reader.rows("x")] == [0.5], "another writer's row, seen"
    finally:
        path.unlink()


check_reports = st.fixed_dictionaries(
    {"report": st.just("micromerge data check"), "data": st.just("corpus")},
    optional={
        **{count: st.integers(-2, 4) | json_values for count in COUNTS},
        "unreadable": st.lists(st.text(max_size=4), max_size=3) | json_values,
        "complete": st.booleans() | json_values,
        "data_fingerprint": st.text(max_size=4) | json_values,
    },
)


@SETTINGS
@given(report=check_reports)
@example(  # a count of Infinity (Python's json reads it): an OverflowError's traceback, found by hand
    report={"report": "micromerge data check", "data": "corpus", "unreadable": [], "parts_checked": math.inf,
            "read": 0, "parts_sized_for_workers": 1, "parts": 2, "complete": False, "data_fingerprint": "0"}
)  # fmt: skip
def test_data_check_report_reader(report):
    path = _scratch(json.dumps(report).encode(), ".json")
    try:
        earlier = earlier_check(path, "corpus")
        assert earlier is not None and earlier.per_part >= 1 and earlier.progress.read >= 0
        assert 0 <= earlier.progress.parts_done <= earlier.parts
        assert all(isinstance(name, str) for name in earlier.progress.unreadable)
    except MicromergeError as error:
        assert "\n" not in str(error)
    finally:
        path.unlink()
