"""Issue #11 on the evaluation path: the results store (L3, L5, C7), bad numbers and file-system
errors (C2, C3), image bombs (C5), and data changed in place (M6). Each test fails on the code
before the fix and passes after."""

from __future__ import annotations

import errno
import fcntl
import json
import multiprocessing
import os
import re
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from micromerge.cli import cli
from micromerge.core.errors import MicromergeError
from micromerge.eval.data import load_benchmark
from micromerge.eval.images import build_image_cache, decode_payloads
from micromerge.eval.store import ResultStore
from tests.helpers import write_checkpoint
from tests.ubench_fixture import write_fixture


def _row(alpha, task="t", value=0.5, **extra):
    return {
        "run_id": "r",
        "alpha": alpha,
        "task": task,
        "split": "all",
        "metric": "accuracy",
        "value": value,
        **extra,
    }


@pytest.fixture
def setup(tmp_path):
    bench = write_fixture(tmp_path / "bench", per_class=2)
    write_checkpoint(tmp_path / "a.safetensors", 0)
    write_checkpoint(tmp_path / "b.safetensors", 1)
    return tmp_path, bench


def _sweep(tmp, bench, *extra, store="s.jsonl"):
    args = [
        "sweep",
        "--base",
        str(tmp / "a.safetensors"),
        "--ft",
        str(tmp / "b.safetensors"),
        "--data",
        str(bench),
    ]
    args += [
        "--store",
        str(tmp / store),
        "--cache-dir",
        str(tmp / "cache"),
        "--bootstrap",
        "0",
        "--quiet",
        *extra,
    ]
    return CliRunner().invoke(cli, args)


def test_identical_sweeps_and_repeated_alphas_store_each_row_once(setup):
    tmp, bench = setup
    assert _sweep(tmp, bench, "--alphas", "0,0.5,0.5,1").exit_code == 0
    lines = (tmp / "s.jsonl").read_text().splitlines()
    assert len({json.loads(line)["alpha"] for line in lines}) == 3
    # the same sweep again under another store name, then both stores' rows appended to one
    store = ResultStore(tmp / "s.jsonl")
    assert store.append(store.rows()) == 0
    assert len((tmp / "s.jsonl").read_text().splitlines()) == len(lines)


def _append_many(path: str, start: int) -> None:
    store = ResultStore(path)
    for i in range(40):
        store.append([_row(float((start + i) % 40))])


def test_two_processes_appending_at_once_lose_and_duplicate_nothing(tmp_path):
    path = str(tmp_path / "r.jsonl")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(path, start)) for start in (0, 20)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    lines = Path(path).read_text().splitlines()
    assert sorted(json.loads(line)["alpha"] for line in lines) == [float(i) for i in range(40)]


def test_a_complete_last_row_without_newline_is_kept(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"schema": 1, **_row(0.0)}))  # no trailing newline
    store = ResultStore(path)
    assert len(store.rows()) == 1
    run_id = store.rows()[0]["run_id"]
    assert [r["alpha"] for r in ResultStore(path).rows(run_id)] == [0.0], "one run's reader reads it too"
    assert store.append([_row(0.0)]) == 0, "it is there: not written again"
    store.append([_row(1.0)])
    assert [r["alpha"] for r in store.rows()] == [0.0, 1.0]


def test_lines_of_the_wrong_shape_are_skipped_and_counted(tmp_path):
    path = tmp_path / "r.jsonl"
    good = json.dumps({"schema": 1, **_row(0.0)})
    bad = ["42", "null", json.dumps({"schema": 1, "alpha": 0}), json.dumps({"schema": 1, **_row("x")}),
           json.dumps({"schema": 1, **_row(0.5, groups=None)}), json.dumps({"schema": 1, **_row(float("nan"))})]  # fmt: skip
    path.write_bytes(("\n".join([good, *bad]) + "\n").encode() + b"\xff\xfe\n")
    with pytest.warns(UserWarning, match=r"skipped 7 line\(s\).*first: line 2"):
        rows = ResultStore(path).rows()
    assert [r["alpha"] for r in rows] == [0.0]


@pytest.mark.parametrize(
    "line",
    [
        {"schema": 2, **_row(0.25)},  # another schema version
        {"schema": 1, **_row(True)},  # a bool is an int to Python, not an alpha
        {"schema": 1, **_row(0.25, value=True)},
        {"schema": 1, **_row(0.25, split=3)},
        {"schema": 1, **_row(0.25, task=3)},
        {"schema": 1, **_row(0.25, metric=None)},
    ],
    ids=["schema", "bool-alpha", "bool-value", "split-not-text", "task-not-text", "metric-not-text"],
)
def test_each_field_of_the_wrong_type_makes_the_line_no_row(tmp_path, line):
    """Readers group and average these fields: a line whose field has the wrong type is
    skipped (and counted), never read as a row with alpha 1 or accuracy 1."""
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"schema": 1, **_row(0.0)}) + "\n" + json.dumps(line) + "\n")
    with pytest.warns(UserWarning, match=r"skipped 1 line\(s\).*first: line 2"):
        rows = ResultStore(path).rows()
    assert [r["alpha"] for r in rows] == [0.0]


def test_a_bad_line_mid_file_is_counted_even_when_the_last_row_has_no_newline(tmp_path):
    """Only the *last* line of a file without a trailing newline may be a torn append; a bad line
    before it is damage the user hears about."""
    path = tmp_path / "r.jsonl"
    rows = [json.dumps({"schema": 1, **_row(a)}) for a in (0.0, 1.0)]
    path.write_text(rows[0] + "\n{not json\n" + rows[1])  # no trailing newline
    with pytest.warns(UserWarning, match=r"skipped 1 line\(s\).*first: line 2"):
        assert [r["alpha"] for r in ResultStore(path).rows()] == [0.0, 1.0]


def test_a_torn_last_line_is_no_damage_and_a_repeated_row_is_read_once(tmp_path):
    """A writer killed mid-append leaves the start of a row: silently not a row (the next append
    cuts it). Stores joined with `cat` hold a row twice: readers give it once."""
    path = tmp_path / "r.jsonl"
    row = json.dumps({"schema": 1, **_row(0.0)})
    path.write_text(row + "\n" + row + "\n" + row[:20])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r["alpha"] for r in ResultStore(path).rows()] == [0.0]
    assert [r["alpha"] for r in ResultStore(path).rows("r")] == [0.0]


def test_a_torn_row_longer_than_the_next_append_leaves_nothing_behind(tmp_path):
    """The torn tail is cut, not written over: a shorter append would leave the torn row's end."""
    path = tmp_path / "r.jsonl"
    whole = json.dumps({"schema": 1, **_row(0.0)}, sort_keys=True) + "\n"
    torn = json.dumps({"schema": 1, **_row(0.5, task="t" * 500)})[:400]
    path.write_text(whole + torn)
    assert ResultStore(path).append([_row(1.0)]) == 1
    lines = path.read_text().splitlines()
    assert lines[0] + "\n" == whole and [json.loads(line)["alpha"] for line in lines] == [0.0, 1.0]


