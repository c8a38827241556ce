"""Unreadable samples in a streamed fine-tune (issue 16): left out of the loss, counted against
--max-bad-fraction over what has been read, recorded, and resumed exactly.

Facts from public sources: open_clip_train skips a webdataset sample it cannot decode (its
`log_and_continue` handler and `filter_no_caption_or_no_image`, open_clip_train/data.py, read
through the search tool); torch's cross_entropy leaves targets equal to its ignore_index (-100)
out of the mean (the torch.nn.functional.cross_entropy documentation).
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from micromerge.core.errors import MicromergeError
from micromerge.finetune.losses import clip_loss
from micromerge.finetune.trainer import run_finetune
from tests.helpers import stop_at_the_next_save, write_checkpoint
from tests.test_finetune import _png, config, write_csv_folder
from tests.test_streaming import _pipe_spec, write_shards

KEEP = torch.tensor([True, False, True, True, False, True, True])


@pytest.fixture
def base(tmp_path):
    write_checkpoint(tmp_path / "base.safetensors", 0)
    return tmp_path / "base.safetensors"


def _features(rows: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    image = F.normalize(torch.randn(rows, 5), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(rows, 5), dim=-1).requires_grad_()
    return image, text, torch.tensor(10.0, requires_grad=True)


def _grads(*tensors: torch.Tensor) -> list[torch.Tensor]:
    grads = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return grads


def test_the_masked_contrastive_loss_is_the_loss_over_the_readable_pairs_alone():
    """Masked, the loss and every gradient equal those of the kept pairs as a batch of their own;
    the left-out rows get no gradient; with every row kept the numbers are the unmasked ones, bit
    for bit (so a stream without unreadable samples trains as before)."""
    image, text, scale = _features()
    masked = clip_loss(image, text, scale, keep=KEEP)
    masked.backward()
    masked_grads = _grads(image, text, scale)
    alone = clip_loss(image[KEEP], text[KEEP], scale)
    alone.backward()
    alone_grads = _grads(image, text, scale)
    assert masked.item() == pytest.approx(alone.item(), abs=1e-6) and alone.item() > 0
    for got, expected in zip(masked_grads, alone_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not masked_grads[0][~KEEP].any() and not masked_grads[1][~KEEP].any()

    every = clip_loss(image, text, scale, keep=torch.ones(7, dtype=torch.bool))
    every.backward()
    every_grads = _grads(image, text, scale)
    plain = clip_loss(image, text, scale)
    plain.backward()
    assert torch.equal(every, plain)
    assert all(torch.equal(a, b) for a, b in zip(every_grads, _grads(image, text, scale), strict=True))


def test_one_readable_pair_gives_a_zero_loss_and_no_nan():
    """A kept row is compared with kept rows only, and a left-out row is not masked: with one pair
    kept no row is all -inf, so nothing in the gradients is NaN."""
    image, text, scale = _features()
    only = torch.zeros(7, dtype=torch.bool)
    only[3] = True
    loss = clip_loss(image, text, scale, keep=only)
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(g).all() for g in _grads(image, text, scale))


def _spoil(folder, *indices: int) -> None:
    for i in indices:
        (folder / f"img{i}.png").write_bytes(b"not a png")


def test_a_stream_leaves_out_its_unreadable_images_counts_them_and_says_so(tmp_path, base, capsys):
    """It stopped at the first one; a corpus of a million scraped images always holds a few.
    One of 24 (4 %, under the default 5 %) is left out of its step's loss, the run trains, and the
    manifest counts it; the note says so once, naming the file."""
    data = write_csv_folder(tmp_path / "pairs", n=24)
    _spoil(data, 5)
    streamed = dict(data_in_memory="no", workers=0, max_steps=3, progress=True)
    run_finetune(config(base, data, tmp_path / "run", **streamed))
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["corrupt_images_skipped"] == 1 and manifest["data_path"]["in_memory"] is False
    err = capsys.readouterr().err
    assert err.count("note: 1 of the 24 samples read by step 3 were unreadable or without a caption") == 1
    assert f"as a list) (the first: {str(data / 'img5.png')!r}): left out of the loss" in err, "named"
    assert (tmp_path / "run" / "unreadable.txt").read_text() == f"{str(data / 'img5.png')!r}\n"
    assert manifest["corrupt_images_listed"] == "unreadable.txt"
    # the spoilt image is one of step 1's: without it the step trains on its 7 readable pairs
    losses = [
        json.loads(row)["loss"] for row in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
    ]
    assert all(loss > 0 for loss in losses) and len(losses) == 3


def _decompression_bomb() -> bytes:
    """A PNG whose header declares 20,000 x 20,000 pixels, over twice Pillow's MAX_IMAGE_PIXELS:
    Image.open raises DecompressionBombError before reading a pixel (Pillow's documentation of
    Image.open; the PNG chunk layout of the PNG specification, ISO/IEC 15948)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("augment", [(), ("crop", "flip")])
