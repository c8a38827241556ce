"""Caption tables and datasets written for other tools: their column names, separators and image
folders, found by the usual names or named after `#` in the corpus spec (eval.pairs.CorpusSpec),
for `finetune` and for the corpora Fisher/RegMean estimate statistics on."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import datasets
import pytest
from click.testing import CliRunner
from PIL import Image

from micromerge.cli import cli
from micromerge.core.errors import MicromergeError
from micromerge.eval.corpus_questions import open_corpus
from micromerge.eval.pairs import CorpusSpec, load_pairs
from micromerge.finetune.hub_stream import HubStream, is_hub_layout
from micromerge.finetune.streaming import SampleRecipe, index_pairs, indexed_pairs
from tests.helpers import write_checkpoint
from tests.test_finetune import CAPTIONS, _png
from tests.test_hub_stream import write_hub_repo

# quilt_1M_lookup.csv's header, as a public Quilt-1M processing script prints it (`pd.read_csv(...)
# .columns`, where pandas names the unnamed index column 'Unnamed: 0': the file's first header field
# is empty, as `DataFrame.to_csv` writes an index). Images are `[ID]_image_[UUID].jpg` files in a
# `quilt_1m/` folder beside the table (a public Quilt-1M repository's README lays it out so).
QUILT_COLUMNS = ["", "caption", "image_path", "subset", "split", "pathology", "roi_text", "noisy_text",
                 "corrected_text", "med_umls_ids", "magnification", "height", "width"]  # fmt: skip
QUILT_CAPTIONS = [
    'The "signet ring" cells, with mucin, push the nucleus aside',
    "Here, at 40x: a mitotic figure; note the spindle",
    "Sheets of lymphocytes, in the germinal centre",
]


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(_png(seed))).convert("RGB").save(buffer, format="JPEG")
    return buffer.getvalue()


def write_quilt_copy(root: Path) -> Path:
    """A Quilt-1M copy laid out as published: the lookup table at the top, the images beside it."""
    (root / "quilt_1m").mkdir(parents=True)
    with open(root / "quilt_1M_lookup.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(QUILT_COLUMNS)
        for i, caption in enumerate(QUILT_CAPTIONS):
            name = f"{1000 + i}_image_0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f{i}.jpg"
            (root / "quilt_1m" / name).write_bytes(_jpeg(i))
            writer.writerow([i, caption, name, "youtube", "train", "['Gastrointestinal']", "['roi']",
                             f"noisy, {caption}", f"corrected, {caption}", "['C0007097', 'C0017189']",
                             0, 882, 1300])  # fmt: skip
    return root / "quilt_1M_lookup.csv"


def write_open_clip_csv(folder: Path) -> Path:
    """A table as open_clip_train reads it by default: tab-separated `filepath` and `title`
    columns in a file named .csv; captions hold commas, so a comma reader would split them."""
    folder.mkdir(parents=True)
    with open(folder / "train.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["filepath", "title"])
        for i in range(4):
            (folder / f"img{i}.png").write_bytes(_png(i))
            writer.writerow([str(folder / f"img{i}.png"), f"{CAPTIONS[i]}, H&E, 20x"])
    return folder / "train.csv"


def test_quilt_1m_lookup_table_is_read_as_published_with_its_image_folder_named(tmp_path):
    table = write_quilt_copy(tmp_path / "quilt")
    pairs = load_pairs(f"{table}#root=quilt_1m")
    assert pairs.captions == QUILT_CAPTIONS  # `caption`, not roi_text, noisy_text or corrected_text
    assert [Path(p["path"]).parent for p in pairs.payloads] == [
        (tmp_path / "quilt" / "quilt_1m").resolve()
    ] * 3
    assert [Path(p["path"]).read_bytes() for p in pairs.payloads] == [_jpeg(i) for i in range(3)]
    with pytest.raises(
        MicromergeError, match=r"line 2: caption for image 1000_image_.*jpg but the file does not exist"
    ):
        load_pairs(str(table))  # without root=, the images are looked for beside the table
    with pytest.raises(MicromergeError, match=r"#root=images: no folder .*quilt/images$"):
        load_pairs(f"{table}#root=images")


def test_open_clip_trains_default_table_is_read_as_open_clip_train_reads_it(tmp_path):
    """open_clip_train's defaults (params.py: --csv-separator tab, --csv-img-key filepath,
    --csv-caption-key title) asked of the installed open_clip_train, and its own CsvDataset read
    the same file: the same images and captions come back here without any option."""
    from open_clip_train.data import CsvDataset
    from open_clip_train.params import parse_args

    defaults = parse_args([])
    table = write_open_clip_csv(tmp_path / "oc")
    theirs = CsvDataset(
        str(table), None, defaults.csv_img_key, defaults.csv_caption_key, sep=defaults.csv_separator
    )
    ours = load_pairs(str(table))
    assert ours.captions == [str(c) for c in theirs.captions] and len(ours.captions) == 4
    assert [p["path"] for p in ours.payloads] == [str(Path(i).resolve()) for i in theirs.images]
    assert index_pairs(str(table)).targets == ours.captions  # the streaming index reads it alike


def test_named_columns_and_separator_override_what_the_header_suggests(tmp_path):
    """A pipe table whose header has as many commas as pipes: the header's tie goes to comma, so
    its columns are named after '#'. A decoy `image` column shows the named one is read."""
    folder = tmp_path / "t"
    folder.mkdir()
    lines = ["img|notes (a, b, c, d)|description|image"]  # three pipes, three commas
    for i in range(3):
        (folder / f"p{i}.png").write_bytes(_png(i))
        lines.append(f"p{i}.png|n|{CAPTIONS[i]}, stained|missing.png")
    (folder / "pairs.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(
        MicromergeError, match=r"pairs.csv: no image column .*found \['img\|notes \(a', ' b', ' c', ' d\)"
    ):
        load_pairs(str(folder / "pairs.csv"))
    pairs = load_pairs(f"{folder / 'pairs.csv'}#sep=pipe,image=img,caption=description")
    assert pairs.captions == [f"{c}, stained" for c in CAPTIONS[:3]]
    assert [Path(p["path"]).name for p in pairs.payloads] == ["p0.png", "p1.png", "p2.png"]


def test_a_tsv_table_and_a_folders_captions_tsv_are_tab_separated(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    rows = ["image\tcaption", *(f"i{i}.png\t{CAPTIONS[i]}, a, b" for i in range(2))]
    for i in range(2):
        (folder / f"i{i}.png").write_bytes(_png(i))
    (folder / "captions.tsv").write_text("\n".join(rows) + "\n")
    assert load_pairs(str(folder)).captions == [f"{c}, a, b" for c in CAPTIONS[:2]]
    (folder / "pairs.tsv").write_text("image,caption\ni0.png,x\n")  # .tsv: tab whatever the header holds
    with pytest.raises(MicromergeError, match=r"no image column .*found \['image,caption'\]"):
        load_pairs(str(folder / "pairs.tsv"))


@pytest.mark.parametrize(
    "suffix, message",
    [
        (
            "#image",
            r"'image' after '#': expected image=COLUMN, caption=COLUMN, sep=comma\|tab\|semicolon\|pipe",
        ),
        ("#colour=red", r"'colour=red' after '#'"),
        ("#image=a,image=b", r"'image=b' after '#'.*each at most once"),
        ("#caption=", r"'caption=' after '#'"),
        ("#sep=space", r"sep=space: expected one of comma, tab, semicolon, pipe"),
    ],
)
def test_malformed_options_are_one_line_naming_what_is_allowed(tmp_path, suffix, message):
    with pytest.raises(MicromergeError, match=message):
        CorpusSpec.parse(f"{tmp_path}/pairs.csv{suffix}")


def test_a_file_whose_name_holds_a_hash_is_that_file_and_a_named_column_must_exist(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png(0))
    (folder / "take#2.csv").write_text("image,caption\na.png,first\n")
    assert load_pairs(str(folder / "take#2.csv")).captions == ["first"]
    assert CorpusSpec.parse(f"{folder}/x.csv#image=i,caption= c ,root=r") == CorpusSpec(
        f"{folder}/x.csv", "i", "c", None, "r"
    )
    with pytest.raises(
        MicromergeError, match=r"no column 'report' \(#caption=report\); found \['image', 'caption'\]"
    ):
        load_pairs(f"{folder / 'take#2.csv'}#caption=report")
    (folder / "odd.csv").write_text("picture,caption\na.png,x\n")
    with pytest.raises(MicromergeError, match=r"name yours: --data '.*odd.csv#image=COLUMN'"):
        load_pairs(str(folder / "odd.csv"))
    # split with the wrong separator, the header is one column that holds the right one
    (folder / "tabs.tsv").write_text("image\tcaption\na.png\tx\n")
    with pytest.raises(
        MicromergeError, match=r"found \['image\\tcaption'\] \(one column whose name holds a tab: is"
    ):
        load_pairs(f"{folder / 'tabs.tsv'}#sep=comma,image=image")


def test_options_a_corpus_cannot_have_are_refused_in_one_line(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png(0))
    (folder / "p.jsonl").write_text(json.dumps({"image": "a.png", "caption": "x"}) + "\n")
    with pytest.raises(MicromergeError, match=r"#sep='\\t' does not apply to a JSONL table"):
        load_pairs(f"{folder / 'p.jsonl'}#sep=tab")
    assert load_pairs(f"{folder / 'p.jsonl'}#root=.").captions == ["x"]
    import tarfile

    shards = tmp_path / "wds"
    shards.mkdir()
    with tarfile.open(shards / "shard-000000.tar", "w") as archive:
        for name, payload in (("s.png", _png(0)), ("s.txt", b"a caption")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    for reader in (load_pairs, index_pairs):
        with pytest.raises(MicromergeError, match=r"#caption='c' does not apply to webdataset shards"):
            reader(f"{shards}#caption=c")
        with pytest.raises(MicromergeError, match=r"#image='i' does not apply to webdataset shards"):
            reader(f"{shards / 'shard-000000.tar'}#image=i")
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"image": [str(folder / "a.png")], "caption": ["x"]}).save_to_disk(str(saved))
    for reader in (load_pairs, index_pairs):
        with pytest.raises(MicromergeError, match=r"#root='r' does not apply to a dataset"):
            reader(f"{saved}#root=r")


def _saved_with_decoy(folder: Path) -> Path:
    """A saved dataset whose images are in `picture` and captions in `report`, beside a decoy
    `image` column of other images and a `caption` column of other text."""
    features = datasets.Features(
        {"image": datasets.Image(), "picture": datasets.Image(),
         "caption": datasets.Value("string"), "report": datasets.Value("string")}
    )  # fmt: skip
    rows = {
        "image": [{"bytes": _png(100 + i), "path": None} for i in range(4)],
        "picture": [{"bytes": _png(i), "path": None} for i in range(4)],
        "caption": ["decoy"] * 4,
        "report": [f"report {i}" for i in range(4)],
    }
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(folder))
    return folder


def test_a_saved_dataset_is_indexed_and_read_from_its_named_columns(tmp_path):
    spec = f"{_saved_with_decoy(tmp_path / 'saved')}#image=picture,caption=report"
    index = index_pairs(spec)
    assert index.kind == "arrow" and index.image_column == "picture"
    pairs = indexed_pairs(index)
    assert pairs.captions == [f"report {i}" for i in range(4)]
    assert [p["bytes"] for p in pairs.payloads] == [_png(i) for i in range(4)]
    assert load_pairs(spec).captions == pairs.captions
    plain = index_pairs(str(tmp_path / "saved"))
    assert plain.targets == ["decoy"] * 4 and plain.fingerprint != index.fingerprint


def test_the_options_are_part_of_a_table_index_fingerprint_and_absent_ones_keep_the_old_digest(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png(0))
    table = folder / "captions.csv"
    table.write_text("image,caption,title\na.png,first,second\n")
    facts = {"table": hashlib.sha256(table.read_bytes()).hexdigest(), "files": [("a.png", len(_png(0)))]}
    assert index_pairs(str(folder)).fingerprint == hashlib.sha256(json.dumps(facts).encode()).hexdigest()
    titled = index_pairs(f"{folder}#caption=title")
    assert titled.targets == ["second"]
    with_options = {**facts, "options": {"caption": "title"}}
    assert titled.fingerprint == hashlib.sha256(json.dumps(with_options).encode()).hexdigest()


def test_a_hub_layout_copy_streams_from_its_named_columns(tmp_path):
    repo = write_hub_repo(tmp_path / "repo", 8)
    spec = f"{repo}#caption=caption,image=image"
    assert is_hub_layout(spec) and is_hub_layout("owner/name#caption=title")
    recipe = SampleRecipe(32, (), 0, lambda texts: texts)
    assert (
        HubStream(f"{repo}#image=image,caption=caption", recipe).fingerprint
        != HubStream(str(repo), recipe).fingerprint
    )
    with pytest.raises(
        MicromergeError, match=r"no column 'report' \(#caption=report\); found \['image', 'caption'\]"
    ):
        HubStream(f"{repo}#caption=report", recipe)
    with pytest.raises(MicromergeError, match=r"#sep='\|' does not apply to a dataset"):
        HubStream(f"{repo}#sep=pipe", recipe)
    assert (HubStream(spec, recipe).image_column, HubStream(spec, recipe).caption_column) == (
        "image",
        "caption",
    )


def test_a_hub_dataset_kept_as_webdataset_shards_is_read_by_its_extension_columns(tmp_path):
    """datasets reads a hub repository of tar shards with its webdataset builder, whose columns are
    the members' extensions and the sample's key and URL: `__key__`, `__url__`, `jpg` (an image),
    `json`, `txt` (a public dataset card's `dataset_info.features`, SlytherinGe/RSTeller's README.md,
    read through the search tool). They were refused ("no image column") until named after `#`."""
    features = datasets.Features(
        {
            "__key__": datasets.Value("string"),
            "__url__": datasets.Value("string"),
            "jpg": datasets.Image(),
            "json": datasets.Value("string"),
            "txt": datasets.Value("string"),
        }
    )
    rows = {
        "__key__": [f"{i:09d}" for i in range(6)],
        "__url__": ["data/00000.tar"] * 6,
        "jpg": [{"bytes": _png(i), "path": None} for i in range(6)],
        "json": ["{}"] * 6,
        "txt": [CAPTIONS[i] for i in range(6)],
    }
    (tmp_path / "repo" / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(
        str(tmp_path / "repo" / "data" / "train.parquet")
    )
    stream = HubStream(str(tmp_path / "repo"), SampleRecipe(32, (), 0, lambda texts: texts))
    assert (stream.image_column, stream.caption_column) == ("jpg", "txt")
    assert load_pairs(str(tmp_path / "repo")).captions == CAPTIONS[:6]


def test_fisher_corpora_take_the_options_and_key_their_statistics_on_them(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    lines = ["image,caption,report"]
    for i in range(4):
        (folder / f"a{i}.png").write_bytes(_png(i))
        lines.append(f"a{i}.png,same,report {i}")
    (folder / "captions.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(MicromergeError, match="needs at least 2 distinct captions"):
        open_corpus(str(folder))
    pairs, described = open_corpus(f"{folder}#caption=report")
    assert (
        pairs.captions == [f"report {i}" for i in range(4)]
        and described["data"] == f"{folder}#caption=report"
    )


def test_finetune_trains_on_an_open_clip_table_and_records_the_spec(tmp_path):
    table = write_open_clip_csv(tmp_path / "oc")
    write_checkpoint(tmp_path / "base.safetensors", 0)

    def finetune(spec: str, out: str):
        return CliRunner().invoke(
            cli,
            ["finetune", "contrastive", "--base", str(tmp_path / "base.safetensors"), "--data", spec,
             "--out", str(tmp_path / out), "--batch-size", "4", "--max-steps", "2", "--device", "cpu",
             "--quiet"],
        )  # fmt: skip

    spec = f"{table}#sep=tab,image=filepath,caption=title"
    result = finetune(spec, "run")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["data"] == spec and manifest["hyperparameters"]["data"] == spec
    bad = finetune(f"{table}#caption=text", "bad")
    assert bad.exit_code == 2 and "no column 'text' (#caption=text)" in bad.output
    assert not (tmp_path / "bad" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "spec",
    ["runs/corpus/captions.csv", "~/corpus", "./corpus", "corpus", "corpus/captions.csv", "wds/s-{0..3}.tar"],
)
def test_a_missing_path_is_named_as_missing_not_looked_up_on_the_hub(tmp_path, monkeypatch, spec):
    """Only `owner/name` as the hub spells it is a hub id (eval.pairs.is_hub_id, shared with the
    hub-stream check): a missing `corpus/captions.csv` or a brace pattern is no repository."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MicromergeError, match=f"--data {spec}: no such file or folder"):
        load_pairs(spec)


