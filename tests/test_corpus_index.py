"""The corpus index of the streaming path (finetune/streaming.py) on its own: how tar members group
into samples, which caption a sample takes, what each kind of fingerprint sees, and how much memory
`--data-in-memory auto` counts on.

Facts from public sources: webdataset shards are plain tar files whose members `KEY.EXT` group into
one sample per KEY, the caption in `.txt` or in the `caption` field of `.json` (webdataset's README
and open_clip_train's data.py, read through the search tool); a tar member's data is padded to
512-byte blocks, so a shard's size does not change when one caption changes by a byte (POSIX ustar).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from micromerge.core.errors import MicromergeError
from micromerge.eval.pairs import load_pairs
from micromerge.finetune.augment import AUGMENTATIONS, augmented_pixels
from micromerge.finetune.shard_stream import _sample_caption
from micromerge.finetune.streaming import (
    IN_MEMORY_BUDGET,
    SampleRecipe,
    StreamedSamples,
    choose_in_memory,
    index_pairs,
    indexed_pairs,
)
from micromerge.finetune.trainer import run_finetune
from tests.helpers import write_checkpoint
from tests.test_finetune import _png, config, write_csv_folder
from tests.test_streaming import write_arrow


def _shard(path: Path, members: list[tuple[str, bytes | None]]) -> Path:
    """A tar shard of these members; a payload of None is a folder member."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            if payload is None:
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    return path


def _streamed_captions(spec: str) -> list[str]:
    samples = StreamedSamples(index_pairs(spec), SampleRecipe(16, (), 0, lambda caption: caption))
    return [samples[(0, i)][1] for i in range(len(samples))]


def test_tar_members_group_by_key_whatever_the_suffixs_case_and_the_txt_caption_comes_first(tmp_path):
    """`a.PNG` + `a.txt`, `b.jpg` + `b.JSON`, and `c` with both a .txt and a .json caption (the .txt
    is the caption, as the plain loader reads it), written c first: samples come in key order on
    every path, so the index, its in-memory read and the streamed samples agree with `load_pairs`."""
    shard = _shard(
        tmp_path / "wds" / "shard-000000.tar",
        [
            ("c.png", _png(2)),
            ("c.json", json.dumps({"caption": "the json's caption of c"}).encode()),
            ("c.txt", b"the txt's caption of c"),
            ("a.PNG", _png(0)),
            ("a.txt", b"caption of a"),
            ("b.jpg", _png(1)),
            ("b.JSON", json.dumps({"caption": "caption of b", "text": "not this"}).encode()),
        ],
    )
    expected = ["caption of a", "caption of b", "the txt's caption of c"]
    assert load_pairs(str(shard.parent)).captions == expected
    index = index_pairs(str(shard.parent))
    assert index.kind == "tar" and len(index) == 3
    assert indexed_pairs(index).captions == expected
    assert _streamed_captions(str(shard.parent)) == expected
    assert [p["bytes"] for p in indexed_pairs(index).payloads] == [_png(0), _png(1), _png(2)]


def test_a_link_or_folder_member_of_a_shard_is_no_image_as_for_webdataset(tmp_path):
    """A shard packed with `tar` from a folder of links holds symlink members (and folder members):
    webdataset's tar iterator keeps regular members only (`tarinfo.isreg()`, webdataset 0.2.86
    tariterators.py), so the pipeline streams sample b with its caption and no image. Every reader
    here refuses that sample in one line rather than reading the link's target (b would be trained
    on a's pixels) or indexing its zero bytes as an image."""
    import webdataset as wds

    shard = tmp_path / "wds" / "shard-000000.tar"
    _shard(
        shard, [("a.png", _png(0)), ("a.txt", b"caption of a"), ("b.txt", b"caption of b"), ("c.png", None)]
    )
    with tarfile.open(shard, "a") as archive:
        link = tarfile.TarInfo("b.png")
        link.type, link.linkname = tarfile.SYMTYPE, "a.png"
        archive.addfile(link)
    streamed = list(wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples()))
    assert [sorted(k for k in s if not k.startswith("__")) for s in streamed] == [["png", "txt"], ["txt"]]
    with pytest.raises(MicromergeError, match=r"shard-000000.tar: sample b has a caption but no image"):
        load_pairs(str(shard.parent))
    with pytest.raises(MicromergeError, match=r"shard-000000.tar: sample b needs an image and a caption"):
        index_pairs(str(shard.parent))


