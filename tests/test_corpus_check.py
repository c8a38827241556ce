"""`micromerge data check`: every sample of a fine-tuning corpus read as a fine-tune reads it, and
the ones a fine-tune would leave out named before it runs, for every corpus form a fine-tune takes.

Facts from public sources: datasets streams a parquet repository one shard per data file, in the
data files' order (`IterableDataset.num_shards`, `IterableDataset.shard`, the datasets
documentation); a hub dataset's image cells are `{bytes, path}` structs that may be null (the
datasets `Image` feature documentation).
"""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from click.testing import CliRunner

from micromerge.cli import cli
from tests.helpers import write_checkpoint
from tests.test_finetune import _png, config, write_csv_folder
from tests.test_streaming import _pipe_spec, write_shards
from tests.test_unreadable_stream import _corpus_with_a_bad_sixth_image, _spoil


def check(*args: str):
    return CliRunner().invoke(cli, ["data", "check", "--quiet", *args])


def test_a_table_corpus_names_its_unreadable_images_and_judges_them_by_max_bad_fraction(tmp_path):
    """Two of 40 images are no image (5 %: within the default 0.05, which is "more than"); the names
    are stdout's lines, the verdict is stderr's; a smaller fraction says a fine-tune would stop."""
    data = write_csv_folder(tmp_path / "pairs", n=40)
    _spoil(data, 5, 31)
    result = check("--data", str(data), "--workers", "0")
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [repr(str(data / "img5.png")), repr(str(data / "img31.png"))]
    assert f"--data {data}: 2 of 40 samples (5.0%) are unreadable or without a caption" in result.stderr
    assert (
        "within --max-bad-fraction 0.05: a fine-tune leaves them out and trains on the rest" in result.stderr
    )
    strict = check("--data", str(data), "--workers", "0", "--max-bad-fraction", "0.04")
    assert strict.exit_code == 1
    assert "more than --max-bad-fraction 0.04: a fine-tune stops on it" in strict.stderr


def test_workers_read_the_same_samples_in_the_same_order(tmp_path):
    """Two worker processes share the batches; the list keeps the corpus's order."""
    data = write_csv_folder(tmp_path / "pairs", n=150)  # three batches of 64
    _spoil(data, 140, 3, 70)
    lists = [check("--data", str(data), "--workers", w).stdout.splitlines() for w in ("0", "2")]
    assert lists[0] == lists[1] == [repr(str(data / f"img{i}.png")) for i in (3, 70, 140)]


def test_the_list_is_the_one_a_streamed_fine_tune_writes_over_the_whole_corpus(tmp_path):
    """The check reads through the trainer's own reader and decoder, so it lists what a run that
    reads every sample (three steps of 8 over 24) lists in its unreadable.txt."""
    write_checkpoint(tmp_path / "base.safetensors", 0)
    data = write_csv_folder(tmp_path / "pairs", n=24)
    _spoil(data, 2, 19)
    streamed = dict(data_in_memory="no", workers=0, max_steps=3, max_bad_fraction=0.1)
    from micromerge.finetune.trainer import run_finetune

    run_finetune(config(tmp_path / "base.safetensors", data, tmp_path / "run", **streamed))
    listed = (tmp_path / "run" / "unreadable.txt").read_text().splitlines()
    assert sorted(check("--data", str(data)).stdout.splitlines()) == sorted(listed) and len(listed) == 2


@pytest.mark.parametrize(
    "kind, named", [("tar", "'sample0005' of '{folder}/shard-000000.tar'"), ("arrow", "row 5")]
)
def test_indexed_shards_and_arrow_rows_are_named_as_a_run_names_them(tmp_path, kind, named):
    _corpus_with_a_bad_sixth_image(tmp_path / "corpus", kind)
    result = check("--data", str(tmp_path / "corpus"))
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [named.format(folder=tmp_path / "corpus")]
    assert "1 of 24 samples (4.2%)" in result.stderr


