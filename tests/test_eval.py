"""Evaluation: loader validation, task registry, metrics, zero-shot parity, CLI, sweeps, resume."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import datasets
import numpy as np
import open_clip
import pyarrow
import pyarrow.ipc
import pyarrow.parquet
import pytest
import torch
from click.testing import CliRunner

from micromerge.cli import cli
from micromerge.core.errors import MicromergeError
from micromerge.eval.data import column_values, load_benchmark
from micromerge.eval.hub_layout import write_hub_layout
from micromerge.eval.metrics import classification_metrics, confusion_matrix, metrics_from_confusion
from micromerge.eval.store import ResultStore
from micromerge.eval.tasks import discover_tasks
from micromerge.merging.models import load_model
from micromerge.merging.sources import open_source
from tests.helpers import launch_failure, run_two_processes, write_checkpoint
from tests.ubench_fixture import fixture_dataset, fixture_features, fixture_rows, write_fixture


@pytest.fixture
def bench(tmp_path):
    return write_fixture(tmp_path / "ubench")


@pytest.fixture
def models(tmp_path):
    write_checkpoint(tmp_path / "base.safetensors", 0)
    write_checkpoint(tmp_path / "ft.safetensors", 1)
    return tmp_path / "base.safetensors", tmp_path / "ft.safetensors"


def _identity(row):
    return (row["alpha"], row["task"], row.get("caption_key"), row["split"], row["metric"])


def test_loader_reads_every_layout_through_one_path(tmp_path, bench):
    """The Hub folder, its parent, save_to_disk and parquet give the same rows; nested structs kept."""
    layouts = [bench, bench.parent.parent, write_fixture(tmp_path / "disk", fmt="save_to_disk")]
    layouts.append(write_fixture(tmp_path / "pq", fmt="parquet"))
    loaded = [load_benchmark(str(p)).dataset for p in layouts]
    assert all(len(d) == 78 for d in loaded)
    assert all(column_values(d, "label_name") == column_values(loaded[0], "label_name") for d in loaded)
    assert not (bench / "state.json").exists() and len(list(bench.glob("*.arrow"))) == 7
    first = loaded[0]
    assert first.features["captions"]["modality_0"]["answer_idx"] == datasets.Value("string")
    assert column_values(first, "dataset").count(None) == 18, "the Held rows keep their null dataset"
    assert column_values(first, "annotator_notes")[0] is None, "unknown extra columns are kept"
    assert first[0]["captions"]["stain_0"] is not None and first[-1]["captions"]["stain_0"] is None


def test_a_saved_dataset_dict_is_read_one_split_at_a_time(tmp_path):
    """A `save_to_disk` DatasetDict (dataset_dict.json + one folder per split) gives the asked split
    only, never its splits' Arrow files read together; a split it lacks is named in one line."""
    folder = tmp_path / "dict"
    splits = {
        "test": fixture_dataset(per_class=2, corrupt=0),
        "train": fixture_dataset(per_class=1, corrupt=0),
    }
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    assert len(load_benchmark(str(folder)).dataset) == 26
    assert len(load_benchmark(str(folder), split="train").dataset) == 13
    with pytest.raises(MicromergeError, match=r"dict: has splits \['test', 'train'\], not 'validation'"):
        load_benchmark(str(folder), split="validation")


def test_hub_shards_are_memory_mapped_not_copied(bench):
    dataset = load_benchmark(str(bench)).dataset
    files = sorted(f["filename"] for f in dataset.cache_files)
    assert [os.path.basename(f) for f in files] == sorted(p.name for p in bench.glob("*.arrow"))


def test_loader_rejects_missing_and_mistyped_columns_and_keeps_extras(tmp_path):
    dataset = datasets.load_from_disk(str(write_fixture(tmp_path / "disk", fmt="save_to_disk")))
    dataset.remove_columns(["dataset"]).save_to_disk(str(tmp_path / "missing"))
    with pytest.raises(
        MicromergeError,
        match=r"missing required column\(s\) \['dataset'\], so not a copy of μ-Bench \(jnirschl/uBench\)$",
    ):
        load_benchmark(str(tmp_path / "missing"))
    # a fine-tuning corpus given to eval: said to be one (the message named a file users do not have),
    # here with a webdataset's own two columns beside its pairs
    pairs = dataset.select_columns(["image"]).add_column("caption", ["a micrograph"] * len(dataset))
    pairs = pairs.add_column("__key__", [str(i) for i in range(len(dataset))])
    pairs = pairs.add_column("__url__", ["shard-0.tar"] * len(dataset))
    pairs.save_to_disk(str(tmp_path / "pairs"))
    with pytest.raises(MicromergeError, match="a corpus of image-caption pairs goes to `finetune --data`$"):
        load_benchmark(str(tmp_path / "pairs"))
    # a few columns none of which is a caption: no copy of μ-Bench, and no corpus either
    dataset.select_columns(["image", "label"]).save_to_disk(str(tmp_path / "images"))
    with pytest.raises(MicromergeError, match=r"so not a copy of μ-Bench \(jnirschl/uBench\)$"):
        load_benchmark(str(tmp_path / "images"))
    paths = dataset.remove_columns(["image"]).add_column("image", ["img.png"] * len(dataset))
    paths.save_to_disk(str(tmp_path / "paths"))
    with pytest.raises(MicromergeError, match="column 'image' must be a datasets Image, not Value"):
        load_benchmark(str(tmp_path / "paths"))
    dataset.cast_column("label", datasets.Value("string")).save_to_disk(str(tmp_path / "typed"))
    with pytest.raises(MicromergeError, match="column 'label' must be a ClassLabel"):
        load_benchmark(str(tmp_path / "typed"))
    flat = dataset.remove_columns(["captions"]).add_column("captions", ["A caption."] * len(dataset))
    flat.save_to_disk(str(tmp_path / "flat"))
    with pytest.raises(MicromergeError, match="column 'captions' must be a struct"):
        load_benchmark(str(tmp_path / "flat"))
    for name, entry in (  # a caption entry needs its options as strings and its answer_idx
        ("unanswered", {"question": datasets.Value("string"), "options": [datasets.Value("string")]}),
        ("numbered", {"answer_idx": datasets.Value("string"), "options": [datasets.Value("int64")]}),
        ("worded", {"answer_idx": datasets.Value("string"), "options": datasets.Value("string")}),
    ):
        features = datasets.Features({**dataset.features, "captions": {"modality_0": entry}})
        undecoded = dataset.cast_column("image", datasets.Image(decode=False))
        rows = {c: column_values(undecoded, c) for c in dataset.column_names if c != "captions"}
        rows["captions"] = [{"modality_0": None}] * len(dataset)
        datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / name))
        with pytest.raises(
            MicromergeError, match=r"captions.modality_0 must be a struct with 'options' \(list"
        ):
            load_benchmark(str(tmp_path / name))
    empty = write_hub_layout(dataset.select([]), tmp_path / "empty" / "perception" / "0.1.0", 1)
    with pytest.raises(MicromergeError, match="0.1.0: the split has no rows"):
        load_benchmark(str(empty))
    dataset.add_column("a_new_column", ["x"] * len(dataset)).save_to_disk(str(tmp_path / "extra"))
    assert "a_new_column" in load_benchmark(str(tmp_path / "extra")).dataset.column_names
    # a copy re-written by other tools (polars, pandas through pyarrow) may hold large_string
    # columns and plain integer labels: as good as string and ClassLabel
    large = dataset.cast_column("dataset", datasets.Value("large_string"))
    large.cast_column("label_name", datasets.Value("large_string")).save_to_disk(str(tmp_path / "large"))
    assert column_values(load_benchmark(str(tmp_path / "large")).dataset, "dataset")[0] == "kather_et_al_2016"
    dataset.cast_column("label", datasets.Value("int64")).save_to_disk(str(tmp_path / "int"))
    assert column_values(load_benchmark(str(tmp_path / "int")).dataset, "label") == column_values(
        dataset, "label"
    )


@pytest.mark.parametrize(
    "column, values, kind",
    [
        ("modality", lambda n: list(range(n)), "a string"),
        ("stain", lambda n: [["H&E"]] * n, "a string"),
        ("dataset", lambda n: [1.5] * n, "a string"),
        ("subdomain", lambda n: [True] * n, "a string"),
        ("submodality", lambda n: [2] * n, "a string"),
        ("microns_per_pixel", lambda n: ["0.5"] * n, "a number"),
        ("synthetic", lambda n: ["no"] * n, "a bool"),
    ],
)
def test_a_mistyped_metadata_column_is_named_on_load(tmp_path, column, values, kind):
    """SCHEMA.md types them: string metadata (nullable), `microns_per_pixel` float, `synthetic`
    bool. A copy whose column has another type failed deep in task discovery ("'int' object has
    no attribute 'replace'", "unhashable type: 'list'"): now one line, exit 2, naming the column
    and its type as datasets writes it (`Value('int64')`; before datasets 4, `Value(dtype=...)`)."""
    dataset = fixture_dataset(per_class=2)
    dataset = dataset.remove_columns(column).add_column(column, values(len(dataset)))
    dataset.save_to_disk(str(tmp_path / "typed"))
    needle = rf"'{column}' must be {kind} \(or null\), not {re.escape(str(dataset.features[column]))}"
    with pytest.raises(MicromergeError, match=needle):
        load_benchmark(str(tmp_path / "typed"))
    result = CliRunner().invoke(cli, ["tasks", "--data", str(tmp_path / "typed")])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"column {column!r}" in result.output and len(result.output.strip().splitlines()) == 1


def test_metadata_columns_nothing_reads_may_have_any_type(tmp_path):
    """SCHEMA.md lists `institution`, `license`, `ncbitaxon_id`, `ncbitaxon_name`, `pmid` and
    `split` without confirming their types (PubMed and NCBI Taxonomy ids are numbers; eval/schema.py
    writes them as text, its own reading). No task or report reads them, so a copy that types them
    otherwise (integers, Arrow's null type) loads, and its tasks are those of the text-typed copy."""
    dataset = fixture_dataset(per_class=2)
    n = len(dataset)
    retyped = dataset.remove_columns(["pmid", "ncbitaxon_id", "institution", "license", "split"])
    retyped = retyped.add_column("pmid", list(range(n))).add_column("ncbitaxon_id", [9606] * n)
    retyped = retyped.add_column("institution", [None] * n).add_column("license", [1.0] * n)
    retyped = retyped.add_column("split", [0] * n)
    assert retyped.features["institution"] == datasets.Value("null")
    retyped.save_to_disk(str(tmp_path / "retyped"))
    dataset.save_to_disk(str(tmp_path / "text"))
    tasks = [
        [
            (t.name, t.classes, t.rows, t.labels, t.groups)
            for t in discover_tasks(load_benchmark(str(folder)).dataset)
        ]
        for folder in (tmp_path / "retyped", tmp_path / "text")
    ]
    assert tasks[0] == tasks[1] and len(tasks[0]) > 5


@pytest.mark.parametrize("column", ["image_id", "label_name", "domain"])
def test_a_required_column_that_is_no_string_is_named_on_load(tmp_path, column):
    """The required text columns (SCHEMA.md: string, never null) typed otherwise: one line naming it."""
    dataset = fixture_dataset(per_class=2)
    dataset = dataset.remove_columns(column).add_column(column, list(range(len(dataset))))
    dataset.save_to_disk(str(tmp_path / "typed"))
    needle = rf"column '{column}' must be a string, not {re.escape(str(dataset.features[column]))}$"
    with pytest.raises(MicromergeError, match=needle):
        load_benchmark(str(tmp_path / "typed"))


def test_a_column_null_in_every_row_loads_as_the_null_type_arrow_gives_it(tmp_path):
    """Parquet written from only the CellCognition rows (SCHEMA.md: their `dataset` is null) types
    `dataset` as Arrow's null type, as any column null throughout (`stain` of fluorescence rows):
    it loads, and the rows are still named by the null-dataset rule."""
    dataset = fixture_dataset(per_class=2)
    table = dataset.with_format("arrow")[:]
    nulls = table.drop_columns(["dataset", "stain"])
    nulls = nulls.append_column("dataset", pyarrow.nulls(len(table))).append_column(
        "stain", pyarrow.nulls(len(table))
    )
    (tmp_path / "parquet").mkdir()
    pyarrow.parquet.write_table(nulls, tmp_path / "parquet" / "test.parquet")
    loaded = load_benchmark(str(tmp_path / "parquet")).dataset
    assert loaded.features["dataset"].dtype == "null" and loaded.features["stain"].dtype == "null"
    fine = [t.name for t in discover_tasks(loaded) if t.level == "fine"]
    assert fine and all(name != "None" for name in fine) and "held_et_al_2010_h2b" in fine