def test_folder_members_of_a_shard_packed_from_folders_are_passed_over_not_the_end(tmp_path):
    """`tar cf shard.tar pairs/ more/` writes each folder's own member before its files (POSIX
    ustar: a directory is a typeflag-5 member). Every reader passes over such a member and goes on
    reading: the samples after a folder member are the corpus, on the plain and the indexed path."""
    shard = _shard(
        tmp_path / "wds" / "shard-000000.tar",
        [
            ("pairs/", None),
            ("pairs/a.png", _png(0)),
            ("pairs/a.txt", b"caption of a"),
            ("more/", None),
            ("more/b.png", _png(1)),
            ("more/b.txt", b"caption of b"),
        ],
    )
    expected = ["caption of b", "caption of a"]  # in key order: more/b before pairs/a
    assert load_pairs(str(shard.parent)).captions == expected
    assert indexed_pairs(index_pairs(str(shard.parent))).captions == expected


def test_a_tar_fingerprint_sees_a_caption_changed_inside_an_unchanged_shard_size(tmp_path):
    def write(caption: bytes) -> str:
        _shard(tmp_path / "wds" / "shard-000000.tar", [("a.png", _png(0)), ("a.txt", caption)])
        return index_pairs(str(tmp_path / "wds")).fingerprint

    shard = tmp_path / "wds" / "shard-000000.tar"
    first = write(b"tumor")
    size = shard.stat().st_size
    assert write(b"tumour") != first and shard.stat().st_size == size


def test_a_table_fingerprint_sees_an_image_replaced_under_its_name(tmp_path):
    """The table is unchanged; the fingerprint reads image names and sizes, not their bytes."""
    data = write_csv_folder(tmp_path / "pairs", n=6)
    before = index_pairs(str(data)).fingerprint
    (data / "img3.png").write_bytes(_png(40) + b"\0" * 7)
    assert index_pairs(str(data)).fingerprint != before


def test_an_arrow_fingerprint_sees_its_data_file_rewritten_under_the_same_state(tmp_path):
    """save_to_disk's state.json carries the dataset's fingerprint; an Arrow file copied over from
    another dataset keeps that state, and the index must still tell them apart."""
    data = write_arrow(tmp_path / "arrow", 6)
    before = index_pairs(str(data)).fingerprint
    other = write_arrow(tmp_path / "other", 9)
    (arrow_file,) = data.glob("*.arrow")
    shutil.copyfile(next(other.glob("*.arrow")), arrow_file)
    assert index_pairs(str(data)).fingerprint != before


def test_an_arrow_fingerprint_sees_other_captions_of_the_same_length(tmp_path):
    """Two saved datasets whose files have the same names and sizes (captions of equal length) are
    two corpora: the dataset's own fingerprint (datasets hashes its content) tells them apart."""
    import datasets

    def saved(folder: Path, captions: list[str]) -> str:
        features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
        rows = {"image": [{"bytes": _png(i), "path": None} for i in range(2)], "caption": captions}
        datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(folder))
        return index_pairs(str(folder)).fingerprint

    first = saved(tmp_path / "a", ["tumor one", "tumor two"])
    second = saved(tmp_path / "b", ["tumor uno", "tumor dos"])
    sizes = [sorted((f.name, f.stat().st_size) for f in (tmp_path / d).glob("*.arrow")) for d in "ab"]
    assert sizes[0] == sizes[1] and first != second


def test_a_caption_table_beside_tar_shards_is_the_corpus_on_every_path(tmp_path):
    """A folder with captions.csv and a stray .tar (an archive of the same images, say): the plain
    loader reads the table, and so does the index, or the two paths would train on different data."""
    folder = write_csv_folder(tmp_path / "pairs", n=4)
    _shard(folder / "backup.tar", [("x.png", _png(9)), ("x.txt", b"not the corpus")])
    index = index_pairs(str(folder))
    assert index.kind == "table" and indexed_pairs(index).captions == load_pairs(str(folder)).captions