def test_a_webdataset_stream_names_a_sample_without_a_caption_and_one_that_does_not_decode(tmp_path):
    """Read through the webdataset library, as a shard pattern or pipe is trained on: every shard
    once, in order, split between the workers."""
    folder = write_shards(tmp_path / "wds", 14, per_shard=7)
    with tarfile.open(folder / "shard-000002.tar", "w") as archive:
        for name, payload in (("x.png", _png(50)), ("x.txt", b"  \n"), ("y.png", b"no png"), ("y.txt", b"a")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    spec = _pipe_spec(folder)
    result = check("--data", spec, "--workers", "2")
    assert result.exit_code == 1
    url = f"pipe:cat {folder}/shard-000002.tar"
    assert result.stdout.splitlines() == [f"'x' of {url!r}", f"'y' of {url!r}"]
    assert "2 of 16 samples (12.5%)" in result.stderr and "a fine-tune stops on it" in result.stderr


def test_a_hub_layout_copy_names_each_unreadable_row_by_its_file_and_row(tmp_path):
    """The training stream shuffles a hub dataset's rows across files and cannot name them; the
    check reads file by file and can: a null image cell, bytes that are no image, a blank caption."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    (tmp_path / "repo" / "data").mkdir(parents=True)
    files = [tmp_path / "repo" / "data" / f"train-{k:05d}-of-00002.parquet" for k in range(2)]
    for k, file in enumerate(files):
        images: list[dict | None] = [{"bytes": _png(i), "path": None} for i in range(20)]
        captions = [f"caption {k} {i}" for i in range(20)]
        if k == 0:
            images[4] = {"bytes": b"no image", "path": None}
        else:
            images[3], captions[11] = None, " "
        datasets.Dataset.from_dict({"image": images, "caption": captions}, features=features).to_parquet(
            str(file)
        )
    for workers in ("0", "2"):
        result = check("--data", str(tmp_path / "repo"), "--workers", workers)
        assert result.exit_code == 1
        expected = [
            f"row 4 of {str(files[0])!r}",
            f"row 3 of {str(files[1])!r}",
            f"row 11 of {str(files[1])!r}",
        ]
        assert sorted(result.stdout.splitlines()) == sorted(expected), workers
        assert "3 of 40 samples (7.5%)" in result.stderr


def test_a_readable_corpus_exits_0_with_nothing_on_stdout(tmp_path):
    data = write_csv_folder(tmp_path / "pairs", n=10)
    result = check("--data", str(data), "--workers", "0")
    assert result.exit_code == 0 and result.stdout == ""
    assert f"--data {data}: all 10 samples are readable, each with a caption" in result.stderr
    (data / "captions.csv").write_text("image,caption\nimg0.png,cells\n")
    one = check("--data", str(data), "--workers", "0")
    assert f"--data {data}: its one sample is readable, with a caption" in one.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{tmp}/nowhere"], "--data {tmp}/nowhere: no such file or folder"),
        (
            ["--data", "{tmp}/wds/shard-{{000000..000003}}.tar"],
            "shard {tmp}/wds/shard-000001.tar (and 2 more of its 4) does not exist",
        ),
        (["--data", "{tmp}/wds", "--workers", "-1"], "-1 is not in the range x>=0"),
        (["--data", "{tmp}/wds", "--max-bad-fraction", "2"], "2.0 is not in the range 0<=x<=1"),
    ],
)
def test_bad_input_is_named_with_exit_code_2(tmp_path, args, message):
    """(One line through the console command, which turns click's usage errors into one line:
    tests/test_merge_cli.py runs it; CliRunner shows click's own lines.)"""
    write_shards(tmp_path / "wds", 7)
    result = check(*(a.format(tmp=tmp_path) for a in args))
    assert result.exit_code == 2, result.output
    assert message.format(tmp=tmp_path) in result.stderr and result.stdout == ""


def test_a_caption_table_that_names_no_caption_is_refused_as_a_fine_tune_refuses_it(tmp_path):
    """An indexed corpus's captions are read with its index, and a blank one is refused before any
    image is read, by the check as by a fine-tune (which names the row)."""
    data = write_csv_folder(tmp_path / "pairs", n=6)
    (data / "captions.csv").write_text("image,caption\nimg0.png,cells\nimg1.png,\n")
    result = check("--data", str(data))
    assert result.exit_code == 2 and "caption" in result.stderr, result.output
    assert json.dumps(result.stdout) == '""'


def test_a_damaged_hub_file_is_one_line_naming_it(tmp_path):
    """A page that fails as it is read (its footer reads) stops the check in one line naming the file,
    from a worker as in the main process (pyarrow's thrift error otherwise, in a worker's traceback)."""
    from tests.test_hub_stream import write_hub_repo

    repo = write_hub_repo(tmp_path / "repo", 16, files=2)
    damaged = repo / "data" / "train-00001-of-00002.parquet"
    data = bytearray(damaged.read_bytes())
    data[4:44] = b"\xa7" * 40  # after the leading magic: the first column chunk's page header
    damaged.write_bytes(bytes(data))
    for workers in ("0", "2"):
        result = check("--data", str(repo), "--workers", workers)
        assert result.exit_code == 2, result.output
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"error: --data {repo}: {damaged} is damaged at row 0 ("), line
        assert line.endswith("download or write it again")


def test_a_hub_dataset_not_held_locally_is_refused_with_the_download_command(tmp_path):
    """The check reads every byte: it asks for a local copy rather than streaming one from the hub
    (where a row's file could be named only after downloading it anyway)."""
    from micromerge.core.errors import MicromergeError
    from micromerge.finetune.corpus_check import CHECK_SIZE, no_target
    from micromerge.finetune.hub_stream import HubStream
    from micromerge.finetune.streaming import SampleRecipe
    from tests.test_hub_stream import write_hub_repo

    stream = HubStream(
        str(write_hub_repo(tmp_path / "repo", 8, files=1)), SampleRecipe(CHECK_SIZE, (), 0, no_target)
    )
    stream.files = ["hf://datasets/owner/cells@0123abc/data/train-00000-of-00001.parquet"]
    with pytest.raises(
        MicromergeError, match=r"data check reads every byte of a local copy; make one \(`hf download"
    ):
        stream.row_groups()


def test_an_interrupted_check_has_said_what_it_found_and_says_how_to_keep_its_work(tmp_path, monkeypatch):
    """Names go out as they are found, so a check stopped after hours has printed what it met (at
    the end only, an interrupt lost them all). Without --out it keeps nothing, and says that --out
    would have (tests/test_corpus_check_resume.py)."""
    from micromerge.finetune.streaming import StreamedSamples

    data = write_csv_folder(tmp_path / "pairs", n=150)
    _spoil(data, 3, 70)
    read = StreamedSamples.__getitem__

    def interrupted_at_sample_100(self, item):
        if item[1] == 100:  # in the second batch of 64: the first, with img3 in it, is done
            raise KeyboardInterrupt
        return read(self, item)

    monkeypatch.setattr(StreamedSamples, "__getitem__", interrupted_at_sample_100)
    result = check("--data", str(data), "--workers", "0")
    assert result.exit_code == 130
    assert result.stdout.splitlines() == [repr(str(data / "img3.png"))]
    assert result.stderr.splitlines() == [
        "interrupted: nothing was kept; run it again to start over, with --out FILE to keep what it finishes"
    ]
    assert list(tmp_path.iterdir()) == [data]


def test_a_shard_cut_short_is_one_line_naming_it(tmp_path):
    """An interrupted download: the check stops where a fine-tune would, with tar's reason."""
    shards = write_shards(tmp_path / "wds", 14, per_shard=7)
    whole = (shards / "shard-000001.tar").read_bytes()
    (shards / "shard-000001.tar").write_bytes(whole[: len(whole) // 2 + 100])
    result = check("--data", _pipe_spec(shards), "--workers", "0")
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        f"error: --data {_pipe_spec(shards)}: shard pipe:cat {shards}/shard-000001.tar cannot be read as a "
        "tar file (unexpected end of data); re-create or re-download it"
    ]


def test_shards_without_a_sample_are_an_error_not_all_readable(tmp_path):
    """ "all 0 samples are readable" was a pass for a stream of empty shards."""
    (tmp_path / "wds").mkdir()
    for k in range(2):
        tarfile.open(tmp_path / "wds" / f"shard-{k:06d}.tar", "w").close()
    result = check("--data", _pipe_spec(tmp_path / "wds"))
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        f"error: --data {_pipe_spec(tmp_path / 'wds')}: no sample in it; check the shards or the pattern"
    ]


def test_one_large_hub_file_is_shared_by_the_workers_row_group_by_row_group(tmp_path):
    """A hub copy of one file (of several row groups) was read by one worker however many were
    asked for; its row groups are now shared, and each row keeps its place in the file."""
    import datasets

    from micromerge.finetune.corpus_check import CHECK_SIZE, no_target
    from micromerge.finetune.hub_stream import HubStream
    from micromerge.finetune.streaming import SampleRecipe

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    images: list[dict | None] = [{"bytes": _png(i), "path": None} for i in range(32)]
    images[5], images[13], images[30] = None, {"bytes": b"no image", "path": None}, None
    (tmp_path / "repo" / "data").mkdir(parents=True)
    file = tmp_path / "repo" / "data" / "train.parquet"
    rows = {"image": images, "caption": [f"caption {i}" for i in range(32)]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(file), batch_size=8)  # 4 row groups
    stream = HubStream(str(tmp_path / "repo"), SampleRecipe(CHECK_SIZE, (), 0, no_target))
    assert stream.one_pass(8, 2, stream.row_groups()).num_workers == 2
    expected = [f"row {i} of {str(file)!r}" for i in (5, 13, 30)]
    for workers in ("0", "2"):
        result = check("--data", str(tmp_path / "repo"), "--workers", workers)
        assert sorted(result.stdout.splitlines(), key=lambda n: int(n.split()[1])) == expected, workers
        assert "3 of 32 samples" in result.stderr