def test_a_decompression_bomb_is_left_out_as_unreadable_with_or_without_augmentation(tmp_path, base, augment):
    """Pillow refuses an image declaring more pixels than any micrograph with an error of its own,
    DecompressionBombError: the augmented path let it through, a traceback that ended the run."""
    data = write_csv_folder(tmp_path / "pairs", n=24)
    (data / "img5.png").write_bytes(_decompression_bomb())
    streamed = dict(data_in_memory="no", workers=0, max_steps=3, augment=augment)
    run_finetune(config(base, data, tmp_path / "run", **streamed))
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["corrupt_images_skipped"] == 1
    assert (tmp_path / "run" / "unreadable.txt").read_text() == f"{str(data / 'img5.png')!r}\n"


def test_an_in_memory_run_counts_no_unreadable_samples_while_it_trains(tmp_path, base, monkeypatch):
    """Decoding in memory drops the unreadable images before the first step, so the stream's
    count (an all-reduce at every loss read of a launch) is not kept: the manifest counts the
    dropped image, and the saved state holds no stream count to resume."""
    from micromerge.finetune.unreadable import UnreadableCount

    def refuse(*_):
        raise AssertionError("an in-memory run counted unreadable samples")

    monkeypatch.setattr(UnreadableCount, "check", refuse)
    data = write_csv_folder(tmp_path / "pairs", n=25)
    _spoil(data, 5)
    interrupted = config(base, data, tmp_path / "run", max_steps=4, save_every=2)
    stop_at_the_next_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(interrupted)
    state = next((tmp_path / "run" / "state").glob("step-*")) / "trainer_state.json"
    assert "unreadable" not in json.loads(state.read_text())
    run_finetune(replace(interrupted, resume=True))
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["corrupt_images_skipped"] == 1 and manifest["data_path"]["in_memory"] is True


def test_more_unreadable_images_than_max_bad_fraction_stop_the_run_in_one_line(tmp_path, base):
    data = write_csv_folder(tmp_path / "pairs", n=24)
    _spoil(data, 2, 9, 17)  # 3 of 24: 12.5 %
    streamed = dict(data_in_memory="no", workers=0, max_steps=3)
    with pytest.raises(
        MicromergeError,
        match=r"^--data .*pairs: 3 of the 24 samples read by step 3 were unreadable or without a caption .*"
        r"\(12\.5%, more than --max-bad-fraction 0\.05; the first: '.*img2\.png', '.*img17\.png', '.*img9\.png'\); "
        r"fix the corpus, or raise --max-bad-fraction to train on the rest \(with --resume: from the last checkpoint\)$",
    ):
        run_finetune(config(base, data, tmp_path / "strict", **streamed))
    assert not (tmp_path / "strict" / "model.safetensors").exists()
    run_finetune(config(base, data, tmp_path / "lenient", max_bad_fraction=0.2, **streamed))
    manifest = json.loads((tmp_path / "lenient" / "manifest.json").read_text())
    assert manifest["corrupt_images_skipped"] == 3