def test_rows_another_tool_wrote_in_compact_json_count_as_written(tmp_path):
    """A row whose run id is not spelled as this module writes it (compact JSON from another tool)
    is indexed for every run; appended between two appends of one store object, it is still
    seen there, not written a second time."""
    path = tmp_path / "r.jsonl"
    store = ResultStore(path)
    assert store.append([_row(0.0)]) == 1
    with open(path, "a") as handle:
        handle.write(json.dumps({"schema": 1, **_row(0.5)}, separators=(",", ":")) + "\n")
    assert store.append([_row(0.5), _row(1.0)]) == 1
    assert [json.loads(line)["alpha"] for line in path.read_text().splitlines()] == [0.0, 0.5, 1.0]


def test_each_runs_first_row_is_found_the_last_without_its_newline_too(tmp_path):
    path = tmp_path / "r.jsonl"
    rows = [json.dumps({"schema": 1, **_row(a, run_id=r)}) for a, r in ((0.0, "a"), (0.5, "a"), (0.0, "b"))]
    path.write_text("\n".join(rows))  # b's only row has no newline
    firsts = ResultStore(path).first_rows()
    assert {run: row["alpha"] for run, row in firsts.items()} == {"a": 0.0, "b": 0.0}
    assert list(firsts) == ["a", "b"]


def test_a_runs_first_row_is_found_past_lines_that_are_no_rows_and_past_long_ones(tmp_path):
    """A run's lines are found by the bytes that name it, so its span may begin with a line that
    is no row (another schema) and hold one longer than a 64 KiB read; a run of one line is read
    to its end, and a run whose only line is no row has no first row (and ends the search)."""
    path = tmp_path / "r.jsonl"
    lines = [
        {"schema": 1, **_row(0.0, run_id="x")},
        {"schema": 2, **_row(0.1, run_id="w")},  # w: no row at all
        {"schema": 2, **_row(0.2, run_id="y")},
        {"schema": 1, **_row(0.3, run_id="y", note="n" * 70_000)},  # longer than one 64 KiB read
        {"schema": 1, **_row(0.4, run_id="y")},
        {"schema": 1, **_row(0.5, run_id="z")},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    firsts = ResultStore(path).first_rows()
    assert {run: row["alpha"] for run, row in firsts.items()} == {"x": 0.0, "y": 0.3, "z": 0.5}


def test_one_runs_rows_include_a_last_row_without_its_newline_written_since_the_last_read(tmp_path):
    """A store object reads only what was written since it last read: a last row added by another
    writer without its newline (a hand edit, a torn append that is whole) is its run's too, to
    every reader."""
    path = tmp_path / "r.jsonl"
    store = ResultStore(path)
    store.append([_row(0.0), _row(0.5)])
    with open(path, "a") as handle:
        handle.write(
            json.dumps({"schema": 1, **_row(1.0)}) + "\n" + json.dumps({"schema": 1, **_row(0.0, run_id="s")})
        )
    assert [row["alpha"] for row in store.rows("r")] == [0.0, 0.5, 1.0]
    assert [row["alpha"] for row in store.rows("s")] == [0.0]
    assert list(store.first_rows()) == ["r", "s"]


def test_an_append_keeps_a_last_row_without_its_newline_written_since_its_last_read(tmp_path):
    """A row another writer added after this store object's last append, whole but without its
    newline, is a row: the next append counts it as written and puts its own rows after it, not
    over it (cut as if it were torn, it would be lost)."""
    path = tmp_path / "r.jsonl"
    store = ResultStore(path)
    assert store.append([_row(0.0, task="a longer task name than the next row's")]) == 1
    with open(path, "a") as handle:
        handle.write(json.dumps({"schema": 1, **_row(0.5)}))
    assert store.append([_row(0.5), _row(1.0)]) == 1
    assert [json.loads(line)["alpha"] for line in path.read_text().splitlines()] == [0.0, 0.5, 1.0]


def test_a_store_in_folders_not_made_yet_is_made_with_them(tmp_path):
    path = tmp_path / "results" / "sweep" / "r.jsonl"
    assert ResultStore(path).append([_row(0.0)]) == 1
    assert [row["alpha"] for row in ResultStore(path).rows()] == [0.0]


def test_a_rows_line_is_the_same_bytes_whatever_order_its_keys_came_in(tmp_path):
    """Same inputs, same bytes out: a row built in another order (another tool, a merged dict)
    is written with its keys sorted."""
    rows = [_row(0.0, note="n"), dict(reversed(list(_row(0.0, note="n").items())))]
    written = []
    for n, row in enumerate(rows):
        ResultStore(tmp_path / f"{n}.jsonl").append([row])
        written.append((tmp_path / f"{n}.jsonl").read_bytes())
    assert written[0] == written[1] and written[0].startswith(b'{"alpha": 0.0, "metric": "accuracy", "note"')


def test_a_first_line_of_nuls_before_a_row_is_no_safetensors_header(tmp_path):
    """A safetensors file starts with its header's length, never 0: eight NULs (a crash zeroed
    them) then a row's `{` are a damaged store, appended to, not a checkpoint to refuse."""
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"\x00" * 8 + json.dumps({"schema": 1, **_row(0.0)}).encode() + b"\n")
    assert ResultStore(path).append([_row(0.5)]) == 1
    assert path.read_bytes().count(b"\n") == 2


def test_an_append_reads_past_lines_that_are_no_rows_without_a_warning(tmp_path):
    """An append reads only its own runs' lines, to skip rows already there; a line of its run that
    is no row (another schema) is passed over in silence there, on the first read and on catching
    up with another writer, and counted once by a reader of every row."""
    path = tmp_path / "r.jsonl"
    other_schema = json.dumps({"schema": 2, **_row(0.0)}) + "\n"
    path.write_text(json.dumps({"schema": 1, **_row(0.0)}) + "\n" + other_schema)
    store = ResultStore(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.append([_row(0.0), _row(0.5)]) == 1
        with open(path, "a") as handle:  # another writer's line, read when catching up
            handle.write(other_schema)
        assert store.append([_row(1.0)]) == 1
    with pytest.warns(UserWarning, match=r"skipped 2 line\(s\).*first: line 2"):
        assert [row["alpha"] for row in ResultStore(path).rows()] == [0.0, 0.5, 1.0]


def test_done_is_the_finished_work_of_one_run_only(tmp_path):
    """Resume skips what `done(run_id)` returns: another run's rows at the same alpha and task
    must not make this run skip its own work."""
    store = ResultStore(tmp_path / "r.jsonl")
    store.append([_row(0.0, run_id="a"), _row(0.5, run_id="b")])
    assert store.done("a") == {(0.0, "t", None, "all", "accuracy")}
    assert store.done("c") == set()


def test_non_finite_values_are_stored_as_valid_json(tmp_path):
    store = ResultStore(tmp_path / "r.jsonl")
    store.append([_row(0.0, value=float("nan"))])
    text = (tmp_path / "r.jsonl").read_text()
    assert "NaN" not in text and json.loads(text, parse_constant=lambda c: pytest.fail(c))["value"] is None


def test_rows_are_never_appended_to_a_checkpoint_but_a_damaged_store_goes_on(tmp_path):
    """Every writer (a soup's relabelled rows, the demo's) appends through the store, not only
    those that checked it first: a checkpoint's bytes are refused there too, left as they were.
    Only a checkpoint (told by its first bytes): a store whose first line a crash zeroed keeps
    taking rows, as tests/test_hostile_bytes.py's property asks of any junk."""
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(range(256)))
    before = checkpoint.read_bytes()
    with pytest.raises(MicromergeError, match="model.safetensors: is a checkpoint, not a results store"):
        ResultStore(checkpoint).append([_row(0.0)])
    assert checkpoint.read_bytes() == before
    torn_first = tmp_path / "r.jsonl"
    torn_first.write_text('{"schema": 1, "run_id": "x", "al')  # a kill during the first append: still a store
    assert ResultStore(torn_first).append([_row(0.0)]) == 1
    zeroed = tmp_path / "z.jsonl"  # a crash left its first block NULs: junk skipped, the store goes on
    zeroed.write_bytes(b"\x00" * 64 + b"\n" + json.dumps({"schema": 1, **_row(0.5)}).encode() + b"\n")
    assert ResultStore(zeroed).append([_row(0.0)]) == 1
    for magic in (b"PK\x03\x04", b"\x80\x02"):  # torch's zip, a pickle
        (tmp_path / "m.pt").write_bytes(magic + bytes(64))
        with pytest.raises(MicromergeError, match="m.pt: is a checkpoint"):
            ResultStore(tmp_path / "m.pt").append([_row(0.0)])


