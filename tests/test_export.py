"""Outputs every CLIP tool opens (issue 15, section 3): open_clip's `local-dir:` layout, transformers'
CLIPModel + CLIPProcessor + zero-shot pipeline, a model card, and `push` against a stub of the hub.

Facts from public sources (read through the search tool and the installed packages): open_clip's
`local-dir:` loader reads `open_clip_config.json` ({"model_cfg", "preprocess_cfg"}) and
`open_clip_model.safetensors` (open_clip/factory.py, constants.py); OpenAI CLIP's BPE vocabulary is
the one open_clip ships (`bpe_simple_vocab_16e6.txt.gz`, 49,408 tokens with the two special tokens
last), which transformers' CLIPTokenizer reads as vocab.json + merges.txt with the special tokens
named `<|startoftext|>` and `<|endoftext|>`.
"""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from micromerge.cli import cli
from micromerge.merging.models import load_model, tokenizer_for
from micromerge.merging.sources import open_source
from tests.helpers import write_checkpoint

transformers = pytest.importorskip("transformers")
TEXTS = ["a micrograph of an adipocyte", "Fluorescence microscopy, DAPI-stained nuclei!", "H&E"]


@pytest.fixture
def checkpoint(tmp_path):
    write_checkpoint(tmp_path / "merged.safetensors", 5)
    return tmp_path / "merged.safetensors"


def _export(checkpoint, out, *extra):
    result = CliRunner().invoke(cli, ["export", str(checkpoint), "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    return out


def _image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))


def test_open_clip_loads_the_export_with_local_dir(tmp_path, checkpoint):
    folder = _export(checkpoint, tmp_path / "oc", "--format", "open_clip")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    with open_source(str(checkpoint)) as source:
        ours, config = load_model(source)
    model.eval()
    pixels = preprocess(_image())[None]
    tokens = tokenizer(TEXTS)
    torch.testing.assert_close(tokens, tokenizer_for(config)(TEXTS))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels), ours.encode_image(pixels), atol=1e-6, rtol=0)
        torch.testing.assert_close(model.encode_text(tokens), ours.encode_text(tokens), atol=1e-6, rtol=0)
    assert (folder / "README.md").is_file()


