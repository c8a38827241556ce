"""Fine-tuning on streamed data (issue 16): the same order and bytes as the in-memory path,
augmentation drawn from the seed (so resuming stays exact), the path chosen and said, memory that
does not grow with the corpus, and bad input as one line.

Facts from public sources: open_clip's training transform is RandomResizedCrop(image_size,
scale=(0.9, 1.0), bicubic) then the model's mean/std (open_clip/transform.py, read through the
search tool); webdataset shards are plain tar files whose members `KEY.EXT` group into samples.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from micromerge.cli import cli
from micromerge.core.errors import MicromergeError
from micromerge.eval.pairs import load_pairs
from micromerge.finetune.micro_batches import epoch_order
from micromerge.finetune.shard_stream import ShardStream, _StreamDecoder
from micromerge.finetune.streaming import SampleRecipe, batches, choose_in_memory, index_pairs, indexed_pairs
from micromerge.finetune.trainer import run_finetune
from tests.helpers import descendants, descendants_left, stop_at_the_next_save, write_checkpoint
from tests.test_finetune import CAPTIONS, _png, config, write_csv_folder


@pytest.fixture
def base(tmp_path):
    write_checkpoint(tmp_path / "base.safetensors", 0)
    return tmp_path / "base.safetensors"


def _weights(path: Path) -> dict:
    return load_file(str(path))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def write_shards(folder: Path, n: int, per_shard: int = 7) -> Path:
    folder.mkdir(parents=True)
    for first in range(0, n, per_shard):
        with tarfile.open(folder / f"shard-{first // per_shard:06d}.tar", "w") as archive:
            for i in range(first, min(n, first + per_shard)):
                for suffix, payload in ((".png", _png(i)), (".txt", CAPTIONS[i % 6].encode())):
                    info = tarfile.TarInfo(f"sample{i:04d}{suffix}")
                    info.size = len(payload)
                    archive.addfile(info, io.BytesIO(payload))
    return folder


def write_arrow(folder: Path, n: int) -> Path:
    import datasets

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    rows = {
        "image": [{"bytes": _png(i), "path": None} for i in range(n)],
        "caption": [CAPTIONS[i % 6] for i in range(n)],
    }
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(folder))
    return folder


FINGERPRINTED = {
    "csv": "the table's bytes, image file names and sizes",
    "tar": "shard names and sizes, every member's tar header",
    "arrow": "the dataset's Arrow fingerprint, file names and sizes",
}


@pytest.mark.parametrize("layout", ["csv", "tar", "arrow"])
def test_streaming_without_augmentation_equals_the_in_memory_run(tmp_path, base, layout):
    writers = {"csv": write_csv_folder, "tar": write_shards, "arrow": write_arrow}
    data = writers[layout](tmp_path / layout, 24)
    memory = run_finetune(config(base, data, tmp_path / "memory", max_steps=4, data_in_memory="yes"))
    streamed = run_finetune(
        config(base, data, tmp_path / "stream", max_steps=4, data_in_memory="no", workers=2)
    )
    assert _same(_weights(memory), _weights(streamed))
    manifest = json.loads((tmp_path / "stream" / "manifest.json").read_text())
    assert manifest["data_path"]["in_memory"] is False and "asked for" in manifest["data_path"]["why"]
    assert manifest["data_path"]["fingerprint"] == FINGERPRINTED[layout]
    single = run_finetune(
        config(base, data, tmp_path / "single", max_steps=4, data_in_memory="no", workers=0)
    )
    assert _same(_weights(streamed), _weights(single)), "the number of workers changes nothing"


def test_supervised_streams_its_task_too(tmp_path, base):
    from tests.ubench_fixture import write_fixture

    bench = write_fixture(tmp_path / "bench", per_class=6, corrupt=0)
    values = dict(mode="supervised", task="kather_et_al_2016", max_steps=3, batch_size=4)
    memory = run_finetune(config(base, bench, tmp_path / "memory", data_in_memory="yes", **values))
    streamed = run_finetune(config(base, bench, tmp_path / "stream", data_in_memory="no", **values))
    assert _same(_weights(memory), _weights(streamed))
    for run, in_memory, setting in (("memory", True, "yes"), ("stream", False, "no")):
        manifest = json.loads((tmp_path / run / "manifest.json").read_text())
        assert manifest["data_path"] == {
            "in_memory": in_memory,
            "why": f"asked for (--data-in-memory {setting})",
            "fingerprint": "the benchmark's files",
        }


def test_supervised_trains_a_two_class_task_and_records_a_known_domain_only(tmp_path, base):
    """Two classes are the fewest a classifier learns from (nirschl_et_al_2018 has two). The run's
    domain defaults to its task's, unless the benchmark does not say it: then none is recorded,
    not "unknown", which analysis would look for among the benchmark's domains."""
    from tests.ubench_fixture import fixture_dataset

    dataset = fixture_dataset(6, 0, 0, ())
    values = dict(mode="supervised", task="nirschl_et_al_2018", max_steps=2, batch_size=4)
    for name, domain in (("named", "pathology"), ("unnamed", None)):
        if domain is None:  # the task's rows say no domain
            dataset = dataset.map(
                lambda row: {"domain": None if row["dataset"] == values["task"] else row["domain"]}
            )
        dataset.to_parquet(str(tmp_path / name / "test-00000-of-00001.parquet"))
        run_finetune(config(base, tmp_path / name, tmp_path / f"run-{name}", **values))
        manifest = json.loads((tmp_path / f"run-{name}" / "manifest.json").read_text())
        assert manifest["domain"] == domain


