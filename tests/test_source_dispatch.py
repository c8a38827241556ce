"""How `open_source` picks and opens a checkpoint's files (merging/sources.py): which file of a
folder wins, what a broken safetensors index or an unreadable file says, which forms need torch,
and where the architecture comes from for hub checkpoints.

Formats: the sharded-safetensors index (`model.safetensors.index.json` with a `weight_map` of key
-> shard file) and a repository holding both `model.safetensors` and `pytorch_model.bin` are the
transformers `save_pretrained` layouts (transformers docs, "Sharded checkpoints"); open_clip hub
repositories hold `open_clip_model.safetensors` beside `open_clip_config.json` with a `model_cfg`
(open_clip `push_to_hf_hub`); huggingface_hub's cache records a file the repository lacks as
`.no_exist/<revision>/<filename>` (huggingface_hub docs, "Understand caching")."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from micromerge.core.errors import MicromergeError
from micromerge.merging.models import get_model_config, load_model
from micromerge.merging.sources import NeedsTorch, _offline_error, checkpoint_name, open_source
from micromerge.merging.zoo import load_zoo
from tests.helpers import deny_access, random_state_dict
from tests.test_sources import _hub_cache, tiny_hf_clip


def test_a_folder_with_safetensors_and_a_pickle_is_read_from_the_safetensors(tmp_path):
    """Hub repositories often hold both forms; the pickle is never opened when safetensors exist."""
    tensors = random_state_dict(1)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    torch.save(random_state_dict(2), tmp_path / "pytorch_model.bin")
    with open_source(str(tmp_path)) as source:
        assert source.label.endswith("model.safetensors")
        assert torch.equal(source.read("visual.proj"), tensors["visual.proj"])


def test_a_folder_with_one_file_and_a_stale_sharded_index_is_read_as_transformers_reads_it(tmp_path):
    """`save_pretrained` unsharded over a sharded save leaves the old index and shards beside the
    new model.safetensors; `from_pretrained` reads model.safetensors first (transformers
    modeling_utils: SAFE_WEIGHTS_NAME before SAFE_WEIGHTS_INDEX_NAME), and so does open_source."""
    from transformers import CLIPModel

    old, new = tiny_hf_clip(seed=1), tiny_hf_clip(seed=2)
    folder = tmp_path / "hf"
    old.save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    new.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file() and (folder / "model.safetensors.index.json").is_file()
    loaded = CLIPModel.from_pretrained(folder)
    key = "text_model.embeddings.token_embedding.weight"
    assert torch.equal(loaded.state_dict()[key], new.state_dict()[key])
    with open_source(str(folder)) as source:
        assert source.label.endswith("model.safetensors")
        assert torch.equal(source.read("token_embedding.weight"), new.state_dict()[key])


def test_an_index_whose_weight_map_names_no_file_is_one_line(tmp_path):
    with pytest.raises(MicromergeError, match=r"not a safetensors index \(needs a 'weight_map' object\)"):
        open_source(str(_sharded(tmp_path / "odd", {"visual.proj": 3})))
    mixed = {"visual.proj": "model-00001-of-00001.safetensors", "logit_scale": 3}  # one entry names no file
    with pytest.raises(MicromergeError, match=r"not a safetensors index \(needs a 'weight_map' object\)"):
        open_source(str(_sharded(tmp_path / "mixed", mixed)))


@pytest.mark.parametrize(
    "spec, name",
    [
        ("runs/plip-ft/model.safetensors", "plip-ft"),  # a fine-tune's run folder names it
        ("export/open_clip_model.safetensors", "export"),
        ("model.safetensors", "model"),  # no folder to name it by
        ("merges/wise-0.5.safetensors", "wise-0.5"),
        ("old/wise_ft.pt", "wise_ft"),
        ("hf-hub:wisdomik/QuiltNet-B-32", "QuiltNet-B-32"),
        ("ckpts/ViT-B-32.openai", "ViT-B-32.openai"),  # a dot that is no checkpoint suffix
        ("runs/plip/", "plip"),
        ("plip", "plip"),
    ],
)
def test_a_checkpoint_is_named_as_people_call_it(spec, name):
    assert checkpoint_name(spec) == name


def test_an_architecture_named_for_a_checkpoint_must_exist(tmp_path):
    save_file(random_state_dict(1), str(tmp_path / "w.safetensors"))
    with pytest.raises(MicromergeError, match=r"--arch 'ViT-Q-99': unknown architecture"):
        open_source(str(tmp_path / "w.safetensors"), arch="ViT-Q-99")
    with open_source(str(tmp_path / "w.safetensors"), arch="ViT-B-32") as source:
        assert source.arch.name == "ViT-B-32"
    # the closest name, found whatever its case (difflib alone answered vit-b-32 with ViT-S-32)
    for typed, close in (("vit-b-32", "ViT-B-32"), ("ViT-B-32-quickgel", "ViT-B-32-quickgelu")):
        with pytest.raises(
            MicromergeError, match=rf"--arch '{typed}': unknown architecture \(did you mean {close}\?\)"
        ):
            open_source(str(tmp_path / "w.safetensors"), arch=typed)


def test_an_arch_that_replaces_the_one_a_checkpoint_names_is_said(tmp_path):
    """`--arch ViT-B-32` on a checkpoint that names micro-clip failed to fit with only "check
    --arch" to go on; the replacement is now said when the checkpoint is opened."""
    import warnings

    from tests.helpers import write_checkpoint

    write_checkpoint(tmp_path / "w.safetensors", 1, arch="nano-clip")
    with pytest.warns(
        UserWarning,
        match=r"w.safetensors: --arch ViT-B-32 replaces the architecture the checkpoint names \(nano-clip\)",
    ):
        open_source(str(tmp_path / "w.safetensors"), arch="ViT-B-32").close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_source(
            str(tmp_path / "w.safetensors"), arch="nano-clip"
        ).close()  # the same name: nothing to say


