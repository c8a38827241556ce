"""The demo's image-caption corpora: what each holds and how its captions speak, because the
demo's forgetting and recovery rest on it.

The general corpus (OpenAI CLIP's stand-in) spans every source but, like web captions, rarely
names a pathology image's fine-grained class; the pathology corpus (PLIP's stand-in) holds only
pathology sources and always names the class. Only the demo ran these until now (minutes)."""

from __future__ import annotations

import hashlib
import re
from collections import Counter

import datasets
import pytest

from micromerge.core.errors import MicromergeError
from micromerge.eval.data import load_benchmark
from micromerge.eval.prompts import class_text
from micromerge.eval.synthetic.generate import GENERAL_PATHOLOGY_CLASS_RATE, write_benchmark, write_corpus
from micromerge.eval.synthetic.spec import SOURCES

PER_CLASS = 30


def _names_its_class(caption: str, source_and_class: str) -> bool:
    label = source_and_class.split("/", 1)[1]
    return re.search(rf"\b{re.escape(class_text(label))}\b", caption) is not None


def _image_digests(dataset: datasets.Dataset) -> list[bytes]:
    images = dataset.cast_column("image", datasets.Image(decode=False))["image"]
    return [hashlib.sha256(image["bytes"]).digest() for image in images]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpora")
    return {
        kind: write_corpus(folder / kind, kind, per_class=PER_CLASS, workers=1)
        for kind in ("general", "pathology")
    }


def test_the_pathology_corpus_holds_every_pathology_class_and_names_it_in_every_caption(corpora):
    corpus = corpora["pathology"]
    expected = [f"{s.dataset}/{c}" for s in SOURCES if s.domain == "pathology" for c in s.classes]
    assert Counter(corpus["source"]) == dict.fromkeys(expected, PER_CLASS)
    assert all(_names_its_class(c, s) for c, s in zip(corpus["caption"], corpus["source"], strict=True))


def test_the_general_corpus_spans_every_source_and_rarely_names_a_pathology_class(corpora):
    corpus = corpora["general"]
    assert Counter(corpus["source"]) == {f"{s.dataset}/{c}": PER_CLASS for s in SOURCES for c in s.classes}
    pathology = {s.dataset for s in SOURCES if s.domain == "pathology"}
    named = {True: [], False: []}  # in a pathology source -> whether each caption names its class
    for caption, source in zip(corpus["caption"], corpus["source"], strict=True):
        named[source.split("/")[0] in pathology].append(_names_its_class(caption, source))
    pathology_rate = sum(named[True]) / len(named[True])
    biology_rate = sum(named[False]) / len(named[False])
    # a pathology caption names its class only when drawn from the full templates (rate 8%), and
    # then in 6 of their 9; a biology caption in 6 of 9 (two thirds)
    assert 0 < pathology_rate <= GENERAL_PATHOLOGY_CLASS_RATE, pathology_rate
    assert biology_rate > 0.5, biology_rate


def test_no_corpus_image_is_a_benchmark_image_and_workers_do_not_change_the_bytes(corpora, tmp_path):
    write_benchmark(tmp_path / "bench", per_class=PER_CLASS, layout="save_to_disk")
    bench = set(_image_digests(load_benchmark(str(tmp_path / "bench")).dataset))
    for kind, corpus in corpora.items():
        digests = _image_digests(corpus)
        assert len(set(digests)) == len(digests) and not bench & set(digests), kind
    again = write_corpus(tmp_path / "again", "pathology", per_class=PER_CLASS, workers=2)
    assert again[:] == corpora["pathology"][:]


def test_a_corpus_of_another_kind_is_one_line(tmp_path):
    with pytest.raises(MicromergeError, match=r"^corpus kind 'biology': expected general or pathology$"):
        write_corpus(tmp_path / "c", "biology")