def test_a_document_given_as_store_is_refused_and_a_hand_added_last_line_is_kept(tmp_path):
    """A notes file given as --store lost its last line (cut as a torn row) and got rows after its
    text. It is refused now, untouched. A store whose last line someone typed (no newline) keeps
    it: only a torn row, or crash NULs, is cut before an append."""
    notes = tmp_path / "notes.md"
    notes.write_text("# My notes\nthe line without a newline")
    before = notes.read_bytes()
    for check in (ResultStore(notes).check_writable, lambda: ResultStore(notes).append([_row(0.0)])):
        with pytest.raises(MicromergeError, match="notes.md: not a results store \\(its first line"):
            check()
        assert notes.read_bytes() == before
    store = tmp_path / "r.jsonl"
    ResultStore(store).append([_row(0.0)])
    with open(store, "a") as handle:
        handle.write("checked by hand on Monday")
    assert ResultStore(store).append([_row(0.5)]) == 1
    lines = store.read_text().splitlines()
    assert lines[1] == "checked by hand on Monday" and len(lines) == 3
    with open(store, "ab") as handle:
        handle.write(b"\x00" * 8)  # crash NULs where a row was to be: cut
    assert ResultStore(store).append([_row(1.0)]) == 1
    assert b"\x00" not in store.read_bytes() and len(store.read_text().splitlines()) == 4


def test_sweep_opens_its_checkpoints_as_its_flags_say(setup):
    """`sweep --allow-pickle --arch` reach the checkpoints the sweep opens, through the job it
    builds, as in `merge`: a trainer's `{"state_dict", "args": Namespace}` needs the first."""
    import argparse

    import torch

    from tests.helpers import random_state_dict

    tmp, bench = setup
    torch.save({"state_dict": random_state_dict(1), "args": argparse.Namespace(lr=1e-5)}, tmp / "b.pt")
    args = ["sweep", "--base", str(tmp / "a.safetensors"), "--ft", str(tmp / "b.pt"), "--data", str(bench)]
    args += ["--alphas", "0", "--tasks", "modality", "--store", str(tmp / "s.jsonl"), "--quiet"]
    args += ["--cache-dir", str(tmp / "cache"), "--bootstrap", "0"]
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code == 2 and "pass --allow-pickle" in refused.output, refused.output
    opened = CliRunner().invoke(cli, [*args, "--allow-pickle", "--arch", "nano-clip"])
    assert opened.exit_code == 0, opened.output


def test_a_sweep_of_linear_is_refused_before_any_work(setup):
    """linear weighs the models by --weights and reads no alpha: its sweep evaluated one merge at
    every alpha and printed a flat curve as if it were one."""
    tmp, bench = setup
    result = _sweep(tmp, bench, "--method", "linear")
    assert result.exit_code == 2 and "--alphas: linear takes no alpha" in result.stderr, result.output
    assert not (tmp / "s.jsonl").exists()


def test_report_survives_a_store_with_junk_lines(setup):
    tmp, bench = setup
    assert _sweep(tmp, bench, "--alphas", "0,1").exit_code == 0
    with open(tmp / "s.jsonl", "a") as handle:
        handle.write('42\n{"schema": 1, "run_id": "r", "alpha": "x"}\n')
    result = CliRunner().invoke(
        cli, ["report", str(tmp / "s.jsonl"), "--out", str(tmp / "rep"), "--target", "domain:pathology"]
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "flags, needle",
    [
        (("--batch-size", "0"), "--batch-size 0: must be at least 1"),
        (("--batch-size", "-5"), "--batch-size -5"),
        (("--bootstrap", "100000000"), "--bootstrap 100000000: must be in"),
        (("--bootstrap", "-1"), "--bootstrap -1"),
        # one resample printed an interval of zero width
        (("--bootstrap", "1"), "--bootstrap 1: a 95% percentile interval needs at least 40 resamples"),
        (("--seed", "-1"), "--seed -1: must be a non-negative integer"),
        # `--alphas "$ALPHAS"` with the variable unset: the sweep evaluated nothing and said
        # "results in s.jsonl", a store it never wrote
        (("--alphas", ""), "--alphas '': empty (an unset variable?)"),
    ],
)
def test_bad_numbers_are_one_line(setup, flags, needle):
    tmp, bench = setup
    result = _sweep(tmp, bench, "--alphas", "0", *flags)
    assert result.exit_code == 2 and needle in result.output, result.output
    assert not (tmp / "s.jsonl").exists()


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("seed", -1, "--seed -1: must be non-negative"),
        ("batch_size", 0, "--batch-size 0: must be at least 1"),
    ],
)
def test_settings_built_by_a_script_are_checked_as_the_flags_are(tmp_path, field, value, needle):
    """A script that builds EvalSettings itself (as the ablation runner and the demo do) gets the
    same refusal the command line gives."""
    from micromerge.eval.settings import EvalSettings

    with pytest.raises(MicromergeError, match=needle):
        EvalSettings("x", tmp_path / "s.jsonl", tmp_path, **{field: value})


