"""The Arrow types of the shards we write, spelled out here apart from `eval/schema.py`.

The synthetic benchmark and the test fixture both take their features from
`micromerge.eval.schema.ubench_features`, so a slip there (a column dropped or moved, a float
stored as float32, `answer_idx` as an int in captions) would pass every test that compares the
two. This file states the published schema a second time, as the Arrow types a shard holds,
from ../shared/ubench/SCHEMA.md:
- "Columns": the columns in the Hub's order; `image` a datasets Image (a struct of `bytes` and
  `path`); `label` one global ClassLabel (stored as int64); `microns_per_pixel` a float;
  `synthetic` a bool; `dataset`, `pmid`, `stain` nullable strings; `bbox`/`polygon` lists of
  `{className, points}`; no `scale` column;
- "`captions`": the keys modality_0/1, submodality_0/1, domain_0/1, stain_0/1,
  classification_0/1, each a struct `{id, name, question, answer_idx, options, tags}` with
  `answer_idx` a string;
- "`questions`": the keys classification, domain, modality, stain, subdomain, submodality, each a
  struct `{answer, answer_idx (int), id, name, options, question, tags}`.
Where SCHEMA.md is silent, eval/schema.py's docstring says the project's reading (the element
types of `tags` and `points`, `pmid`/`ncbitaxon_id` as strings); those are pinned here as read.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.ipc
import pytest

from micromerge.eval.synthetic.generate import write_benchmark
from tests.ubench_fixture import write_fixture

TEXT_LIST = "list<item: string>"
CAPTION = (
    "struct<id: string, name: string, question: string, answer_idx: string, "
    f"options: {TEXT_LIST}, tags: {TEXT_LIST}>"
)
QUESTION = (
    "struct<answer: string, answer_idx: int64, id: string, name: string, "
    f"options: {TEXT_LIST}, question: string, tags: {TEXT_LIST}>"
)
CAPTION_KEYS = [
    f"{kind}_{n}" for kind in ("modality", "submodality", "domain", "stain", "classification") for n in (0, 1)
]
QUESTION_KEYS = ["classification", "domain", "modality", "stain", "subdomain", "submodality"]
ANNOTATIONS = "list<item: struct<className: string, points: list<item: list<item: double>>>>"
PUBLISHED_COLUMNS = [
    ("image_id", "string"),
    ("image", "struct<bytes: binary, path: string>"),
    ("label", "int64"),
    ("label_name", "string"),
    ("dataset", "string"),
    ("domain", "string"),
    ("institution", "string"),
    ("license", "string"),
    ("microns_per_pixel", "double"),
    ("modality", "string"),
    ("ncbitaxon_id", "string"),
    ("ncbitaxon_name", "string"),
    ("pmid", "string"),
    ("split", "string"),
    ("stain", "string"),
    ("subdomain", "string"),
    ("submodality", "string"),
    ("synthetic", "bool"),
    ("captions", "struct<" + ", ".join(f"{key}: {CAPTION}" for key in CAPTION_KEYS) + ">"),
    ("questions", "struct<" + ", ".join(f"{key}: {QUESTION}" for key in QUESTION_KEYS) + ">"),
    ("bbox", ANNOTATIONS),
    ("polygon", ANNOTATIONS),
]


def _shard_schema(inner: Path) -> pa.Schema:
    schemas = []
    for shard in sorted(inner.glob("ubench-test-*.arrow")):
        with pyarrow.ipc.open_stream(shard) as reader:
            schemas.append(reader.schema)
    assert len(schemas) == 7 and all(s.equals(schemas[0], check_metadata=True) for s in schemas)
    return schemas[0]


@pytest.fixture(scope="module")
def synthetic_shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("synthetic") / "hub"
    write_benchmark(folder, per_class=2, layout="hub")
    return folder / "perception" / "0.1.0"


def test_the_synthetic_benchmarks_shards_hold_the_published_columns_in_order_with_their_types(
    synthetic_shards,
):
    schema = _shard_schema(synthetic_shards)
    assert [(field.name, str(field.type)) for field in schema] == PUBLISHED_COLUMNS
    assert all(field.nullable for field in schema), "datasets writes every column nullable; nulls are data"
    assert b"huggingface" in schema.metadata, "datasets reads the features (ClassLabel names) from here"


def test_the_test_fixtures_shards_hold_the_published_columns_and_one_extra_at_the_end(tmp_path):
    schema = _shard_schema(write_fixture(tmp_path / "fixture", per_class=2, corrupt=0))
    assert [(field.name, str(field.type)) for field in schema] == [
        *PUBLISHED_COLUMNS,
        ("annotator_notes", "string"),
    ]
