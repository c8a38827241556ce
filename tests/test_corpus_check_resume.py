"""`data check --out`: a check stopped early (Ctrl-C, a damaged shard) and run again with the same
report goes on from the last finished part and ends with the report an uninterrupted check writes,
byte for byte; a report of another corpus, or a file that is no report, is refused, not replaced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from micromerge.finetune import check_report, corpus_check
from micromerge.finetune.streaming import StreamedSamples
from tests.test_corpus_check import check
from tests.test_finetune import write_csv_folder
from tests.test_hub_stream import write_hub_repo
from tests.test_streaming import _pipe_spec, write_shards
from tests.test_unreadable_stream import _spoil


@pytest.fixture
def small_parts(monkeypatch):
    """Parts of 8 samples a worker, so a corpus of tens of samples has several."""
    monkeypatch.setattr(corpus_check, "PART_SAMPLES", 8)


READ = StreamedSamples.__getitem__


def _reads(monkeypatch, stop_at: int | None = None) -> list[int]:
    """The sample numbers an indexed check reads in this process (--workers 0); Ctrl-C at `stop_at`."""
    seen: list[int] = []

    def counted(self, item):
        if item[1] == stop_at:
            raise KeyboardInterrupt
        seen.append(item[1])
        return READ(self, item)

    monkeypatch.setattr(StreamedSamples, "__getitem__", counted)
    return seen


def test_an_interrupted_check_goes_on_from_its_last_part_and_ends_with_the_same_report(
    tmp_path, small_parts, monkeypatch
):
    """40 samples in parts of 8; Ctrl-C in the third part keeps the first two (written as the check
    stops, though the last timed write is not due). Run again, it reads samples 16 on only, prints
    every unreadable one (those found before first), and writes the uninterrupted check's bytes."""
    data = write_csv_folder(tmp_path / "pairs", n=40)
    _spoil(data, 3, 12, 20, 33)
    names = [repr(str(data / f"img{i}.png")) for i in (3, 12, 20, 33)]
    report = tmp_path / "check.json"
    monkeypatch.setattr(check_report, "SAVE_EVERY_S", 1e9)
    args = ("--data", str(data), "--workers", "0", "--max-bad-fraction", "0.2", "--out", str(report))

    _reads(monkeypatch, stop_at=21)
    stopped = check(*args)
    assert stopped.exit_code == 130
    assert stopped.stdout.splitlines() == names[:2]  # img20 was read in the batch the stop cut short
    assert stopped.stderr.splitlines() == [
        "interrupted: finished work is kept; run the same command again to resume"
    ]
    kept = json.loads(report.read_text())
    assert (kept["parts_checked"], kept["parts"], kept["read"], kept["complete"]) == (2, 5, 16, False)
    assert kept["unreadable"] == names[:2] and kept["fine_tune_stops"] is None

    reads = _reads(monkeypatch)
    resumed = check(*args)
    assert resumed.exit_code == 1
    assert reads == list(range(16, 40))
    assert resumed.stdout.splitlines() == names
    assert resumed.stderr.splitlines() == [
        f"--out {report}: going on after part 2 of 5 (16 samples read, 2 unreadable)",
        f"--data {data}: 4 of 40 samples (10.0%) are unreadable or without a caption (none, blank, or a "
        ".json caption that is not text, such as a list); within --max-bad-fraction 0.2: a fine-tune "
        "leaves them out and trains on the rest",
    ]
    finished = report.read_bytes()
    whole = json.loads(finished)
    assert (whole["complete"], whole["read"], whole["samples_in_corpus"], whole["unreadable"]) == (
        True,
        40,
        40,
        names,
    )
    assert (whole["unreadable_count"], whole["unreadable_fraction"], whole["fine_tune_stops"]) == (
        4,
        0.1,
        False,
    )
    assert whole["provenance"]["method"] == "data check"
    assert whole["provenance"]["inputs_sha256"] == {"data": whole["data_fingerprint"]}

    _reads(monkeypatch)
    straight = tmp_path / "straight.json"
    assert check(*args[:-1], str(straight)).exit_code == 1
    assert straight.read_bytes() == finished


def test_a_finished_report_is_checked_again_from_the_start(tmp_path, small_parts, monkeypatch):
    """Run again after it finished (the user has usually fixed the corpus), the check reads it all."""
    data = write_csv_folder(tmp_path / "pairs", n=20)
    report = tmp_path / "check.json"
    args = ("--data", str(data), "--workers", "0", "--out", str(report))
    assert check(*args).exit_code == 0
    first = report.read_bytes()
    reads = _reads(monkeypatch)
    again = check(*args)
    assert again.exit_code == 0 and reads == list(range(20))
    assert again.stderr.splitlines()[0] == (
        f"--out {report}: it holds a finished check; checking the corpus again from the start"
    )
    assert report.read_bytes() == first