def test_auto_counts_three_bytes_a_pixel_against_the_budget():
    """uint8 RGB: 224 x 224 x 3 = 150,528 bytes an image; 28,532 images fit in 4 GiB, 28,533 do not."""
    assert IN_MEMORY_BUDGET == 4 << 30
    fits, why = choose_in_memory("auto", 28_532, 224, ())
    assert fits and why == "the decoded images take 4096 MiB, within 4 GiB"
    assert choose_in_memory("auto", 1000, 224, ()) == (True, "the decoded images take 144 MiB, within 4 GiB")
    assert choose_in_memory("auto", 28_533, 224, ()) == (
        False,
        "the decoded images would take 4.0 GiB, over 4 GiB",
    )


def test_a_streamed_json_caption_is_read_from_its_caption_field(tmp_path):
    shard = _shard(
        tmp_path / "wds" / "shard-000000.tar",
        [("a.png", _png(0)), ("a.json", json.dumps({"caption": " an H&E tile ", "key": "a"}).encode())],
    )
    assert _streamed_captions(str(shard.parent)) == ["an H&E tile"]


def test_an_empty_caption_stops_both_paths_naming_the_sample(tmp_path):
    """Captions are read when the shards are indexed, so an empty one stops the run with one line
    before training, streamed as in memory (streamed, it was trained on as empty text: a worker
    cannot stop the run with one line). A `.txt` left empty with a `.json` caption beside it takes
    the `.json`'s, as the plain tar reader does."""
    base = tmp_path / "base.safetensors"
    write_checkpoint(base, 0)
    shard = _shard(tmp_path / "wds" / "shard-000000.tar", [("a.png", _png(0)), ("a.txt", b"  \n")])
    for in_memory in ("yes", "no"):
        with pytest.raises(
            MicromergeError, match=r"shard-000000.tar: sample a has an image but no caption \(.txt\)"
        ):
            run_finetune(config(base, shard.parent, tmp_path / f"run-{in_memory}", data_in_memory=in_memory))
    both = _shard(
        tmp_path / "both" / "shard-000000.tar",
        [("a.png", _png(0)), ("a.txt", b""), ("a.json", json.dumps({"caption": "from the json"}).encode())],
    )
    assert index_pairs(str(both.parent)).targets == ["from the json"] == load_pairs(str(both.parent)).captions


def _asymmetric_png(size: int = 16) -> bytes:
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[0, :, 0] = 255  # a red top row
    pixels[:, 0, 1] = 200  # a green left column
    pixels[size - 3, size - 2, 2] = 90
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_rot90_draws_each_of_the_four_quarter_turns():
    payload = {"bytes": _asymmetric_png(), "path": None}
    original = augmented_pixels(payload, 16, (), 0)
    turns = {augmented_pixels(payload, 16, ("rot90",), seed).tobytes() for seed in range(40)}
    assert turns == {np.ascontiguousarray(np.rot90(original, k, axes=(1, 2))).tobytes() for k in range(4)}


def test_augmentations_apply_in_the_order_named_from_the_one_seed():
    """`augment = ["flip", "rot90"]` flips, then turns, both drawn from the sample's seed in turn."""
    payload = {"bytes": _asymmetric_png(), "path": None}

    def by_hand(names: tuple[str, ...], seed: int) -> bytes:
        image = Image.open(io.BytesIO(payload["bytes"])).convert("RGB")
        torch.random.default_generator.manual_seed(seed)
        for name in names:
            image = AUGMENTATIONS[name](16)(image)
        return np.asarray(image).transpose(2, 0, 1).tobytes()

    orders = [("flip", "rot90"), ("rot90", "flip")]
    for seed in range(6):
        for names in orders:
            assert augmented_pixels(payload, 16, names, seed).tobytes() == by_hand(names, seed)
    assert any(by_hand(orders[0], seed) != by_hand(orders[1], seed) for seed in range(6))