@pytest.mark.parametrize("layout", ["image files", "webdataset shards"])
def test_a_run_that_stops_early_stops_its_data_workers_with_it(tmp_path, base, monkeypatch, layout):
    """Ctrl-C (or an error) in a streamed run: its traceback, which a notebook keeps as the last
    one, held the DataLoader, and the run's `--workers 2` processes lived on, idle, until another
    error replaced it. They now end with the run, while the traceback is still held."""
    if layout == "image files":  # streamed because it augments
        data, values = str(write_csv_folder(tmp_path / "pairs", n=24)), dict(augment=("flip",))
    else:
        data, values = _pipe_spec(write_shards(tmp_path / "wds", 28, per_shard=7)), {}
    stop_at_the_next_save(monkeypatch)
    before = descendants()
    cfg = config(base, data, tmp_path / "run", max_steps=6, save_every=2, workers=2, **values)
    with pytest.raises(KeyboardInterrupt) as stopped:
        run_finetune(cfg)
    assert descendants_left(before) == []
    assert stopped.traceback  # still held, as a notebook holds it


def test_augmentation_is_drawn_from_the_seed_and_survives_a_resume(tmp_path, base, monkeypatch):
    data = write_csv_folder(tmp_path / "pairs", n=24)
    augmented = dict(max_steps=8, augment=("crop", "flip", "rot90", "stain-jitter"), lr=1e-3)
    straight = run_finetune(config(base, data, tmp_path / "straight", **augmented))
    again = run_finetune(config(base, data, tmp_path / "again", **augmented))
    plain = run_finetune(config(base, data, tmp_path / "plain", max_steps=8, lr=1e-3))
    assert _same(_weights(straight), _weights(again)), "same seed, same augmentation"
    assert not _same(_weights(straight), _weights(plain)), "augmentation changes what is seen"
    manifest = json.loads((tmp_path / "straight" / "manifest.json").read_text())
    assert manifest["hyperparameters"]["augment"] == ["crop", "flip", "rot90", "stain-jitter"]
    assert manifest["data_path"]["in_memory"] is False and "augmentation" in manifest["data_path"]["why"]

    interrupted = config(base, data, tmp_path / "resumed", save_every=4, **augmented)
    stop_at_the_next_save(monkeypatch)  # killed right after the checkpoint of step 4
    with pytest.raises(KeyboardInterrupt):
        run_finetune(interrupted)
    resumed = run_finetune(replace(interrupted, resume=True))
    assert _same(_weights(straight), _weights(resumed)), "resumed at the exact sample, same augmentation"