def test_bfloat16_tensors_need_torch_for_the_numpy_engine(tmp_path):
    """numpy has no bfloat16: the torch-free engine hands such a checkpoint to torch (NeedsTorch)."""
    tensors = random_state_dict(1)
    tensors["visual.proj"] = tensors["visual.proj"].to(torch.bfloat16)
    save_file(tensors, str(tmp_path / "bf16.safetensors"))
    with pytest.raises(
        NeedsTorch, match=r"holds bfloat16 tensors \(first 'visual.proj'\), which numpy lacks"
    ):
        open_source(str(tmp_path / "bf16.safetensors"), arrays="numpy")
    with open_source(str(tmp_path / "bf16.safetensors")) as source:
        assert source.read("visual.proj").dtype == torch.bfloat16


def test_an_open_clip_folder_takes_its_architecture_from_open_clip_config(tmp_path):
    save_file(random_state_dict(1), str(tmp_path / "open_clip_model.safetensors"))
    config = get_model_config("nano-clip")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    with open_source(str(tmp_path)) as source:
        assert source.arch.model_config == config


def _sharded(folder, weight_map: dict | None):
    folder.mkdir()
    save_file(random_state_dict(1), str(folder / "model-00001-of-00001.safetensors"))
    index = {"metadata": {}} | ({"weight_map": weight_map} if weight_map is not None else {})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder / "model.safetensors.index.json"


def test_a_broken_safetensors_index_is_one_line(tmp_path):
    with pytest.raises(MicromergeError, match=r"not a safetensors index \(needs a 'weight_map' object\)"):
        open_source(str(_sharded(tmp_path / "no-map", None)))
    missing = _sharded(
        tmp_path / "gone", {"a": "model-00001-of-00001.safetensors", "b": "model-x.safetensors"}
    )
    with pytest.raises(MicromergeError, match="shard model-x.safetensors is missing"):
        open_source(str(missing))


