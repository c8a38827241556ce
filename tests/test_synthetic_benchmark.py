"""The embedded default (`micromerge demo`'s synthetic μ-Bench) follows the real structure (issue 12,
item 5), read from what the generator writes, not from the demo's accuracies (which would hold
with the structure wrong: ten tasks are found either way).

Facts from ../shared/ubench/SCHEMA.md ("Files on the Hub", "captions", "questions", "Facts that
break naive loaders"): `perception/0.1.0/` holds `dataset_info.json` and seven Arrow IPC *stream*
shards `ubench-test-0000{0..6}-of-00007.arrow`, no `state.json`; `dataset` is null for one source
(Held et al. 2010 on the Hub), told apart by its classification template; `stain` is null where it
does not apply, and so are the stain caption and question entries; each caption's `options` are a
per-image subset of candidates followed by the literal "none of the above", `answer_idx` a string
in captions and an int in questions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.ipc
import pytest

from micromerge.eval.data import load_benchmark
from micromerge.eval.synthetic.generate import write_benchmark
from micromerge.eval.synthetic.spec import SOURCES
from micromerge.eval.tasks import discover_tasks

NONE_OF_THE_ABOVE = "none of the above"


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("synthetic") / "hub"
    write_benchmark(folder, per_class=2, layout="hub")
    return folder


def test_the_hub_layout_is_seven_arrow_stream_shards_and_dataset_info_without_state_json(hub):
    inner = hub / "perception" / "0.1.0"
    assert sorted(p.name for p in inner.iterdir()) == [
        "dataset_info.json",
        *(f"ubench-test-0000{i}-of-00007.arrow" for i in range(7)),
    ]
    lengths = []
    for shard in sorted(inner.glob("*.arrow")):
        with pyarrow.ipc.open_stream(shard) as reader:  # a stream, not the random-access file format
            lengths.append(reader.read_all().num_rows)
    assert sum(lengths) == len(load_benchmark(str(hub)).dataset) > 0
    assert max(lengths) - min(lengths) <= 1, "the rows are dealt evenly over the shards"
    split = json.loads((inner / "dataset_info.json").read_text())["splits"]["test"]
    assert split["shard_lengths"] == lengths and split["num_examples"] == sum(lengths)


def test_one_source_has_a_null_dataset_and_is_named_after_its_source_by_the_rule(hub):
    dataset = load_benchmark(str(hub)).dataset
    names = dataset["dataset"][:]
    (null_source,) = [s for s in SOURCES if s.null_dataset]
    nulls = sum(name is None for name in names)
    assert nulls == 2 * len(null_source.classes) and null_source.dataset not in names
    fine = [task.name for task in discover_tasks(dataset) if task.level == "fine"]
    assert sorted(fine) == sorted(s.dataset for s in SOURCES) and "None" not in fine


def test_stain_is_null_where_it_does_not_apply_and_so_are_its_questions(hub):
    rows = load_benchmark(str(hub)).dataset.select_columns(["modality", "stain", "captions", "questions"])
    modalities_without_stain = set()
    for row in rows:
        stained = row["stain"] is not None
        assert (row["captions"]["stain_0"] is not None) is stained
        assert (row["captions"]["stain_1"] is not None) is stained
        assert (row["questions"]["stain"] is not None) is stained
        if not stained:
            modalities_without_stain.add(row["modality"])
    assert {"fluorescence microscopy", "electron microscopy"} <= modalities_without_stain


def test_every_question_offers_its_own_subset_ending_in_none_of_the_above(hub):
    rows = load_benchmark(str(hub)).dataset.select_columns(["dataset", "label_name", "captions", "questions"])
    offered_per_source: dict[str | None, set[tuple[str, ...]]] = {}
    for row in rows:
        for key, caption in row["captions"].items():
            if caption is None:
                continue
            options = caption["options"]
            assert options[-1] == NONE_OF_THE_ABOVE and len(set(options)) == len(options) <= 6, key
            assert isinstance(caption["answer_idx"], str), "a string in the captions"
            answer = options[int(caption["answer_idx"])]
            assert answer != NONE_OF_THE_ABOVE and caption["question"].split("{class}")[0] in answer
            if key == "classification_1":
                spoken = row["label_name"].replace("_", " ")  # `very_weak` reads "very weak"
                assert answer == caption["question"].format(**{"class": spoken})
                offered_per_source.setdefault(row["dataset"], set()).add(tuple(sorted(options)))
        for kind, question in row["questions"].items():
            if question is None:
                continue
            assert isinstance(question["answer_idx"], int), "an int in the questions"
            assert question["options"][question["answer_idx"]] == question["answer"], kind
            assert question["options"][-1] == NONE_OF_THE_ABOVE
    colorectal = next(s for s in SOURCES if s.dataset == "synth-colorectal-tissue")
    assert len(colorectal.classes) == 5 and len(offered_per_source[colorectal.dataset]) > 1, (
        "five classes, four offered per image: the offered subsets differ from image to image"
    )


def test_the_save_to_disk_layout_holds_the_same_rows(hub, tmp_path):
    saved = tmp_path / "saved"
    write_benchmark(saved, per_class=2, layout="save_to_disk")
    assert (saved / "state.json").is_file()
    ours, theirs = load_benchmark(str(saved)).dataset, load_benchmark(str(hub)).dataset
    assert ours.features == theirs.features and len(ours) == len(theirs)
    assert (
        ours.select_columns(["image_id", "dataset", "captions"])[:]
        == theirs.select_columns(["image_id", "dataset", "captions"])[:]
    )


def test_every_image_is_marked_synthetic(hub):
    assert set(load_benchmark(str(hub)).dataset["synthetic"]) == {True}


def test_the_benchmark_has_the_same_bytes_under_any_hash_seed(tmp_path):
    """Same seed, same bytes (the developers' guide), also across processes: Python salts string
    hashes per process, so anything taken from a set of strings in set order would differ."""
    script = (
        "import sys; from pathlib import Path; from micromerge.eval.synthetic.generate import write_benchmark; "
        "write_benchmark(Path(sys.argv[1]), per_class=2, layout='hub')"
    )
    for salt in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": salt, "HF_HUB_OFFLINE": "1"}
        subprocess.run([sys.executable, "-c", script, str(tmp_path / salt)], env=env, check=True)
    files = sorted(p.relative_to(tmp_path / "1") for p in (tmp_path / "1").rglob("*") if p.is_file())
    assert len(files) == 8
    for name in files:
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes(), name