def _hub_snapshot(revision: str, source: Path) -> Path:
    """Lay the fixture out as huggingface_hub's cache holds a dataset snapshot:
    datasets--jnirschl--uBench/{refs/main, snapshots/<revision>/perception/0.1.0/...}."""
    root = Path(os.environ["HF_HUB_CACHE"]) / "datasets--jnirschl--uBench"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    target = root / "snapshots" / revision / "perception" / "0.1.0"
    shutil.copytree(source, target)
    return target


def test_hub_id_reads_the_cached_snapshot_offline(tmp_path, bench):
    """`ubench` is the pinned revision; `@REV` picks another snapshot (here a smaller benchmark)."""
    from micromerge.eval.hub_layout import HUB_REVISION

    _hub_snapshot(HUB_REVISION, bench)
    assert len(load_benchmark("ubench").dataset) == 78
    other = "0123456789abcdef0123456789abcdef01234567"
    _hub_snapshot(other, write_fixture(tmp_path / "smaller", per_class=2))
    for spec in (f"jnirschl/uBench@{other}", f"ubench@{other}"):
        assert len(load_benchmark(spec).dataset) == 26, spec
    assert len(load_benchmark(f"ubench@{HUB_REVISION}").dataset) == 78


def _hub_1x_snapshot_download(monkeypatch) -> list[bool]:
    """huggingface_hub 1.x's snapshot_download as its source (1.33, _snapshot_download.py) has it:
    given a commit hash and not `local_files_only`, it lists the repository's files on the hub
    before it looks in the cache, so offline (or unreachable) it fails although the snapshot is
    cached; 2.x falls back to the cache itself. Records each call's `local_files_only`."""
    import huggingface_hub

    real, calls = huggingface_hub.snapshot_download, []

    def snapshot_download(*args, local_files_only=False, **kwargs):
        calls.append(local_files_only)
        if not local_files_only:
            raise ConnectionError("listing the repository's files: the hub cannot be reached")
        return real(*args, local_files_only=True, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_a_cached_snapshot_is_read_offline_and_when_the_hub_is_unreachable(monkeypatch, bench):
    """HF_HUB_OFFLINE=1 is said to huggingface_hub as `local_files_only` (one call, no listing);
    without it, a failed download is retried from the cache."""
    from micromerge.eval.hub_layout import HUB_REVISION

    _hub_snapshot(HUB_REVISION, bench)
    calls = _hub_1x_snapshot_download(monkeypatch)
    assert len(load_benchmark("ubench").dataset) == 78 and calls == [True]
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    calls.clear()
    assert len(load_benchmark("ubench").dataset) == 78 and calls == [False, True]


def test_hub_copy_offline_without_cache_is_a_clear_error():
    with pytest.raises(
        MicromergeError,
        match=r"jnirschl/uBench@3f2c5b590bc7: not in the Hugging Face cache \(HF_HUB_OFFLINE=1\);.*--data",
    ) as raised:
        load_benchmark("ubench")
    assert "unreachable" not in str(raised.value)  # offline by the setting, not for want of a network


def test_hub_copy_unreachable_without_cache_says_the_hub_could_not_be_reached(monkeypatch):
    import huggingface_hub

    def snapshot_download(*args, **kwargs):
        raise ConnectionError("the hub cannot be reached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(
        MicromergeError,
        match=r"not in the Hugging Face cache and the hub is unreachable \(ConnectionError; HF_HUB_OFFLINE=1 fails fast\)",
    ):
        load_benchmark("ubench")


def _tasks_cli(path):
    return CliRunner().invoke(cli, ["tasks", "--data", str(path)])


def test_bad_copies_are_one_line_errors(tmp_path, bench):
    missing = tmp_path / "missing"
    shutil.copytree(bench, missing)
    (missing / "ubench-test-00003-of-00007.arrow").unlink()
    truncated = tmp_path / "truncated"
    shutil.copytree(bench, truncated)
    shard = truncated / "ubench-test-00002-of-00007.arrow"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    for path, message in (
        (missing, "shard(s) missing: ubench-test-00003-of-00007.arrow"),
        (truncated, "ubench-test-00002-of-00007.arrow: not a readable Arrow stream shard"),
        (tmp_path / "nowhere", "no such file or folder"),
    ):
        result = _tasks_cli(path)
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1


def test_a_shard_with_garbage_in_its_text_is_one_line_naming_it(tmp_path, bench):
    """A copy whose shard kept its size and stream framing but not its bytes (a bad disk, an
    interrupted rsync) opened, and `tasks` ended in pyarrow's UnicodeDecodeError deep inside task
    discovery. Arrow's full validation names the shard and the column; a save_to_disk copy too."""
    damaged = tmp_path / "damaged"
    shutil.copytree(bench, damaged)
    shard = damaged / "ubench-test-00002-of-00007.arrow"
    data = shard.read_bytes()
    at = data.index(b"none of the above")
    shard.write_bytes(data[:at] + b"\xff\xfe" + data[at + 2 :])  # never valid UTF-8
    result = _tasks_cli(damaged)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert f"--data {shard}: damaged contents (column captions: Invalid UTF8 sequence" in result.output
    saved = tmp_path / "saved"
    load_benchmark(str(bench)).dataset.save_to_disk(str(saved))
    arrow = next(saved.glob("*.arrow"))
    data = arrow.read_bytes()
    at = data.index(b"none of the above")
    arrow.write_bytes(data[:at] + b"\xff\xfe" + data[at + 2 :])
    with pytest.raises(
        MicromergeError, match=f"--data {re.escape(str(arrow))}: damaged contents \\(column captions"
    ):
        load_benchmark(str(saved))


def test_shards_of_another_split_are_ignored_and_of_another_set_refused(tmp_path, bench):
    """A folder may hold other splits' shards (`<builder>-<split>-NNNNN-of-NNNNN.arrow`, the
    `datasets` builder-cache naming SCHEMA.md cites); shards of another *set* of the same split
    (a re-sharded copy written over an old one) or numbered past their set are a broken copy, even
    when every index 0..N-1 is present."""
    first = bench / "ubench-test-00000-of-00007.arrow"
    shutil.copyfile(first, bench / "ubench-validation-00000-of-00001.arrow")
    assert len(load_benchmark(str(bench)).dataset) == 78
    mixed, beyond, two = tmp_path / "mixed", tmp_path / "beyond", tmp_path / "two"
    shutil.copytree(bench, mixed)
    (mixed / "ubench-test-00003-of-00007.arrow").rename(mixed / "ubench-test-00003-of-00008.arrow")
    shutil.copytree(bench, beyond)
    shutil.copyfile(first, beyond / "ubench-test-00007-of-00007.arrow")
    for copy in ("a", "b"):
        shutil.copytree(bench, two / copy / "perception" / "0.1.0")
    for path, message in (
        (mixed, "shards of 2 different sets (-of-00007, -of-00008)"),
        (beyond, "shard(s) past the set: ubench-test-00007-of-00007.arrow"),
        (two, "holds 2 μ-Bench shard folders"),
    ):
        result = _tasks_cli(path)
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1


def test_the_one_shard_folder_below_a_given_folder_is_found(tmp_path, bench):
    """--data may name a folder above the shards' (a Hub-cache repository folder, whose snapshot
    holds perception/0.1.0): the one shard folder found below it is read (two are refused, above)."""
    cached = tmp_path / "datasets--jnirschl--uBench"
    shutil.copytree(bench, cached / "snapshots" / ("ab" * 20) / "perception" / "0.1.0")
    assert len(load_benchmark(str(cached)).dataset) == 78


def test_the_benchmarks_fingerprint_is_the_same_in_every_process(bench):
    """Result rows name the benchmark by its fingerprint, and resumed or split runs match rows by
    it: processes with other string hashing (PYTHONHASHSEED, random per process) fingerprint the
    seven shards alike, so their files are hashed in a fixed order, not a set's."""
    script = "import sys; from micromerge.eval.data import load_benchmark; print(load_benchmark(sys.argv[1]).fingerprint)"
    seen = {
        subprocess.run(
            [sys.executable, "-c", script, str(bench)],
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        for seed in (1, 2, 3)
    }  # fmt: skip
    assert len(seen) == 1 and seen != {""}


def test_data_verify_names_the_changed_shard(tmp_path, bench):
    import hashlib

    expected = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in bench.glob("*.arrow")}
    (tmp_path / "sums.json").write_text(json.dumps(expected))
    ok = CliRunner().invoke(
        cli, ["data", "verify", str(bench.parent.parent), "--expected", str(tmp_path / "sums.json")]
    )
    assert ok.exit_code == 0 and "all 7 shards match" in ok.output, ok.output
    shard = bench / "ubench-test-00004-of-00007.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = CliRunner().invoke(cli, ["data", "verify", str(bench), "--expected", str(tmp_path / "sums.json")])
    assert bad.exit_code == 2
    assert (
        "ubench-test-00004-of-00007.arrow  differs" in bad.output and "1 of 7 shard(s) differ" in bad.output
    )
    published = CliRunner().invoke(cli, ["data", "verify", str(bench)])  # our fixture is not the real data
    assert published.exit_code == 2 and "7 of 7 shard(s) differ" in published.output
    assert "synthetic benchmark" not in published.output, "the fixture's rows name another institution"
    (tmp_path / "empty").mkdir()
    for where, message in (
        (tmp_path / "nowhere", "no such folder"),
        (tmp_path / "empty", "no μ-Bench shard"),
    ):
        wrong = CliRunner().invoke(cli, ["data", "verify", str(where)])
        assert wrong.exit_code == 2 and f"{where}: {message}" in wrong.output, wrong.output


def test_the_written_dataset_info_records_each_shards_length(bench):
    """`datasets`' builder records every shard's row count in `dataset_info.json`
    (`splits.test.shard_lengths`, DatasetInfo/SplitInfo); the fixture carries them as the Hub's does."""
    info = json.loads((bench / "dataset_info.json").read_text())
    split = info["splits"]["test"]
    rows = [len(datasets.Dataset.from_file(str(p))) for p in sorted(bench.glob("*.arrow"))]
    assert split["shard_lengths"] == rows and split["num_examples"] == sum(rows) == 78
    assert not (bench / "state.json").exists()


def test_a_repository_copy_is_read_at_perception_0_1_0_beside_other_shard_folders(tmp_path, bench):
    """A copy of the whole repository is read at `perception/0.1.0` (SCHEMA.md's folder) even when
    another shard folder lies below it (an older copy kept in a subfolder)."""
    root = bench.parent.parent
    shutil.copytree(bench, root / "old" / "perception" / "0.1.0")
    (root / "old" / "perception" / "0.1.0" / "ubench-test-00006-of-00007.arrow").unlink()
    assert len(load_benchmark(str(root)).dataset) == 78


def test_a_shard_of_another_dataset_is_refused_not_read_as_rows_of_nulls(tmp_path, bench):
    """`datasets.concatenate_datasets` (5.x) fills the columns a shard lacks with nulls and adds
    the ones it has extra: a foreign shard under a μ-Bench name would become rows of nulls."""
    full = datasets.Dataset.from_file(str(bench / "ubench-test-00005-of-00007.arrow"))
    foreign = datasets.Dataset.from_dict({"image_id": ["x"], "something_else": [1]})
    retyped = full.cast_column("pmid", datasets.Value("large_string"))
    for name, dataset, message in (
        (
            "foreign",
            foreign,
            "columns missing: image, label, label_name, dataset, domain; columns extra: something_else",
        ),
        ("retyped", retyped, "column 'pmid' of another type"),
        ("trimmed", full.remove_columns(["annotator_notes"]), "columns missing: annotator_notes"),
    ):
        copy = tmp_path / name
        shutil.copytree(bench, copy)
        write_hub_layout(dataset, tmp_path / f"{name}-shard", 1)
        shutil.copyfile(
            tmp_path / f"{name}-shard" / "ubench-test-00000-of-00001.arrow",
            copy / "ubench-test-00005-of-00007.arrow",
        )
        result = _tasks_cli(copy)
        assert result.exit_code == 2, result.output
        assert (
            "ubench-test-00005-of-00007.arrow: not a shard of the same dataset as ubench-test-00000-of-00007.arrow"
            in result.output
        )
        assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_one_parquet_or_arrow_file_is_a_copy_too(tmp_path, bench):
    """A single file loads as its folder does: a parquet export (as written by `Dataset.to_parquet`)
    or one of the Hub's Arrow stream shards; any other file is refused in one line."""
    folder = write_fixture(tmp_path / "pq", fmt="parquet")
    parquet = folder / "test-00000-of-00001.parquet"
    whole = load_benchmark(str(folder)).dataset
    assert load_benchmark(str(parquet)).dataset.to_dict() == whole.to_dict()
    shard = bench / "ubench-test-00005-of-00007.arrow"
    assert load_benchmark(str(shard)).dataset.to_dict() == datasets.Dataset.from_file(str(shard)).to_dict()
    notes = tmp_path / "notes.txt"
    notes.write_text("rows")
    result = _tasks_cli(notes)
    assert (
        result.exit_code == 2 and "not a folder (pass the folder holding the shards, or one" in result.output
    )
    assert len(result.output.strip().splitlines()) == 1


def test_a_parquet_folder_names_a_file_of_another_dataset_and_casts_mere_type_differences(tmp_path):
    """`datasets`' parquet builder casts every file to the first one's features (so a column that
    is all null in one file, typed `null` there, loads) but refuses other columns only as "An error
    occurred while generating the dataset"; the file and its columns are named instead."""
    folder = write_fixture(tmp_path / "pq", fmt="parquet")
    rows = datasets.Dataset.from_parquet(str(folder / "test-00000-of-00001.parquet"))
    first, second = rows.select(range(40)), rows.select(range(40, len(rows)))
    table = second.with_format("arrow")[:]  # as another tool writes it: no features metadata
    table = table.set_column(table.schema.get_field_index("pmid"), "pmid", pyarrow.nulls(len(table)))
    (folder / "test-00000-of-00001.parquet").unlink()
    first.to_parquet(str(folder / "test-00000-of-00002.parquet"))
    pyarrow.parquet.write_table(table.replace_schema_metadata(None), folder / "test-00001-of-00002.parquet")
    assert len(load_benchmark(str(folder)).dataset) == len(rows)
    foreign = folder / "test-00002-of-00002.parquet"
    datasets.Dataset.from_dict({"image_id": ["x"], "something_else": [1]}).to_parquet(str(foreign))
    result = _tasks_cli(folder)
    assert result.exit_code == 2, result.output
    assert (
        "test-00002-of-00002.parquet: not a file of the same dataset as test-00000-of-00002.parquet"
        in result.output
    )
    assert "columns extra: something_else" in result.output and len(result.output.strip().splitlines()) == 1
    second = folder / "test-00001-of-00002.parquet"  # the foreign file as the second of two, too
    second.unlink()
    foreign.rename(second)
    result = _tasks_cli(folder)
    assert (
        result.exit_code == 2
        and "test-00001-of-00002.parquet: not a file of the same dataset" in result.output
    )
    second.rename(foreign)
    foreign.write_bytes(b"PAR1 cut short")
    result = _tasks_cli(folder)
    assert (
        result.exit_code == 2 and "test-00002-of-00002.parquet: not a readable .parquet file" in result.output
    )


@pytest.mark.parametrize("arrow_format", ["file", "stream"])
def test_an_arrow_folder_in_either_ipc_format_loads_and_names_a_foreign_file(tmp_path, arrow_format):
    """`datasets`' arrow builder reads Arrow's IPC file format and its stream format (the one its
    cache and the Hub's shards use); a folder of either loads, and a file of another dataset in it
    is named by its columns."""
    dataset = fixture_dataset(2, 0, 0)
    table = dataset.with_format("arrow")[:].replace_schema_metadata(dataset.features.arrow_schema.metadata)
    writer = pyarrow.ipc.new_file if arrow_format == "file" else pyarrow.ipc.new_stream
    folder = tmp_path / "arrows"
    folder.mkdir()
    for index, part in enumerate((table.slice(0, 10), table.slice(10))):
        with writer(str(folder / f"part-{index}.arrow"), table.schema) as out:
            out.write_table(part)
    assert len(load_benchmark(str(folder)).dataset) == len(dataset)
    foreign = pyarrow.table({"image_id": ["x"], "something_else": [1]})
    with writer(str(folder / "part-2.arrow"), foreign.schema) as out:
        out.write_table(foreign)
    result = _tasks_cli(folder)
    assert (
        result.exit_code == 2
        and "part-2.arrow: not a file of the same dataset as part-0.arrow" in result.output
    )


def test_data_verify_says_when_a_copy_is_micromerges_synthetic_benchmark(tmp_path):
    """`data verify` on the demo's benchmark listed all seven shards as different from the published
    ones, true but no help: its rows' institution says whose it is, and the error now says it."""
    from micromerge.eval.synthetic.generate import write_benchmark

    write_benchmark(tmp_path / "synthetic", per_class=2, workers=1)
    result = CliRunner().invoke(cli, ["data", "verify", str(tmp_path / "synthetic")])
    assert result.exit_code == 2
    assert result.output.rstrip().endswith(
        "; this is micromerge's synthetic benchmark (`micromerge demo` writes it), not a copy of jnirschl/uBench"
    ), result.output


def test_data_verify_names_a_missing_shard(bench):
    import hashlib

    from micromerge.eval.hub_layout import verify_shards

    expected = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in bench.glob("*.arrow")}
    (bench / "ubench-test-00002-of-00007.arrow").unlink()
    report = dict(verify_shards(bench, expected))
    assert report.pop("ubench-test-00002-of-00007.arrow") == "missing"
    assert set(report.values()) == {"ok"} and len(report) == 6