def test_augmentation_without_a_crop_fits_the_image_as_the_in_memory_path_does():
    """`augment = ["flip"]` on a 24 x 10 image: flipped, then resized and centre-cropped to the
    training size like every decoded image, not handed on at its own size."""
    from micromerge.eval.images import decode_one

    pixels = np.random.default_rng(0).integers(0, 256, (10, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    payload = {"bytes": buffer.getvalue(), "path": None}
    for seed in range(4):
        torch.random.default_generator.manual_seed(seed)
        flipped = AUGMENTATIONS["flip"](16)(Image.open(io.BytesIO(payload["bytes"])).convert("RGB"))
        out = io.BytesIO()
        flipped.save(out, format="PNG")
        expected = decode_one({"bytes": out.getvalue(), "path": None}, 16)
        got = augmented_pixels(payload, 16, ("flip",), seed)
        assert got.shape == (3, 16, 16) and np.array_equal(got, expected)


def test_the_crop_is_open_clip_trainings_own():
    """`crop` is the RandomResizedCrop that open_clip's training transform starts with: same size,
    scale, ratio and interpolation (asked of the installed open_clip, not copied from it)."""
    import open_clip
    from torchvision.transforms import RandomResizedCrop

    theirs = next(
        t
        for t in open_clip.image_transform(224, is_train=True).transforms
        if isinstance(t, RandomResizedCrop)
    )
    ours = AUGMENTATIONS["crop"](224)
    assert (ours.size, ours.scale, ours.ratio, ours.interpolation) == (
        theirs.size,
        theirs.scale,
        theirs.ratio,
        theirs.interpolation,
    )


def test_the_every_byte_fingerprint_sees_a_caption_changed_under_the_same_images(tmp_path):
    data = write_csv_folder(tmp_path / "pairs", n=6)
    before = load_pairs(str(data)).fingerprint()
    table = data / "captions.csv"
    header, first, *rest = table.read_text().splitlines()
    table.write_text("\n".join([header, first.replace(",", ",an edited caption: ", 1), *rest]) + "\n")
    assert load_pairs(str(data)).captions[0].startswith("an edited caption: ")
    assert load_pairs(str(data)).fingerprint() != before


def test_blank_lines_in_a_jsonl_table_are_no_rows(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    for i in range(2):
        (folder / f"{i}.png").write_bytes(_png(i))
    rows = [json.dumps({"image": f"{i}.png", "caption": f"caption {i}"}) for i in range(2)]
    (folder / "captions.jsonl").write_text(f"{rows[0]}\n\n   \n{rows[1]}\n\n")
    assert load_pairs(str(folder)).captions == ["caption 0", "caption 1"]


def test_samples_of_a_shard_stream_draw_their_own_augmentation(tmp_path):
    """The draw is seeded by (seed, pass, shard, key): six copies of one image under six keys are not
    augmented one way. (Not "six ways": the shard's path is in the seed, and two of six crops of a
    small image may coincide.)"""
    import webdataset as wds

    from micromerge.finetune.shard_stream import ShardStream, _StreamDecoder
    from tests.test_streaming import _pipe_spec

    members = [
        (f"s{i}{suffix}", payload)
        for i in range(6)
        for suffix, payload in ((".png", _png(0)), (".txt", b"x"))
    ]
    folder = _shard(tmp_path / "wds" / "shard-000000.tar", members).parent
    stream = ShardStream(
        _pipe_spec(folder), SampleRecipe(32, ("crop", "flip"), 0, lambda caption: torch.tensor(0))
    )
    batches = wds.DataPipeline(
        wds.SimpleShardList(stream.urls), wds.tarfile_to_samples(), wds.batched(6, collation_fn=list)
    )
    images = [image for pixels, *_ in _StreamDecoder(stream, skip=0)(iter(batches)) for image in pixels]
    assert len(images) == 6 and len({image.numpy().tobytes() for image in images}) > 1


def test_a_bad_table_row_is_named_by_its_line_in_the_file(tmp_path):
    """CSV: the header is line 1, so the second data row is line 3; JSONL: blank lines count (what an
    editor shows; the JSONL count used to skip them and name the wrong line)."""
    folder = write_csv_folder(tmp_path / "csv", n=3)
    table = folder / "captions.csv"
    header, first, second, third = table.read_text().splitlines()
    table.write_text("\n".join([header, first, "," + second.split(",", 1)[1], third]) + "\n")
    with pytest.raises(MicromergeError, match=r"captions.csv: line 3 has a caption but no image"):
        load_pairs(str(folder))
    table.write_text("\n".join([header, first, second.split(",", 1)[0] + ",", third]) + "\n")
    with pytest.raises(MicromergeError, match=r"captions.csv: line 3: image img1.png has no caption"):
        load_pairs(str(folder))
    (folder / "lines.jsonl").write_text('{"image": "img0.png", "caption": "a"}\n\n{"image": "img1.png"}\n')
    with pytest.raises(MicromergeError, match=r"lines.jsonl: line 3: image img1.png has no caption"):
        load_pairs(str(folder / "lines.jsonl"))


def test_an_arrow_corpus_caption_is_stripped_and_a_missing_one_named_on_every_path(tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})

    def corpus(name: str, captions: list) -> str:
        rows = {"image": [{"bytes": _png(i), "path": None} for i in range(3)], "caption": captions}
        datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / name))
        return str(tmp_path / name)

    padded = corpus("padded", ["  stroma ", "tumor\n", "adipose"])
    assert index_pairs(padded).targets == load_pairs(padded).captions == ["stroma", "tumor", "adipose"]
    for captions in (["stroma", None, "adipose"], ["stroma", "  ", "adipose"]):
        missing = corpus("missing", captions)
        for read in (load_pairs, index_pairs):
            with pytest.raises(MicromergeError, match="missing: row 1 has an image but no caption"):
                read(missing)