def test_transformers_processor_and_pipeline_open_the_export(tmp_path, checkpoint):
    folder = _export(checkpoint, tmp_path / "hf")
    processor = transformers.CLIPProcessor.from_pretrained(folder)
    text_config = transformers.CLIPConfig.from_pretrained(folder).text_config
    assert (text_config.bos_token_id, text_config.eos_token_id) == (
        processor.tokenizer.bos_token_id,
        processor.tokenizer.eos_token_id,
    ), "the model's special tokens are the tokenizer's"
    with open_source(str(checkpoint)) as source:
        ours, config = load_model(source)
    ours.eval()
    expected = tokenizer_for(config)(TEXTS)
    got = processor(text=TEXTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    for row, ids in enumerate(got["input_ids"]):
        length = int(got["attention_mask"][row].sum())
        assert ids[:length].tolist() == expected[row][:length].tolist(), TEXTS[row]
    image = _image()
    classifier = transformers.pipeline("zero-shot-image-classification", model=str(folder))
    scores = {
        r["label"]: r["score"] for r in classifier(image, candidate_labels=TEXTS, hypothesis_template="{}")
    }
    with torch.no_grad():
        mean = torch.tensor(processor.image_processor.image_mean).view(3, 1, 1)
        std = torch.tensor(processor.image_processor.image_std).view(3, 1, 1)
        pixels = ((torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float() / 255 - mean) / std)[None]
        image_emb = torch.nn.functional.normalize(ours.encode_image(pixels), dim=-1)
        text_emb = torch.nn.functional.normalize(ours.encode_text(expected), dim=-1)
        probs = (ours.logit_scale.exp() * image_emb @ text_emb.T).softmax(dim=-1)[0]
    for text, prob in zip(TEXTS, probs.tolist(), strict=True):
        assert scores[text] == pytest.approx(prob, abs=1e-4), text


def test_the_model_card_says_how_the_model_was_made_and_what_it_scored(tmp_path, checkpoint):
    base, ft = tmp_path / "b.safetensors", tmp_path / "f.safetensors"
    write_checkpoint(base, 0)
    write_checkpoint(ft, 1)
    merged = tmp_path / "m.safetensors"
    args = ["merge", "--base", str(base), "--ft", str(ft), "--method", "ties", "--alpha", "0.7"]
    assert CliRunner().invoke(cli, [*args, "--out", str(merged), "--quiet"]).exit_code == 0
    manifest = json.loads((tmp_path / "m.safetensors.manifest.json").read_text())
    store = tmp_path / "results.jsonl"
    from tests.ubench_fixture import write_fixture

    bench = write_fixture(tmp_path / "bench", fmt="save_to_disk", per_class=3)
    evaluated = CliRunner().invoke(
        cli,
        ["eval", "--model", str(merged), "--data", str(bench), "--store", str(store), "--bootstrap", "0"]
        + ["--cache-dir", str(tmp_path / "cache"), "--device", "cpu"],
    )
    assert evaluated.exit_code == 0, evaluated.output
    folder = _export(merged, tmp_path / "card", "--results", str(store))
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "- ties" in card
    for digest in manifest["inputs_sha256"].values():
        assert digest in card
    assert '"density": 0.2' in card and "ubench:coarse" in card and "| all |" in card
    unevaluated = _export(base, tmp_path / "plain", "--format", "open_clip")
    assert "Not evaluated here" in (unevaluated / "README.md").read_text()
    wrong = CliRunner().invoke(
        cli, ["export", str(base), "--out", str(tmp_path / "x"), "--results", str(store)]
    )
    assert wrong.exit_code == 2 and "no `micromerge eval`" in wrong.output


class _StubHub:
    """Records what `push` asks of huggingface_hub.HfApi; never reaches a network."""

    calls: list = []

    def __init__(self, token=None):
        self.calls.append(("init", token))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return type("Commit", (), {"commit_url": f"https://hub.example/{kwargs['repo_id']}/commit/1"})()


def test_push_uploads_an_exported_folder_as_one_commit(tmp_path, checkpoint, monkeypatch):
    import huggingface_hub

    folder = _export(checkpoint, tmp_path / "hf")
    monkeypatch.setattr(huggingface_hub, "HfApi", _StubHub)
    _StubHub.calls = []
    offline = CliRunner().invoke(cli, ["push", str(folder), "--repo", "lab/merged"])
    assert offline.exit_code == 2 and "HF_HUB_OFFLINE" in offline.output and not _StubHub.calls
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    result = CliRunner().invoke(
        cli, ["push", str(folder), "--repo", "lab/merged", "--private", "--token", "t"]
    )
    assert result.exit_code == 0, result.output
    assert _StubHub.calls[0] == ("init", "t")
    assert _StubHub.calls[1] == (
        "create_repo",
        "lab/merged",
        {"private": True, "exist_ok": True, "repo_type": "model"},
    )
    assert _StubHub.calls[2][1]["folder_path"] == str(folder) and "hub.example/lab/merged" in result.output
    (tmp_path / "empty").mkdir()
    empty = CliRunner().invoke(cli, ["push", str(tmp_path / "empty"), "--repo", "lab/x"])
    assert empty.exit_code == 2 and "export it first" in empty.output


def test_a_finetuned_run_folder_has_a_model_card(tmp_path):
    from tests.test_finetune import config, write_csv_folder

    data = write_csv_folder(tmp_path / "data")
    base = tmp_path / "base.safetensors"
    write_checkpoint(base, 0)
    from micromerge.finetune.trainer import run_finetune

    run_finetune(config(base, data, tmp_path / "run"))
    card = (tmp_path / "run" / "README.md").read_text()
    assert "finetune-contrastive" in card and "library_name: open_clip" in card
    assert "\n# run\n" in card, "the run folder's name, not model.safetensors's stem"
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    ((name, digest),) = manifest["base_sha256"].items()
    assert f"| `{name}` | `{digest}` |" in card