def test_each_epoch_is_a_fresh_seeded_permutation_that_the_ranks_share_out(tmp_path):
    """An epoch visits every sample once in a new order (a DataLoader's shuffle, reproducible): the
    same order every epoch would repeat each batch's composition, and the paths differ only in how
    they read, so the streamed plan must be this order too, ranks taking disjoint slices of it."""
    n, batch, world = 40, 4, 2
    per_epoch = n // (batch * world)
    orders = [epoch_order(n, 7, epoch) for epoch in range(3)]
    assert all(sorted(order.tolist()) == list(range(n)) for order in orders)
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])
    assert torch.equal(orders[1], epoch_order(n, 7, 1)), "fixed by the seed"
    assert not torch.equal(orders[0], epoch_order(n, 8, 0)), "and changed by it"
    plans = [
        list(batches(lambda e: epoch_order(n, 7, e), 0, 2 * per_epoch, per_epoch, batch, world, rank))
        for rank in range(world)
    ]
    for epoch in range(2):
        seen = [
            i for plan in plans for step in plan[epoch * per_epoch : (epoch + 1) * per_epoch] for e, i in step
        ]
        assert all(e == epoch for plan in plans for e, _ in plan[epoch * per_epoch][:1])
        assert sorted(seen) == list(range(n)), "each rank its own slice, together every sample once"
    interleaved = [i for step in zip(*plans, strict=True) for rank_step in step for _, i in rank_step]
    assert interleaved[:n] == orders[0].tolist() and interleaved[n:] == orders[1].tolist()