def test_data_verify_says_each_shards_status_before_hashing_the_next(bench, tmp_path, monkeypatch):
    """The real copy is 3.6 GB, a minute or more from a cold disk: every line came at the end."""
    import hashlib

    import click

    from micromerge.eval import hub_layout

    sums = tmp_path / "sums.json"
    sums.write_text(
        json.dumps({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in bench.glob("*.arrow")})
    )
    events: list[str] = []
    hashed = hub_layout.sha256_file
    monkeypatch.setattr(hub_layout, "sha256_file", lambda path: events.append("hash") or hashed(path))
    echo = click.echo
    monkeypatch.setattr(
        click, "echo", lambda message=None, **kw: events.append("line") or echo(message, **kw)
    )
    result = CliRunner().invoke(cli, ["data", "verify", str(bench), "--expected", str(sums)])
    assert result.exit_code == 0, result.output
    assert events == ["hash", "line"] * 7 + ["line"], events  # then the summary line
    assert result.output.count("  ok\n") == 7 and "all 7 shards match" in result.output


def test_a_cached_snapshot_without_the_shard_folder_is_named(tmp_path, bench):
    from micromerge.eval.hub_layout import HUB_REVISION

    snapshot = _hub_snapshot(HUB_REVISION, bench)
    for shard in snapshot.glob("*.arrow"):
        shard.unlink()
    with pytest.raises(MicromergeError, match="the snapshot at .* has no perception/0.1.0 shards"):
        load_benchmark("ubench")


def test_tasks_are_discovered_as_the_benchmark_defines_them(bench):
    tasks = {t.name: t for t in discover_tasks(load_benchmark(str(bench)).dataset)}
    coarse = {"modality", "submodality", "domain", "subdomain", "stain"}
    fine = {
        "kather_et_al_2016",
        "nirschl_et_al_2018",
        "held_et_al_2010_h2b",
        "eulenberg_et_al_2017_darkfield",
        "opencell",
    }
    assert set(tasks) == coarse | fine, "null-dataset rows are named by the source table's rule, never None"
    held = tasks["held_et_al_2010_h2b"]
    assert held.classes == ("anaphase", "interphase", "metaphase") and held.n_images == 18
    assert [q.key for q in held.questions] == ["classification_0", "classification_1"]
    assert tasks["kather_et_al_2016"].groups == {
        "level": "fine",
        "domain": "pathology",
        "subdomain": "gastrointestinal pathology",
        "modality": "light microscopy",
        "submodality": "brightfield microscopy",
        "taxonomy": "neoplastic histopathology",
        "scale": "tissue",
        "paper": "yes",
        "synthetic": "no",
        "fine_headline": "yes",
    }
    assert tasks["opencell"].groups["paper"] == "no"
    assert tasks["eulenberg_et_al_2017_darkfield"].groups["fine_headline"] == "no"
    stain = tasks["stain"]
    assert [len(q.rows) for q in stain.questions] == [30, 30], "null stain captions are not scored"
    modality = tasks["modality"].questions[0]
    assert (
        modality.options.shape == (78, 5) and "A micrograph acquired through X-ray imaging." in modality.texts
    )
    assert tasks["subdomain"].questions == () and len(tasks["subdomain"].classes) == 3


def test_source_table_override_changes_a_scale(tmp_path, bench):
    from micromerge.eval.source_metadata import load_source_table

    (tmp_path / "mine.toml").write_text('[sources.kather_et_al_2016]\nscale = "subcellular"\n')
    table = load_source_table(tmp_path / "mine.toml")
    tasks = {t.name: t for t in discover_tasks(load_benchmark(str(bench)).dataset, table)}
    assert tasks["kather_et_al_2016"].groups["scale"] == "subcellular"
    assert tasks["kather_et_al_2016"].notes == (
        "median 0.5 µm/px is outside subcellular's 0–0.35 (subcellular because: set in mine.toml)",
    )
    assert tasks["kather_et_al_2016"].groups["taxonomy"] == "neoplastic histopathology", "other keys stay"
    (tmp_path / "why.toml").write_text(
        '[sources.kather_et_al_2016]\nscale = "subcellular"\nscale_reason = "organelles"\n'
    )
    tasks = {
        t.name: t
        for t in discover_tasks(load_benchmark(str(bench)).dataset, load_source_table(tmp_path / "why.toml"))
    }
    assert tasks["kather_et_al_2016"].notes[0].endswith("(subcellular because: organelles)")
    (tmp_path / "bad.toml").write_text("[sources.kather_et_al_2016]\nscale = 3\n")
    with pytest.raises(MicromergeError, match=r"bad.toml: sources.kather_et_al_2016.scale must be a str"):
        load_source_table(tmp_path / "bad.toml")


def test_source_table_override_replaces_a_scale_range(tmp_path, bench):
    """`--sources` is "a TOML of the same shape": its [scales] replace ours (they were read from
    the shipped table only, and an override's [scales] was silently ignored)."""
    from micromerge.eval.source_metadata import load_source_table

    (tmp_path / "mine.toml").write_text("[scales]\ntissue = [0.6, 5.0]\n")
    table = load_source_table(tmp_path / "mine.toml")
    assert table.scales["tissue"] == (0.6, 5.0) and table.scales["cellular"] == (0.05, 1.5)
    (tmp_path / "new.toml").write_text(
        '[scales]\norgan = [5.0, 50.0]\n[sources.kather_et_al_2016]\nscale = "organ"\n'
    )
    assert load_source_table(tmp_path / "new.toml").info("kather_et_al_2016").scale == "organ", (
        "a new scale, with its range"
    )
    (tmp_path / "one.toml").write_text("[scales]\norgan = [5.0, 5.0]\n")
    assert load_source_table(tmp_path / "one.toml").scales["organ"] == (5.0, 5.0), "low <= high: one value"
    tasks = {t.name: t for t in discover_tasks(load_benchmark(str(bench)).dataset, table)}
    assert tasks["kather_et_al_2016"].notes[0].startswith("median 0.5 µm/px is outside tissue's 0.6–5")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[sources.kather_et_al_2016]\nnull_dataset_match = "(h2b"\n',
            r"mine.toml: sources.kather_et_al_2016.null_dataset_match '\(h2b' is not a regular expression",
        ),
        ('[source.kather_et_al_2016]\nscale = "tissue"\n', r"mine.toml: unknown table\(s\) \['source'\]"),
        (
            '[zz]\na = 1\n[source.k]\nscale = "tissue"\n[scale]\nb = 2\n',
            r"table\(s\) \['scale', 'source', 'zz'\]",
        ),
        (
            "[scales]\ntissue = [5.0, 0.2]\n",
            r"mine.toml: scales.tissue = \[5.0, 0.2\]: expected \[low, high\]",
        ),
        ('[scales]\ntissue = "0.2-5"\n', r"mine.toml: scales.tissue = '0.2-5': expected"),
        ("[scales]\ntissue = 0.5\n", r"mine.toml: scales.tissue = 0.5: expected \[low, high\]"),
        ('[scales]\ntissue = [0.2, "5"]\n', r"mine.toml: scales.tissue = \[0.2, '5'\]: expected"),
        ("[scales]\ntissue = [true, 5.0]\n", r"mine.toml: scales.tissue = \[True, 5.0\]: expected"),
        # a scale no [scales] names was a report group of its own, never cross-checked
        (
            '[sources.kather_et_al_2016]\nscale = "Tissue"\n',
            r"mine.toml: sources.kather_et_al_2016.scale 'Tissue' is not a scale of \[scales\] "
            r"\(subcellular, cellular, tissue\); use one, or add it to \[scales\]",
        ),
    ],
)
def test_a_bad_source_table_override_is_named_when_read(tmp_path, text, message):
    """A bad regex failed later inside `tasks` with a bare re.error; a misspelt table was ignored."""
    from micromerge.eval.source_metadata import load_source_table

    (tmp_path / "mine.toml").write_text(text)
    with pytest.raises(MicromergeError, match=message):
        load_source_table(tmp_path / "mine.toml")