def test_a_caption_that_is_not_text_is_refused_on_every_path_not_trained_on_as_its_repr(tmp_path):
    """Caption datasets often hold several captions per image (a list column), and a JSONL or a
    shard's `.json` may hold a number where text belongs. Each was turned into its Python repr and
    trained on silently ("['a smear', 'blood cells']" as one caption); now one line names it, before
    training: a dataset's column by its type (streamed from the hub layout too), a table's or
    shard's caption by its line or sample."""
    import datasets

    from micromerge.finetune.hub_stream import HubStream
    from tests.test_hub_stream import write_hub_repo

    listed = datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string"))}
    )
    rows = {"image": [{"bytes": _png(i), "path": None} for i in range(2)], "caption": [["a", "b"], ["c"]]}
    datasets.Dataset.from_dict(rows, features=listed).save_to_disk(str(tmp_path / "listed"))
    for read in (load_pairs, index_pairs):
        with pytest.raises(
            MicromergeError,
            match=rf"listed: caption column 'caption' holds {re.escape(str(listed['caption']))}, not text",
        ):
            read(str(tmp_path / "listed"))
    repo = write_hub_repo(tmp_path / "repo", 4)
    with pytest.raises(MicromergeError, match=r"caption column 'image' holds Image\(.*\), not text"):
        HubStream(f"{repo}#caption=image", SampleRecipe(32, (), 0, lambda texts: texts))

    folder = write_csv_folder(tmp_path / "jsonl", n=2)
    table = folder / "lines.jsonl"
    table.write_text('{"image": "img0.png", "caption": "a"}\n{"image": "img1.png", "caption": ["b", "c"]}\n')
    for read in (load_pairs, index_pairs):
        with pytest.raises(
            MicromergeError,
            match=r"lines.jsonl: line 2: column 'caption': the caption is not text but list \['b', 'c'\]",
        ):
            read(str(table))
    many = json.dumps({"image": "img0.png", "caption": [f"caption {i}" for i in range(1000)]})
    table.write_text(many + "\n")
    with pytest.raises(MicromergeError) as caught:
        load_pairs(str(table))
    assert "not text but list ['caption 0', 'caption 1'," in str(caught.value)
    assert len(str(caught.value)) < 400, "a thousand captions quoted whole is no one-line error"
    table.write_text('{"image": "img0.png", "caption": 7}\n')
    with pytest.raises(
        MicromergeError, match=r"line 1: column 'caption': the caption is not text but int 7; give one"
    ):
        load_pairs(str(table))

    shard = _shard(
        tmp_path / "wds" / "shard-000000.tar",
        [("a.png", _png(0)), ("a.json", json.dumps({"caption": ["x", "y"]}).encode())],
    )
    for read in (load_pairs, index_pairs):
        with pytest.raises(
            MicromergeError, match=r"shard-000000.tar: sample a: the caption is not text but list"
        ):
            read(str(shard.parent))
    assert _sample_caption({"json": json.dumps({"caption": ["x"]}).encode()}) == "", (
        "a remote stream's worker takes it as no caption: the step that meets it stops the run"
    )