def test_a_batch_with_no_readable_sample_stops_the_run_in_one_line(tmp_path, base):
    data = write_csv_folder(tmp_path / "pairs", n=16)
    _spoil(data, *range(16))
    with pytest.raises(
        MicromergeError,
        match=r"^--data .*pairs: all 8 samples of a batch at step 1 were unreadable or without a caption \(none, "
        r"blank, or a \.json caption that is not text, such as a list\) \(the first: '.*pairs/img\d+\.png', "
        r"'.*pairs/img\d+\.png', '.*pairs/img\d+\.png'\), so the step has nothing to train on "
        r"\(a whole batch is most often a broken shard or folder\); fix the corpus$",
    ):
        run_finetune(config(base, data, tmp_path / "bad", max_steps=2, data_in_memory="no", workers=0))


def test_a_resumed_stream_leaves_out_the_same_samples_and_goes_on_counting(tmp_path, base, monkeypatch):
    data = write_csv_folder(tmp_path / "pairs", n=24)
    _spoil(data, 4, 20)
    streamed = dict(data_in_memory="no", workers=0, max_steps=6, max_bad_fraction=0.1)
    straight = run_finetune(config(base, data, tmp_path / "straight", **streamed))
    interrupted = config(base, data, tmp_path / "resumed", save_every=3, **streamed)
    stop_at_the_next_save(monkeypatch)  # killed right after the checkpoint of step 3 (one epoch)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(interrupted)
    state = next((tmp_path / "resumed" / "state").glob("step-*")) / "trainer_state.json"
    names = [repr(str(data / f"img{i}.png")) for i in (4, 20)]
    saved = json.loads(state.read_text())["unreadable"]
    assert sorted(saved.pop("names")) == sorted(names)  # in the order they were gathered
    assert saved == {"read": 24, "unreadable": 2}
    resumed = run_finetune(replace(interrupted, resume=True))
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for run in ("straight", "resumed"):
        assert json.loads((tmp_path / run / "manifest.json").read_text())["corrupt_images_skipped"] == 4
        # read in both epochs, listed once; the resumed run's list holds those skipped before it
        assert sorted((tmp_path / run / "unreadable.txt").read_text().splitlines()) == sorted(names)


def test_a_run_stopped_by_max_bad_fraction_resumes_with_a_larger_one(tmp_path, base):
    """A long stream stopped for more unreadable images than --max-bad-fraction allowed: the
    message says to raise it, and --resume with the larger one goes on from the last checkpoint
    (the fraction guards the run, it does not change what it trains) and ends where a run with the
    larger one from the start ends. Other settings still refuse a resume."""
    from micromerge.finetune.micro_batches import epoch_order

    data = write_csv_folder(tmp_path / "pairs", n=24)
    _spoil(data, int(epoch_order(24, 0, 0)[8]))  # one image of step 2: 1 of 16 read by then
    streamed = dict(data_in_memory="no", workers=0, max_steps=6, save_every=1)
    stopped = config(base, data, tmp_path / "run", max_bad_fraction=0.03, **streamed)
    with pytest.raises(
        MicromergeError, match=r"1 of the 16 samples read by step 2 .* \(with --resume: from the last"
    ):
        run_finetune(stopped)
    assert (tmp_path / "run" / "state" / "LATEST").read_text() == "step-00000001"
    with pytest.raises(MicromergeError, match="the run there used other settings"):
        run_finetune(replace(stopped, max_bad_fraction=0.1, lr=2e-3, resume=True))
    resumed = run_finetune(replace(stopped, max_bad_fraction=0.1, resume=True))
    straight = run_finetune(config(base, data, tmp_path / "straight", max_bad_fraction=0.1, **streamed))
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    finished = replace(stopped, max_bad_fraction=0.2, resume=True)  # a finished run hands its model back
    assert run_finetune(finished) == resumed


