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
import os

import numpy as np
import open_clip
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from micromerge.cli import cli
from micromerge.core.errors import MicromergeError
from micromerge.eval.store import ResultStore
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
        pixels = ((torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 - mean) / std)[None]
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
    table = card.split("## Evaluation")[1].split("## Licence")[0].splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table if line.startswith("| ")][1:]
    assert {row[1:3] for row in map(tuple, cells)} == {("ubench", "all")}, "all images, not the halves"
    assert len({row[0] for row in cells}) == len(cells), "one row per task: its accuracy, caption keys pooled"
    fine = [row[3] for row in cells if row[0] == "kather_et_al_2016"]
    pooled = next(
        r
        for r in ResultStore(store).rows()
        if (r["task"], r["caption_key"], r["split"], r["metric"])
        == ("kather_et_al_2016", "all", "all", "accuracy")
    )
    assert fine == [f"{100 * pooled['value']:.1f} %"]
    swept = CliRunner().invoke(  # a sweep from this checkpoint: its rows carry the same base sha256
        cli,
        ["sweep", "--base", str(merged), "--ft", str(ft), "--alphas", "0,1", "--data", str(bench)]
        + ["--store", str(store), "--bootstrap", "0", "--cache-dir", str(tmp_path / "cache"), "--quiet"],
    )
    assert swept.exit_code == 0, swept.output
    again = _export(merged, tmp_path / "card-after-sweep", "--results", str(store))
    assert (again / "README.md").read_text() == card, "only the checkpoint's own `eval` rows"
    closed = CliRunner().invoke(  # the other protocol: a second table section, each row named by it
        cli,
        ["eval", "--model", str(merged), "--data", str(bench), "--store", str(store), "--bootstrap", "0"]
        + ["--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--protocol", "closed-set", "--quiet"],
    )
    assert closed.exit_code == 0, closed.output
    both = (_export(merged, tmp_path / "both", "--results", str(store)) / "README.md").read_text()
    assert {"ubench", "closed-set"} <= {
        line.split("|")[2].strip() for line in both.splitlines() if line.startswith("| kather")
    }
    reevaluated = CliRunner().invoke(  # the same protocol again with other settings: the latest wins
        cli,
        ["eval", "--model", str(merged), "--data", str(bench), "--store", str(store), "--bootstrap", "0"]
        + ["--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--seed", "1", "--quiet"],
    )
    assert reevaluated.exit_code == 0, reevaluated.output
    latest = CliRunner().invoke(
        cli, ["export", str(merged), "--out", str(tmp_path / "latest"), "--results", str(store)]
    )
    assert latest.exit_code == 0 and "1 earlier eval run(s)" in latest.output, latest.output
    rows = [
        line
        for line in (tmp_path / "latest" / "README.md").read_text().splitlines()
        if line.startswith("| kather")
    ]
    assert len(rows) == 2, rows
    unevaluated = _export(base, tmp_path / "plain", "--format", "open_clip")
    assert "Not evaluated here" in (unevaluated / "README.md").read_text()
    wrong = CliRunner().invoke(
        cli, ["export", str(base), "--out", str(tmp_path / "x"), "--results", str(store)]
    )
    assert wrong.exit_code == 2 and "no `micromerge eval`" in wrong.output


