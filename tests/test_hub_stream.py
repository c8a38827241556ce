"""Fine-tuning on a dataset in the Hugging Face hub's layout, streamed (issue 16: "`streaming=True`
for hub datasets").

The fixture is a hub dataset repository as `push_to_hub` writes one and `hf download
--repo-type dataset` copies it: parquet files `data/train-0000K-of-0000N.parquet`, the image column a
`{bytes, path}` struct with the `datasets` features (`Image`) in the parquet schema's metadata
(datasets' "Share a dataset" and "Image dataset" docs, read through the search tool; written here
by `Dataset.to_parquet`, the writer push_to_hub uses). The hub itself is unreachable from this
machine; a hub id only adds the download in front of the same `datasets` streaming reader.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet
import pytest
import torch

from micromerge.core.errors import MicromergeError
from micromerge.eval.pairs import damaged_parquet
from micromerge.finetune import trainer
from micromerge.finetune.hub_stream import HubStream, is_hub_layout
from micromerge.finetune.streaming import SampleRecipe
from micromerge.finetune.trainer import run_finetune
from tests.helpers import descendants, descendants_left, stop_at_the_next_save, write_checkpoint
from tests.test_finetune import CAPTIONS, _png, config
from tests.test_streaming import _same, _weights


@pytest.fixture(autouse=True)
def no_pause_after_a_pass(monkeypatch):
    """datasets (5.x) waits 5 s for pyarrow's threads whenever a parquet stream ends or is closed
    (apache/arrow#45214): nothing over a real pass of hours, a minute over these tiny ones."""
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0, raising=False)


@pytest.fixture
def base(tmp_path):
    write_checkpoint(tmp_path / "base.safetensors", 0)
    return tmp_path / "base.safetensors"