def test_the_bounds_of_the_checked_settings_are_themselves_accepted(tmp_path):
    """The refusals above stop at the bound: a batch of one image, no intervals, the fewest
    resamples of an interval and the largest resample count are settings a user may give."""
    from micromerge.eval.settings import MAX_BOOTSTRAP, MIN_BOOTSTRAP, EvalSettings, check_bootstrap

    for resamples in (0, MIN_BOOTSTRAP, MAX_BOOTSTRAP):
        check_bootstrap(resamples)
    with pytest.raises(
        MicromergeError, match=r"^--bootstrap 39: a 95% percentile interval needs at least 40 resamples"
    ):
        check_bootstrap(MIN_BOOTSTRAP - 1)
    with pytest.raises(MicromergeError, match=r"--bootstrap 100001: must be in \[0, 100,000\]"):
        check_bootstrap(MAX_BOOTSTRAP + 1)
    assert EvalSettings("x", tmp_path / "s.jsonl", tmp_path, batch_size=1, seed=0).batch_size == 1


def test_an_unwritable_store_or_cache_fails_before_any_work(setup):
    tmp, bench = setup
    (tmp / "store-folder").mkdir()
    (tmp / "a-file").write_text("x")
    for extra, needle in (
        (("--store", str(tmp / "store-folder")), "is a folder"),
        (("--store", str(tmp / "a-file" / "r.jsonl")), "cannot write"),
        (("--cache-dir", str(tmp / "a-file" / "cache")), "--cache-dir"),
    ):
        args = ["eval", "--model", str(tmp / "a.safetensors"), "--data", str(bench), "--quiet"]
        args += ["--store", str(tmp / "r.jsonl"), "--cache-dir", str(tmp / "cache"), *extra]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2 and needle in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("exists", [False, True])
def test_a_store_on_a_filesystem_without_locks_is_one_line_before_any_work(setup, monkeypatch, exists):
    """Some NFS, Lustre and GPFS mounts answer flock with ENOLCK, ENOSYS or EOPNOTSUPP. That was
    an OSError traceback from the store's first append, after the evaluation had run (raised again
    by the unlock in the same `finally`, which hid the first). The store now asks before any work
    (the cache folder is not made yet) and says where a store can go; a script's append is told
    the same and writes nothing. Simulated: every filesystem of this machine gives locks."""
    tmp, bench = setup
    store = tmp / "r.jsonl"
    if exists:
        ResultStore(store).append([_row(0.0)])
    before = store.read_bytes() if exists else None

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    args = ["eval", "--model", str(tmp / "a.safetensors"), "--data", str(bench), "--quiet"]
    result = CliRunner().invoke(cli, [*args, "--store", str(store), "--cache-dir", str(tmp / "cache")])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1
    said = f"--store {store}: this filesystem gives no file locks ({os.strerror(errno.ENOLCK)})"
    assert said in result.output and "keep the store on a local disk" in result.output
    assert not (tmp / "cache").exists()
    with pytest.raises(MicromergeError, match=re.escape(said)):
        ResultStore(store).append([_row(0.5)])
    assert (store.read_bytes() if store.exists() else None) == before


def test_a_run_refused_for_its_input_leaves_no_store_behind_and_a_checkpoint_is_no_store(setup, tmp_path):
    """The store was created (empty, with its folder) as the first check of every run, so a mistyped
    --data left `results/results.jsonl` behind; `soup` left its candidate store. The check now
    writes nothing. And a checkpoint passed as --store had its tail cut as a torn row and rows
    appended: it is refused."""
    tmp, bench = setup
    stores = tmp_path / "stores"
    stores.mkdir()
    store = stores / "new-folder" / "r.jsonl"
    for command in (
        ["eval", "--model", str(tmp / "a.safetensors")],
        ["soup", "--base", str(tmp / "a.safetensors"), "--ft", str(tmp / "a.safetensors")],
    ):
        args = [*command, "--data", str(tmp / "no-such-bench"), "--quiet", "--store", str(store)]
        result = CliRunner().invoke(cli, [*args, "--cache-dir", str(tmp / "cache")])
        assert result.exit_code == 2 and "no-such-bench" in result.output, result.output
        assert sorted(stores.iterdir()) == [], "no store, no folder, and the probe leaves nothing"
    args = ["eval", "--model", str(tmp / "a.safetensors"), "--data", str(bench), "--tasks", "modality"]
    args += ["--quiet", "--cache-dir", str(tmp / "cache")]
    result = CliRunner().invoke(cli, [*args, "--store", str(store)])
    assert result.exit_code == 0 and store.stat().st_size > 0, result.output
    checkpoint = (tmp / "a.safetensors").read_bytes()  # `--store` given the checkpoint by mistake:
    mistaken = [*args, "--store", str(tmp / "a.safetensors")]
    result = CliRunner().invoke(cli, mistaken)
    assert result.exit_code == 2 and "is a checkpoint, not a results store" in result.output, result.output
    assert (tmp / "a.safetensors").read_bytes() == checkpoint, "its tail was cut as a torn row, rows appended"


def test_what_is_no_store_is_refused_in_one_line_by_every_reader(tmp_path):
    """`report model.safetensors` skipped 49,294 "lines" with a warning, then said it held no rows;
    `export --results manifest.json` (an indented JSON file: every line skipped) said "no eval of it
    in it", and of a path that did not exist the same. Each is refused as what it is, naming the
    flag the user typed; a manifest is refused as --store too, untouched. Neither leaves the empty
    --out folders it made."""
    write_checkpoint(tmp_path / "a.safetensors", 0)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"method": "linear", "alpha": 0.5}, indent=2))
    before = manifest.read_bytes()
    expected = {
        "a.safetensors": "is a checkpoint, not a results store",
        "manifest.json": "not a results store \\(its first line is not a JSON row\\)",
        "missing.jsonl": "results store not found",
        "": "is a folder; pass a results store",
    }
    for name, message in expected.items():
        with pytest.raises(MicromergeError, match=f"^--results {tmp_path / name}: {message}"):
            ResultStore(tmp_path / name).check_readable("--results")
        nested = tmp_path / "rep" / "inner"  # the folders a refused report made are removed again
        report = CliRunner().invoke(cli, ["report", str(tmp_path / name), "--out", str(nested)])
        assert report.exit_code == 2 and report.output.count("\n") == 1, report.output
        card = ["export", str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "card")]
        exported = CliRunner().invoke(cli, [*card, "--results", str(tmp_path / name)])
        assert exported.exit_code == 2 and f"--results {tmp_path / name}: " in exported.output, (
            exported.output
        )
        assert not (tmp_path / "card").exists() and not (tmp_path / "rep").exists()
    with pytest.raises(MicromergeError, match="manifest.json: not a results store"):
        ResultStore(manifest).append([_row(0.0)])
    assert manifest.read_bytes() == before
    compact = tmp_path / "r.jsonl"  # a store's first line is a whole row, `{` then its first key
    compact.write_text(json.dumps({"schema": 1, **_row(0.5)}) + "\n")
    ResultStore(compact).check_readable("--results")
    assert ResultStore(compact).append([_row(0.0)]) == 1