def test_null_dataset_rows_matched_by_two_rules_are_unassigned_not_guessed(tmp_path, bench):
    """A row whose evidence two sources' rules both match is not given to the first one: its task is
    named `unassigned_<digest of its template>` (eval/source_metadata.py), never None."""
    from micromerge.eval.source_metadata import load_source_table

    (tmp_path / "two.toml").write_text('[sources.kather_et_al_2016]\nnull_dataset_match = "h2b|chromatin"\n')
    dataset = load_benchmark(str(bench)).dataset
    default = {t.name: t for t in discover_tasks(dataset)}
    tasks = {t.name: t for t in discover_tasks(dataset, load_source_table(tmp_path / "two.toml"))}
    unassigned = [name for name in tasks if name.startswith("unassigned_")]
    assert "held_et_al_2010_h2b" not in tasks and len(unassigned) == 1
    assert tasks[unassigned[0]].n_images == 18, "the 18 Held rows, together"
    assert tasks["kather_et_al_2016"].n_images == default["kather_et_al_2016"].n_images, (
        "none given to kather"
    )


def test_tasks_says_which_rows_a_null_dataset_match_rule_named_and_in_which_table(tmp_path, bench):
    """The 18 Held rows have a null `dataset` (../shared/ubench/SCHEMA.md); a rule names them.
    `tasks --sources` listed the resulting tasks but not that a table had moved rows into one:
    each task that received such rows now says how many, by which rule, from which table."""
    shipped = CliRunner().invoke(cli, ["tasks", "--data", str(bench)])
    assert shipped.exit_code == 0, shipped.output
    assert re.search(
        r"held_et_al_2010_h2b .*\n  note: 18 of its rows have a null dataset; named by the "
        r"null_dataset_match rule '.+' \(shipped table\)",
        shipped.output,
    ), shipped.output
    assert shipped.output.count("of its rows have a null dataset") == 1, "kather's rows all name it"
    (tmp_path / "moved.toml").write_text(
        '[sources.held_et_al_2010_h2b]\nnull_dataset_match = ""\n'
        '[sources.kather_et_al_2016]\nnull_dataset_match = "h2b|chromatin"\n'
    )
    moved = CliRunner().invoke(
        cli, ["tasks", "--data", str(bench), "--sources", str(tmp_path / "moved.toml")]
    )
    assert moved.exit_code == 0, moved.output
    assert re.search(
        r"kather_et_al_2016 .*\n  note: 18 of its rows have a null dataset; named by the "
        rf"null_dataset_match rule 'h2b\|chromatin' \(--sources {re.escape(str(tmp_path / 'moved.toml'))}\)",
        moved.output,
    ), moved.output