def write_hub_repo(folder: Path, n: int, files: int = 4, row_group: int | None = None) -> Path:
    import datasets

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    (folder / "data").mkdir(parents=True)
    per_file = -(-n // files)
    for k in range(files):
        rows = range(k * per_file, min(n, (k + 1) * per_file))
        table = {
            "image": [{"bytes": _png(i), "path": None} for i in rows],
            "caption": [f"{CAPTIONS[i % len(CAPTIONS)]} (sample {i})" for i in rows],
        }
        part = datasets.Dataset.from_dict(table, features=features)
        part.to_parquet(str(folder / "data" / f"train-{k:05d}-of-{files:05d}.parquet"), batch_size=row_group)
    _write_card(folder, n)
    return folder


def _write_card(folder: Path, n: int) -> None:
    """The dataset card and .gitattributes `push_to_hub` uploads beside the data (and `hf download`
    copies): the card's YAML header declares the config's data files (`data/train-*`), the
    features and the train split's size, which `load_dataset_builder` reads. The layout is the one
    of cards `push_to_hub` uploaded to public hub datasets ("Upload README.md with huggingface_hub"
    commits) and of hub-docs' datasetcard.md, both read through the search tool."""
    size = sum(path.stat().st_size for path in (folder / "data").iterdir())
    (folder / "README.md").write_text(
        "---\ndataset_info:\n  features:\n  - name: image\n    dtype: image\n  - name: caption\n"
        f"    dtype: string\n  splits:\n  - name: train\n    num_bytes: {size}\n    num_examples: {n}\n"
        f"  download_size: {size}\n  dataset_size: {size}\nconfigs:\n- config_name: default\n  data_files:\n"
        '  - split: train\n    path: data/train-*\n---\n# Dataset Card for "repo"\n'
    )
    (folder / ".gitattributes").write_text("*.parquet filter=lfs diff=lfs merge=lfs -text\n")


def _sample_number(caption: str) -> torch.Tensor:
    return torch.tensor(int(caption.rsplit("sample ", 1)[1].rstrip(")")))


def test_a_hub_layout_copy_is_recognised_and_its_parquet_keeps_the_image_feature(tmp_path):
    import pyarrow.parquet as pq

    repo = write_hub_repo(tmp_path / "repo", 8)
    assert (
        is_hub_layout(str(repo))
        and is_hub_layout("your-org/pathology-image-captions")
        and not is_hub_layout("./x/y")
    )
    metadata = pq.read_schema(next((repo / "data").glob("*.parquet"))).metadata[b"huggingface"]
    assert json.loads(metadata)["info"]["features"]["image"]["_type"] == "Image"


def test_processes_read_disjoint_shares_that_cover_the_data(tmp_path):
    """split_dataset_by_node: with 4 files and 2 processes each reads 2 files, in a seeded order."""
    repo = write_hub_repo(tmp_path / "repo", 16)
    stream = HubStream(str(repo), SampleRecipe(32, (), 0, _sample_number))
    assert stream.rows == 16 and stream.num_shards == 4
    shares = []
    for rank in (0, 1):
        batches = stream.loader(batch=1, workers=0, world=2, rank=rank, skip=0)
        shares.append([int(next(batches)[1]) for _ in range(8)])
    assert not set(shares[0]) & set(shares[1]) and set(shares[0]) | set(shares[1]) == set(range(16))
    again = stream.loader(batch=1, workers=0, world=2, rank=0, skip=0)
    assert [int(next(again)[1]) for _ in range(8)] == shares[0], "the order is the seed's alone"
    skipped = stream.loader(batch=1, workers=0, world=2, rank=0, skip=3)
    assert [int(next(skipped)[1]) for _ in range(5)] == shares[0][3:], "resuming continues at the sample"

    other = write_hub_repo(tmp_path / "other", 20)  # another file at the same path: a new fingerprint
    first = sorted((repo / "data").glob("*.parquet"))[0]
    first.write_bytes(sorted((other / "data").glob("*.parquet"))[0].read_bytes())
    assert HubStream(str(repo), SampleRecipe(32, (), 0, _sample_number)).fingerprint != stream.fingerprint


def test_a_workers_passes_leave_the_shared_epoch_alone(tmp_path):
    """datasets keeps an IterableDataset's epoch in shared memory (`set_epoch` writes it in place, for
    persistent workers; datasets/iterable_dataset.py), and forked DataLoader workers share it. A
    worker that set it for its own next pass reshuffled the pass another worker was starting: a
    resumed run, whose first worker reads its trained-on pass undecoded and so gets ahead, trained
    on other rows at step 5 about once in 24 runs under load. Each worker now counts its passes on
    a copy; shown in-process, where the dataset handed in is what the workers' forks share."""
    from micromerge.finetune.hub_stream import _HubSamples

    repo = write_hub_repo(tmp_path / "repo", 16)
    stream = HubStream(str(repo), SampleRecipe(32, (), 0, _sample_number))
    shared = stream.dataset.shuffle(seed=0, buffer_size=8)
    samples = iter(_HubSamples(stream, shared, rank=0, skip_samples=(0, 8)))
    read = [int(next(samples)[1]) for _ in range(40)]  # two passes and a half
    assert sorted(read[:16]) == sorted(read[16:32]) == list(range(16))
    assert shared.epoch == 0


def test_a_streamed_hub_dataset_trains_reproducibly_and_resumes_at_the_exact_sample(
    tmp_path, base, monkeypatch
):
    repo = write_hub_repo(tmp_path / "repo", 32)
    values = dict(max_steps=6, workers=2, augment=("crop", "flip"), data_in_memory="no")
    straight = run_finetune(config(base, repo, tmp_path / "straight", **values))
    again = run_finetune(config(base, repo, tmp_path / "again", **values))
    assert _same(_weights(straight), _weights(again))
    manifest = json.loads((tmp_path / "straight" / "manifest.json").read_text())
    assert manifest["data_path"]["in_memory"] is False
    assert "streamed by datasets (streaming=True): asked for" in manifest["data_path"]["why"]

    interrupted = config(base, repo, tmp_path / "resumed", save_every=3, **values)
    stop_at_the_next_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(interrupted)
    assert _same(_weights(straight), _weights(run_finetune(replace(interrupted, resume=True))))


def test_auto_loads_a_small_local_copy_whole_and_says_why(tmp_path, base, capsys):
    """The row count comes from the parquet footers, so `auto` can weigh the decoded size before
    reading any image: a small copy is decoded into memory, like any small corpus."""
    repo = write_hub_repo(tmp_path / "repo", 16)
    run_finetune(config(base, repo, tmp_path / "run", max_steps=2, progress=True))
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["data_path"]["in_memory"] is True
    assert "data: 16 examples, in memory" in capsys.readouterr().err


def test_auto_streams_a_local_copy_whose_decoded_images_are_over_the_budget(tmp_path, base, monkeypatch):
    """The same weighing the other way: with the budget one byte below the 16 rows' decoded size,
    `auto` streams the copy through datasets (counted from the footers' row count, before any
    image is read)."""
    import micromerge.finetune.streaming as streaming
    from micromerge.merging.models import get_model_config

    repo = write_hub_repo(tmp_path / "repo", 16)
    size = get_model_config("nano-clip")["vision_cfg"]["image_size"]
    monkeypatch.setattr(streaming, "IN_MEMORY_BUDGET", streaming.decoded_bytes(16, size) - 1)
    run_finetune(config(base, repo, tmp_path / "run", max_steps=2))
    path = json.loads((tmp_path / "run" / "manifest.json").read_text())["data_path"]
    assert path["in_memory"] is False
    assert path["why"].startswith("a hub-layout dataset of 4 shards streamed by datasets (streaming=True): ")
    assert path["why"].endswith(" GiB, over 0 GiB"), "the size counted from the footers, over the budget"


def test_a_small_corpus_streamed_for_many_passes_is_told_about_datasets_pause(
    tmp_path, base, capsys, monkeypatch
):
    """datasets pauses SLEEP_TIME_ON_THREADS_SHUTDOWN at the end of every parquet pass (5 s in 5.x;
    BENCHMARKS.md measured it as the hub stream's whole gap on a 3,900-pair corpus): a run of many
    passes says so, with the way round it; a run of one pass does not."""
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 5, raising=False)
    many = config(base, "your-org/captions@v2", tmp_path / "run", max_steps=20_000, batch_size=256)
    trainer._say_pauses_between_passes(5_000, many, world=1)
    note = capsys.readouterr().err
    assert note.startswith("note: about 1024 passes over 5000 rows") and "about 85 min in all" in note
    assert (
        "`datasets.load_dataset('your-org/captions', split='train', revision='v2').save_to_disk(DIR)`" in note
    )
    assert note.count("\n") == 1
    trainer._say_pauses_between_passes(1_000_000, many, world=1)  # five passes: 25 s, not worth a line
    trainer._say_pauses_between_passes(None, many, world=1)  # size unknown
    assert capsys.readouterr().err == ""
    # a step is accum_steps micro-batches on each of `world` processes: 6 x 2 x 5 x 2 = 120 rows
    # a step, 12 passes over 10 rows, 60 s of pauses: the least that is told
    accumulated = config(
        base, "your-org/captions", tmp_path / "acc", max_steps=6, batch_size=5, accum_steps=2
    )
    trainer._say_pauses_between_passes(10, accumulated, world=2)
    assert capsys.readouterr().err.startswith("note: about 12 passes over 10 rows, and datasets pauses 5 s")
    trainer._say_pauses_between_passes(11, accumulated, world=2)  # 10.9 passes: 55 s
    assert capsys.readouterr().err == ""
    file = write_hub_repo(tmp_path / "repo", 16)
    streamed = config(base, file, tmp_path / "streamed", max_steps=2, data_in_memory="no", progress=True)
    monkeypatch.setattr(trainer, "_say_pauses_between_passes", lambda rows, cfg, world: print(f"rows={rows}"))
    run_finetune(streamed)
    assert "rows=16" in capsys.readouterr().out