@pytest.mark.parametrize("form", ["bytes", "struct", "path"])
def test_a_datasets_images_as_bytes_structs_or_paths_read_alike_and_a_number_column_is_refused(
    tmp_path, form
):
    """What `datasets.Image` casts from is an image column: encoded bytes, the {bytes, path} struct
    that parquet written without datasets' metadata holds, or paths (in memory, bytes and structs
    were taken for paths). A column of numbers failed inside pyarrow's cast; now one line."""
    import datasets

    (tmp_path / "img.png").write_bytes(_png(0))
    images = {
        "bytes": [_png(0), _png(1)],
        "struct": [{"bytes": _png(0), "path": None}, {"bytes": _png(1), "path": None}],
        "path": [str(tmp_path / "img.png")] * 2,
    }[form]
    datasets.Dataset.from_dict({"image": images, "caption": ["a", "b"]}).save_to_disk(str(tmp_path / form))
    read = [load_pairs(str(tmp_path / form)), indexed_pairs(index_pairs(str(tmp_path / form)))]
    expected = [_png(0), _png(1)] if form != "path" else [_png(0)] * 2
    for pairs in read:
        assert [p["bytes"] or Path(p["path"]).read_bytes() for p in pairs.payloads] == expected
    datasets.Dataset.from_dict({"image": [0, 1], "caption": ["a", "b"]}).save_to_disk(
        str(tmp_path / "numbers")
    )
    # a struct, but not datasets' {bytes, path}: a web corpus's {url, width} is no image column
    web = [{"url": "https://example.org/a.png", "width": 32}] * 2
    datasets.Dataset.from_dict({"image": web, "caption": ["a", "b"]}).save_to_disk(str(tmp_path / "web"))
    for load in (load_pairs, index_pairs):
        with pytest.raises(MicromergeError, match=r"image column 'image' holds \{.*'url'.*, not images"):
            load(str(tmp_path / "web"))
    for load in (load_pairs, index_pairs):
        with pytest.raises(
            MicromergeError,
            match=rf"image column 'image' holds {re.escape(str(datasets.Value('int64')))}, not images or their paths",
        ):
            load(str(tmp_path / "numbers"))


