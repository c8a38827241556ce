"""The cycle collector pauses while a results store is decoded and its runs are tabled (21 of 27
seconds of decoding a 500 MB store were the collector: BENCHMARKS.md, "Reports at the paper
grid's size"), and comes back as it was, whatever happens inside."""

from __future__ import annotations

import gc
import json

import pytest

from micromerge.analysis import tables
from micromerge.core.collector import cycle_collection_paused
from micromerge.eval.store import ResultStore
from tests.test_analysis import write_store


def test_the_collector_is_off_inside_and_as_it_was_after_even_on_an_error():
    assert gc.isenabled()
    with cycle_collection_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(KeyError), cycle_collection_paused():
        raise KeyError("x")
    assert gc.isenabled()
    gc.disable()
    try:
        with cycle_collection_paused():
            pass
        assert not gc.isenabled(), "a caller's own pause is not ended by ours"
    finally:
        gc.enable()


def test_a_store_is_decoded_and_tabled_with_the_collector_paused(tmp_path, monkeypatch):
    store = write_store(tmp_path / "r.jsonl")
    states: dict[str, list[bool]] = {"decode": [], "table": []}
    decode, table = json.loads, tables.task_table
    monkeypatch.setattr(json, "loads", lambda text: states["decode"].append(gc.isenabled()) or decode(text))
    monkeypatch.setattr(
        tables, "task_table", lambda rows: states["table"].append(gc.isenabled()) or table(rows)
    )
    rows = ResultStore(store).rows()
    assert len(states["decode"]) == len(rows) and not any(states["decode"])
    (run,) = tables.load_runs(store)
    assert states["table"] == [False] and len(run.table) == len(rows)
    assert gc.isenabled()