def test_metrics_equal_hand_computed_values():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 2, 2])
    values = metrics_from_confusion(np.bincount(y_true * 3 + y_pred, minlength=9).reshape(3, 3))
    assert values["accuracy"] == pytest.approx(4 / 6)
    assert values["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # F1 per class: c0 2*2/(3+2)=0.8, c1 2*1/(2+2)=0.5, c2 2*1/(1+2)=2/3
    assert values["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    with_ci = classification_metrics(y_true, y_pred, 3, bootstrap=200, seed=1)
    assert with_ci["accuracy"]["ci_low"] <= 4 / 6 <= with_ci["accuracy"]["ci_high"]
    assert with_ci == classification_metrics(y_true, y_pred, 3, bootstrap=200, seed=1), "seeded"


def test_the_printed_group_means_equal_hand_computed_ones():
    """`eval` prints the paper's aggregates: per level, and per domain/modality/... over the
    fine-grained tasks only, each task once (the pooled row, not its per-caption-key rows, not the
    headline rows), on the whole benchmark (not a select/report half), "unknown" never a group."""
    from micromerge.eval.aggregate import aggregate

    coarse_groups = dict.fromkeys(("domain", "subdomain", "modality", "submodality", "scale"), "all")
    pathology = {"domain": "pathology", "modality": "light microscopy", "scale": "tissue"}

    def row(task, level, value, **extra):
        groups = {**coarse_groups, **(pathology if level == "fine" else {}), "level": level}
        base = {"task": task, "level": level, "metric": "accuracy", "value": value, "split": "all"}
        return {**base, "caption_key": None, "groups": groups, **extra}

    cells = {"level": "fine", "domain": "cell biology", "modality": "light microscopy", "scale": "unknown"}
    rows = [
        row("kather", "fine", 0.9),
        row("bbbc", "fine", 0.3, groups=cells),
        row("modality", "coarse", 0.5, caption_key="all"),
        row("modality", "coarse", 0.1, caption_key="modality_0"),  # a per-key row: reported beside
        row("coarse", "headline", 0.99, groups={"level": "headline"}),
        row("kather", "fine", 0.0, split="select"),
        row("kather", "fine", 0.2, metric="balanced_accuracy"),
    ]
    assert aggregate(rows) == pytest.approx(
        {
            "level:fine": 0.6,
            "level:coarse": 0.5,
            "domain:pathology": 0.9,
            "domain:cell biology": 0.3,
            "modality:light microscopy": 0.6,
            "scale:tissue": 0.9,
            "overall": (0.9 + 0.3 + 0.5) / 3,
        }
    )
    assert list(aggregate(rows)) == [  # printed in this order: the groups by name, then overall
        "domain:cell biology",
        "domain:pathology",
        "level:coarse",
        "level:fine",
        "modality:light microscopy",
        "scale:tissue",
        "overall",
    ]
    assert aggregate(rows, split="select") == pytest.approx(
        {
            "level:fine": 0.0,
            "domain:pathology": 0.0,
            "modality:light microscopy": 0.0,
            "scale:tissue": 0.0,
            "overall": 0.0,
        }
    )


def test_a_class_embedding_is_the_renormalised_mean_of_its_unit_prompt_embeddings():
    """CLIP's prompt ensemble (CLIP_benchmark's zero_shot_classifier, OpenAI's notebook): each
    prompt's embedding normalised, averaged per class, the mean normalised again. A long prompt
    embedding must not outvote the others, and every class must score on the same scale."""
    from micromerge.eval.tasks import Task
    from micromerge.eval.zeroshot import class_embeddings

    vectors = {
        "a cell.": [10.0, 0.0, 0.0],
        "an image of cell.": [0.0, 1.0, 0.0],
        "a nucleus.": [0.0, 0.0, 3.0],
        "an image of nucleus.": [0.0, 4.0, 0.0],
    }

    class Texts(torch.nn.Module):
        def encode_text(self, tokens):
            return tokens

    def tokenizer(texts):
        return torch.tensor([vectors[t] for t in texts])

    task = Task(
        "t", "fine", ("cell", "nucleus"), ("cell", "nucleus"), ("a {}.", "an image of {}."), (0, 1), (0, 1)
    )
    embedded = class_embeddings(Texts(), tokenizer, task, torch.device("cpu"))
    half = 0.5**0.5
    torch.testing.assert_close(embedded, torch.tensor([[half, half, 0.0], [0.0, half, half]]))


def test_metrics_count_only_the_classes_a_task_has_seen():
    """Classes absent from the truth do not dilute balanced accuracy; macro-F1 counts a class that
    was predicted but never true (F1 0) and ignores one neither true nor predicted: the conventions
    of scikit-learn's balanced_accuracy_score and f1_score(average="macro"), whose default labels
    are the union of y_true and y_pred."""
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 3, 1, 2, 2])  # class 3 predicted once, never true; class 4 never seen
    values = metrics_from_confusion(confusion_matrix(y_true, y_pred, 5))
    assert values["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # F1: c0 2*2/(3+2)=0.8, c1 2*1/(2+1)=2/3, c2 2*1/(1+2)=2/3, c3 0
    assert values["macro_f1"] == pytest.approx((0.8 + 2 / 3 + 2 / 3 + 0) / 4)


def test_correctness_metrics_keep_unknown_classes_out_of_balanced_accuracy():
    """Label -1 (a question whose true class the task does not list) counts in accuracy only."""
    from micromerge.eval.metrics import correctness_metrics

    values = correctness_metrics(np.array([0, 0, 1, -1, -1]), np.array([1, 0, 1, 0, 0]), 2, bootstrap=0)
    assert values["accuracy"]["value"] == pytest.approx(2 / 5)
    assert values["balanced_accuracy"]["value"] == pytest.approx((1 / 2 + 1) / 2)


def test_correctness_metrics_average_recall_over_the_classes_present_only():
    """Balanced accuracy under the μ-Bench protocol is the mean recall over the true classes present
    (a select or report half can hold none of a class's images), as `metrics_from_confusions` and
    scikit-learn's balanced_accuracy_score count it; a pooled row (n_classes 0: questions of several
    tasks, whose classes are not comparable) has accuracy only."""
    from micromerge.eval.metrics import correctness_metrics

    labels, right = np.array([0, 0, 0, 2, 2]), np.array([1, 1, 0, 1, 0])  # class 1: no question
    values = correctness_metrics(labels, right, 3, bootstrap=0)
    assert values["balanced_accuracy"]["value"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    pooled = correctness_metrics(np.full(5, -1), right, 0, bootstrap=50)
    assert set(pooled) == {"accuracy"} and pooled["accuracy"]["value"] == pytest.approx(3 / 5)


def test_one_question_per_image_intervals_are_the_multinomial_over_outcome_cells():
    """With one question per image, a replicate is Multinomial(n, cell counts / n) over the (class,
    right/wrong) cells present, in cell order, from the seed: the intervals stores have held since
    before images were counted, so rows resumed across versions agree number for number."""
    from micromerge.eval.metrics import correctness_metrics

    rng = np.random.default_rng(11)
    labels, right = rng.integers(0, 3, 60), rng.random(60) < 0.6
    result = correctness_metrics(labels, right, 3, bootstrap=300, seed=5)
    table = np.bincount(labels * 2 + right, minlength=8)
    present = np.flatnonzero(table)
    drawn = np.zeros((300, 8), dtype=np.int64)
    drawn[:, present] = np.random.default_rng(5).multinomial(60, table[present] / 60, size=300)
    cells = drawn.reshape(300, 4, 2)
    accuracy = cells[:, :, 1].sum(axis=1) / 60
    recall = cells[:, :3, 1] / cells[:, :3].sum(axis=2)
    for name, samples in (("accuracy", accuracy), ("balanced_accuracy", np.nanmean(recall, axis=1))):
        low, high = np.nanpercentile(samples, [2.5, 97.5])
        assert (result[name]["ci_low"], result[name]["ci_high"]) == pytest.approx((low, high), abs=1e-12), (
            name
        )


def test_pooled_questions_about_one_image_are_resampled_together():
    """A pooled row (modality_0 and _1, every coarse key of a headline) asks several questions of
    each image; they are not independent, and resampling them one by one gave intervals too narrow.
    Images are resampled: the interval equals brute-force resampling of images, is as wide as one
    question per image would give when an image's two answers always agree, and with one question
    per image it is the one drawn before, number for number."""
    from micromerge.eval.metrics import correctness_metrics

    rng = np.random.default_rng(7)
    right = rng.random(200) < 0.7
    labels = rng.integers(0, 3, 200)
    twice = dict(
        labels=np.repeat(labels, 2), correct=np.repeat(right, 2), n_classes=3, bootstrap=20000, seed=2
    )
    by_image = correctness_metrics(**twice, images=np.repeat(np.arange(200), 2))["accuracy"]
    by_question = correctness_metrics(**twice)["accuracy"]
    once = correctness_metrics(labels, right, 3, bootstrap=20000, seed=2)["accuracy"]
    assert by_image["ci_high"] - by_image["ci_low"] == pytest.approx(
        once["ci_high"] - once["ci_low"], abs=0.01
    )
    assert (by_question["ci_high"] - by_question["ci_low"]) < 0.8 * (by_image["ci_high"] - by_image["ci_low"])
    draws = np.random.default_rng(4).integers(0, 200, (20000, 200))  # resample images, each with both answers
    low, high = np.percentile(right[draws].mean(axis=1), [2.5, 97.5])
    assert by_image["ci_low"] == pytest.approx(low, abs=0.006) and by_image["ci_high"] == pytest.approx(
        high, abs=0.006
    )
    single = correctness_metrics(labels, right, 3, bootstrap=500, seed=1, images=np.arange(200) * 5)
    assert single == correctness_metrics(labels, right, 3, bootstrap=500, seed=1), (
        "one question per image: as before"
    )


def test_two_images_resample_and_an_image_of_many_questions_keeps_its_counts():
    """Two images are enough to resample: one right and one wrong resample to 0, 1/2 or 1, so the
    interval is [0, 1], not the point. An image asked more than 255 questions of one kind (a generic
    corpus's, not μ-Bench's) keeps its counts: its pattern is found without packing them into bytes,
    so 300 right answers and 44 are two patterns, not one (300 mod 256 = 44)."""
    from micromerge.eval.metrics import _image_patterns, correctness_metrics

    two = correctness_metrics(
        np.array([0, 1]), np.array([1, 0]), 2, bootstrap=200, seed=0, images=np.arange(2)
    )
    assert (two["accuracy"]["ci_low"], two["accuracy"]["ci_high"]) == (0.0, 1.0)
    image_of, cells = np.repeat([0, 1, 2], [300, 44, 3]), np.repeat([1, 1, 0], [300, 44, 3])
    patterns, counts = _image_patterns(image_of, cells, 3, 2)
    assert sorted(map(tuple, patterns.tolist())) == [(0, 44), (0, 300), (3, 0)] and counts.tolist() == [
        1,
        1,
        1,
    ]


def test_option_scoring_never_picks_a_padding_slot():
    """Rows have different numbers of options; the padded slots (-1) must not win even when the
    text the padding would gather (id 0) is the most similar to the image."""
    from micromerge.eval.zeroshot import option_correct

    text_emb = torch.eye(3)
    image_emb = torch.tensor([[1.0, 0.5, 0.2], [1.0, 0.5, 0.2]])
    options = torch.tensor([[1, 2, -1], [2, 1, -1]])  # text 0 is in neither row's options
    answers = torch.tensor([0, 1])  # text 1 is the best of each row's own options
    assert option_correct(image_emb, text_emb, options, answers).tolist() == [True, True]
    own = torch.tensor([[0, 2, -1], [2, 0, 1]])  # text 0 offered: a real option, and the best one
    assert option_correct(image_emb, text_emb, own, torch.tensor([0, 1])).tolist() == [True, True]


def test_confusion_bootstrap_matches_resampling_images():
    """Drawing confusion matrices from the multinomial gives the intervals that resampling images gives."""
    rng = np.random.default_rng(5)
    y_true = rng.integers(0, 4, 300)
    y_pred = np.where(rng.random(300) < 0.7, y_true, rng.integers(0, 4, 300))
    result = classification_metrics(y_true, y_pred, 4, bootstrap=20000, seed=3)
    draws = np.random.default_rng(4).integers(0, 300, (20000, 300))
    resampled = {name: [] for name in result}
    for row in draws:
        for name, value in metrics_from_confusion(confusion_matrix(y_true[row], y_pred[row], 4)).items():
            resampled[name].append(value)
    for name, values in resampled.items():
        low, high = np.nanpercentile(values, [2.5, 97.5])
        assert result[name]["ci_low"] == pytest.approx(low, abs=0.006), name
        assert result[name]["ci_high"] == pytest.approx(high, abs=0.006), name
        assert high - low > 0.05, "the interval has width"


def _clip_benchmark_accuracy(model, preprocess, tokenizer, dataset, task) -> float:
    """An independent zero-shot implementation in the way CLIP_benchmark computes it."""
    with torch.no_grad():
        weights = []
        for classname in task.class_texts:
            texts = tokenizer([template.format(classname) for template in task.templates])
            embeddings = model.encode_text(texts)
            embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
            mean = embeddings.mean(dim=0)
            weights.append(mean / mean.norm())
        classifier = torch.stack(weights, dim=1)
        correct = total = 0
        for row, label in zip(task.rows, task.labels, strict=True):
            try:
                image = dataset[row]["image"]
            except Exception:
                continue  # the corrupt image
            features = model.encode_image(preprocess(image).unsqueeze(0))
            features = features / features.norm(dim=-1, keepdim=True)
            prediction = (100.0 * features @ classifier).argmax(dim=-1).item()
            correct += int(prediction == label)
            total += 1
    return correct / total


def _eval_args(tmp_path, bench, model, store="r.jsonl", bootstrap=0, protocol="ubench"):
    """`micromerge eval` of one checkpoint on the fixture, quietly, with the image cache in tmp_path."""
    return ["eval", "--model", str(model), "--data", str(bench), "--store", str(tmp_path / store),
            "--bootstrap", str(bootstrap), "--cache-dir", str(tmp_path / "cache"), "--quiet",
            "--protocol", protocol]  # fmt: skip


def test_the_printed_table_shows_a_dash_where_a_row_has_no_balanced_accuracy(tmp_path, bench, models):
    """A headline row is pooled over tasks, so it has no classes and no balanced accuracy: the
    table printed "nan" in that column. A task's row prints its numbers over all its images."""
    result = CliRunner().invoke(cli, _eval_args(tmp_path, bench, models[0]))
    assert result.exit_code == 0, result.output
    (coarse,) = [line for line in result.output.splitlines() if line.startswith("ubench:coarse")]
    assert coarse.split()[-1] == "-" and "nan" not in result.output
    stored = {
        (r["task"], r["caption_key"], r["metric"]): r
        for r in ResultStore(tmp_path / "r.jsonl").rows()
        if r["split"] == "all"
    }
    printed = [
        line.split()[:7] for line in result.output.splitlines() if line.startswith("kather_et_al_2016")
    ]
    assert len(printed) >= 2, result.output
    for task, key, _, n, accuracy, _, balanced in printed:  # each task row: its all-images numbers
        row = stored[(task, key, "accuracy")]
        assert (int(n), accuracy) == (row["n_images"], f"{row['value']:.3f}"), "the 'all' rows, not a half's"
        assert balanced == f"{stored[(task, key, 'balanced_accuracy')]['value']:.3f}"


def _load(model_path):
    with open_source(str(model_path)) as source:
        model, config = load_model(source)
    preprocess = open_clip.image_transform(config["vision_cfg"]["image_size"], is_train=False)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=config["text_cfg"]["context_length"])
    return model, preprocess, tokenizer


def test_closed_set_accuracy_equals_an_independent_implementation(tmp_path, bench, models):
    result = CliRunner().invoke(cli, _eval_args(tmp_path, bench, models[0], protocol="closed-set"))
    assert result.exit_code == 0, result.output
    rows = {
        r["task"]: r
        for r in ResultStore(tmp_path / "r.jsonl").rows()
        if r["metric"] == "accuracy" and r["split"] == "all"
    }
    assert {r["protocol"] for r in rows.values()} == {"closed-set"}
    model, preprocess, tokenizer = _load(models[0])
    dataset = load_benchmark(str(bench)).dataset
    scored = [t for t in discover_tasks(dataset) if len(t.classes) >= 2]
    assert set(rows) == {t.name for t in scored}, "single-class tasks (stain here) are not scored closed-set"
    for task in scored:
        assert rows[task.name]["value"] == pytest.approx(
            _clip_benchmark_accuracy(model, preprocess, tokenizer, dataset, task), abs=1e-12
        ), task.name
    assert rows["kather_et_al_2016"]["n_corrupt"] == 1 and rows["modality"]["n_corrupt"] == 1
    assert "kather_et_al_2016" in result.output and "corrupt images skipped" in result.output
    assert all(r["chance"] == pytest.approx(1 / r["n_classes"]) for r in rows.values()), "a uniform guess"
    assert {r["prompts"] for r in rows.values()} == {"names"}


def _ubench_by_hand(
    model,
    preprocess,
    tokenizer,
    dataset,
    outside=("opencell",),
    chance: dict[str, float] | None = None,
    widths: dict[str, set[int]] | None = None,
) -> dict[str, tuple[int, int]]:
    """The authors' rule written from SCHEMA.md with open_clip alone: per image and caption key,
    embed that row's own options, argmax cosine similarity, correct when it equals answer_idx.
    Returns caption key -> (correct, scored), per fine source for classification keys, and the
    coarse keys pooled over the sources not `outside` the paper's tables. `chance`, when given,
    receives each name's sum of 1 / (the options of each question scored), and `widths` each
    name's set of option counts. Two options scoring within 1e-5 of the best would be broken by
    float noise, differently here and in a batched evaluation, so the fixture must have none."""
    counts: dict[str, list[int]] = {}
    with torch.no_grad():
        for row in range(len(dataset)):
            try:
                record = dataset[row]
                image = record["image"]
            except Exception:
                continue  # the corrupt image
            features = model.encode_image(preprocess(image).unsqueeze(0))
            features = features / features.norm(dim=-1, keepdim=True)
            for key, caption in record["captions"].items():
                if caption is None:
                    continue
                texts = model.encode_text(tokenizer(caption["options"]))
                texts = texts / texts.norm(dim=-1, keepdim=True)
                scores = (features @ texts.T)[0]
                assert (scores >= scores.max() - 1e-5).sum() == 1, f"row {row} {key}: a near-tie"
                correct = int(scores.argmax().item() == int(caption["answer_idx"]))
                names = [key if not key.startswith("classification") else f"{record['dataset']}/{key}"]
                if not key.startswith("classification") and record["dataset"] not in outside:
                    names.append("coarse in the paper's sources")
                for name in names:
                    tally = counts.setdefault(name, [0, 0])
                    tally[0] += correct
                    tally[1] += 1
                    if chance is not None:
                        chance[name] = chance.get(name, 0.0) + 1 / len(caption["options"])
                    if widths is not None:
                        widths.setdefault(name, set()).add(len(caption["options"]))
    return {k: (v[0], v[1]) for k, v in counts.items()}


def test_ubench_protocol_equals_open_clip_on_the_rows(tmp_path, bench, models):
    result = CliRunner().invoke(cli, _eval_args(tmp_path, bench, models[1]))
    assert result.exit_code == 0, result.output
    rows = [
        r
        for r in ResultStore(tmp_path / "r.jsonl").rows()
        if r["split"] == "all" and r["metric"] == "accuracy"
    ]
    assert {r["protocol"] for r in rows} == {"ubench"}
    by_key = {(r["task"], r["caption_key"]): r for r in rows}
    chance: dict[str, float] = {}
    widths: dict[str, set[int]] = {}
    hand = _ubench_by_hand(
        *_load(models[1]), load_benchmark(str(bench)).dataset, chance=chance, widths=widths
    )
    varied = {name for name, counts in widths.items() if len(counts) > 1}
    assert {"modality_0", "stain_1", "kather_et_al_2016/classification_0"} <= varied, (
        "questions of one key offer different numbers of options, so the evaluation pads"
    )
    paper_coarse = hand.pop("coarse in the paper's sources")
    for name, (correct, scored) in hand.items():
        source, _, key = name.rpartition("/")
        task = source if source != "None" else "held_et_al_2010_h2b"
        task = task or key.rsplit("_", 1)[0]
        row = by_key[(task, key)]
        assert row["n_questions"] == scored and row["value"] == pytest.approx(correct / scored, abs=1e-12), (
            name
        )
        assert row["chance"] == pytest.approx(chance[name] / scored, abs=1e-12), name
    assert len(hand) == 8 + 5 * 2, "every coarse key and both classification keys of every source"
    paper_fine = [v for k, v in hand.items() if k.endswith("classification_1") and k.split("/")[0] not in
                  ("opencell", "eulenberg_et_al_2017_darkfield")]  # fmt: skip
    headline = {r["task"]: r for r in rows if r["level"] == "headline"}
    assert {t: r["caption_key"] for t, r in headline.items()} == {
        "ubench:coarse": "coarse keys pooled",
        "ubench:fine": "classification_1",
    }
    # the task with the corrupt image says so on every row (the closed-set test: kather, modality)
    assert {r["n_corrupt"] for r in rows if r["task"] in ("kather_et_al_2016", "modality")} == {1}
    assert {r["prompts"] for r in rows} == {None}, "prompts apply to the closed-set protocol only"
    assert {r["process"] for r in rows} == {"0/1"}
    assert headline["ubench:fine"]["value"] == pytest.approx(
        sum(c for c, _ in paper_fine) / sum(n for _, n in paper_fine), abs=1e-12
    )
    assert headline["ubench:fine"]["n_questions"] == sum(n for _, n in paper_fine)
    # pooled over sources whose questions offer 3 or 4 options: the mean of 1/n, not 1/(mean n)
    fine_names = [k for k in hand if k.endswith("classification_1") and k.split("/")[0] not in
                  ("opencell", "eulenberg_et_al_2017_darkfield")]  # fmt: skip
    assert headline["ubench:fine"]["chance"] == pytest.approx(
        sum(chance[k] for k in fine_names) / sum(n for _, n in paper_fine), abs=1e-12
    )
    assert headline["ubench:coarse"]["n_questions"] == paper_coarse[1]
    assert headline["ubench:coarse"]["value"] == pytest.approx(paper_coarse[0] / paper_coarse[1], abs=1e-12)


def test_a_subdomain_caption_pair_where_present_is_scored_and_pooled_into_the_coarse_headline(
    tmp_path, models
):
    """SCHEMA.md ("`captions`"): "a `subdomain_*` pair may exist for some sources; not confirmed",
    and the authors' coarse-grained perception pools "modality, submodality, domain, subdomain
    (where present), stain". With the pair filled for two sources and null for the rest, the
    subdomain task asks it of those sources' images only, each key scores as open_clip does on the
    rows by hand, and the coarse headline pools it with the other coarse keys."""
    bench = write_fixture(tmp_path / "ubench", subdomain_sources=("kather_et_al_2016", None))
    dataset = load_benchmark(str(bench)).dataset
    tasks = {t.name: t for t in discover_tasks(dataset)}
    questions = tasks["subdomain"].questions
    assert [q.key for q in questions] == ["subdomain_0", "subdomain_1"]
    assert [len(q.rows) for q in questions] == [36, 36], "kather's and Held's 18 images each, no other"
    result = CliRunner().invoke(cli, _eval_args(tmp_path, bench, models[1]))
    assert result.exit_code == 0, result.output
    rows = [
        r
        for r in ResultStore(tmp_path / "r.jsonl").rows()
        if r["split"] == "all" and r["metric"] == "accuracy"
    ]
    by_key = {(r["task"], r["caption_key"]): r for r in rows}
    hand = _ubench_by_hand(*_load(models[1]), dataset)
    for key in ("subdomain_0", "subdomain_1"):
        correct, scored = hand[key]
        row = by_key[("subdomain", key)]
        assert scored == 35, "the corrupt image is one of kather's"
        assert row["n_questions"] == scored and row["value"] == pytest.approx(correct / scored, abs=1e-12), (
            key
        )
    pooled_correct, pooled_scored = hand["coarse in the paper's sources"]
    coarse = by_key[("ubench:coarse", "coarse keys pooled")]
    assert coarse["n_questions"] == pooled_scored
    assert coarse["value"] == pytest.approx(pooled_correct / pooled_scored, abs=1e-12), "pooled with the pair"


def test_a_source_outside_the_papers_tables_is_kept_out_of_both_headlines(tmp_path, bench, models):
    """Sources on the Hub but not in the paper's tables (`paper_tables = false`: opencell and
    sirinukunwattana_et_al_2016 in ours; here nirschl_et_al_2018 by a `--sources` table) are
    scored as tasks but pooled into neither headline, whichever tasks a run selects: `--tasks
    coarse` still leaves their images out of the coarse headline (they are known from every task,
    not the selected ones), and a selection of every fine headline source but them completes the
    fine headline."""
    table = tmp_path / "outside.toml"
    table.write_text("[sources.nirschl_et_al_2018]\npaper_tables = false\n")
    outside = ("opencell", "nirschl_et_al_2018")
    hand = _ubench_by_hand(*_load(models[1]), load_benchmark(str(bench)).dataset, outside)
    coarse = hand.pop("coarse in the paper's sources")
    fine = [v for k, v in hand.items() if k.endswith("classification_1") and k.split("/")[0] not in
            (*outside, "eulenberg_et_al_2017_darkfield")]  # fmt: skip

    def headline(store: str, *extra: str) -> dict[str, dict]:
        args = [*_eval_args(tmp_path, bench, models[1], store=store), "--sources", str(table), *extra]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        rows = ResultStore(tmp_path / store).rows()
        return {r["task"]: r for r in rows if r["level"] == "headline" and r["split"] == "all"}

    every = headline("every.jsonl")
    assert every["ubench:coarse"]["n_questions"] == coarse[1]
    assert every["ubench:coarse"]["value"] == pytest.approx(coarse[0] / coarse[1], abs=1e-12)
    assert every["ubench:fine"]["n_questions"] == sum(n for _, n in fine)
    assert every["ubench:fine"]["value"] == pytest.approx(sum(c for c, _ in fine) / sum(n for _, n in fine))
    only_coarse = headline("coarse.jsonl", "--tasks", "coarse")
    assert set(only_coarse) == {"ubench:coarse"}
    assert only_coarse["ubench:coarse"]["value"] == every["ubench:coarse"]["value"]
    fine_sources = "kather_et_al_2016,held_et_al_2010_h2b"
    assert set(headline("fine.jsonl", "--tasks", fine_sources)) == {"ubench:fine"}


def test_a_run_id_gains_a_field_only_where_that_setting_changes_the_numbers(tmp_path):
    """Run ids are what a store resumes by: a field added to them since 0.1.0 (a non-fp32 forward,
    intervals that resample images, a --sources table) is added only where it applies, so an
    fp32, --bootstrap 0 or shipped-table run keeps the id it had and its store still resumes."""
    from types import SimpleNamespace

    from micromerge.core.hashing import sha256_json
    from micromerge.eval.engine import _run_id
    from micromerge.eval.images import DECODE_IDENTITY
    from micromerge.eval.settings import HALVES, EvalSettings

    bench, cpu = SimpleNamespace(fingerprint="abc"), torch.device("cpu")
    settings = EvalSettings("x", tmp_path / "s.jsonl", tmp_path, precision="fp32", bootstrap=0)
    identity = {"model": ["h"], "data": "abc", "prompts": "names", "protocol": "ubench", "bootstrap": 0,
                "seed": 0, "halves": HALVES, "decode": DECODE_IDENTITY}  # fmt: skip
    assert _run_id({"model": ["h"]}, settings, bench, cpu) == sha256_json(identity)[:16]
    resampled = replace(settings, bootstrap=100)
    assert (
        _run_id({"model": ["h"]}, resampled, bench, cpu)
        == sha256_json({**identity, "bootstrap": 100, "intervals": "images"})[:16]
    )
    closed = replace(settings, protocol="closed-set", bootstrap=100)
    assert (
        _run_id({"model": ["h"]}, closed, bench, cpu)
        == sha256_json({**identity, "bootstrap": 100, "protocol": "closed-set"})[:16]
    )


def test_headline_rows_are_written_only_over_every_task_they_pool(tmp_path, bench, models):
    """`--tasks modality` wrote a `ubench:coarse` row pooled over modality alone under the paper's
    name, and a later `--tasks all` into the same store kept that row (its identity was there):
    the report showed the one-task number as the coarse headline. Now a headline is written only
    when every task it pools is scored, so resuming gives what a fresh run gives."""

    def headline(store: str) -> dict[tuple, float]:
        rows = ResultStore(tmp_path / store).rows()
        return {
            (r["task"], r["split"]): r["value"]
            for r in rows
            if r["level"] == "headline" and r["metric"] == "accuracy"
        }

    for tasks in ("modality", "coarse", "all"):
        result = CliRunner().invoke(
            cli, [*_eval_args(tmp_path, bench, models[0], "resumed.jsonl"), "--tasks", tasks]
        )
        assert result.exit_code == 0, result.output
        written = {task for task, _ in headline("resumed.jsonl")}
        assert (
            written
            == {"modality": set(), "coarse": {"ubench:coarse"}, "all": {"ubench:coarse", "ubench:fine"}}[
                tasks
            ]
        )
    fresh = CliRunner().invoke(cli, _eval_args(tmp_path, bench, models[0], "fresh.jsonl"))
    assert fresh.exit_code == 0, fresh.output
    assert headline("resumed.jsonl") == headline("fresh.jsonl") and len(headline("fresh.jsonl")) == 6
    fine_only = [t.name for t in discover_tasks(load_benchmark(str(bench)).dataset) if t.level == "fine"]
    result = CliRunner().invoke(
        cli, [*_eval_args(tmp_path, bench, models[0], "fine.jsonl"), "--tasks", ",".join(fine_only)]
    )
    assert result.exit_code == 0 and {t for t, _ in headline("fine.jsonl")} == {"ubench:fine"}


def test_the_fine_headline_pools_exactly_the_sources_that_ask_classification_1(bench):
    """The fine headline pools each headline source's `classification_1` question (SCHEMA.md: the
    authors' fine-grained headline used `classification_1` only), and every caption is nullable:
    a source whose `classification_1` is null on every row adds nothing to the pool, so a selection
    without it still completes the headline; a source asking only `classification_1` is in it."""
    from micromerge.eval.engine import complete_headlines
    from micromerge.eval.evaluator import HEADLINE_FINE

    every = discover_tasks(load_benchmark(str(bench)).dataset)
    first, second = [t for t in every if t.level == "fine" and t.groups.get("fine_headline") == "yes"][:2]
    both_keys = {"classification_0", "classification_1"}
    assert {q.key for q in first.questions} == {q.key for q in second.questions} == both_keys
    without_key = replace(first, questions=tuple(q for q in first.questions if q.key != "classification_1"))
    only_key = replace(second, questions=tuple(q for q in second.questions if q.key == "classification_1"))
    every = [without_key if t is first else only_key if t is second else t for t in every]
    assert HEADLINE_FINE in complete_headlines([t for t in every if t is not without_key], every)
    assert HEADLINE_FINE not in complete_headlines([t for t in every if t is not only_key], every)


def test_a_sources_override_or_a_bf16_forward_is_its_own_run_and_each_row_says_which(tmp_path, bench, models):
    """The source table names and groups the tasks and a bf16 forward gives other numbers, but
    neither was in the run id: a store resumed with another `--sources` file, or a sweep begun on a
    CPU and resumed on a GPU, mixed two kinds of rows in one run. Each is now in the id where it is
    present (the fp32, shipped-table id is kept, so stores written before resume) and in every row."""
    from micromerge.eval.engine import _run_id
    from micromerge.eval.settings import EvalSettings

    plain = CliRunner().invoke(cli, _eval_args(tmp_path, bench, models[0]))
    override = tmp_path / "sources.toml"
    override.write_text('[sources.kather_et_al_2016]\nscale = "cellular"\n')
    changed = CliRunner().invoke(cli, [*_eval_args(tmp_path, bench, models[0]), "--sources", str(override)])
    assert plain.exit_code == 0 and changed.exit_code == 0, changed.output
    rows = ResultStore(tmp_path / "r.jsonl").rows()
    runs = {r["run_id"]: (json.dumps(r["sources"]), r["precision"]) for r in rows}
    digest = hashlib.sha256(override.read_bytes()).hexdigest()
    named = json.dumps({"file": str(override), "sha256": digest})
    assert len(runs) == 2 and set(runs.values()) == {("null", "fp32"), (named, "fp32")}
    kather = {r["run_id"]: r["groups"]["scale"] for r in rows if r["task"] == "kather_et_al_2016"}
    assert sorted(kather.values()) == ["cellular", "tissue"], "each run holds its own table's groups"

    loaded = load_benchmark(str(bench))
    settings = EvalSettings(data=str(bench), store=tmp_path / "x.jsonl", cache_dir=tmp_path / "cache")
    ids = {
        device: _run_id({"model": ["m"]}, settings, loaded, torch.device(device))
        for device in ("cpu", "cuda")
    }
    fp32_on_gpu = _run_id({"model": ["m"]}, replace(settings, precision="fp32"), loaded, torch.device("cuda"))
    assert ids["cpu"] != ids["cuda"] and fp32_on_gpu == ids["cpu"]
    assert (
        _run_id({"model": ["m"]}, replace(settings, sources=override), loaded, torch.device("cpu"))
        != ids["cpu"]
    )


def test_eval_twice_adds_no_rows(tmp_path, bench, models):
    args = _eval_args(tmp_path, bench, models[0], bootstrap=40)
    printed = CliRunner().invoke(cli, args)
    assert printed.exit_code == 0
    first = (tmp_path / "r.jsonl").read_text()
    task_lines = [line for line in printed.output.splitlines() if line.startswith("kather_et_al_2016")]
    assert task_lines and all("[" in line for line in task_lines), "a bootstrap interval per task"
    unbooted = CliRunner().invoke(cli, _eval_args(tmp_path, bench, models[0], store="n.jsonl"))
    task_lines = [line for line in unbooted.output.splitlines() if line.startswith("kather_et_al_2016")]
    assert task_lines and not any("[" in line for line in task_lines), "--bootstrap 0: no interval printed"
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert (tmp_path / "r.jsonl").read_text() == first


def _sweep_args(tmp_path, bench, models, alphas="0:1:0.5", store="s.jsonl"):
    return [
        "sweep",
        "--base",
        str(models[0]),
        "--ft",
        str(models[1]),
        "--alphas",
        alphas,
        "--data",
        str(bench),
        "--store",
        str(tmp_path / store),
        "--bootstrap",
        "40",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--quiet",
        "--device",
        "cpu",
    ]


def test_a_sweep_prints_each_task_headline_and_group_across_alpha_once(tmp_path, bench, models):
    """One line per task (its caption keys pooled), headline and group mean, one column per α, each
    cell the store's `all`-split accuracy: the eval table printed once per α was about 60 lines an α
    (660 for the default eleven). A source's corrupt image is said once, on its task's line."""
    from micromerge.eval.aggregate import aggregate, is_task_row

    result = CliRunner().invoke(cli, _sweep_args(tmp_path, bench, models))
    assert result.exit_code == 0, result.output
    rows = ResultStore(tmp_path / "s.jsonl").rows()
    lines = result.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("task / group"))
    assert lines[header].split()[-3:] == ["0", "0.5", "1"]
    table = {
        line[: line.index("  ")].strip(): line
        for line in lines[header + 1 :]
        if line.strip() and "results in" not in line
    }
    expected: dict[str, list[float]] = {}
    for row in rows:
        if (
            row["split"] == "all"
            and row["metric"] == "accuracy"
            and (is_task_row(row) or row["level"] == "headline")
        ):
            expected.setdefault(row["task"], []).append(row["value"])
    for alpha in (0.0, 0.5, 1.0):
        for group, value in aggregate([r for r in rows if r["alpha"] == alpha]).items():
            expected.setdefault(f"mean {group}", []).append(value)
    assert set(table) == set(expected) and len(table) < 60, "one line each, for all three α"
    for name, values in expected.items():
        cells = table[name][len(name) :].split("(")[0].split()
        assert cells == [f"{v:.3f}" for v in values], name
    assert table["kather_et_al_2016"].endswith("(1 corrupt images skipped)")
    assert "balanced" not in result.output and result.output.count("alpha = ") == 0