def test_the_card_of_a_sharded_checkpoint_finds_its_evaluation_whatever_order_its_digests_take(tmp_path):
    """An eval row records a sharded checkpoint's digests in its files' order; export matches them
    as a set. Here the first shard's digest sorts after the second's, so comparing lists in either
    order alone would find no evaluation."""
    import hashlib

    from safetensors.torch import save_file

    from tests.helpers import random_state_dict
    from tests.ubench_fixture import write_fixture

    tensors = random_state_dict(5)
    keys = sorted(tensors)
    halves = [keys[::2], keys[1::2]]
    folder = tmp_path / "sharded"
    folder.mkdir()

    def write(order):
        names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        for name, shard in zip(names, order, strict=True):
            save_file(
                {k: tensors[k] for k in shard}, str(folder / name), metadata={"micromerge.arch": "nano-clip"}
            )
        index = {"weight_map": {k: name for name, shard in zip(names, order, strict=True) for k in shard}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        return [hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in names]

    digests = write(halves)
    if digests == sorted(digests):  # the other split swaps the two files' bytes and digests
        digests = write(halves[::-1])
    assert digests != sorted(digests)
    index = folder / "model.safetensors.index.json"
    with open_source(str(index)) as source:
        assert len(source.files) == 2
    bench = write_fixture(tmp_path / "bench", fmt="save_to_disk", per_class=3)
    store = tmp_path / "results.jsonl"
    evaluated = CliRunner().invoke(
        cli,
        ["eval", "--model", str(index), "--data", str(bench), "--store", str(store), "--bootstrap", "0"]
        + ["--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--quiet"],
    )
    assert evaluated.exit_code == 0, evaluated.output
    recorded = next(iter(ResultStore(store).rows()))["model"]["base_sha256"]
    assert len(recorded) == 2 and recorded != sorted(recorded), "the files' order, not sorted"
    card = (_export(index, tmp_path / "card", "--results", str(store)) / "README.md").read_text()
    assert "ubench:coarse" in card and "| kather_et_al_2016 |" in card


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
    monkeypatch.setenv("HF_HUB_OFFLINE", "false")  # huggingface_hub reads this as online
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
    assert empty.exit_code == 2 and "not an export" in empty.output


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


def _our_pixels(image: Image.Image, config: dict) -> torch.Tensor:
    """What micromerge's own evaluation feeds the model for `image` (eval/images.py + normalisation)."""
    import io

    from micromerge.eval.images import decode_one
    from micromerge.merging.models import image_size, normalisation

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    decoded = torch.from_numpy(decode_one({"bytes": buffer.getvalue()}, image_size(config)).copy())
    mean, std = normalisation(config)
    return ((decoded.float() / 255 - mean.view(3, 1, 1)) / std.view(3, 1, 1))[None]


def test_both_exports_preprocess_an_image_as_micromerges_evaluation_does(tmp_path, checkpoint):
    """The numbers on the model card were measured with micromerge's preprocessing (bicubic resize
    of the shorter side, centre crop, OpenAI CLIP's mean and std); an image that is neither square
    nor the input size shows a wrong resample filter, size, crop or normalisation in either export."""
    from micromerge.merging.models import normalisation

    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    with open_source(str(checkpoint)) as source:
        _, config = load_model(source)
    ours = _our_pixels(image, config)
    hf = transformers.CLIPImageProcessor.from_pretrained(_export(checkpoint, tmp_path / "hf"))
    # a grey-level micrograph (fluorescence, electron microscopy) is made RGB, as decode_one does
    for shown in (image, image.convert("L")):
        # transformers resizes through its own array round trip: a few pixels land one grey level apart
        levels = (
            (hf(images=shown, return_tensors="pt")["pixel_values"] - _our_pixels(shown, config))
            * 255
            * normalisation(config)[1].view(3, 1, 1)
        )
        assert levels.abs().max() < 1.01 and (levels.abs() > 0.01).float().mean() < 0.02, shown.mode
    folder = _export(checkpoint, tmp_path / "oc", "--format", "open_clip")
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    torch.testing.assert_close(preprocess(image)[None], ours, atol=1e-5, rtol=0)


def test_the_exported_tokenizer_follows_openai_clips_conventions(tmp_path, checkpoint):
    """Its special tokens are CLIPTokenizer's own defaults (OpenAI's: unknown and padding are
    <|endoftext|>), its length is the model's context (16 for nano-clip, not CLIP's 77), and both
    transformers tokenizers give open_clip's ids for ordinary English, which uses the first BPE
    merges (transformers skips merges.txt's first line, the '#version' header)."""
    folder = _export(checkpoint, tmp_path / "hf")
    defaults = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    with open_source(str(checkpoint)) as source:
        _, config = load_model(source)
    text = "in the thin section of an inflamed intestine, the nuclei are stained with haematoxylin"
    expected = open_clip.tokenizer.SimpleTokenizer().encode(text)
    for use_fast in (False, True):
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, use_fast=use_fast)
        specials = ("bos_token", "eos_token", "unk_token", "pad_token")
        assert {k: getattr(tokenizer, k) for k in specials} == {k: getattr(defaults, k) for k in specials}
        assert tokenizer.model_max_length == config["text_cfg"]["context_length"] == 16
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == expected, use_fast