def test_a_resumed_check_reads_the_parts_the_first_cut_whatever_the_workers(
    tmp_path, small_parts, monkeypatch
):
    """Parts are sized for the first run's workers (recorded), so a resume with other --workers neither
    reads a sample twice nor skips one: 2 workers cut parts of 16; resumed in-process after one part."""
    data = write_csv_folder(tmp_path / "pairs", n=40)
    _spoil(data, 30)
    report = tmp_path / "check.json"
    assert check("--data", str(data), "--workers", "2", "--out", str(report)).exit_code == 1
    whole = json.loads(report.read_text())
    assert (whole["parts"], whole["parts_sized_for_workers"]) == (3, 2)
    kept = {**whole, "complete": False, "parts_checked": 1, "read": 16, "unreadable": []}
    report.write_text(json.dumps(kept))
    reads = _reads(monkeypatch)
    resumed = check("--data", str(data), "--workers", "0", "--out", str(report))
    assert resumed.exit_code == 1 and reads == list(range(16, 40))
    assert json.loads(report.read_text())["unreadable"] == [repr(str(data / "img30.png"))]


def test_a_changed_corpus_is_checked_from_the_start(tmp_path, small_parts, monkeypatch):
    """An image added to the table changes the corpus's fingerprint: the old parts are not this one's."""
    data = write_csv_folder(tmp_path / "pairs", n=20)
    report = tmp_path / "check.json"
    args = ("--data", str(data), "--workers", "0", "--out", str(report))
    _reads(monkeypatch, stop_at=10)
    assert check(*args).exit_code == 130
    assert json.loads(report.read_text())["parts_checked"] == 1
    write_csv_folder(data, n=21)
    reads = _reads(monkeypatch)
    again = check(*args)
    assert again.exit_code == 0 and reads == list(range(21))
    assert again.stderr.splitlines()[0] == (
        f"--out {report}: the corpus has changed since it was written; checking it from the start"
    )