def test_sweep_rows_and_end_points_equal_plain_evaluation(tmp_path, bench, models):
    result = CliRunner().invoke(cli, _sweep_args(tmp_path, bench, models))
    assert result.exit_code == 0, result.output
    rows = ResultStore(tmp_path / "s.jsonl").rows()
    per_alpha = 9 * 3 * 3 * 2 + 2 * 3  # tasks x (2 keys + pooled) x splits x metrics + headline rows
    assert len(rows) == 3 * per_alpha and len({_identity(r) for r in rows}) == len(rows)
    halves = [
        r
        for r in rows
        if r["alpha"] == 0.0 and r["task"] == "kather_et_al_2016" and r["metric"] == "accuracy"
        and r["caption_key"] == "all"
    ]  # fmt: skip
    sizes = {r["split"]: r["n_images"] for r in halves}
    assert sizes == {"all": 17, "select": 8, "report": 9}
    row = rows[0]
    assert (
        row["method"] == "wise-ft"
        and row["dataset"]["fingerprint"]
        and len(row["model"]["base_sha256"][0]) == 64
    )
    for alpha, model in ((0.0, models[0]), (1.0, models[1])):
        store = f"e{alpha}.jsonl"
        CliRunner().invoke(cli, _eval_args(tmp_path, bench, model, store=store, bootstrap=40))
        plain = {_identity(r)[1:]: r["value"] for r in ResultStore(tmp_path / store).rows()}
        swept = {_identity(r)[1:]: r["value"] for r in rows if r["alpha"] == alpha}
        assert swept == pytest.approx(plain, abs=1e-6)