def test_merges_txt_reads_as_clips_ranks_where_the_first_line_is_skipped(tmp_path, checkpoint):
    """OpenAI's merges.txt starts with a '#version: 0.2' header, and readers written for it (the
    transformers 4 CLIPTokenizer, ports of it) drop the first line unread: without the header they
    would lose CLIP's first merge ('i n'). transformers 5 accepts either, so the file is checked."""
    folder = _export(checkpoint, tmp_path / "hf")
    lines = (folder / "merges.txt").read_text().strip().split("\n")
    ranks = open_clip.tokenizer.SimpleTokenizer().bpe_ranks
    assert [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]] == sorted(
        ranks, key=ranks.__getitem__
    )


def test_export_refuses_what_it_cannot_write_in_one_line(tmp_path, checkpoint):
    from micromerge.core.errors import MicromergeError
    from micromerge.merging.export import _write_transformers, export_checkpoint

    with pytest.raises(
        MicromergeError, match=r"--format 'onnx': choose one of \['transformers', 'open_clip'\]"
    ):
        export_checkpoint(str(checkpoint), tmp_path / "x", fmt="onnx")
    (tmp_path / "card").mkdir()
    (tmp_path / "card" / "README.md").write_text("the user's own notes")
    with pytest.raises(MicromergeError, match="already holds README.md; pass --force"):
        export_checkpoint(str(checkpoint), tmp_path / "card", fmt="open_clip")
    assert (tmp_path / "card" / "README.md").read_text() == "the user's own notes"
    for config in (
        {"vision_cfg": {"timm_model_name": "convnext_tiny"}, "text_cfg": {}},
        {"vision_cfg": {"image_size": 32}, "text_cfg": {"hf_model_name": "bert-base-uncased"}},
    ):
        with pytest.raises(MicromergeError, match="only ViT CLIPs with the CLIP text tower"):
            _write_transformers("m", config, {}, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_a_text_tower_with_its_own_tokenizer_gets_no_clip_vocabulary(tmp_path, checkpoint):
    """open_clip configs name a Hugging Face tokenizer (hf_tokenizer_name) when the text tower was
    not trained on CLIP's BPE: writing CLIP's vocabulary beside it would tokenise wrongly."""
    from micromerge.merging.export import _write_transformers
    from micromerge.merging.torch_sources import load_all

    with open_source(str(checkpoint)) as source:
        _, config = load_model(source)
        tensors = load_all(source)
    for index, text_cfg in enumerate(
        ({"hf_tokenizer_name": "org/other-tokenizer"}, {"vocab_size": 30522})  # or another vocabulary
    ):
        other = {**config, "text_cfg": {**config["text_cfg"], **text_cfg}}
        with pytest.warns(UserWarning, match="no tokenizer written"):
            _write_transformers("m", other, tensors, tmp_path / str(index))
        written = tmp_path / str(index)
        assert (written / "model.safetensors").is_file() and not (written / "vocab.json").exists()


def test_push_refuses_what_is_not_an_export_and_uploads_a_model_repo(tmp_path, checkpoint, monkeypatch):
    """Only a folder with weights, their config and a model card goes up, as a model repo, in one commit named
    for the folder; an empty HF_HUB_OFFLINE means online (huggingface_hub reads it the same way)."""
    import huggingface_hub

    folder = _export(checkpoint, tmp_path / "hf")
    monkeypatch.setattr(huggingface_hub, "HfApi", _StubHub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "")
    (tmp_path / "no-card").mkdir()
    (tmp_path / "no-card" / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "README.md").write_text("a card")
    (tmp_path / "no-config").mkdir()  # weights and card, no config: no tool could load the repo
    for name in ("model.safetensors", "README.md"):
        (tmp_path / "no-config" / name).write_bytes((folder / name).read_bytes())
    (tmp_path / "no-card-but-config").mkdir()
    for name in ("model.safetensors", "config.json"):
        (tmp_path / "no-card-but-config" / name).write_bytes((folder / name).read_bytes())
    not_an_export = (
        "not an export (model.safetensors + config.json or open_clip_model.safetensors + "
        "open_clip_config.json, and a model card README.md)"
    )
    for path, needle in (
        (checkpoint, "not a folder; `micromerge export CHECKPOINT --out FOLDER` makes one"),
        (tmp_path / "no-card", not_an_export),
        (tmp_path / "no-weights", not_an_export),
        (tmp_path / "no-config", not_an_export),
        (tmp_path / "no-card-but-config", not_an_export),
    ):
        _StubHub.calls = []
        refused = CliRunner().invoke(cli, ["push", str(path), "--repo", "lab/x"])
        assert refused.exit_code == 2 and needle in refused.output and not _StubHub.calls, refused.output
    result = CliRunner().invoke(cli, ["push", str(folder), "--repo", "lab/merged"])
    assert result.exit_code == 0, result.output
    (_, upload) = _StubHub.calls[-1]
    assert upload == {
        "folder_path": str(folder),
        "repo_id": "lab/merged",
        "repo_type": "model",
        "commit_message": "micromerge: upload hf",
        "ignore_patterns": [".staging.*", ".*.tmp"],
    }
    from huggingface_hub.utils import filter_repo_objects

    files = ["model.safetensors", ".staging.123.ab/model.safetensors", ".model.safetensors.9.x.tmp"]
    kept = list(filter_repo_objects(files, ignore_patterns=upload["ignore_patterns"]))
    assert kept == ["model.safetensors"], "huggingface_hub's own filter leaves the work in progress out"


def test_a_checkpoint_holding_python_objects_is_exported_with_allow_pickle(tmp_path):
    """A trainer's `{"state_dict": ..., "args": Namespace}` needs the restricted reader: export takes
    --allow-pickle as merge and eval do (its refusal names that flag, which export lacked)."""
    import argparse

    from safetensors.torch import load_file

    from tests.helpers import random_state_dict

    tensors = random_state_dict(5)
    torch.save({"state_dict": tensors, "args": argparse.Namespace(lr=1e-5)}, tmp_path / "trained.pt")
    refused = CliRunner().invoke(cli, ["export", str(tmp_path / "trained.pt"), "--out", str(tmp_path / "no")])
    assert refused.exit_code == 2 and "pass --allow-pickle" in refused.output
    folder = _export(tmp_path / "trained.pt", tmp_path / "oc", "--format", "open_clip", "--allow-pickle")
    exported = load_file(str(folder / "open_clip_model.safetensors"))
    assert exported.keys() == tensors.keys()
    assert all(torch.equal(exported[k], v) for k, v in tensors.items())


def test_an_export_stopped_half_way_leaves_none_of_its_files(tmp_path, checkpoint, monkeypatch):
    """Ctrl-C after the weights were written left model.safetensors and config.json without the
    tokenizer or card, and the rerun was refused ("already holds model.safetensors; pass --force"):
    the export's files are staged and renamed in together, and a staging folder a killed export
    left (which `push` would upload) is removed by the next export."""
    import os

    from micromerge.merging import export

    def interrupted(folder, context_length):
        raise KeyboardInterrupt

    out = tmp_path / "hf"
    out.mkdir()
    left_by_a_killed_export = out / ".staging.999999999.abc"  # no such pid runs
    left_by_a_killed_export.mkdir()
    (left_by_a_killed_export / "model.safetensors").write_bytes(b"half")
    with monkeypatch.context() as patch:
        patch.setattr(export, "_write_clip_tokenizer", interrupted)
        with pytest.raises(KeyboardInterrupt):
            export.export_checkpoint(str(checkpoint), out)
    assert os.listdir(out) == []
    folder = _export(checkpoint, out)
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "merges.txt",
        "model.safetensors",
        "preprocessor_config.json",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]