def _png_declaring(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def test_a_decompression_bomb_is_a_corrupt_image(tmp_path):
    payloads = [{"bytes": _png_declaring(30000, 30000), "path": None}]
    pixels, valid = decode_payloads(payloads, 32, progress=False)
    assert not valid[0] and pixels.shape == (1, 3, 32, 32)


def test_a_task_none_of_whose_images_reads_is_one_line_not_a_task_that_vanishes(tmp_path):
    """Every image of one source unreadable: the task got no row (gone from the table, the report
    and the pools of the headline said to hold every task), and a sweep, never finding its
    completion rows, evaluated every alpha again at each resume. Refused, naming the task; the
    other tasks go on with --tasks."""
    import datasets

    from micromerge.eval.tasks import discover_tasks

    folder = write_fixture(tmp_path / "bench", per_class=2, corrupt=0, fmt="save_to_disk")
    dataset = datasets.load_from_disk(str(folder)).cast_column("image", datasets.Image(decode=False))
    task, second = [t for t in discover_tasks(dataset) if t.level == "fine"][:2]
    spoiled = set(task.image_rows)
    images = [
        {"bytes": b"not an image", "path": None} if i in spoiled else image
        for i, image in enumerate(dataset["image"])
    ]
    dataset = (
        dataset.remove_columns("image").add_column("image", images).cast_column("image", datasets.Image())
    )
    dataset.save_to_disk(str(tmp_path / "spoiled"))
    write_checkpoint(tmp_path / "a.safetensors", 0)
    args = ["eval", "--model", str(tmp_path / "a.safetensors"), "--data", str(tmp_path / "spoiled")]
    args += [
        "--store",
        str(tmp_path / "r.jsonl"),
        "--quiet",
        "--bootstrap",
        "0",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    refused = CliRunner().invoke(cli, [*args, "--tasks", f"modality,{task.name}"])
    assert refused.exit_code == 2 and len(refused.output.strip().splitlines()) == 1, refused.output
    assert f"none of the {len(spoiled)} images of task {task.name} can be read" in refused.output
    assert not (tmp_path / "r.jsonl").exists()
    kept = CliRunner().invoke(cli, [*args, "--tasks", "modality"])
    assert kept.exit_code == 0, kept.output
    spoiled |= set(second.image_rows)  # two such tasks: the first named, the other counted
    images = [
        {"bytes": b"not an image", "path": None} if i in spoiled else image for i, image in enumerate(images)
    ]
    dataset.remove_columns("image").add_column("image", images).cast_column(
        "image", datasets.Image()
    ).save_to_disk(str(tmp_path / "spoiled-two"))
    args[args.index(str(tmp_path / "spoiled"))] = str(tmp_path / "spoiled-two")
    both = CliRunner().invoke(cli, [*args, "--tasks", f"{task.name},{second.name}"])
    assert (
        both.exit_code == 2
        and f"images of task {task.name} (and of 1 more task(s)) can be read" in both.output
    )


def test_a_dataset_changed_in_place_gets_a_new_fingerprint(tmp_path):
    """save_to_disk keeps a `_fingerprint` in state.json; a data file replaced under it (same names,
    same state.json) must still be seen as new data, or the image cache serves stale pixels."""
    folder = write_fixture(tmp_path / "bench", per_class=2, corrupt=0, fmt="save_to_disk")
    before = load_benchmark(str(folder), cache_dir=tmp_path / "c")
    cache = tmp_path / "images"
    first = np.array(build_image_cache(before.dataset, before.fingerprint, 16, cache, progress=False).pixels)
    other = write_fixture(tmp_path / "other", per_class=2, seed=1, corrupt=0, fmt="save_to_disk")
    for data_file in folder.glob("data-*.arrow"):
        shutil.copyfile(other / data_file.name, data_file)  # state.json and its fingerprint unchanged
    after = load_benchmark(str(folder), cache_dir=tmp_path / "c")
    assert before.fingerprint != after.fingerprint
    second = build_image_cache(after.dataset, after.fingerprint, 16, cache, progress=False)
    assert not np.array_equal(first, np.asarray(second.pixels)), "the new pixels, not the cached old ones"


def test_report_finds_the_specialist_by_its_bytes_not_the_current_folder(setup, monkeypatch):
    tmp, bench = setup
    work, elsewhere = tmp / "work", tmp / "elsewhere"
    for folder in (work / "ckpt", elsewhere / "ckpt"):
        folder.mkdir(parents=True)
    write_checkpoint(work / "ckpt" / "ft.safetensors", 1)
    (work / "ckpt" / "ft.safetensors.manifest.json").write_text(
        json.dumps({"domain": "pathology", "micromerge_version": "0.1"})
    )
    write_checkpoint(elsewhere / "ckpt" / "ft.safetensors", 2)  # same relative path, other bytes
    (elsewhere / "ckpt" / "ft.safetensors.manifest.json").write_text(
        json.dumps({"domain": "biology", "micromerge_version": "0.1"})
    )
    monkeypatch.chdir(work)
    args = [
        "sweep",
        "--base",
        str(tmp / "a.safetensors"),
        "--ft",
        "ckpt/ft.safetensors",
        "--data",
        str(bench),
    ]
    args += ["--store", "results/s.jsonl", "--cache-dir", str(tmp / "cache"), "--bootstrap", "0", "--quiet"]
    assert CliRunner().invoke(cli, [*args, "--alphas", "0,1"]).exit_code == 0
    monkeypatch.chdir(elsewhere)
    result = CliRunner().invoke(cli, ["report", str(work / "results" / "s.jsonl"), "--out", str(tmp / "rep")])
    assert result.exit_code == 0, result.output
    assert "target (domain:pathology)" in (tmp / "rep" / "report.md").read_text()


def test_report_on_a_coarse_only_sweep_without_a_manifest(setup):
    tmp, bench = setup
    assert _sweep(tmp, bench, "--alphas", "0,1", "--tasks", "coarse").exit_code == 0
    result = CliRunner().invoke(cli, ["report", str(tmp / "s.jsonl"), "--out", str(tmp / "rep")])
    assert result.exit_code == 0, result.output


def test_levels_combine_in_a_task_selection(setup):
    from micromerge.eval.task_selection import select_tasks
    from micromerge.eval.tasks import discover_tasks

    tasks = discover_tasks(load_benchmark(str(setup[1])).dataset)
    assert select_tasks(tasks, "coarse,fine") == tasks
    assert {t.level for t in select_tasks(tasks, "coarse,kather_et_al_2016")} == {"coarse", "fine"}


def test_tasks_that_cannot_be_scored_are_named_not_silently_dropped(setup):
    tmp, bench = setup
    args = [
        "eval",
        "--model",
        str(tmp / "a.safetensors"),
        "--data",
        str(bench),
        "--store",
        str(tmp / "r.jsonl"),
    ]
    args += ["--cache-dir", str(tmp / "cache"), "--bootstrap", "0", "--quiet", "--protocol", "closed-set"]
    only = CliRunner().invoke(cli, [*args, "--tasks", "stain"])  # one class (H&E) in the fixture
    assert only.exit_code == 2 and "no task can be scored" in only.output and "stain" in only.output
    assert not (tmp / "r.jsonl").exists(), "a refused run leaves no store"
    mixed = CliRunner().invoke(cli, [*args, "--tasks", "stain,modality"])
    assert mixed.exit_code == 0 and "not scored under --protocol closed-set: stain" in mixed.output


def test_progress_in_a_log_is_a_few_lines_not_carriage_returns():
    """Off a terminal (CI, `make demo > log`) a bar writes plain lines: at the start, every
    LOG_INTERVAL seconds and at the end, never a carriage-return redraw; ASCII (`#` for the bar,
    not block characters) of at most 100 columns."""
    import io

    from micromerge.core.progress import progress_bar

    log = io.StringIO()
    bar = progress_bar(range(20_000), desc="work", unit="step", file=log)
    for step in bar:
        if step % 10 == 0:
            bar.set_postfix(loss=f"{1 / (step + 1):.4f}")  # as the trainer reports its loss
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and 1 <= len(lines) <= 3, lines
    assert log.getvalue().isascii() and all(len(line) <= 100 for line in lines), (
        "a log of any encoding, any width"
    )
    assert lines[-1].startswith("work: 100%") and "20000/20000" in lines[-1] and "loss=" in lines[-1]
    silent = io.StringIO()
    for _ in progress_bar(range(10), desc="quiet", file=silent, disable=True):
        pass
    assert silent.getvalue() == ""


def test_off_a_terminal_the_hub_libraries_progress_bars_stay_quiet(tmp_path):
    """Ours print a few lines in a log; datasets' own bars ("Generating test split: …", redrawn with
    carriage returns) are turned off for a command whose stderr is not a terminal, unless the user
    set them. The same command with them set on shows one, so the check can see a bar."""
    import subprocess
    import sys

    data = write_fixture(tmp_path / "bench", per_class=2, fmt="parquet") / "test-00000-of-00001.parquet"
    env = {k: v for k, v in os.environ.items() if not k.endswith("_DISABLE_PROGRESS_BARS")}
    command = [sys.executable, "-m", "micromerge.cli", "tasks", "--data", str(data)]

    def stderr_of(cache: str, **extra: str) -> str:
        run_env = {**env, "HF_DATASETS_CACHE": str(tmp_path / cache), **extra}
        done = subprocess.run(command, capture_output=True, text=True, env=run_env, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stderr

    assert "Generating test split" in stderr_of("on", HF_DATASETS_DISABLE_PROGRESS_BARS="0")
    quiet = stderr_of("off")
    assert "Generating" not in quiet and "%|" not in quiet, quiet


def test_a_truncated_image_is_a_corrupt_image_not_a_crash_at_resize():
    """PIL opens a file lazily: a PNG cut in half opens, and only fails when its pixels are read.
    They are read inside the guard, so it is counted as corrupt, and the good one beside it kept."""
    from tests.test_finetune import _png

    whole = _png(0)
    payloads = [{"bytes": whole[: len(whole) // 2], "path": None}, {"bytes": whole, "path": None}]
    pixels, valid = decode_payloads(payloads, 16, progress=False)
    assert valid.tolist() == [False, True] and not pixels[0].any() and pixels[1].any()


def test_pixels_come_from_the_feeds_own_rows_normalised_as_open_clip_does():
    """A feed serves the cache rows it was given (the evaluator's valid rows, not the dataset's
    first ones), by range or by position, as ToTensor then Normalize(mean, std) make them."""
    import torch

    from micromerge.eval.images import ImageCache, PixelFeed

    pixels = np.random.default_rng(0).integers(0, 256, (6, 3, 4, 4), dtype=np.uint8)
    rows = np.array([4, 1, 5])
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    feed = PixelFeed(ImageCache(pixels, np.ones(6, dtype=bool)), rows, mean, std, torch.device("cpu"))

    def expected(cache_rows):
        return (torch.from_numpy(pixels[cache_rows]).float() / 255 - mean.view(1, 3, 1, 1)) / std.view(
            1, 3, 1, 1
        )

    torch.testing.assert_close(feed.batch(1, 3), expected([1, 5]), atol=1e-6, rtol=0)
    torch.testing.assert_close(feed.take(np.array([2, 0])), expected([5, 4]), atol=1e-6, rtol=0)


def test_images_past_the_first_decoding_chunk_land_in_their_own_rows():
    """Payloads are decoded 256 at a time: the 300th image is the 300th row, and a corrupt one
    past the first chunk is marked at its own row."""
    from micromerge.eval.images import decode_one
    from tests.test_finetune import _png

    payloads = [{"bytes": _png(i % 7), "path": None} for i in range(300)]
    payloads[270] = {"bytes": b"not an image", "path": None}
    pixels, valid = decode_payloads(payloads, 8, progress=False)
    assert np.flatnonzero(~valid).tolist() == [270]
    for row in (0, 255, 256, 299):
        assert np.array_equal(pixels[row], decode_one(payloads[row], 8)), row


def test_a_payload_without_bytes_or_path_is_a_missing_image():
    """A null image stored as a struct ({bytes: null, path: null}) decodes to nothing, counted."""
    from micromerge.eval.images import decode_one

    assert decode_one({"bytes": None, "path": None}, 8) is None and decode_one(None, 8) is None


def test_the_image_cache_is_rebuilt_when_its_pixels_are_gone_or_its_rows_differ(tmp_path):
    """The cache is (fingerprint, size): a half-present cache (index without pixels, as a deleted
    .npy leaves it) is built again, and one of another row count is never served."""
    import datasets

    from tests.test_finetune import _png

    def dataset(n, offset):
        rows = {"image": [{"bytes": _png(offset + i), "path": None} for i in range(n)]}
        return datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image()}))

    four, two = dataset(4, 0), dataset(2, 10)
    first = np.array(build_image_cache(four, "f", 8, tmp_path, progress=False).pixels)
    (tmp_path / "images" / "f-8px.npy").unlink()
    again = build_image_cache(four, "f", 8, tmp_path, progress=False)
    assert np.array_equal(np.asarray(again.pixels), first)
    other = build_image_cache(two, "f", 8, tmp_path, progress=False)
    assert other.pixels.shape[0] == 2 and not np.array_equal(np.asarray(other.pixels), first[:2])


@pytest.mark.parametrize(
    "damage",
    [
        lambda npy, index: npy.write_bytes(npy.read_bytes()[: len(npy.read_bytes()) // 2]),  # cut short
        lambda npy, index: npy.write_bytes(b"not numpy"),
        lambda npy, index: index.write_text("{cut"),
        lambda npy, index: index.write_text(json.dumps({"rows": 4})),  # no valid mask
        lambda npy, index: np.save(npy, np.zeros((4, 3, 4, 4), dtype=np.uint8)),  # another size's pixels
    ],
)
def test_an_image_cache_damaged_on_disk_is_built_again(tmp_path, damage):
    """A cache file cut short by a full disk, or hand-edited, was numpy's or json's traceback on
    every later eval (the cache is reused across runs, so the user never saw why); pixels of another
    shape were served as these. The cache is built again."""
    import datasets

    from tests.test_finetune import _png

    rows = {"image": [{"bytes": _png(i), "path": None} for i in range(4)]}
    four = datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image()}))
    first = np.array(build_image_cache(four, "f", 8, tmp_path, progress=False).pixels)
    damage(tmp_path / "images" / "f-8px.npy", tmp_path / "images" / "f-8px.json")
    again = build_image_cache(four, "f", 8, tmp_path, progress=False)
    assert np.array_equal(np.asarray(again.pixels), first) and bool(np.all(again.valid))


def test_pixels_decoded_under_another_rule_or_library_are_decoded_again(tmp_path, monkeypatch):
    """The cache key was the data and the size: pixels an earlier micromerge decoded otherwise, or
    another Pillow/torchvision resampled, were served as this version's, so a fresh machine and a
    warm cache gave different numbers. The decode identity is in the index; statistics are keyed on it."""
    import datasets

    from micromerge.eval import images
    from micromerge.eval.images import DECODE_IDENTITY
    from tests.test_finetune import _png

    assert "Pillow" in DECODE_IDENTITY and "torchvision" in DECODE_IDENTITY
    rows = {"image": [{"bytes": _png(i), "path": None} for i in range(4)]}
    four = datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image()}))
    build_image_cache(four, "f", 8, tmp_path, progress=False)
    np.save(tmp_path / "images" / "f-8px.npy", np.full((4, 3, 8, 8), 7, dtype=np.uint8))  # marked
    assert int(build_image_cache(four, "f", 8, tmp_path, progress=False).pixels.max()) == 7, "reused"
    monkeypatch.setattr(images, "DECODE_IDENTITY", "another rule; Pillow 0; torchvision 0")
    rebuilt = build_image_cache(four, "f", 8, tmp_path, progress=False)
    assert not np.all(np.asarray(rebuilt.pixels) == 7), "decoded again"
    index = json.loads((tmp_path / "images" / "f-8px.json").read_text())
    assert index["decode"] == "another rule; Pillow 0; torchvision 0"