def test_too_few_shards_are_split_by_row_group_then_refused_in_one_line(tmp_path):
    repo = write_hub_repo(tmp_path / "repo", 12, files=1, row_group=4)  # one file, 3 row groups
    stream = HubStream(str(repo), SampleRecipe(32, (), 0, _sample_number))
    assert stream.num_shards == 1
    batches = stream.loader(batch=2, workers=2, world=1, rank=0, skip=0)  # resharded: 3 row groups
    assert len(next(batches)[1]) == 2
    with pytest.raises(MicromergeError, match="3 shards .* for 4 process"):
        stream.loader(batch=2, workers=1, world=4, rank=0, skip=0)
    with pytest.raises(MicromergeError, match=r"3 shards .* for 1 process\(es\) x 4 worker\(s\)"):
        stream.loader(batch=2, workers=4, world=1, rank=0, skip=0)  # a worker needs a shard too


def test_a_remote_streams_read_error_says_to_resume_or_copy_and_its_rows_come_from_the_card():
    """Streamed from the hub (its files are hf:// URLs, no local file to check for damage), a read
    error is the network's: resume, or train from a local copy. The row count, with no footer to
    read, is the one the dataset card gives (none when it gives 0 or nothing)."""
    from types import SimpleNamespace

    from micromerge.finetune.hub_stream import _row_count, _unreadable

    files = ["hf://datasets/your-org/pathology-image-captions@main/data/train-00000-of-00002.parquet"]
    stream = SimpleNamespace(spec="your-org/pathology-image-captions", files=files)
    message = str(_unreadable(stream, OSError("Connection reset by peer\nmore")))
    assert message == (
        "--data your-org/pathology-image-captions: reading the hub stream failed (Connection reset by "
        "peer); run again with --resume, or download a local copy and pass its folder"
    )

    def builder(splits):
        return SimpleNamespace(info=SimpleNamespace(splits=splits))

    assert (
        _row_count(builder({"train": SimpleNamespace(num_examples=208_414)}), "train", files, "x") == 208_414
    )
    assert _row_count(builder({"train": SimpleNamespace(num_examples=0)}), "train", files, "x") is None
    assert _row_count(builder(None), "train", files, "x") is None