def test_every_sample_of_every_epoch_draws_its_own_augmentation_seed():
    """A sample's augmentation is seeded from (seed, epoch, index) alone, so a resumed or re-sharded
    run draws the same crops; the seeds must still differ from sample to sample and epoch to epoch
    (one crop for all would be no augmentation) and fit a non-negative 63-bit seed."""
    from micromerge.finetune.augment import named_sample_seed, sample_seed

    seeds = [sample_seed(0, epoch, i) for epoch in range(2) for i in range(500)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(1, 0, 0) != sample_seed(0, 0, 0), "--seed changes them"
    named = {named_sample_seed(0, 0, f"shard-{i}.tar/{i:06d}") for i in range(500)}
    assert len(named) == 500


def test_the_path_is_chosen_by_size_and_augmentation_and_said(tmp_path, base, capsys):
    assert choose_in_memory("auto", 1000, 224, ())[0] is True
    assert choose_in_memory("auto", 1_000_000, 224, ())[0] is False, "150 GB of decoded Quilt-1M images"
    assert choose_in_memory("auto", 10, 32, ("crop",))[0] is False
    with pytest.raises(MicromergeError, match="augmentation needs the streaming path"):
        choose_in_memory("yes", 10, 32, ("flip",))
    # the user's word over the size rule, either way
    assert choose_in_memory("yes", 1_000_000, 224, ()) == (True, "asked for (--data-in-memory yes)")
    assert choose_in_memory("no", 10, 32, ()) == (False, "asked for (--data-in-memory no)")
    data = write_csv_folder(tmp_path / "pairs", n=16)
    run_finetune(replace(config(base, data, tmp_path / "auto", max_steps=1), progress=True))
    assert "data: 16 examples, in memory (the decoded images take" in capsys.readouterr().err


def test_the_shard_fingerprint_is_cheap_and_still_sees_a_changed_shard(tmp_path):
    shards = write_shards(tmp_path / "wds", 14)
    first = index_pairs(str(shards))
    assert len(first) == 14 and first.kind == "tar"
    with tarfile.open(shards / "shard-000001.tar", "a") as archive:
        for suffix, payload in ((".png", _png(99)), (".txt", b"one more")):
            info = tarfile.TarInfo(f"sample0099{suffix}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    second = index_pairs(str(shards))
    assert len(second) == 15 and second.fingerprint != first.fingerprint


@pytest.mark.parametrize("layout", ["csv", "tar", "arrow"])
def test_the_in_memory_path_reads_the_index_it_made_and_gets_what_the_loader_gets(tmp_path, layout):
    """The in-memory path reads its bytes from the corpus index (one pass over an Arrow image
    column or the tar members, instead of indexing and then loading the whole corpus again), and
    must get exactly what the plain loader gets: same payloads, captions and every-byte fingerprint."""
    make = {"csv": write_csv_folder, "tar": write_shards, "arrow": write_arrow}[layout]
    data = make(tmp_path / "pairs", 20)
    loaded, indexed = load_pairs(str(data)), indexed_pairs(index_pairs(str(data)))
    assert indexed.captions == loaded.captions
    assert [p.get("bytes") for p in indexed.payloads] == [p.get("bytes") for p in loaded.payloads]
    assert [p.get("path") for p in indexed.payloads] == [p.get("path") for p in loaded.payloads]
    assert indexed.fingerprint() == loaded.fingerprint()


def test_the_shard_decoder_draws_augmentation_per_pass_and_keeps_nothing_per_sample(tmp_path):
    """Augmentation on a shard stream is drawn from (seed, pass, shard, key): the same on a replay,
    new on the next pass, and the decoder holds no per-sample record (over Quilt-1M a record per
    sample and worker would grow to about 100 MB in each worker)."""
    import webdataset as wds

    spec = _pipe_spec(write_shards(tmp_path / "wds", 14))
    stream = ShardStream(
        spec, SampleRecipe(32, ("crop", "flip"), 0, lambda caption: torch.tensor(len(caption)))
    )

    def one_pass(decoder):
        batches = wds.DataPipeline(
            wds.SimpleShardList(stream.urls), wds.tarfile_to_samples(), wds.batched(7, collation_fn=list)
        )
        return [image for pixels, *_ in decoder(iter(batches)) for image in pixels]

    decoder = _StreamDecoder(stream, skip=0)
    first, second = one_pass(decoder), one_pass(decoder)
    replay = one_pass(_StreamDecoder(stream, skip=0))
    assert len(first) == 14 and all(torch.equal(a, b) for a, b in zip(first, replay, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, second, strict=True)), "a new pass, new draws"
    assert vars(decoder).keys() == {"stream", "skip", "passes", "batches"} and decoder.passes == 2


def test_processes_read_disjoint_shards_that_cover_the_stream(tmp_path):
    """Each process takes every world-th shard of the seeded shard order (split_by_node's rule):
    two ranks' first passes are disjoint and together hold every sample once."""
    folder = tmp_path / "wds"
    folder.mkdir()
    for shard in range(4):
        with tarfile.open(folder / f"shard-{shard:06d}.tar", "w") as archive:
            for i in range(shard * 5, shard * 5 + 5):
                for suffix, payload in ((".png", _png(i)), (".txt", f"sample {i}".encode())):
                    info = tarfile.TarInfo(f"s{i:04d}{suffix}")
                    info.size = len(payload)
                    archive.addfile(info, io.BytesIO(payload))
    stream = ShardStream(
        _pipe_spec(folder), SampleRecipe(32, (), 0, lambda caption: torch.tensor(int(caption.split()[1])))
    )
    shares = []
    for rank in (0, 1):
        batches = stream.loader(batch=1, workers=0, world=2, rank=rank, skip=0)
        shares.append([int(next(batches)[1]) for _ in range(10)])
    assert not set(shares[0]) & set(shares[1]) and set(shares[0]) | set(shares[1]) == set(range(20))


def test_resuming_a_shard_stream_reads_the_batches_it_skips_without_decoding_them(tmp_path, monkeypatch):
    """Resuming deep into a stream must not cost decoding everything before it: the skipped batches
    are read from the shards but their images are never decoded, and the first batch after them is
    exactly the one an uninterrupted stream gives there."""
    from micromerge.finetune import augment

    spec = _pipe_spec(write_shards(tmp_path / "wds", 28, per_shard=7))
    stream = ShardStream(spec, SampleRecipe(32, ("crop",), 0, lambda caption: torch.tensor(len(caption))))
    straight = stream.loader(batch=4, workers=0, world=1, rank=0, skip=0)
    wanted = [next(straight) for _ in range(4)][3]
    decoded = []
    original = augment.augmented_pixels
    monkeypatch.setattr(augment, "augmented_pixels", lambda *a: decoded.append(1) or original(*a))
    pixels, targets, readable, names = next(stream.loader(batch=4, workers=0, world=1, rank=0, skip=3))
    assert len(decoded) == 4, "only the batch handed out was decoded"
    assert bool(readable.all()) and not any(names) and torch.equal(pixels, wanted[0])
    assert torch.equal(targets, wanted[1])


RSS = """
import sys
from pathlib import Path
from micromerge.finetune.config import FinetuneConfig
from micromerge.finetune.trainer import run_finetune
base, data, out, in_memory = sys.argv[1:5]
run_finetune(FinetuneConfig(mode="contrastive", base=base, data=data, out=Path(out), max_steps=2, batch_size=8,
                            device="cpu", progress=False, data_in_memory=in_memory, workers=0))
# VmHWM: this process's own peak (ru_maxrss would start from the forking parent's, pytest's)
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) // 1024)
"""


def _peak_rss_mb(base: Path, data: Path, out: Path, in_memory: str) -> int:
    result = subprocess.run(
        [sys.executable, "-c", RSS, str(base), str(data), str(out), in_memory], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_streaming_memory_does_not_grow_with_the_corpus(tmp_path):
    """A corpus ten times larger: the streamed run's peak RSS stays put, the in-memory run's grows by
    the decoded images (the positive control that shows the measurement can see it)."""
    base = tmp_path / "base.safetensors"
    write_checkpoint(base, 0, arch="micro-clip")  # 64 px: 12 KiB per decoded image
    small = write_csv_folder(tmp_path / "small", n=400)
    large = write_csv_folder(tmp_path / "large", n=4000)
    streamed = [_peak_rss_mb(base, d, tmp_path / f"s-{d.name}", "no") for d in (small, large)]
    in_memory = [_peak_rss_mb(base, d, tmp_path / f"m-{d.name}", "yes") for d in (small, large)]
    assert in_memory[1] - in_memory[0] > 30, in_memory
    assert streamed[1] - streamed[0] < 12, streamed


def _pipe_spec(shards: Path) -> str:
    """A webdataset URL pattern read through a pipe, as remote shards are (no network needed)."""
    count = len(list(shards.glob("*.tar")))
    return f"pipe:cat {shards}/shard-{{000000..{count - 1:06d}}}.tar"


def test_a_shard_stream_is_read_in_a_seeded_order_and_resumes_at_the_exact_sample(
    tmp_path, base, monkeypatch
):
    spec = _pipe_spec(write_shards(tmp_path / "wds", 28, per_shard=7))
    values = dict(max_steps=6, workers=2, augment=("crop", "flip"), lr=1e-3)
    straight = run_finetune(config(base, spec, tmp_path / "straight", **values))
    again = run_finetune(config(base, spec, tmp_path / "again", **values))
    assert _same(_weights(straight), _weights(again))
    manifest = json.loads((tmp_path / "straight" / "manifest.json").read_text())
    assert manifest["data_path"]["in_memory"] is False and "webdataset" in manifest["data_path"]["why"]

    interrupted = config(base, spec, tmp_path / "resumed", save_every=3, **values)
    stop_at_the_next_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(interrupted)
    assert _same(_weights(straight), _weights(run_finetune(replace(interrupted, resume=True))))


def test_a_shard_stream_needs_a_length_and_a_shard_per_worker(tmp_path, base):
    spec = _pipe_spec(write_shards(tmp_path / "wds", 14, per_shard=7))
    with pytest.raises(MicromergeError, match="a stream has no length here: give --max-steps"):
        run_finetune(replace(config(base, spec, tmp_path / "a"), max_steps=None))
    with pytest.raises(MicromergeError, match="2 shards for 1 process"):
        run_finetune(config(base, spec, tmp_path / "b", workers=3))


@pytest.mark.parametrize("workers", [0, 1])
def test_a_missing_or_unreadable_shard_is_one_line_that_names_it(tmp_path, base, workers):
    """A pattern naming a shard that is not there, or a shard that is no tar file or was cut short
    (an interrupted download), ended the run with webdataset's traceback from a DataLoader worker
    (FileNotFoundError, tarfile.ReadError); a missing local shard was not even looked for before."""
    shards = write_shards(tmp_path / "wds", 14, per_shard=7)
    pattern = f"{shards}/shard-{{000000..000003}}.tar"
    with pytest.raises(
        MicromergeError, match=r"shard .*shard-000002\.tar \(and 1 more of its 4\) does not exist"
    ):
        run_finetune(config(base, pattern, tmp_path / "missing", workers=workers))
    assert not (tmp_path / "missing").exists()
    one_missing = f"{shards}/shard-{{000000..000002}}.tar"  # no "(and 0 more ...)" for one alone
    with pytest.raises(MicromergeError, match=r"shard .*shard-000002\.tar does not exist"):
        run_finetune(config(base, one_missing, tmp_path / "missing", workers=workers))
    whole = (shards / "shard-000001.tar").read_bytes()
    for name, damaged in (("junk", b"not a tar file\n"), ("cut", whole[: len(whole) // 2 + 100])):
        (shards / "shard-000001.tar").write_bytes(damaged)
        spec = f"{shards}/shard-{{000000..000001}}.tar"
        with pytest.raises(MicromergeError) as caught:
            run_finetune(config(base, spec, tmp_path / name, max_steps=4, batch_size=4, workers=workers))
        message = str(caught.value)
        assert "\n" not in message and message.startswith(f"--data {spec}: shard "), message
        assert "shard-000001.tar cannot be read as a tar file (" in message, message
        # once: a member cut short went through the handler twice (webdataset's inner and outer
        # loops), the first line nested in the second, the inner one naming no shard
        assert message.count("cannot be read") == 1 and " @ " not in message, message


@pytest.mark.parametrize("then", ["exit 3", "exec >&-; sleep 1; exit 3"])
def test_a_pipe_whose_command_fails_is_one_line_with_its_exit_status(tmp_path, base, then):
    """A `pipe:` download that fails (expired credentials, a wrong URL) was "cannot be read as a tar
    file ((('cmd',), {'shell': True, 'bufsize': 8192}): exit 3 (read) {})": webdataset's Pipe
    repr, and a tar file blamed. Its status is said, and where to look. A command that had not
    ended when its output did (`exec >&-` closes it, then the command takes a second to fail)
    failed unnoticed, the run trained on: webdataset's Pipe looks for the status at each read, so
    it was missed whenever the last read came first (the fails-at-once case went so once on a
    loaded machine, at the floors). Each pipe is now waited for once its tar is read, in a
    fine-tune and in a check."""
    shards = write_shards(tmp_path / "wds", 14, per_shard=7)
    spec = f"pipe:cat {shards}/shard-000000.tar; {then}"
    expected = (
        f"--data {spec}: shard {spec}: its command exited with status 3; run the command on its own to "
        "see why (a download's URL or credentials?), then run again"
    )
    with pytest.raises(MicromergeError) as caught:
        run_finetune(config(base, spec, tmp_path / "run", max_steps=6, batch_size=2, workers=0))
    assert str(caught.value) == expected
    result = CliRunner().invoke(cli, ["data", "check", "--data", spec, "--workers", "0", "--quiet"])
    assert result.exit_code == 2 and result.stderr.splitlines() == [f"error: {expected}"], result.output


def test_a_shard_streams_datasets_pickle_as_spawned_workers_need(tmp_path):
    """DataLoader workers started by spawn (the default on macOS and Windows) unpickle the dataset:
    webdataset's stages pickle, and the stage that closes each shard once read (a local function at
    first) must too. Unpickled, each reads what the original reads."""
    import itertools
    import pickle

    from micromerge.finetune.corpus_check import CHECK_BATCH, CHECK_SIZE, no_target
    from micromerge.finetune.shard_stream import ShardStream
    from micromerge.finetune.streaming import SampleRecipe

    shards = write_shards(tmp_path / "wds", 14, per_shard=7)
    stream = ShardStream(f"{shards}/shard-{{000000..000001}}.tar", SampleRecipe(CHECK_SIZE, (), 0, no_target))
    check = stream.one_pass(CHECK_BATCH, 0, stream.urls).dataset
    training = stream.loader(4, 0, 1, 0, 0)._dataset
    for dataset in (check, training):  # the check's one batch of 14; the training's first 3 of 4
        again = pickle.loads(pickle.dumps(dataset))
        names = [[batch[3] for batch in itertools.islice(d, 3)] for d in (dataset, again)]
        assert names[0] == names[1] and len(names[0]) in (1, 3)


def test_a_pipe_whose_command_writes_nothing_is_one_line_naming_the_command(tmp_path):
    """A command that succeeds with no output (a `curl` without --fail on a page of nothing, a
    `cat` of an empty file) was "cannot be read as a tar file (empty file); re-create or re-download
    it": tarfile's words for a stream of no bytes, and a file blamed where a command is."""
    from micromerge.finetune.corpus_check import CHECK_BATCH, CHECK_SIZE, no_target
    from micromerge.finetune.shard_stream import ShardStream
    from micromerge.finetune.streaming import SampleRecipe

    spec = "pipe:true"
    stream = ShardStream(spec, SampleRecipe(CHECK_SIZE, (), 0, no_target))
    with pytest.raises(MicromergeError) as caught:
        list(stream.one_pass(CHECK_BATCH, 0, stream.urls))
    assert str(caught.value) == (
        f"--data {spec}: shard {spec}: its command wrote nothing (and exited with status 0); run the "
        "command on its own to see why, then run again"
    )


def test_a_shard_a_worker_cannot_read_stops_the_workers_with_the_run(tmp_path, base):
    """A shard read error is raised in a DataLoader worker and raised again by the loader's iterator
    in the main process: the error's traceback then held the iterator's frames, and with them the
    run's `--workers 2` processes, for as long as a notebook kept the error. They now end with the
    run while the error is held, and the error is still its one line."""
    shards = write_shards(tmp_path / "wds", 28, per_shard=7)
    (shards / "shard-000003.tar").write_bytes(b"not a tar file\n")
    spec = f"{shards}/shard-{{000000..000003}}.tar"
    before = descendants()
    with pytest.raises(MicromergeError) as caught:
        run_finetune(config(base, spec, tmp_path / "run", max_steps=6, batch_size=4, workers=2))
    assert "shard-000003.tar cannot be read as a tar file (" in str(caught.value)
    assert descendants_left(before) == []
    assert caught.traceback  # still held, as a notebook holds it


def test_the_unreadable_shard_handler_closes_the_stream_webdataset_leaves_open(tmp_path):
    """webdataset's tar expander hands its handler the error with the shard's open stream and URL
    appended to its args (webdataset 0.2.86 tariterators.py, `tar_file_expander`); the run stops,
    so the stream is closed here rather than left to the garbage collector's ResourceWarning."""
    from micromerge.finetune.shard_stream import ShardReadError, _UnreadableShard

    shard = tmp_path / "shard-000000.tar"
    shard.write_bytes(b"not a tar file\n")
    stream = open(shard, "rb")  # noqa: SIM115 (the handler closes it)
    error = tarfile.ReadError("bad header", stream, str(shard))
    with pytest.raises(
        ShardReadError, match=r"shard .*shard-000000\.tar cannot be read as a tar file \(bad header\)"
    ):
        _UnreadableShard("corpus", [str(shard)])(error)
    assert stream.closed


@pytest.mark.timeout(120)
def test_a_stream_without_a_full_batch_stops_in_one_line_instead_of_spinning(tmp_path, base):
    """webdataset's `.repeat()` passed over shards that hold no full batch for ever, and the run
    hung without a word (an empty shard set, or a pipe that yields nothing). A worker whose shards
    hold none now ends its share; the others go on, and when none is left the run stops."""
    empty = tmp_path / "empty"
    empty.mkdir()
    with tarfile.open(empty / "shard-000000.tar", "w"):
        pass
    with pytest.raises(
        MicromergeError, match=r"the stream ran dry at step 0: no shard holds a full batch of 4"
    ):
        run_finetune(config(base, _pipe_spec(empty), tmp_path / "dry", max_steps=2, batch_size=4, workers=1))
    mixed = write_shards(tmp_path / "mixed", 8, per_shard=8)
    with tarfile.open(mixed / "shard-000001.tar", "w"):
        pass
    spec = _pipe_spec(mixed)
    path = run_finetune(config(base, spec, tmp_path / "mixed-run", max_steps=3, batch_size=4, workers=2))
    assert json.loads((path.parent / "manifest.json").read_text())["steps"] == 3


def test_a_streamed_webdataset_sample_is_captioned_by_its_json_as_the_index_reads_it(tmp_path):
    """`key.png` + `key.json` ({"caption": ...}) is webdataset's other caption form; the indexed
    path read it, the stream read `txt` only and trained on empty text."""
    import webdataset as wds

    from micromerge.finetune.shard_stream import ShardStream, _StreamDecoder
    from micromerge.finetune.streaming import SampleRecipe

    folder = tmp_path / "wds"
    folder.mkdir()
    with tarfile.open(folder / "shard-000000.tar", "w") as archive:
        for name, payload in (
            ("a.png", _png(0)),
            ("a.json", json.dumps({"caption": " from the json "}).encode()),
            ("b.png", _png(1)),
            ("b.txt", b"from the txt"),
            ("c.png", _png(2)),
            ("c.json", b"{not json"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    stream = ShardStream(_pipe_spec(folder), SampleRecipe(32, (), 0, lambda caption: caption))
    batches = wds.DataPipeline(
        wds.SimpleShardList(stream.urls), wds.tarfile_to_samples(), wds.batched(1, collation_fn=list)
    )
    decoded = [(t, bool(r), n) for _, (t,), (r,), (n,) in _StreamDecoder(stream, skip=0)(iter(batches))]
    # a sample left with no caption is not decoded: unreadable, it is left out of the loss, and
    # named by its key and shard for the run's note
    assert decoded == [
        ("from the json", True, ""),
        ("from the txt", True, ""),
        ("", False, f"'c' of {stream.urls[0]!r}"),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_two_processes_stream_their_own_shards_and_end_identical(tmp_path, base, accum):
    from tests.helpers import launch_failure, run_two_processes
    from tests.test_finetune import _contrastive_args

    spec = _pipe_spec(write_shards(tmp_path / "wds", 32, per_shard=8))
    args = _contrastive_args(base, spec, tmp_path / "ddp", steps=3, batch_size=4)
    result = run_two_processes(*args, "--save-every", "0", "--workers", "1", "--accum-steps", str(accum))
    assert result.returncode == 0, launch_failure(result)
    manifest = json.loads((tmp_path / "ddp" / "manifest.json").read_text())
    assert manifest["processes"] == 2 and len(set(manifest["rank_weight_sha256"])) == 1
    assert manifest["images_seen"] == 3 * accum * 4 * 2  # steps x micro-batches x batch x processes


@pytest.mark.slow
def test_two_processes_streaming_killed_and_resumed_end_with_the_same_weights(tmp_path, base):
    """Each process streams its own shards (every second one) with its own augmentation draws. The
    launch killed once it has saved step 6 of 14 and launched again with --resume skips, on each
    process, the batches that process trained on (its own count, not the launch's): a process's 32
    samples make 5 steps of 2 x 3, so the skip crosses a whole pass and lands inside the second.
    It ends bit-identical to an uninterrupted launch, with the same logged losses."""
    from tests.helpers import straight_and_resumed_launches
    from tests.test_finetune import _contrastive_args

    spec = _pipe_spec(write_shards(tmp_path / "wds", 64, per_shard=8))

    def arguments(out: Path) -> list[str]:
        args = _contrastive_args(base, spec, out, steps=14, batch_size=3)
        return [*args, "--save-every", "2", "--lr", "1e-3", "--accum-steps", "2", "--workers", "1",
                "--augment", "crop", "--augment", "flip"]  # fmt: skip

    straight, killed = straight_and_resumed_launches(arguments, tmp_path)
    assert _same(_weights(straight / "model.safetensors"), _weights(killed / "model.safetensors"))
    logs = [(folder / "train_log.jsonl").read_text().splitlines() for folder in (straight, killed)]
    assert [json.loads(row)["step"] for row in logs[1]] == list(range(1, 15))
    assert [json.loads(row)["loss"] for row in logs[1]] == [json.loads(row)["loss"] for row in logs[0]]


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("workers", -1, "--workers -1: must be an integer of at least 0"),
        ("data_in_memory", "maybe", "--data-in-memory maybe: expected auto, yes or no"),
        ("augment", ("blur",), "--augment blur: choose from"),
    ],
)
def test_bad_streaming_settings_are_one_line(tmp_path, base, field, value, needle):
    with pytest.raises(MicromergeError, match=needle):
        config(base, tmp_path, tmp_path / "out", **{field: value})