def test_a_shard_stream_stopped_by_a_damaged_shard_goes_on_once_it_is_replaced(tmp_path):
    """Parts of a shard stream are its shards (one a worker): the error keeps the parts before the
    damaged shard, and once the shard is written again the check reads from it on."""
    shards = write_shards(tmp_path / "wds", 28, per_shard=7)
    whole = (shards / "shard-000002.tar").read_bytes()
    (shards / "shard-000002.tar").write_bytes(whole[: len(whole) // 2 + 100])
    report = tmp_path / "check.json"
    args = ("--data", _pipe_spec(shards), "--workers", "0", "--out", str(report))
    assert check(*args).exit_code == 2
    kept = json.loads(report.read_text())
    assert (kept["parts_checked"], kept["parts"], kept["read"], kept["samples_in_corpus"]) == (2, 4, 14, None)
    (shards / "shard-000002.tar").write_bytes(whole)
    resumed = check(*args)
    assert resumed.exit_code == 0, resumed.output
    assert resumed.stderr.splitlines() == [
        f"--out {report}: going on after part 2 of 4 (14 samples read, 0 unreadable)",
        f"--data {_pipe_spec(shards)}: all 28 samples are readable, each with a caption",
    ]
    assert json.loads(report.read_text())["samples_in_corpus"] == 28


def test_local_shards_are_cut_by_their_bytes_and_a_pipes_one_a_worker(tmp_path, monkeypatch):
    """A part starts worker processes of its own (0.11 s for two): 200 shards of 7 samples took 14.8 s
    read in 100 parts of one shard a worker, 0.75 s in one. Local shards are now taken until a part
    holds PART_SHARD_BYTES a worker; a pipe's size is unknown, so its shards stay one a worker."""
    from micromerge.finetune.corpus_check import corpus_parts

    shards = write_shards(tmp_path / "wds", 28, per_shard=7)
    local = f"{shards}/shard-{{000000..000003}}.tar"
    assert [len(part) for part in corpus_parts(local, 2).parts] == [4]  # 4 small shards: one part
    monkeypatch.setattr(corpus_check, "PART_SHARD_BYTES", (shards / "shard-000000.tar").stat().st_size * 1.5)
    assert [len(part) for part in corpus_parts(local, 1).parts] == [2, 2]
    assert [len(part) for part in corpus_parts(local, 2).parts] == [3, 1]
    assert [len(part) for part in corpus_parts(_pipe_spec(shards), 2).parts] == [2, 2]
    assert [len(part) for part in corpus_parts(_pipe_spec(shards), 1).parts] == [1, 1, 1, 1]


def test_a_hub_copys_parts_are_whole_row_groups_one_a_worker_at_least(tmp_path, monkeypatch):
    """Row groups of 4 rows, parts for 2 workers of PART_SAMPLES 6 a worker: whole groups up to 12
    rows (3 groups), and every row read once."""
    from micromerge.finetune.corpus_check import corpus_parts

    monkeypatch.setattr(corpus_check, "PART_SAMPLES", 6)
    repo = write_hub_repo(tmp_path / "repo", 40, files=2, row_group=4)
    parts = corpus_parts(str(repo), 2)
    assert [[(Path(g.file).name[6:11], g.group) for g in part] for part in parts.parts] == [
        [("00000", 0), ("00000", 1), ("00000", 2)],
        [("00000", 3), ("00000", 4), ("00001", 0)],
        [("00001", 1), ("00001", 2), ("00001", 3)],
        [("00001", 4)],
    ]
    assert parts.samples == 40
    readable = [ok for part in range(len(parts)) for _, _, oks, _ in parts.batches(part, 2) for ok in oks]
    assert len(readable) == 40 and all(readable)


def _report_with(field: str, value: str) -> str:
    """A whole report of the corpus the test writes, its `field` given the JSON text `value`."""
    fields = {"report": '"micromerge data check"', "data": '"{data}"', "unreadable": "[]", "parts_checked": "1",
              "read": "0", "data_fingerprint": '"0"', "parts_sized_for_workers": "1", "parts": "2",
              "complete": "false", field: value}  # fmt: skip
    return "{" + ", ".join(f'"{key}": {text}' for key, text in fields.items()) + "}"


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "not a data check report (Expecting value: line 1 column 1 (char 0)){fix}"),
        ('{"rows": []}', 'not a data check report (no "report": "micromerge data check" in it){fix}'),
        (
            '{"report": "micromerge data check", "data": "{data}"}',
            "not a data check report (no 'parts_checked' in it){fix}",
        ),
        (
            _report_with("unreadable", "[1]"),
            "not a data check report (unreadable is not a list of names){fix}",
        ),
        # "abc" was read as three names, {"a": 1} as one
        (
            _report_with("unreadable", '"abc"'),
            "not a data check report (unreadable is not a list of names){fix}",
        ),
        (
            _report_with("unreadable", '{"a": 1}'),
            "not a data check report (unreadable is not a list of names){fix}",
        ),
        # Infinity (which Python's json reads) was an OverflowError's traceback
        (
            _report_with("parts_checked", "Infinity"),
            "not a data check report (parts_checked is Infinity, not a count){fix}",
        ),
        (_report_with("read", "-5"), "not a data check report (read is -5, not a count){fix}"),
        (
            _report_with("parts_checked", "1.7"),
            "not a data check report (parts_checked is 1.7, not a count){fix}",
        ),
        (_report_with("parts", "true"), "not a data check report (parts is true, not a count){fix}"),
        (_report_with("parts", '"2"'), 'not a data check report (parts is "2", not a count){fix}'),
        (
            _report_with("complete", '"yes"'),
            "not a data check report (complete is neither true nor false){fix}",
        ),
        (_report_with("parts_checked", "3"), "not a data check report (its parts do not add up){fix}"),
        (
            _report_with("parts_sized_for_workers", "0"),
            "not a data check report (its parts do not add up){fix}",
        ),
        (  # nested past Python's parser: a RecursionError's traceback
            _report_with("unreadable", "[" * 100_000 + "]" * 100_000),
            "not a data check report (nested too deeply to read){fix}",
        ),
        (
            '{"report": "micromerge data check", "data": "elsewhere"}',
            "the report of a check of --data elsewhere; choose another --out, or delete it to check this corpus",
        ),
    ],
)
def test_a_file_that_is_not_this_corpuss_report_is_refused_and_kept(tmp_path, content, message):
    data = write_csv_folder(tmp_path / "pairs", n=4)
    report = tmp_path / "results.json"
    report.write_text(content.replace("{data}", str(data)))
    result = check("--data", str(data), "--out", str(report))
    assert result.exit_code == 2, result.output
    message = message.replace("{fix}", "; choose another --out, or delete the file")
    assert result.stderr.splitlines() == [f"error: --out {report}: {message}"]
    assert report.read_text() == content.replace("{data}", str(data))


def test_an_out_that_cannot_be_written_is_refused_before_a_sample_is_read(tmp_path, monkeypatch):
    """The report is first written where the check starts: a path under a file failed only at the
    first timed write, or at the end of a check of hours."""
    data = write_csv_folder(tmp_path / "pairs", n=10)
    (tmp_path / "a-file").write_text("")
    reads = _reads(monkeypatch)
    result = check("--data", str(data), "--workers", "0", "--out", str(tmp_path / "a-file" / "check.json"))
    assert result.exit_code == 2 and reads == []
    assert result.stderr.splitlines() == [
        f"error: {tmp_path / 'a-file' / 'check.json'}: cannot write here (Not a directory); choose another --out"
    ]