def test_a_state_saved_before_the_guards_left_the_digest_still_resumes(tmp_path, base, monkeypatch):
    """States written by 0.1.13 and earlier digest every hyper-parameter, --max-bad-fraction
    included, and count no unreadable samples: they resume under the same flags as before."""
    from micromerge.core.hashing import sha256_json

    data = write_csv_folder(tmp_path / "pairs", n=24)
    streamed = dict(data_in_memory="no", workers=0, max_steps=6, save_every=3)
    straight = run_finetune(config(base, data, tmp_path / "straight", **streamed))
    interrupted = config(base, data, tmp_path / "old", **streamed)
    stop_at_the_next_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(interrupted)
    state = next((tmp_path / "old" / "state").glob("step-*")) / "trainer_state.json"
    saved = json.loads(state.read_text())
    del saved["unreadable"]
    saved["config_digest"] = sha256_json(interrupted.hyperparameters())
    state.write_text(json.dumps(saved))
    with pytest.raises(MicromergeError, match="the run there used other settings"):
        run_finetune(replace(interrupted, max_bad_fraction=0.1, resume=True))  # as 0.1.13 refused it
    resumed = run_finetune(replace(interrupted, resume=True))
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "caption", [("x.txt", b"  \n"), ("x.json", json.dumps({"caption": ["a smear", "blood cells"]}).encode())]
)
def test_a_streamed_shard_sample_without_a_caption_is_left_out_as_unreadable(tmp_path, base, caption):
    """A sample without a caption (or with a list for one) trained on empty text once; then it
    stopped the run. It is now left out like an unreadable image, and counted the same way."""
    folder = write_shards(tmp_path / "wds", 8, per_shard=8)
    with tarfile.open(folder / "shard-000001.tar", "w") as archive:
        for name, payload in (("x.png", _png(50)), caption):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    values = dict(batch_size=3, max_steps=6, workers=0)
    with pytest.raises(
        MicromergeError, match=r"2 of the 18 samples read by step 6 were unreadable or without a"
    ):
        run_finetune(config(base, _pipe_spec(folder), tmp_path / "strict", **values))
    run_finetune(config(base, _pipe_spec(folder), tmp_path / "run", max_bad_fraction=0.2, **values))
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["corrupt_images_skipped"] == 2


def _corpus_with_a_bad_sixth_image(folder, kind: str) -> None:
    """24 image-caption pairs whose sixth image (sample0005, row 5) is no image: tar shards read
    through their index, or a `save_to_disk` Arrow dataset."""
    import datasets

    images = [_png(i) for i in range(24)]
    images[5] = b"not a png"
    if kind == "arrow":
        features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
        rows = {
            "image": [{"bytes": b, "path": None} for b in images],
            "caption": [f"cells {i}" for i in range(24)],
        }
        datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(folder))
        return
    folder.mkdir()
    with tarfile.open(folder / "shard-000000.tar", "w") as archive:
        for i, image in enumerate(images):
            for suffix, payload in ((".png", image), (".txt", f"cells {i}".encode())):
                info = tarfile.TarInfo(f"sample{i:04d}{suffix}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))


@pytest.mark.parametrize(
    "kind, named", [("tar", "'sample0005' of '{folder}/shard-000000.tar'"), ("arrow", "row 5")]
)
def test_an_indexed_stream_names_the_sample_it_left_out(tmp_path, base, capsys, kind, named):
    """The note names what to fix: a tar member by its key and shard, an Arrow row by its number
    (a table's image by its file: the first test of this module)."""
    _corpus_with_a_bad_sixth_image(tmp_path / "corpus", kind)
    streamed = dict(data_in_memory="no", workers=0, max_steps=3, progress=True)
    run_finetune(config(base, tmp_path / "corpus", tmp_path / "run", **streamed))
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["corrupt_images_skipped"] == 1
    expected = named.format(folder=tmp_path / "corpus")
    assert f"(the first: {expected}): left out of the loss" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["contrastive", "supervised"])