def test_a_stream_reads_only_its_image_and_caption_columns(tmp_path):
    """Hub corpora carry more columns (Quilt-1M: UMLS entities, subsets, notes...): the stream
    selects the two it trains on, so the others are never read from the parquet pages."""
    import datasets

    features = datasets.Features(
        {
            "notes": datasets.Value("string"),
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "embedding": datasets.Sequence(datasets.Value("float32")),
        }
    )
    rows = {
        "notes": ["a", "b"],
        "image": [{"bytes": _png(i), "path": None} for i in range(2)],
        "caption": ["tumor (sample 0)", "stroma (sample 1)"],
        "embedding": [[0.5] * 4, [1.5] * 4],
    }
    (tmp_path / "repo" / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(
        str(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet")
    )
    stream = HubStream(str(tmp_path / "repo"), SampleRecipe(32, (), 0, _sample_number))
    assert stream.dataset.column_names == ["image", "caption"]
    assert sorted(
        int(next(stream.loader(batch=2, workers=0, world=1, rank=0, skip=0))[1][i]) for i in range(2)
    ) == [0, 1]


def test_an_uncached_hub_id_offline_is_one_line_naming_the_local_copy(tmp_path, base, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(
        MicromergeError,
        match=r"is not in the cache, and the hub cannot be reached offline \(HF_DATASETS_OFFLINE=1\); make a local copy",
    ):
        run_finetune(config(base, "someone/quilt-like", tmp_path / "run", max_steps=2))


def test_a_hub_ids_revision_reaches_datasets_and_the_offline_line_names_datasets_own_setting(
    tmp_path, base, monkeypatch
):
    """`owner/name@rev` opens that revision, and its copy command asks for it; offline by
    HF_DATASETS_OFFLINE alone (datasets obeys it whatever HF_HUB_OFFLINE says), the line names it."""
    import datasets

    opened = []

    def unreachable(name, revision=None):
        opened.append((name, revision))
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset_builder", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "true")
    with pytest.raises(
        MicromergeError,
        match=r"cannot be reached offline \(HF_DATASETS_OFFLINE=true\); .*"
        r"hf download someone/quilt-like --repo-type dataset --revision v1\.0 --local-dir DIR",
    ):
        run_finetune(config(base, "someone/quilt-like@v1.0", tmp_path / "run", max_steps=2))
    assert opened == [("someone/quilt-like", "v1.0")]


def test_resuming_a_hub_stream_reads_the_batches_it_skips_without_decoding_them(tmp_path, monkeypatch):
    from micromerge.finetune import augment

    repo = write_hub_repo(tmp_path / "repo", 16)
    stream = HubStream(str(repo), SampleRecipe(32, (), 0, _sample_number))
    straight = stream.loader(batch=2, workers=0, world=1, rank=0, skip=0)
    wanted = [next(straight) for _ in range(4)][3]
    decoded = []
    original = augment.decode_one
    monkeypatch.setattr(augment, "decode_one", lambda *a: decoded.append(1) or original(*a))
    pixels, targets, readable, names = next(stream.loader(batch=2, workers=0, world=1, rank=0, skip=3))
    assert len(decoded) == 2, "only the batch handed out was decoded"
    assert bool(readable.all()) and not any(names) and torch.equal(pixels, wanted[0])
    assert torch.equal(targets, wanted[1])


@pytest.mark.parametrize(
    "other",
    ["captions.csv", "captions.tsv", "captions.jsonl", "state.json", "dataset_info.json", "shard-000000.tar"],
)
def test_a_folder_with_parquet_files_is_a_hub_copy_unless_another_loader_reads_it(tmp_path, other):
    """Parquet files beside a caption table, a save_to_disk file or tar shards belong to that
    other layout (its loader reads the folder); parquet files alone, at any depth, are a hub copy."""
    repo = write_hub_repo(tmp_path / "repo", 4)
    assert is_hub_layout(str(repo))
    (repo / other).write_text("{}")
    assert not is_hub_layout(str(repo))


def test_a_folder_of_images_and_a_readme_is_no_hub_copy_and_says_what_a_corpus_needs(tmp_path, base):
    """A hub copy is told by its parquet files, not by any file at all: a folder of images with a
    README (a user pointing --data at the images) is refused in one line that names the layouts."""
    (tmp_path / "images").mkdir()
    for i in range(4):
        (tmp_path / "images" / f"i{i}.png").write_bytes(_png(i))
    (tmp_path / "images" / "README.md").write_text("slides, scanned at 20x\n")
    assert not is_hub_layout(str(tmp_path / "images"))
    with pytest.raises(MicromergeError, match=r"folder has no captions\.csv/\.tsv/\.jsonl, no \.tar shards"):
        run_finetune(config(base, tmp_path / "images", tmp_path / "run", max_steps=1))


@pytest.mark.parametrize(
    "spec, hub",
    [("owner/name", True), ("owner/name@v1.0", True), ("owner/name#caption=title", True),
     ("owner/name/extra", False), ("./name", False), ("/name", False), ("~/name", False), ("name", False),
     ("wds/s-{0..3}.tar", False), ("corpus/pairs.csv", False), ("owner/na..me", False)],
)  # fmt: skip
def test_a_hub_id_is_one_owner_and_one_name_and_never_a_path(tmp_path, monkeypatch, spec, hub):
    monkeypatch.chdir(tmp_path)  # none of these exists here
    assert is_hub_layout(spec) is hub


def test_the_seed_orders_the_stream(tmp_path):
    """The shard order and the sample buffer are drawn from the run's seed: another seed, another order."""
    repo = write_hub_repo(tmp_path / "repo", 16)
    orders = []
    for seed in (0, 1):
        batches = HubStream(str(repo), SampleRecipe(32, (), seed, _sample_number)).loader(1, 0, 1, 0, 0)
        orders.append([int(next(batches)[1]) for _ in range(16)])
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(16)) and orders[0] != orders[1]


def test_each_pass_over_a_stream_is_shuffled_anew(tmp_path):
    """`set_epoch` per pass: the second pass over the data is another permutation of it."""
    repo = write_hub_repo(tmp_path / "repo", 16)
    batches = HubStream(str(repo), SampleRecipe(32, (), 0, _sample_number)).loader(1, 0, 1, 0, 0)
    order = [int(next(batches)[1]) for _ in range(32)]
    assert sorted(order[:16]) == sorted(order[16:]) == list(range(16)) and order[:16] != order[16:]


def test_streamed_captions_are_stripped_and_a_row_without_one_is_unreadable(tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    rows = {"image": [{"bytes": _png(i), "path": None} for i in range(2)], "caption": ["  stroma \n", None]}
    (tmp_path / "repo" / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(
        str(tmp_path / "repo" / "data" / "train.parquet")
    )
    seen = []
    recipe = SampleRecipe(32, (), 0, lambda caption: seen.append(caption) or torch.tensor(0))
    batches = HubStream(str(tmp_path / "repo"), recipe).loader(1, 0, 1, 0, 0)
    readable = [bool(next(batches)[2]), bool(next(batches)[2])]
    # the row without a caption is not decoded: unreadable, it is left out of the loss (it
    # trained on empty text once)
    assert sorted(zip(seen, readable, strict=True)) == [("", False), ("stroma", True)]


class _SeedEcho:
    """A sample recipe that hands back the augmentation seed each sample was given."""

    seed = 0

    def make(self, payload, caption, seed, name):
        return torch.zeros(1), torch.tensor(seed % 2**62), torch.tensor(True), name


def test_every_worker_draws_its_own_augmentation_seeds(tmp_path):
    """A sample's augmentation seed names the pass, the process, the worker and the sample's place
    in that worker's share: two workers' first samples are not augmented alike."""
    repo = write_hub_repo(tmp_path / "repo", 16)
    batches = HubStream(str(repo), _SeedEcho()).loader(batch=1, workers=2, world=1, rank=0, skip=0)
    seeds = [int(next(batches)[1]) for _ in range(8)]
    assert len(set(seeds)) == 8


def _parquet(path: Path, numbers: range, word: str = "sample") -> None:
    import datasets

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    rows = {
        "image": [{"bytes": _png(i), "path": None} for i in numbers],
        "caption": [f"{word} {i}" for i in numbers],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset = datasets.Dataset.from_dict(rows, features=features)
    if len(dataset):
        dataset.to_parquet(str(path))
    else:  # datasets before 5.2 divides by zero writing no rows; its file as 5.2 writes it: no row group
        pyarrow.parquet.ParquetWriter(str(path), dataset.data.table.schema).close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_of_empty_files_ends_instead_of_spinning(tmp_path, workers):
    """A pass that yields no row ends the stream (the trainer then says it ran dry, in one line):
    a worker that has never had a row does not pass over nothing for ever."""
    for k in range(2):
        _parquet(tmp_path / "repo" / "data" / f"train-0000{k}-of-00002.parquet", range(0))
    stream = HubStream(str(tmp_path / "repo"), SampleRecipe(32, (), 0, _sample_number))
    with pytest.raises(StopIteration):
        next(stream.loader(batch=1, workers=workers, world=1, rank=0, skip=0))


@pytest.mark.timeout(120)
def test_a_worker_whose_share_is_an_empty_file_stops_instead_of_spinning(tmp_path):
    """An empty parquet file is a shard with no rows: its worker ends its share (the loader goes
    on with the others) rather than passing over nothing for ever, which would hang the run."""
    _parquet(tmp_path / "repo" / "data" / "train-00000-of-00002.parquet", range(8))
    _parquet(tmp_path / "repo" / "data" / "train-00001-of-00002.parquet", range(0))
    stream = HubStream(str(tmp_path / "repo"), SampleRecipe(32, (), 0, _sample_number))
    batches = stream.loader(batch=1, workers=2, world=1, rank=0, skip=0)
    assert sorted(int(next(batches)[1]) for _ in range(8)) == list(range(8))
    # Files are dealt to workers afresh each pass: a worker that had rows goes on past a pass whose
    # share was the empty file (it used to end there, and with both ended the stream ran dry).
    assert sorted(int(next(batches)[1]) for _ in range(8 * 9)) == sorted(list(range(8)) * 9)


def test_a_file_with_a_row_group_of_no_rows_is_one_line_naming_it(tmp_path):
    """pyarrow (and pandas through it) writes a table of no rows as one row group of none, and
    datasets' stream fails on that group in a DataLoader worker ("BatchSize must be greater than
    0"): refused when the stream opens, naming the file. The file datasets writes (no row group at
    all) streams, as the test above shows."""
    _parquet(tmp_path / "repo" / "data" / "train-00000-of-00002.parquet", range(8))
    empty = tmp_path / "repo" / "data" / "train-00001-of-00002.parquet"
    schema = pyarrow.parquet.read_schema(tmp_path / "repo" / "data" / "train-00000-of-00002.parquet")
    pyarrow.parquet.write_table(schema.empty_table(), str(empty))
    assert pyarrow.parquet.ParquetFile(empty).metadata.row_group(0).num_rows == 0
    with pytest.raises(MicromergeError, match=re.escape(f"{empty} has a row group of no rows")):
        HubStream(str(tmp_path / "repo"), SampleRecipe(32, (), 0, _sample_number))


@pytest.mark.parametrize("in_memory", ["no", "yes"])
def test_a_parquet_file_cut_short_is_one_line_naming_it(tmp_path, base, in_memory):
    """A local copy with a file an interrupted download cut short ended the run in pyarrow's "magic
    bytes not found" (streamed) or datasets' DatasetGenerationError (read whole), both tracebacks."""
    repo = write_hub_repo(tmp_path / "repo", 16, files=2)
    cut = repo / "data" / "train-00001-of-00002.parquet"
    cut.write_bytes(cut.read_bytes()[:-100])
    with pytest.raises(MicromergeError) as caught:
        run_finetune(config(base, str(repo), tmp_path / "run", data_in_memory=in_memory, max_steps=2))
    message = str(caught.value)
    assert (
        message.startswith(f"--data {repo}: {cut} is not a readable parquet file (") and "\n" not in message
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("in_memory", ["no", "yes"])
def test_a_damaged_page_behind_a_valid_footer_is_one_line_naming_the_file(tmp_path, base, in_memory):
    """A file whose footer reads (so the up-front check passes) but whose first page header is
    garbage failed only as it was read: pyarrow's "Couldn't deserialize thrift" traceback from a
    DataLoader worker (streamed) or datasets' DatasetGenerationError (read whole), neither naming
    the file. The failure path reads each file whole to name the damaged one."""
    repo = write_hub_repo(tmp_path / "repo", 16, files=2)
    damaged = repo / "data" / "train-00001-of-00002.parquet"
    data = bytearray(damaged.read_bytes())
    data[4:44] = b"\xa7" * 40  # after the leading magic: the first column chunk's page header
    damaged.write_bytes(bytes(data))
    assert pyarrow.parquet.ParquetFile(damaged).metadata.num_rows == 8, "the footer still reads"
    with pytest.raises(MicromergeError) as caught:
        run_finetune(
            config(base, str(repo), tmp_path / "run", data_in_memory=in_memory, max_steps=4, workers=1)
        )
    message = str(caught.value)
    assert message.startswith(f"--data {repo}: {damaged} is damaged (") and "\n" not in message, message
    assert message.endswith("download or write it again")
    assert not (tmp_path / "run").exists()
    assert damaged_parquet([str(p) for p in sorted((repo / "data").glob("*.parquet"))], str(repo)) == message
    with pytest.raises((OSError, pyarrow.ArrowException)) as read_whole:
        for _ in pyarrow.parquet.ParquetFile(damaged).iter_batches():
            pass
    assert f"is damaged ({str(read_whole.value).strip().splitlines()[0]})" in message, "pyarrow's own words"


def test_a_damaged_file_a_worker_reads_stops_the_workers_with_the_run(tmp_path, base):
    """As a webdataset shard's (tests/test_streaming.py): the one-line error of a file a DataLoader
    worker cannot read, held as a notebook holds it, leaves none of the run's `--workers 2` alive."""
    repo = write_hub_repo(tmp_path / "repo", 16, files=2)
    damaged = repo / "data" / "train-00001-of-00002.parquet"
    data = bytearray(damaged.read_bytes())
    data[4:44] = b"\xa7" * 40  # the first page header, behind a footer that reads
    damaged.write_bytes(bytes(data))
    before = descendants()
    with pytest.raises(MicromergeError) as caught:
        run_finetune(config(base, str(repo), tmp_path / "run", data_in_memory="no", max_steps=4, workers=2))
    assert f"{damaged} is damaged (" in str(caught.value)
    assert descendants_left(before) == []
    assert caught.traceback  # still held


def test_a_local_copy_is_read_whole_whatever_its_path_holds_and_its_train_split_first(tmp_path):
    """A local folder named with an '@' is a path, not `name@revision`; of a repository with test
    and train files the train split is streamed."""
    repo = tmp_path / "quilt@v2"
    _parquet(repo / "data" / "test-00000-of-00001.parquet", range(3), word="test")
    _parquet(repo / "data" / "train-00000-of-00001.parquet", range(5))
    stream = HubStream(str(repo), SampleRecipe(32, (), 0, _sample_number))
    assert stream.rows == 5
    batches = stream.loader(batch=1, workers=0, world=1, rank=0, skip=0)
    assert sorted(int(next(batches)[1]) for _ in range(5)) == list(range(5))


def test_the_in_memory_and_statistics_readers_take_the_same_split_as_the_stream(tmp_path):
    """A local copy whose only split is not named train: the stream read it, but the in-memory path
    (`--data-in-memory yes`, and Fisher/RegMean's `--base-data`) asked `datasets` for split="train"
    and died with its `ValueError: Unknown split "train"` traceback. Both read the train split,
    else the only one; several and none named train is one line from both."""
    from micromerge.eval.pairs import load_pairs

    only = tmp_path / "only-test"
    _parquet(only / "data" / "test-00000-of-00001.parquet", range(4))
    assert load_pairs(str(only)).captions == [f"sample {i}" for i in range(4)]
    assert HubStream(str(only), SampleRecipe(32, (), 0, _sample_number)).rows == 4
    both = tmp_path / "both"
    _parquet(both / "data" / "train-00000-of-00001.parquet", range(5))
    _parquet(both / "data" / "test-00000-of-00001.parquet", range(3), word="test")
    assert load_pairs(str(both)).captions == [f"sample {i}" for i in range(5)]
    neither = tmp_path / "neither"
    _parquet(neither / "data" / "test-00000-of-00001.parquet", range(3))
    _parquet(neither / "data" / "validation-00000-of-00001.parquet", range(3))
    for read in (load_pairs, lambda spec: HubStream(spec, SampleRecipe(32, (), 0, _sample_number))):
        with pytest.raises(MicromergeError, match="and none named train; keep the one to train on"):
            read(str(neither))