def test_an_unreadable_file_says_so_before_opening_it(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_file(random_state_dict(1), str(path))
    deny_access(monkeypatch, path, os.R_OK)
    with pytest.raises(MicromergeError, match="file is not readable"):
        open_source(str(path))


def test_transformers_format_needs_torch_for_the_numpy_engine(tmp_path):
    tiny_hf_clip(seed=1).save_pretrained(tmp_path / "hf")
    with pytest.raises(NeedsTorch, match="transformers-format keys are converted with torch"):
        open_source(str(tmp_path / "hf"), arrays="numpy")


def test_the_offline_error_says_whether_the_hub_was_off_or_unreachable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = str(_offline_error("x", "o/r", OSError()))
    assert "HF_HUB_OFFLINE=1 and it is not in the Hugging Face cache" in message
    assert "set HF_HUB_OFFLINE=1" not in message  # it is set: no advice to set it
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    message = str(_offline_error("x", "o/r", OSError()))
    assert "the hub is unreachable" in message and "not in the Hugging Face cache" not in message
    assert message.endswith("or set HF_HUB_OFFLINE=1 to fail fast")


@pytest.mark.parametrize(
    ("hub", "datasets_flag", "offline", "offline_for_datasets"),
    [
        ("1", None, True, True),
        ("TRUE", None, True, True),
        ("yes", None, True, True),
        ("false", None, False, False),
        ("0", None, False, False),
        ("", None, False, False),
        (None, None, False, False),
        ("1", "0", True, False),
        ("1", "", True, False),  # set, even empty, HF_DATASETS_OFFLINE decides for datasets
        (None, "on", False, True),
    ],
)
def test_offline_settings_are_read_as_the_hub_libraries_read_them(
    monkeypatch, hub, datasets_flag, offline, offline_for_datasets
):
    """huggingface_hub/constants.py: HF_HUB_OFFLINE is on for 1/ON/YES/TRUE in any case; datasets/
    config.py: HF_DATASETS_OFFLINE, when set, decides for datasets. `push` refused HF_HUB_OFFLINE=false
    (the hub reads it as online) and the stream's error missed HF_HUB_OFFLINE=true."""
    from micromerge.core.hub_download import hub_offline, offline_setting

    for name, value in (("HF_HUB_OFFLINE", hub), ("HF_DATASETS_OFFLINE", datasets_flag)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert hub_offline() is offline and hub_offline(dataset=True) is offline_for_datasets
    # the errors name the setting that decided, as the user wrote it
    assert offline_setting() == (f"HF_HUB_OFFLINE={hub}" if offline else None)
    deciding = "HF_DATASETS_OFFLINE" if datasets_flag is not None else "HF_HUB_OFFLINE"
    written = datasets_flag if datasets_flag is not None else hub
    assert offline_setting(dataset=True) == (f"{deciding}={written}" if offline_for_datasets else None)


def _cached_repo_without_config(tmp_path):
    """`hf-hub:me/bare` in the hub cache: open_clip weights, no open_clip_config.json."""
    tensors = random_state_dict(3)
    save_file(tensors, str(tmp_path / "w.safetensors"))
    weights = (tmp_path / "w.safetensors").read_bytes()
    return tensors, _hub_cache("me/bare", {"open_clip_model.safetensors": weights})


def test_an_open_clip_hub_repo_without_a_config_is_opened_when_the_cache_says_it_has_none(tmp_path):
    """The cache's `.no_exist` record means the repo has no open_clip_config.json: not an error."""
    tensors, snapshot = _cached_repo_without_config(tmp_path)
    no_exist = snapshot.parent.parent / ".no_exist" / snapshot.name
    no_exist.mkdir(parents=True)
    (no_exist / "open_clip_config.json").touch()
    with open_source("hf-hub:me/bare") as source:
        assert torch.equal(source.read("visual.proj"), tensors["visual.proj"])
        assert source.arch.model_config is None


def test_an_open_clip_hub_repo_the_hub_says_has_no_config_is_opened(tmp_path, monkeypatch):
    """Online, the hub answering 'no such file' for open_clip_config.json is not an error."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    tensors, _ = _cached_repo_without_config(tmp_path)
    real_download = huggingface_hub.hf_hub_download

    def download(repo_id, filename, **kwargs):
        if filename == "open_clip_config.json":
            raise EntryNotFoundError(f"{repo_id} has no {filename}")
        return real_download(repo_id=repo_id, filename=filename, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    with open_source("hf-hub:me/bare") as source:
        assert torch.equal(source.read("visual.proj"), tensors["visual.proj"])


def test_a_zoo_architecture_config_wins_over_the_repo_config(tmp_path):
    """BiomedCLIP's shipped config (local text-tower path) is used, not the repo's, which names a
    hub tokenizer and text model that cannot be fetched offline."""
    entry = load_zoo()["biomedclip"]
    save_file(random_state_dict(3), str(tmp_path / "w.safetensors"))
    repo_config = {"model_cfg": get_model_config("nano-clip"), "preprocess_cfg": {}}
    _hub_cache(
        entry.repo,
        {
            "open_clip_model.safetensors": (tmp_path / "w.safetensors").read_bytes(),
            "open_clip_config.json": json.dumps(repo_config).encode(),
        },
    )
    with open_source("biomedclip") as source:
        assert source.arch.model_config == entry.model_config()


def test_a_sharded_transformers_hub_repo_with_a_shard_not_cached_says_how_to_fetch_it(tmp_path):
    hf_model = tiny_hf_clip(seed=2)
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    files = {
        n: (tmp_path / "hf" / n).read_bytes()
        for n in ("config.json", "model.safetensors.index.json", *shards[1:])
    }
    _hub_cache("vinid/plip", files)
    with pytest.raises(MicromergeError, match=r"vinid/plip.*hf download") as info:
        open_source("plip")
    assert "\n" not in str(info.value)


def test_a_zoo_tag_open_clip_does_not_know_is_named(tmp_path, monkeypatch):
    """A zoo file edited for an open_clip release that renamed a tag: say which, do not download."""
    zoo = tmp_path / "zoo.toml"
    zoo.write_text(
        '[old]\ndescription = "x"\nformat = "open_clip_tag"\nopen_clip_name = "ViT-B-32"\ntag = "openai-2021"\n'
    )
    monkeypatch.setattr("micromerge.merging.sources.load_zoo", lambda: load_zoo(zoo))
    with pytest.raises(
        MicromergeError, match="zoo:old: open_clip has no pretrained tag 'openai-2021' for ViT-B-32"
    ):
        open_source("old")


@pytest.mark.parametrize(
    "written",
    [
        {},  # every key left to transformers' defaults (ViT-B/32: what openai/clip-vit-base-patch32 is)
        {"projection_dim": 24, "text_config": {"hidden_size": 32}, "vision_config": {"image_size": 64}},
        # older transformers versions also wrote *_config_dict: it is then the whole tower's config
        {
            "text_config": {"hidden_size": 32, "num_hidden_layers": 3, "hidden_act": "quick_gelu"},
            "text_config_dict": {"num_hidden_layers": 2, "max_position_embeddings": 16, "hidden_act": "gelu"},
            "vision_config": {"patch_size": 16},
            "vision_config_dict": {"patch_size": 8, "hidden_act": "gelu"},
        },
    ],
)
def test_a_transformers_config_is_read_as_transformers_resolves_it(written):
    """The reference is transformers' own CLIPConfig: what it makes of a config.json (its defaults
    for what the file leaves out, `*_config_dict` over `*_config`) is what we read."""
    import transformers

    from micromerge.merging.hf_clip import hf_config_to_openclip

    resolved = transformers.CLIPConfig(**json.loads(json.dumps(written))).to_dict()
    assert hf_config_to_openclip(written) == hf_config_to_openclip(resolved)
    full = hf_config_to_openclip(resolved)
    vision, text = resolved["vision_config"], resolved["text_config"]
    assert full["vision_cfg"]["patch_size"] == vision["patch_size"]
    assert full["quick_gelu"] == (vision["hidden_act"] == "quick_gelu")
    assert full["text_cfg"]["layers"] == text["num_hidden_layers"]
    assert full["embed_dim"] == resolved["projection_dim"]


def test_broken_json_beside_a_checkpoint_is_one_line(tmp_path):
    from micromerge.merging.hf_clip import openclip_to_hf

    hf, oc = tmp_path / "hf", tmp_path / "oc"
    hf.mkdir(), oc.mkdir()
    tensors = random_state_dict(0)
    save_file({k: v.contiguous() for k, v in openclip_to_hf(tensors).items()}, str(hf / "model.safetensors"))
    save_file(tensors, str(oc / "open_clip_model.safetensors"))
    for folder, name, text, needle in (
        (hf, "config.json", "{cut", r"config.json: unreadable \(Expecting property name"),
        (hf, "config.json", "[1, 2]", "config.json: holds a JSON list, not an object"),
        (
            hf,
            "config.json",
            '{"text_config": {"hidden_size": "wide"}}',
            r"text_config.hidden_size must be a positive integer, not 'wide'",
        ),
        (hf, "config.json", '{"vision_config": 3}', "vision_config must be an object, not 3"),
        (
            hf,
            "config.json",
            '{"vision_config": {"num_hidden_layers": 0}}',
            "vision_config.num_hidden_layers must be a positive integer, not 0",
        ),
        (
            hf,
            "config.json",
            '{"projection_dim": true}',
            "config.projection_dim must be a positive integer, not True",
        ),
        (oc, "open_clip_config.json", "{cut", r"open_clip_config.json: unreadable .*pass --arch"),
    ):
        (folder / name).write_text(text)
        with pytest.raises(MicromergeError, match=needle):
            open_source(str(folder))
        (folder / name).unlink()
    (hf / "config.json").write_text("{}")
    (hf / "preprocessor_config.json").write_text("{cut")
    with pytest.raises(MicromergeError, match="preprocessor_config.json: unreadable .*OpenAI CLIP's"):
        open_source(str(hf))
    with pytest.raises(MicromergeError, match=r"not a safetensors index \(needs a 'weight_map' object\)"):
        open_source(str(_sharded(tmp_path / "list-map", ["a"])))


def test_keys_without_a_counterpart_in_the_other_format_are_named():
    """Only ViT CLIPs exist in transformers' format: a key of anything else (an adapter, a head) is
    named, in both directions, instead of being dropped from the weights."""
    from micromerge.merging.hf_clip import hf_to_openclip_recipes, openclip_to_hf

    with pytest.raises(
        MicromergeError,
        match=r"no open_clip equivalent: \['vision_model.encoder.layers.0.adapter.weight'\] \(\+0 more\)",
    ):
        hf_to_openclip_recipes(
            ["vision_model.encoder.layers.0.adapter.weight", "text_model.embeddings.position_ids"]
        )
    with pytest.raises(MicromergeError, match="cannot export key 'head.weight' to transformers CLIP format"):
        openclip_to_hf({**random_state_dict(0), "head.weight": torch.zeros(2, 2)})


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_a_transformers_tower_saved_alone_merges_and_is_named_when_evaluated(tmp_path, tower):
    """transformers' CLIPVisionModelWithProjection / CLIPTextModelWithProjection (keys from the
    library itself) hold one tower under `vision_model.` / `text_model.`. Merged, it is merged key by
    key, as before. Evaluated, "cannot tell its architecture; pass --arch NAME" named a mend that
    cannot work (an open_clip architecture does not hold its keys): it now says which tower is there
    and that zero-shot needs both."""
    import transformers
    from click.testing import CliRunner

    from micromerge.cli import cli

    config = tiny_hf_clip().config
    alone = (
        transformers.CLIPVisionModelWithProjection(config.vision_config)
        if tower == "vision"
        else transformers.CLIPTextModelWithProjection(config.text_config)
    )
    held, lacking = (f"{tower}_model", "text_model" if tower == "vision" else "vision_model")
    weights = {k: v.contiguous() for k, v in alone.state_dict().items() if not k.endswith("position_ids")}
    assert any(k.startswith(f"{held}.") for k in weights) and not any(
        k.startswith(f"{lacking}.") for k in weights
    )
    for name, scale in (("a", 1.0), ("b", 2.0)):
        (tmp_path / name).mkdir()
        save_file({k: v * scale for k, v in weights.items()}, str(tmp_path / name / "model.safetensors"))
    merged = tmp_path / "merged.safetensors"
    made = CliRunner().invoke(cli, ["merge", "--base", str(tmp_path / "a"), "--ft", str(tmp_path / "b"),
                                    "--alpha", "0.5", "--out", str(merged), "--quiet"])  # fmt: skip
    assert made.exit_code == 0, made.output
    with open_source(str(merged)) as source:
        key = next(iter(weights))
        torch.testing.assert_close(source.read(key), torch.as_tensor(weights[key] * 1.5), atol=1e-6, rtol=0)
    message = (
        f"{tmp_path / 'a' / 'model.safetensors'}: transformers-format weights of the {tower} tower alone "
        f"({held}.* keys, no {lacking}.*: a CLIP{tower.title()}Model's, not a CLIPModel's); zero-shot "
        "evaluation needs both towers: pass the whole CLIPModel's weights"
    )
    with (
        open_source(str(tmp_path / "a")) as source,
        pytest.raises(MicromergeError, match=f"^{re.escape(message)}$"),
    ):
        load_model(source)