def test_sweep_with_rules_and_ties(tmp_path, bench, models):
    args = _sweep_args(tmp_path, bench, models, alphas="0.5,1") + [
        "--method",
        "ties",
        "--include",
        "visual.*",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    rows = ResultStore(tmp_path / "s.jsonl").rows()
    assert {r["alpha"] for r in rows} == {0.5, 1.0} and rows[0]["parameters"]["include"] == ["visual.*"]


def test_store_ignores_and_repairs_a_torn_last_line(tmp_path):
    store = ResultStore(tmp_path / "r.jsonl")
    store.append([{"run_id": "x", "alpha": 0.0, "task": "t", "metric": "accuracy", "value": 1.0}])
    with open(tmp_path / "r.jsonl", "a") as handle:
        handle.write('{"schema": 1, "run_id": "x", "alpha": 0.5, "ta')
    assert len(store.rows()) == 1
    store.append([{"run_id": "x", "alpha": 0.5, "task": "t", "metric": "accuracy", "value": 0.5}])
    assert [r["alpha"] for r in store.rows()] == [0.0, 0.5]
    with open(tmp_path / "r.jsonl", "a") as handle:
        handle.write(json.dumps({"schema": 99, "run_id": "x"}) + "\n")
    with pytest.warns(UserWarning, match="not rows of this version"):
        assert len(store.rows()) == 2


@pytest.mark.parametrize("protocol", ["ubench", "closed-set"])
def test_a_point_that_lost_the_end_of_its_append_is_evaluated_again(tmp_path, bench, models, protocol):
    """A kill tears an append after some whole line (the store drops the torn one). The rows that
    mark a task done are written last, so a point missing any of its rows is not done, and the
    next run writes what is missing. (They used to be each task's report-half row, written before
    the ubench headline rows: a point that lost only its headline rows counted as done.)"""
    args = _eval_args(tmp_path, bench, models[0], store="e.jsonl", protocol=protocol)
    assert CliRunner().invoke(cli, args).exit_code == 0
    path = tmp_path / "e.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    complete = sorted(_identity(r) for r in ResultStore(path).rows())
    for lost in (1, 2, len(lines) // 2):
        path.write_text("".join(lines[:-lost]))
        assert CliRunner().invoke(cli, args).exit_code == 0
        assert sorted(_identity(r) for r in ResultStore(path).rows()) == complete, lost


@pytest.mark.slow
def test_sweep_killed_with_sigkill_resumes_without_redoing_rows(tmp_path, bench, models):
    command = [
        sys.executable,
        "-m",
        "micromerge.cli",
        *_sweep_args(tmp_path, bench, models, alphas="0:1:0.05"),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    store = ResultStore(tmp_path / "s.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and len({r["alpha"] for r in store.rows()}) < 3:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished_before = {r["alpha"] for r in store.rows()}
    assert 3 <= len(finished_before) < 21, "the kill must land mid-sweep for this test to mean anything"
    before = {_identity(r): r["value"] for r in store.rows()}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = store.rows()
    keys = [_identity(r) for r in rows]
    assert len(keys) == len(set(keys)) == 21 * (9 * 3 * 3 * 2 + 2 * 3)
    assert all(dict(zip(keys, [r["value"] for r in rows], strict=True))[k] == v for k, v in before.items())


@pytest.mark.slow
def test_two_processes_split_a_sweep_through_accelerate_launch(tmp_path, bench, models):
    result = run_two_processes(*_sweep_args(tmp_path, bench, models, alphas="0:1:0.25"), cwd=tmp_path)
    assert result.returncode == 0, launch_failure(result)
    rows = ResultStore(tmp_path / "s.jsonl").rows()
    keys = [_identity(r) for r in rows]
    assert len(keys) == len(set(keys)) == 5 * (9 * 3 * 3 * 2 + 2 * 3)
    by_process = {}
    for row in rows:
        by_process.setdefault(row["process"], set()).add(row["alpha"])
    assert by_process == {"0/2": {0.0, 0.5, 1.0}, "1/2": {0.25, 0.75}}


@pytest.mark.parametrize("process, evaluates", [(0, True), (1, False)])
def test_under_a_launch_one_process_evaluates_a_model(
    tmp_path, bench, models, monkeypatch, process, evaluates
):
    """`accelerate launch ... eval`: every process evaluated the whole benchmark and printed the
    whole table (the store kept one copy); the main process does it, the others stop."""
    import accelerate

    class SecondOfTwo:  # as PartialState is in process `process` of a two-process launch
        def __init__(self, cpu: bool = False):
            self.process_index, self.num_processes, self.is_main_process = process, 2, process == 0

    monkeypatch.setattr(accelerate, "PartialState", SecondOfTwo)
    args = ["eval", "--model", str(models[0]), "--data", str(bench), "--store", str(tmp_path / "e.jsonl")]
    args += ["--bootstrap", "0", "--cache-dir", str(tmp_path / "cache"), "--quiet", "--device", "cpu"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert ("results in" in result.output) is evaluates and (tmp_path / "e.jsonl").exists() is evaluates


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_process_share_together_is_the_whole_list_once_dealt_from_any_first_process(world):
    from micromerge.eval.engine import process_share

    alphas = tuple(range(7))
    for first in range(world):
        shares = [process_share(alphas, rank, world, first) for rank in range(world)]
        assert sorted(a for share in shares for a in share) == list(alphas)
        assert shares[first][0] == 0 and shares[(first + 1) % world][:1] == ((1,) if world > 1 else (0,))


def test_evaluations_and_sweeps_of_one_preparation_index_the_store_once(tmp_path, bench, models, monkeypatch):
    """An ablation's sweeps share `prepare(settings)`, and with it one reader of the results store:
    where each run's lines lie is found once for the grid (a 500 MB store took 1.3 to 1.8 s a scan,
    three scans a sweep), not again at each sweep; a greedy soup's candidate store, named by its
    own settings, gets its own reader."""
    from micromerge.eval import store as store_module
    from micromerge.eval.engine import prepare, run_eval, run_sweep
    from micromerge.eval.settings import EvalSettings, SweepPlan
    from micromerge.merging.job import job_from_mapping

    built = []
    real = store_module._RunLines.__init__
    monkeypatch.setattr(
        store_module._RunLines, "__init__", lambda self, *a, **k: built.append(1) or real(self, *a, **k)
    )
    settings = EvalSettings(str(bench), tmp_path / "s.jsonl", tmp_path / "cache", bootstrap=0, progress=False)
    prepared = prepare(settings)
    for model in models:
        run_eval(str(model), settings, torch.device("cpu"), prepared=prepared)
    for method in ("wise-ft", "task-arithmetic"):
        job = job_from_mapping(
            {"base": str(models[0]), "finetuned": [str(models[1])], "method": method, "alphas": "0,1"}
        )
        run_sweep(
            SweepPlan(job.base, job.finetuned, job.spec, job.alphas, job.access),
            settings,
            torch.device("cpu"),
            prepared=prepared,
        )
    assert len(built) == 1, "one index for the evaluations and both sweeps"
    assert prepared.results(settings.store) is prepared.results(str(settings.store))
    assert prepared.results(tmp_path / "soup.jsonl") is not prepared.results(settings.store)
    assert len({r["run_id"] for r in ResultStore(settings.store).rows()}) == 4


def test_a_process_that_starts_after_another_finished_an_alpha_still_takes_its_own_share(
    tmp_path, bench, models
):
    """The share was dealt from the alphas not yet in the store: a process that read the store
    after the other had finished its alpha 0.5 dealt [0, 1] anew, took 0, and alpha 1 was no
    process's (an ablation's later sweeps lost it silently). The share is dealt from the whole list."""
    from dataclasses import replace

    from micromerge.eval.engine import run_sweep
    from micromerge.eval.settings import EvalSettings, SweepPlan
    from micromerge.merging.job import job_from_mapping

    job = job_from_mapping({"base": str(models[0]), "finetuned": [str(models[1])], "alphas": "0,0.5,1"})
    plan = SweepPlan(job.base, job.finetuned, job.spec, job.alphas, job.access)
    settings = EvalSettings(str(bench), tmp_path / "s.jsonl", tmp_path / "cache", bootstrap=0, progress=False)
    second, first = (EvalSettings(**{**settings.__dict__, "rank": r, "world_size": 2}) for r in (1, 0))
    run_sweep(plan, second, torch.device("cpu"))  # process 1 of 2 is first to the store
    run_sweep(plan, first, torch.device("cpu"))

    def shares(store):
        by_process = {}
        for row in ResultStore(store).rows():
            by_process.setdefault(row["process"], set()).add(row["alpha"])
        return by_process

    assert shares(tmp_path / "s.jsonl") == {"1/2": {0.5}, "0/2": {0.0, 1.0}}
    # a grid deals each sweep on from where the last left off: dealt from process 1, it takes the remainder
    rotated = replace(plan, first_process=1)
    for process in (first, second):
        run_sweep(rotated, replace(process, store=tmp_path / "r.jsonl"), torch.device("cpu"))
    assert shares(tmp_path / "r.jsonl") == {"1/2": {0.0, 1.0}, "0/2": {0.5}}


def test_tasks_command_lists_counts(bench):
    result = CliRunner().invoke(cli, ["tasks", "--data", str(bench)])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("kather_et_al_2016"))
    assert line.split()[1:5] == ["fine", "18", "3", "classification_0,classification_1"]
    assert "pathology / gastrointestinal pathology / light microscopy / tissue" in line
    assert any(line.startswith("held_et_al_2010_h2b") for line in result.output.splitlines())


def _second_column_starts(lines: list[str]) -> set[int]:
    return {re.match(r"\S+\s+", line).end() for line in lines}


def test_a_real_task_name_longer_than_the_default_column_keeps_tasks_and_eval_aligned(tmp_path, models):
    """`eulenberg_et_al_2017_epifluorescence` (36 characters, a real `dataset` value: SCHEMA.md's
    task table) pushed its row's columns past everyone else's in a 34-wide column; the group means'
    numbers were ragged after names longer than 28."""
    long_name = "eulenberg_et_al_2017_epifluorescence"
    rows = fixture_rows()
    rows["dataset"] = [long_name if d == "eulenberg_et_al_2017_darkfield" else d for d in rows["dataset"]]
    datasets.Dataset.from_dict(rows, features=fixture_features()).save_to_disk(str(tmp_path / "long"))
    listed = CliRunner().invoke(cli, ["tasks", "--data", str(tmp_path / "long")])
    assert listed.exit_code == 0, listed.output
    lines = [line for line in listed.output.splitlines() if not line.startswith("  note")]
    assert any(line.startswith(long_name + " ") for line in lines)
    assert len(_second_column_starts(lines)) == 1, listed.output
    scored = CliRunner().invoke(
        cli,
        ["eval", "--model", str(models[0]), "--data", str(tmp_path / "long"), "--store",
         str(tmp_path / "r.jsonl"), "--bootstrap", "0", "--quiet"],
    )  # fmt: skip
    assert scored.exit_code == 0, scored.output
    output = scored.output.splitlines()
    start = next(i for i, line in enumerate(output) if line.startswith("task "))
    table = output[start : next(i for i, line in enumerate(output) if line.startswith("  mean accuracy"))]
    assert any(line.startswith(long_name + " ") for line in table)
    assert len(_second_column_starts(table)) == 1, "\n".join(table)
    means = [line for line in output if line.startswith("  mean accuracy")]
    assert len(means) > 10 and len({line.rindex(" ") for line in means}) == 1, "\n".join(means)


def test_caption_prompts_use_the_class_captions(tmp_path, bench, models):
    from micromerge.eval.zeroshot import class_embeddings
    from micromerge.merging.models import tokenizer_for

    task = next(
        t for t in discover_tasks(load_benchmark(str(bench)).dataset) if t.name == "nirschl_et_al_2018"
    )
    with open_source(str(models[0])) as source:
        model, config = load_model(source)
    tokenizer = tokenizer_for(config)
    seen = []

    def spy(texts):
        seen.append(list(texts))
        return tokenizer(texts)

    by_caption = class_embeddings(model, spy, task, torch.device("cpu"), prompts="captions")
    by_name = class_embeddings(model, spy, task, torch.device("cpu"), prompts="names")
    assert seen[0] == [
        "An H&E micrograph of chronic_heart_failure.",
        "An H&E micrograph of not_chronic_heart_failure.",
    ], "the correct option of each class's first classification_0 caption"
    assert len(seen[1]) == len(task.templates) * 2 and not torch.allclose(by_caption, by_name)
    args = [*_eval_args(tmp_path, bench, models[0], protocol="closed-set"), "--prompts", "captions"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert {r["prompts"] for r in ResultStore(tmp_path / "r.jsonl").rows()} == {"captions"}
    # under the ubench protocol it changed nothing but the run id (the same numbers stored twice)
    args = [*_eval_args(tmp_path, bench, models[0], store="u.jsonl"), "--prompts", "captions"]
    refused = CliRunner().invoke(cli, args)
    assert (
        refused.exit_code == 2
        and "--prompts captions: applies to --protocol closed-set only" in refused.output
    )
    assert not (tmp_path / "u.jsonl").exists()


def test_data_verify_names_a_shard_beyond_the_expected_set(tmp_path, bench):
    """Every `*-test-NNNNN-of-NNNNN.arrow` file is read by the loader (which then refuses the mixed
    set), so a copy with one more shard than the published seven is not verified."""
    import hashlib

    expected = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in bench.glob("*.arrow")}
    (tmp_path / "sums.json").write_text(json.dumps(expected))
    shutil.copyfile(bench / "ubench-test-00000-of-00007.arrow", bench / "ubench-test-00007-of-00008.arrow")
    result = CliRunner().invoke(
        cli, ["data", "verify", str(bench), "--expected", str(tmp_path / "sums.json")]
    )
    assert result.exit_code == 2, result.output
    assert "ubench-test-00007-of-00008.arrow  unexpected" in result.output
    assert (
        "1 of 8 shard(s) differ, are missing or unexpected: ubench-test-00007-of-00008.arrow" in result.output
    )


@pytest.mark.parametrize(
    "expected, message",
    [
        ({}, "must be a non-empty JSON object"),
        ([], "must be a non-empty JSON object"),
        ({"../../etc/passwd": "0" * 64}, "'../../etc/passwd' is not a shard file name"),
        ({"sub/ubench-test-00000-of-00007.arrow": "0" * 64}, "is not a shard file name"),
        ({"ubench-test-00000-of-00007.arrow": 1}, "is not a sha256 (64 hex digits): 1"),
        ({"ubench-test-00000-of-00007.arrow": "abc"}, "is not a sha256 (64 hex digits): 'abc'"),
        ({"ubench-test-00000-of-00007.arrow": "0" * 63}, f"is not a sha256 (64 hex digits): '{'0' * 63}'"),
        ({"ubench-test-00000-of-00007.arrow": "0" * 65}, f"is not a sha256 (64 hex digits): '{'0' * 65}'"),
    ],
)
def test_data_verify_refuses_checksums_that_verify_nothing(tmp_path, bench, expected, message):
    """An empty object verified "all 0 shards match" (exit 0); a name with a folder checked a file
    outside the copy."""
    (tmp_path / "sums.json").write_text(json.dumps(expected))
    result = CliRunner().invoke(
        cli, ["data", "verify", str(bench), "--expected", str(tmp_path / "sums.json")]
    )
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_data_verify_reads_upper_case_checksums(tmp_path, bench):
    """Some tools print digests in upper case (PowerShell's Get-FileHash): the same sha256."""
    import hashlib

    expected = {p.name: hashlib.sha256(p.read_bytes()).hexdigest().upper() for p in bench.glob("*.arrow")}
    (tmp_path / "sums.json").write_text(json.dumps(expected))
    result = CliRunner().invoke(
        cli, ["data", "verify", str(bench), "--expected", str(tmp_path / "sums.json")]
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("  ok") == len(expected) == 7


def test_the_published_checksums_pass_their_own_check():
    from micromerge.eval.hub_layout import PUBLISHED_SHARDS, checked_checksums

    assert checked_checksums(PUBLISHED_SHARDS, "published") == PUBLISHED_SHARDS


def test_an_override_of_a_source_the_data_lacks_is_warned_about(tmp_path, bench):
    """A misspelt source (`kather_et_al_2061`) changed nothing, silently; an override that matches
    says nothing, nor does one that switches off a shipped `null_dataset_match` rule (its source
    is then absent because its rows went elsewhere)."""
    import warnings

    from micromerge.eval.source_metadata import load_source_table

    dataset = load_benchmark(str(bench)).dataset
    (tmp_path / "mine.toml").write_text(
        '[sources.kather_et_al_2061]\nscale = "subcellular"\n[sources.kather_et_al_2016]\nscale = "tissue"\n'
    )
    with pytest.warns(UserWarning, match=r"mine.toml: \['kather_et_al_2061'\] name no source of this data"):
        discover_tasks(dataset, load_source_table(tmp_path / "mine.toml"))
    (tmp_path / "fine.toml").write_text('[sources.kather_et_al_2016]\nscale = "tissue"\n')
    # switching off the shipped rule that names the Held rows (eval/ubench_sources.toml) leaves no
    # `held_et_al_2010_h2b` task, yet it changed where those rows go: it is not "nothing"
    (tmp_path / "moved.toml").write_text(
        '[sources.held_et_al_2010_h2b]\nnull_dataset_match = ""\n'
        '[sources.kather_et_al_2016]\nnull_dataset_match = "h2b|chromatin"\n'
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        discover_tasks(dataset, load_source_table(tmp_path / "fine.toml"))
        discover_tasks(dataset, load_source_table())
        moved = {t.name for t in discover_tasks(dataset, load_source_table(tmp_path / "moved.toml"))}
    assert "held_et_al_2010_h2b" not in moved
    (tmp_path / "typo.toml").write_text(  # several: named in order, not a set's
        '[sources.zz_typo]\nscale = "tissue"\n[sources.held_et_al_2010_hb2]\nnull_dataset_match = "nothing"\n'
        '[sources.aa_typo]\nscale = "tissue"\n'
    )
    with pytest.warns(
        UserWarning, match=r"\['aa_typo', 'held_et_al_2010_hb2', 'zz_typo'\] name no source of"
    ):
        discover_tasks(dataset, load_source_table(tmp_path / "typo.toml"))


def test_a_run_under_another_decoding_is_another_run_and_every_row_says_how_it_was_decoded(
    tmp_path, bench, models, monkeypatch
):
    """Pixels decoded by another Pillow/torchvision (or rule) are decoded again (the image cache is
    keyed on it), but the run id was not: a sweep resumed after an upgrade took the old alphas as
    done and mixed two decodings in one run, and no row said which."""
    from micromerge.eval import engine, images
    from micromerge.eval.images import DECODE_IDENTITY

    assert CliRunner().invoke(cli, _eval_args(tmp_path, bench, models[0])).exit_code == 0
    other = "another rule; Pillow 0; torchvision 0"
    monkeypatch.setattr(images, "DECODE_IDENTITY", other)
    monkeypatch.setattr(engine, "DECODE_IDENTITY", other)
    assert CliRunner().invoke(cli, _eval_args(tmp_path, bench, models[0])).exit_code == 0
    runs: dict[str, set[str]] = {}
    for row in ResultStore(tmp_path / "r.jsonl").rows():
        runs.setdefault(row["decode"], set()).add(row["run_id"])
    assert runs.keys() == {DECODE_IDENTITY, other} and len(runs[other] | runs[DECODE_IDENTITY]) == 2


def test_sweep_hands_the_launchs_barrier_to_the_engine(tmp_path, bench, models, monkeypatch):
    """A data-aware sweep's first process computes the statistics while the others wait at the
    launch's barrier (tests/test_learned_merging.py): the command must hand that barrier in."""
    import accelerate

    from micromerge.eval import engine

    class Launched:  # as PartialState is in the first process of a two-process launch
        def __init__(self, cpu: bool = False):
            self.process_index, self.num_processes, self.is_main_process = 0, 2, True

        def wait_for_everyone(self) -> None:
            """The barrier."""

    handed = []
    monkeypatch.setattr(accelerate, "PartialState", Launched)
    monkeypatch.setattr(engine, "run_sweep", lambda plan, settings, device, wait: handed.append(wait) or [])
    result = CliRunner().invoke(cli, _sweep_args(tmp_path, bench, models, alphas="0,1"))
    assert result.exit_code == 0, result.output
    assert len(handed) == 1 and handed[0].__func__ is Launched.wait_for_everyone