def test_a_sweep_of_a_specialist_with_the_bases_weights_says_so(setup):
    """The sweep hashes its inputs before any alpha: a specialist with the base's weights (a path
    typed twice) gives the base's numbers at every alpha, and is named in a warning."""
    tmp, bench = setup
    args = [
        "sweep",
        "--base",
        str(tmp / "a.safetensors"),
        "--ft",
        str(tmp / "a.safetensors"),
        "--data",
        str(bench),
    ]
    args += [
        "--alphas",
        "0,1",
        "--store",
        str(tmp / "s.jsonl"),
        "--cache-dir",
        str(tmp / "cache"),
        "--bootstrap",
        "0",
    ]
    result = CliRunner().invoke(cli, [*args, "--quiet"])
    assert result.exit_code == 0, result.output
    assert f"--ft {tmp / 'a.safetensors'}: the same weights as --base" in result.output


def test_an_append_reads_only_what_was_written_since_and_still_sees_every_writer(tmp_path, monkeypatch):
    """An append read the whole store to skip rows already there: quadratic in a sweep (8.5 s of the
    demo's 66 s of sweeps; hours on a paper-size grid). It now reads the bytes past its last append,
    and still skips a row another writer (another process) appended in between."""
    import micromerge.eval.store as store_module

    path = tmp_path / "r.jsonl"
    mine, theirs = ResultStore(path), ResultStore(path)
    mine.append([_row(a) for a in (0.0, 0.1, 0.2)])
    theirs.append([_row(0.0), _row(0.5)])  # a duplicate it skips, and a row of its own
    read: list[int] = []
    real_pread = os.pread
    monkeypatch.setattr(store_module.os, "pread", lambda fd, n, at: read.append(n) or real_pread(fd, n, at))
    assert mine.append([_row(0.5), _row(0.6)]) == 1, "the other writer's row is seen"
    their_line = len(json.dumps({"schema": 1, **_row(0.5)}, sort_keys=True)) + 1
    assert sum(read) < 3 * their_line, read  # the line it checks the file by, and the new one
    read.clear()
    assert mine.append([_row(0.6)]) == 0 and sum(read) < 2 * their_line
    theirs.append([_row(0.65), _row(0.66)])
    assert mine.append([_row(0.65), _row(0.66)]) == 0, "nothing written: what it read still counts"
    read.clear()
    assert mine.append([_row(0.8)]) == 1 and sum(read) < 1.5 * their_line, read  # one line checked
    assert [r["alpha"] for r in ResultStore(path).rows()] == [0.0, 0.1, 0.2, 0.5, 0.6, 0.65, 0.66, 0.8]
    # It reads only its own run's lines: another run's rows are read when that run is appended.
    theirs.append([_row(0.0, run_id="other")])
    assert mine.append([_row(0.0, run_id="other"), _row(0.7)]) == 1
    assert mine.append([_row(0.7), _row(0.0, run_id="other")]) == 0