def test_a_saved_dataset_dict_corpus_trains_on_its_train_split(tmp_path):
    """What `load_dataset(...).save_to_disk` writes (dataset_dict.json, a folder per split) is indexed
    like a saved Dataset, memory-mapped; whichever split comes first (here validation), the train
    split is the corpus. (It used to be read whole into memory as a hub dataset's bytes.)"""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})

    def split(captions: list[str]) -> datasets.Dataset:
        images = [{"bytes": _png(i), "path": None} for i in range(len(captions))]
        return datasets.Dataset.from_dict({"image": images, "caption": captions}, features=features)

    folder = tmp_path / "dict"
    datasets.DatasetDict({"validation": split(["held out"]), "train": split(["one", "two"])}).save_to_disk(
        str(folder)
    )
    assert load_pairs(str(folder)).captions == ["one", "two"]
    index = index_pairs(str(folder))
    assert index.kind == "arrow" and index.targets == ["one", "two"], "memory-mapped, not read into memory"
    assert [p["bytes"] for p in indexed_pairs(index).payloads] == [_png(0), _png(1)]
    samples = StreamedSamples(index, SampleRecipe(16, (), 0, lambda caption: caption))
    assert [samples[(0, i)][1] for i in range(2)] == ["one", "two"]
    before = index.fingerprint
    split(["one", "two", "three"]).save_to_disk(str(folder / "train"))
    assert index_pairs(str(folder)).fingerprint != before, "the train split's own files are fingerprinted"
    # no train split: the only one is the corpus; several, and none is taken silently
    only, several = tmp_path / "only", tmp_path / "several"
    datasets.DatasetDict({"validation": split(["held out"])}).save_to_disk(str(only))
    assert load_pairs(str(only)).captions == ["held out"]
    datasets.DatasetDict({"validation": split(["a"]), "test": split(["b"])}).save_to_disk(str(several))
    for read in (load_pairs, index_pairs):
        with pytest.raises(MicromergeError, match="splits validation, test and none named train"):
            read(str(several))


def test_a_shard_streams_captions_are_stripped_as_the_indexed_paths_are(tmp_path):
    import webdataset as wds

    from micromerge.finetune.shard_stream import ShardStream, _StreamDecoder
    from tests.test_streaming import _pipe_spec

    folder = _shard(
        tmp_path / "wds" / "shard-000000.tar", [("a.png", _png(0)), ("a.txt", b"  padded caption \n")]
    )
    stream = ShardStream(_pipe_spec(folder.parent), SampleRecipe(32, (), 0, lambda caption: caption))
    batches = wds.DataPipeline(
        wds.SimpleShardList(stream.urls), wds.tarfile_to_samples(), wds.batched(1, collation_fn=list)
    )
    ((_, targets, *_),) = list(_StreamDecoder(stream, skip=0)(iter(batches)))
    assert list(targets) == ["padded caption"] == _streamed_captions(str(folder.parent))


def test_unreadable_images_are_dropped_with_their_own_targets_up_to_the_fraction_allowed():
    """`--max-bad-fraction 0.25`: one bad image of four is allowed (not more than a quarter), two are
    not; the images kept keep their own captions."""
    from micromerge.eval.pairs import decode_checked

    good = [{"bytes": _png(i), "path": None} for i in range(4)]
    bad = {"bytes": b"not an image", "path": None}
    kept = decode_checked([good[0], bad, good[2], good[3]], ["a", "b", "c", "d"], 16, 0.25, "corpus", False)
    assert kept.targets == ["a", "c", "d"] and kept.n_corrupt == 1 and kept.pixels.shape == (3, 3, 16, 16)
    assert np.array_equal(
        kept.pixels[1], decode_checked([good[2]], ["c"], 16, 0.0, "corpus", False).pixels[0]
    )
    with pytest.raises(
        MicromergeError,
        match=r"^--data corpus: 2 of 4 images are unreadable \(more than --max-bad-fraction 0\.25\), "
        r"the first row 1, row 2; fix or remove them$",
    ):
        decode_checked([good[0], bad, bad, good[3]], ["a", "b", "c", "d"], 16, 0.25, "corpus", False)
    # by file where the payload names one; the first three of them
    named = [{"path": f"img/{i}.png", "bytes": None} for i in range(5)]
    with pytest.raises(MicromergeError, match=r"the first 'img/0\.png', 'img/1\.png', 'img/2\.png'; fix"):
        decode_checked(named, list("abcde"), 16, 0.25, "corpus", False)