def test_two_processes_leave_out_the_same_samples_as_one_process_of_their_joint_batch(tmp_path, base, mode):
    """Under a launch each process masks its own rows, and the loss is still the one-batch loss
    over every process's readable rows: the contrastive mask is gathered with the features, the
    supervised mean counts every process's readable rows. Two processes of batch 6 read the same
    permutation as one of batch 12, so they end with its weights (to float noise), and the count
    in the manifest is both processes'."""
    from tests.helpers import launch_failure, run_two_processes
    from tests.ubench_fixture import write_fixture

    if mode == "contrastive":
        data = write_csv_folder(tmp_path / "pairs", n=48)
        _spoil(data, 7, 30)
        extra, values = [], {}
    else:  # the fixture writes one corrupt image into each task
        data = write_fixture(tmp_path / "bench", per_class=8, corrupt=1)
        extra, values = ["--task", "kather_et_al_2016"], dict(mode="supervised", task="kather_et_al_2016")
    args = ["finetune", mode, "--base", str(base), "--data", str(data), "--out", str(tmp_path / "ddp"),
            "--max-steps", "4", "--batch-size", "6", "--lr", "1e-3", "--save-every", "0", "--device", "cpu",
            "--data-in-memory", "no", "--workers", "0", "--max-bad-fraction", "0.2", "--quiet", *extra]  # fmt: skip
    result = run_two_processes(*args)
    assert result.returncode == 0, launch_failure(result)
    one = config(base, data, tmp_path / "one", max_steps=4, batch_size=12, data_in_memory="no", workers=0,
                 max_bad_fraction=0.2, **values)  # fmt: skip
    one_weights, two_weights = (
        load_file(str(run_finetune(one))),
        load_file(str(tmp_path / "ddp" / "model.safetensors")),
    )
    manifests = [json.loads((tmp_path / run / "manifest.json").read_text()) for run in ("ddp", "one")]
    assert manifests[0]["corrupt_images_skipped"] == manifests[1]["corrupt_images_skipped"] > 0
    # both processes' skipped samples are listed (in the order they were gathered)
    listed = [sorted((tmp_path / run / "unreadable.txt").read_text().splitlines()) for run in ("ddp", "one")]
    assert listed[0] == listed[1] and listed[0]
    assert len(set(manifests[0]["rank_weight_sha256"])) == 1
    for key in one_weights:
        torch.testing.assert_close(two_weights[key], one_weights[key], rtol=0, atol=5e-6, msg=key)


def test_a_hub_layout_stream_leaves_out_a_null_image_and_one_that_does_not_decode(tmp_path, base):
    """A hub dataset's image cell can be null, or hold bytes that are no image; streamed by
    `datasets`, both are left out and counted like any other unreadable sample (one pass of 40 rows:
    5 steps of 8, stopping before the pass's end, where datasets pauses 5 s)."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    images: list[dict | None] = [{"bytes": _png(i), "path": None} for i in range(40)]
    images[3], images[17] = None, {"bytes": b"no image", "path": None}
    (tmp_path / "repo" / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(
        {"image": images, "caption": [f"caption {i}" for i in range(40)]}, features=features
    ).to_parquet(str(tmp_path / "repo" / "data" / "train.parquet"))
    values = dict(max_steps=5, data_in_memory="no", workers=0, max_bad_fraction=0.1)
    run_finetune(config(base, tmp_path / "repo", tmp_path / "run", **values))
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["corrupt_images_skipped"] == 2
    assert manifest["data_path"]["why"].startswith("a hub-layout dataset of 1 shard streamed by datasets")