def test_a_one_row_store_rewritten_in_place_with_a_row_as_long_is_read_again(tmp_path):
    """The bytes compared where the last append ended are the whole last line, not just its `}` and
    newline, which every row ends with: here the only line, replaced by another row of its length."""
    path = tmp_path / "r.jsonl"
    store = ResultStore(path)
    assert store.append([_row(0.0, task="a")]) == 1
    size = path.stat().st_size
    with open(path, "w") as handle:  # truncated and rewritten: the inode stays
        handle.write(json.dumps({"schema": 1, **_row(0.0, task="b")}, sort_keys=True) + "\n")
    assert path.stat().st_size == size
    assert store.append([_row(0.0, task="a")]) == 1, "task a's row is gone: written again"


def test_a_store_rewritten_in_place_is_read_whole_again(tmp_path):
    """The same file (same inode, as long or longer) with other bytes where the last append ended
    is another store: its rows are read again, not taken from what was there before."""
    path = tmp_path / "r.jsonl"
    store = ResultStore(path)
    store.append([_row(0.0), _row(0.5)])
    with open(path, "w") as handle:  # truncated and rewritten: the inode stays
        handle.write(
            json.dumps({"schema": 1, **_row(0.0, task="a much longer task name than before")}) + "\n"
        )
        handle.write(json.dumps({"schema": 1, **_row(0.0)}) + "\n")
    assert store.append([_row(0.0), _row(0.5)]) == 1, "the row that went with the old bytes is written again"
    path.unlink()
    assert store.append([_row(0.0), _row(0.5)]) == 2, "a new file"
    other = tmp_path / "other.jsonl"  # the same length and the same last line: only the inode differs
    other.write_text(
        "".join(
            json.dumps({"schema": 1, **r}, sort_keys=True) + "\n" for r in (_row(0.0, task="u"), _row(0.5))
        )
    )
    assert other.stat().st_size == path.stat().st_size
    other.replace(path)
    assert store.append([_row(0.0)]) == 1
    path.write_bytes(b"PK\x03\x04" + bytes(4096))
    with pytest.raises(MicromergeError, match="is a checkpoint"):
        store.append([_row(0.0)])