def test_a_table_saved_by_excel_with_a_byte_order_mark_is_read_as_open_clip_train_reads_it(tmp_path):
    """Excel's "CSV UTF-8" starts the file with a byte-order mark. It became part of the first
    column's name (`'\\ufeffimage'`: "no image column"); pandas, which open_clip_train's CsvDataset
    reads tables with, drops it, and so do we (and for JSONL)."""
    from open_clip_train.data import CsvDataset

    folder = tmp_path / "excel"
    folder.mkdir()
    for i in range(2):
        (folder / f"img{i}.png").write_bytes(_png(i))
    table = folder / "captions.csv"
    table.write_bytes(b"\xef\xbb\xbfimage,caption\r\nimg0.png,a cell\r\nimg1.png,b cell\r\n")
    theirs = CsvDataset(str(table), None, "image", "caption", sep=",")
    assert load_pairs(str(table)).captions == [str(c) for c in theirs.captions] == ["a cell", "b cell"]
    assert index_pairs(str(table)).targets == ["a cell", "b cell"]
    lines = folder / "captions.jsonl"
    lines.write_bytes(b'\xef\xbb\xbf{"image": "img0.png", "caption": "a cell"}\n')
    assert load_pairs(str(lines)).captions == ["a cell"]


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "image,caption\nimg0.png,H&E stain, 40x\n",
            "line 2 has 3 fields, the header 2; quote a caption holding commas",
        ),
        (
            "image\tcaption\nimg0.png\ta\tb\n",
            "line 2 has 3 fields, the header 2; quote a caption holding tabs",
        ),
        ("image,caption,caption\nimg0.png,a,b\n", "column 'caption' is named twice in the header"),
        (  # several repeated: the first by name, whatever the order of a set of strings
            "image,caption,e,d,c,b,e,d,c,b\nimg0.png,a,1,2,3,4,5,6,7,8\n",
            "column 'b' is named twice in the header",
        ),
    ],
)
def test_a_row_with_more_fields_than_the_header_or_a_repeated_column_is_refused(tmp_path, text, message):
    """An unquoted comma in a caption split it: `H&E stain, 40x` trained as `H&E stain`, the rest
    dropped without a word (csv.DictReader files extra fields under None). A header naming a column
    twice read the last one silently. pandas refuses the first ("Expected 2 fields in line 2, saw 3")."""
    (tmp_path / "img0.png").write_bytes(_png(0))
    (tmp_path / "captions.csv").write_text(text)
    with pytest.raises(MicromergeError, match=message.replace("(", r"\(")):
        load_pairs(str(tmp_path / "captions.csv"))