def test_an_export_into_the_checkpoints_own_folder_never_replaces_the_checkpoint(tmp_path, checkpoint):
    """A run folder exported into itself with --force: model.safetensors (open_clip keys, the one
    its manifest's sha256 names) was replaced by the transformers-keyed export. Refused, nothing
    written; the open_clip layout beside it (other file names) is allowed."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(checkpoint.read_bytes())
    before = (run / "model.safetensors").read_bytes()
    refused = CliRunner().invoke(
        cli, ["export", str(run / "model.safetensors"), "--out", str(run), "--force"]
    )
    assert (
        refused.exit_code == 2
        and "would replace model.safetensors, the checkpoint being exported" in refused.output
    )
    assert sorted(p.name for p in run.iterdir()) == ["model.safetensors"]
    assert (run / "model.safetensors").read_bytes() == before
    _export(run / "model.safetensors", run, "--format", "open_clip")
    assert (run / "open_clip_model.safetensors").is_file() and (
        run / "model.safetensors"
    ).read_bytes() == before


def test_the_exported_weights_carry_their_provenance(tmp_path, checkpoint):
    """Only the README said where an export came from: its weights' header was bare, so an exported
    model merged or exported again had no history. The header now holds the record of how the
    model was made (a merge's, here) and what was exported from what."""
    import hashlib

    from safetensors import safe_open

    from micromerge.merging.model_card import checkpoint_provenance

    write_checkpoint(tmp_path / "ft.safetensors", 6)
    merged = tmp_path / "m.safetensors"
    args = [
        "merge",
        "--base",
        str(checkpoint),
        "--ft",
        str(tmp_path / "ft.safetensors"),
        "--out",
        str(merged),
    ]
    assert CliRunner().invoke(cli, [*args, "--quiet"]).exit_code == 0
    digest = hashlib.sha256(merged.read_bytes()).hexdigest()
    for fmt, weights in (("transformers", "model.safetensors"), ("open_clip", "open_clip_model.safetensors")):
        folder = _export(merged, tmp_path / fmt, "--format", fmt)
        with safe_open(str(folder / weights), "pt") as handle:
            assert handle.metadata()["format"] == "pt", "transformers reads this key"
        record = checkpoint_provenance([folder / weights])
        assert record["method"] == "wise-ft" and record["inputs_sha256"]
        assert record["export"]["format"] == fmt and record["export"]["source_sha256"] == {
            "m.safetensors": digest
        }
    foreign = tmp_path / "foreign.safetensors"
    from safetensors.torch import save_file

    from tests.helpers import random_state_dict

    save_file(random_state_dict(0), str(foreign), metadata={"micromerge.arch": "nano-clip"})
    record = checkpoint_provenance(
        [_export(foreign, tmp_path / "f", "--format", "open_clip") / "open_clip_model.safetensors"]
    )
    assert record["kind"] == "export" and "method" not in record


def test_a_set_that_fails_half_way_through_publishing_says_so(tmp_path, monkeypatch):
    """The files of a staged set are renamed into place one at a time; a failure among the renames
    (a full disk's rename of a folder, a file made read-only meanwhile) left the first ones in place,
    and the error still said "no file was left behind"."""
    import micromerge.core.atomic as atomic

    renames = []
    real = os.replace

    def second_fails(src, dst):
        renames.append(dst)
        if len(renames) == 2:
            raise OSError(28, "No space left on device")
        real(src, dst)

    with pytest.raises(MicromergeError, match="no file was left behind"), atomic.staged_files(tmp_path):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(atomic.os, "replace", second_fails)
    with (
        pytest.raises(
            MicromergeError, match=r"1 of its files were already in place \(a.txt, ...\): write it again"
        ),
        atomic.staged_files(tmp_path) as staging,
    ):
        for name in ("a.txt", "b.txt"):
            (staging / name).write_text(name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"], "the staging folder is removed"


@pytest.mark.parametrize("error", ["ConnectionError", "HFValidationError"])
def test_a_push_the_hub_refuses_or_cannot_reach_is_one_line(tmp_path, checkpoint, monkeypatch, error):
    """Online without a network (DNS), a wrong token, a repo of someone else's or a malformed id:
    huggingface_hub's or httpx's exception (not all of them OSErrors) was a traceback. One line
    naming the repo and what to check."""
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError

    raised = {"ConnectionError": ConnectionError, "HFValidationError": HFValidationError}[error]

    class _Unreachable(_StubHub):
        def create_repo(self, repo_id, **kwargs):
            raise raised("[Errno -2] Name or service not known\nmore detail")

    folder = _export(checkpoint, tmp_path / "hf")
    monkeypatch.setattr(huggingface_hub, "HfApi", _Unreachable)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    result = CliRunner().invoke(cli, ["push", str(folder), "--repo", "lab/merged"])
    assert result.exit_code == 2, result.output
    assert (
        f"--repo lab/merged: the upload failed ({error}: [Errno -2] Name or service not known); "
        "check the network" in result.output
    )
    assert len(result.output.strip().splitlines()) == 1