def test_one_runs_rows_are_every_row_of_that_run(tmp_path):
    """`rows(run_id)` skips other runs' lines undecoded (by the id's bytes): a line that holds the id
    elsewhere, and ids JSON escapes, must give the same rows as filtering every row."""
    path = tmp_path / "r.jsonl"
    ids = ["a", "b", 'q"uote', "ü", "back\\slash"]
    rows = [_row(0.0, run_id=i) for i in ids] + [
        _row(0.5, run_id="b", task="a"),
        _row(0.5, run_id="a", task="b"),
    ]
    ResultStore(path).append(rows)
    every = ResultStore(path).rows()
    for run_id in ids:
        assert ResultStore(path).rows(run_id) == [r for r in every if r["run_id"] == run_id], run_id
        assert ResultStore(path).done(run_id) == {
            ResultStore.identity(r) for r in every if r["run_id"] == run_id
        }


def test_one_reader_finds_each_runs_rows_without_reading_the_others_again(tmp_path, monkeypatch):
    """A paper-size grid's store is 500 MB: each sweep's resume check, first append and rows back
    read all of it (1.3 to 1.8 s each, ten minutes a re-run of a finished grid of 192 sweeps). A
    reader shared by the sweeps (eval.engine.Prepared.results) indexes where each run's lines lie
    once, then reads a run's own lines and what was appended since, by any writer. A line written
    in another JSON spelling, and a row holding another run's id in a nested field, are neither
    lost nor misread."""
    import micromerge.eval.store as store_module

    path = tmp_path / "r.jsonl"
    ResultStore(path).append([_row(a / 10, run_id=f"run{i}") for i in range(8) for a in range(10)])
    nested = _row(0.0, run_id="run2", task="nested", parameters={"run_id": "run5"})
    with open(path, "a") as handle:  # hand-written: compact separators, keys unsorted
        handle.write(
            json.dumps({"schema": 1, **_row(0.0, run_id="run5", task="compact")}, separators=(",", ":"))
        )
        handle.write("\n" + json.dumps({"schema": 1, **nested}, sort_keys=True) + "\n")
        for run_id in ("ü", 'q"uote'):  # UTF-8 as such, and an escape
            handle.write(json.dumps({"schema": 1, **_row(0.0, run_id=run_id)}, ensure_ascii=False) + "\n")
    reader = ResultStore(path)
    every = ResultStore(path).rows()
    assert reader.rows("run0") == [r for r in every if r["run_id"] == "run0"]
    read: list[int] = []  # bytes read, whichever way
    real_pread, real_open = os.pread, open

    class Counted:
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def fileno(self):
            return self.handle.fileno()

        def read(self, *args):
            data = self.handle.read(*args)
            read.append(len(data))
            return data

    monkeypatch.setattr(store_module.os, "pread", lambda fd, n, at: read.append(n) or real_pread(fd, n, at))
    monkeypatch.setattr(store_module, "open", Counted, raising=False)
    run5 = reader.rows("run5")
    assert run5 == [r for r in every if r["run_id"] == "run5"] and len(run5) == 11, "the compact line too"
    assert sum(read) < path.stat().st_size / 4, "its own lines (and the odd one), not every run's"
    assert {r["task"] for r in reader.rows("run2")} == {"t", "nested"} and len(reader.rows("run2")) == 11
    ResultStore(path).append([_row(0.95, run_id="run5"), _row(0.95, run_id="run6")])  # another writer
    read.clear()
    assert (0.95, "t", None, "all", "accuracy") in reader.done("run5")
    assert sum(read) < path.stat().st_size / 4
    assert reader.append([_row(0.95, run_id="run5"), _row(0.95, run_id="run7")]) == 1, "the other's row seen"
    assert len(ResultStore(path).rows("run7")) == 11 and len(ResultStore(path).rows()) == len(every) + 3
    for run_id in ("ü", 'q"uote'):
        assert [r["run_id"] for r in reader.rows(run_id)] == [run_id]


def test_an_append_that_failed_to_write_is_written_by_the_next(tmp_path, monkeypatch):
    """A full disk fails the write after the rows' keys were taken as present: the next append
    (the same object, as a sweep's next alpha) must not skip them as written."""
    import errno

    import micromerge.eval.store as store_module

    store = ResultStore(tmp_path / "r.jsonl")
    store.append([_row(0.0)])
    real_write = os.write

    def full_disk(fd, payload):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module.os, "write", full_disk)
    with pytest.raises(OSError, match="No space"):
        store.append([_row(0.5)])
    monkeypatch.setattr(store_module.os, "write", real_write)
    assert store.append([_row(0.5)]) == 1
    assert [r["alpha"] for r in ResultStore(tmp_path / "r.jsonl").rows()] == [0.0, 0.5]


EVALUATION = ["--store", "s.jsonl", "--cache-dir", "cache", "--bootstrap", "0", "--quiet", "--data"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="--device cuda is refused only where there is no GPU")
@pytest.mark.parametrize(
    "name, needle",
    [
        ("cuda:x", "--device cuda:x: expected auto, cpu, cuda or cuda:N"),
        ("cuda:", "--device cuda:: expected auto, cpu, cuda or cuda:N"),
        ("cuda:2", r"--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"),
    ],
)
def test_a_cuda_device_that_is_no_device_here_is_one_line_on_a_gpu_machine(monkeypatch, name, needle):
    """On a GPU machine `cuda:x` reached torch.device (a RuntimeError traceback) and an ordinal past
    the last GPU failed later, deep in torch ("invalid device ordinal")."""
    import torch

    from micromerge.core.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(MicromergeError, match=needle):
        resolve_device(name)
    assert resolve_device("cuda:1") == torch.device("cuda:1") and resolve_device("cuda") == torch.device(
        "cuda"
    )


@pytest.mark.parametrize(
    "command",
    [
        ["eval", "--model", "a.safetensors", *EVALUATION],
        ["sweep", "--base", "a.safetensors", "--ft", "b.safetensors", "--alphas", "0,1", *EVALUATION],
        ["soup", "--base", "a.safetensors", "--ft", "b.safetensors", *EVALUATION],
        ["merge", "--base", "a.safetensors", "--ft", "b.safetensors", "--out", "m.safetensors"],
        [
            "merge",
            "--base",
            "a.safetensors",
            "--ft",
            "b.safetensors",
            "--method",
            "fisher",
            "--out",
            "m",
            "--data",
        ],
    ],
    ids=["eval", "sweep", "soup", "merge", "merge-fisher"],
)
def test_device_cuda_on_a_machine_without_one_is_one_line_before_any_work(setup, command, monkeypatch):
    """Every command with --device says in one line that there is no GPU, and writes nothing;
    only the fine-tuning path had a test, and a mutant that let `cuda` through hung there."""
    tmp, bench = setup
    monkeypatch.chdir(tmp)
    before = sorted(p.name for p in tmp.iterdir())
    data = [str(bench)] if command[-1] == "--data" else []
    result = CliRunner().invoke(cli, [*command, *data, "--device", "cuda:0"])
    assert result.exit_code == 2, result.output
    assert (
        result.output
        == "error: --device cuda:0: no CUDA device is available here; use --device cpu or auto\n"
    )
    assert sorted(p.name for p in tmp.iterdir()) == before