def test_a_null_image_of_an_arrow_corpus_is_unreadable_on_every_path(tmp_path):
    """An Arrow corpus may hold a null image cell (datasets writes None for a missing image). Read
    undecoded it is no payload at all: the augmented path opened `None` (an AttributeError in a
    DataLoader worker, a traceback); it is an unreadable image like any other, on every path, so
    the trainer stops on it with its one line (or the in-memory path drops it)."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    rows = {"image": [{"bytes": _png(0), "path": None}, None, {"bytes": _png(1), "path": None}]}
    datasets.Dataset.from_dict({**rows, "caption": ["a", "b", "c"]}, features=features).save_to_disk(
        str(tmp_path / "arrow")
    )
    index = index_pairs(str(tmp_path / "arrow"))
    for augment in ((), ("flip",), ("crop", "rot90")):
        samples = StreamedSamples(index, SampleRecipe(16, augment, 0, lambda caption: caption))
        assert [bool(samples[(0, i)][2]) for i in range(3)] == [True, False, True], augment
    from micromerge.eval.pairs import decode_checked

    pairs = indexed_pairs(index)
    kept = decode_checked(pairs.payloads, pairs.captions, 16, 0.5, "corpus", False)
    assert kept.targets == ["a", "c"] and kept.n_corrupt == 1


def test_a_broken_json_caption_stops_both_paths_before_training(tmp_path):
    """A .json that is not JSON is a one-line error when the shards are indexed, so on the streamed
    path too (it used to stream as an empty caption: a worker cannot stop the run with one line)."""
    shard = _shard(
        tmp_path / "wds" / "shard-000000.tar", [("a.png", _png(0)), ("a.json", b'{"caption": "cut')]
    )
    with pytest.raises(MicromergeError, match=r"shard-000000.tar: sample a: .json is not valid JSON"):
        index_pairs(str(shard.parent))


@pytest.mark.parametrize("header", ["filename,captions", "filepath,text", "path,caption", "file,text"])
def test_a_caption_table_names_its_columns_as_common_corpora_do(tmp_path, header):
    """The image and caption columns go by several names (eval/pairs.py IMAGE_COLUMNS and
    CAPTION_COLUMNS, as README says): each pair is read."""
    folder = write_csv_folder(tmp_path / "pairs", n=3)
    table = folder / "captions.csv"
    table.write_text("\n".join([header, *table.read_text().splitlines()[1:]]) + "\n")
    assert (
        load_pairs(str(folder)).captions
        == load_pairs(str(write_csv_folder(tmp_path / "plain", n=3))).captions
    )


def test_a_folder_with_both_tables_reads_the_csv_and_an_empty_shard_set_is_no_corpus(tmp_path):
    folder = write_csv_folder(tmp_path / "pairs", n=3)
    (folder / "captions.jsonl").write_text(json.dumps({"image": "img0.png", "caption": "from jsonl"}) + "\n")
    assert len(load_pairs(str(folder)).captions) == 3
    _shard(tmp_path / "empty" / "shard-000000.tar", [])
    with pytest.raises(MicromergeError, match="empty: the dataset is empty"):
        load_pairs(str(tmp_path / "empty"))


def test_a_tables_image_names_are_read_without_the_spaces_around_them(tmp_path):
    """A table written by hand or by a spreadsheet with a space after each comma (`img0.png, a
    smear`): the image is `img0.png`, as the caption is `a smear`."""
    folder = write_csv_folder(tmp_path / "pairs", n=2)
    (folder / "captions.csv").write_text("image,caption\n img0.png , a smear\nimg1.png,b\n")
    pairs = load_pairs(str(folder))
    assert [Path(p["path"]).name for p in pairs.payloads] == ["img0.png", "img1.png"]
    assert pairs.captions == ["a smear", "b"]


def test_a_folders_shards_are_read_in_the_order_of_their_names(tmp_path, monkeypatch):
    """A folder lists its files in whatever order the file system keeps (ext4: by hash): read so,
    the same corpus would be another sample order and another fingerprint on another machine."""
    for name, caption in (("shard-1.tar", b"one"), ("shard-0.tar", b"zero"), ("shard-2.tar", b"two")):
        _shard(tmp_path / "wds" / name, [("a.png", _png(0)), ("a.txt", caption)])
    listed = Path.glob
    monkeypatch.setattr(Path, "glob", lambda self, pattern: reversed(sorted(listed(self, pattern))))
    assert load_pairs(str(tmp_path / "wds")).captions == ["zero", "one", "two"]
