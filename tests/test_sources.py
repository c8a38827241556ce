"""Checkpoint sources: every format ends as open_clip keys, verified numerically where it matters."""

import json
import os
import pickle
import re
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from micromerge.core.errors import MicromergeError
from micromerge.merging.models import build_model, get_model_config, infer_model_config, load_model
from micromerge.merging.sources import open_source
from micromerge.merging.tensor_source import TensorMeta
from micromerge.merging.zoo import load_zoo
from tests.helpers import random_state_dict, write_checkpoint

transformers = pytest.importorskip("transformers")


def tiny_hf_clip(seed=0, act="quick_gelu", eps=1e-5):
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=1000,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            hidden_act=act,
            layer_norm_eps=eps,
            eos_token_id=999,
            bos_token_id=998,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            hidden_act=act,
            layer_norm_eps=eps,
        ),
        projection_dim=24,
    )
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def _features(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _inputs():
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, 32, 32)
    tokens = torch.randint(1, 990, (3, 16))
    for row, eos in enumerate((5, 9, 15)):
        tokens[row, eos] = 999
        tokens[row, eos + 1 :] = 0
    return pixels, tokens


def assert_same_embeddings(hf_model, oc_model):
    pixels, tokens = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            oc_model.encode_image(pixels),
            _features(hf_model.get_image_features(pixel_values=pixels)),
            atol=1e-5,
            rtol=1e-5,
        )
        torch.testing.assert_close(
            oc_model.encode_text(tokens),
            _features(hf_model.get_text_features(input_ids=tokens)),
            atol=1e-5,
            rtol=1e-5,
        )


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_transformers_folder_converts_to_open_clip_with_identical_embeddings(tmp_path, act):
    """OpenAI's CLIPs and PLIP use quick_gelu; CLIPs trained since (e.g. LAION's in transformers
    format) use gelu, which the open_clip config must follow or every MLP computes another function."""
    hf_model = tiny_hf_clip(act=act)
    hf_model.save_pretrained(tmp_path / "plip-like")
    with open_source(str(tmp_path / "plip-like")) as source:
        assert "visual.transformer.resblocks.0.attn.in_proj_weight" in source.keys()
        assert not any(k.startswith("vision_model") for k in source.keys())
        oc_model, config = load_model(source)
    assert config["quick_gelu"] is (act == "quick_gelu") and config["vision_cfg"]["patch_size"] == 8
    assert_same_embeddings(hf_model, oc_model)


def test_a_layer_norm_epsilon_of_its_own_is_kept_and_exported(tmp_path):
    """A config's `layer_norm_eps` was not read: a checkpoint trained with 1e-6 (or 1e-3) was
    loaded with torch's 1e-5 in every LayerNorm, each normalisation off by the difference."""
    from micromerge.merging.export import export_checkpoint

    hf_model = tiny_hf_clip(eps=1e-3)
    hf_model.save_pretrained(tmp_path / "own-eps")
    with open_source(str(tmp_path / "own-eps")) as source:
        oc_model, config = load_model(source)
    assert config["vision_cfg"]["norm_kwargs"] == config["text_cfg"]["norm_kwargs"] == {"eps": 1e-3}
    assert_same_embeddings(hf_model, oc_model)
    with pytest.warns(UserWarning, match="does not use CLIP's BPE vocabulary .* no tokenizer written"):
        export_checkpoint(str(tmp_path / "own-eps"), tmp_path / "out", "transformers")
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["text_config"]["layer_norm_eps"] == exported["vision_config"]["layer_norm_eps"] == 1e-3
    assert_same_embeddings(transformers.CLIPModel.from_pretrained(tmp_path / "out").eval(), oc_model)


@pytest.mark.parametrize(
    "tower, edit, needle",
    [
        (
            "vision_config",
            {"num_channels": 1},
            "vision_config.num_channels 1: open_clip's CLIP takes 3-channel",
        ),
        ("text_config", {"layer_norm_eps": "1e-5"}, "text_config.layer_norm_eps must be a number in (0, 1)"),
        ("vision_config", {"layer_norm_eps": 0}, "vision_config.layer_norm_eps must be a number in (0, 1)"),
        ("vision_config", {"layer_norm_eps": 1}, "vision_config.layer_norm_eps must be a number in (0, 1)"),
        # loaded as gelu: every MLP computed another function than the checkpoint was trained with
        (
            "text_config",
            {"hidden_act": "gelu_new"},
            "text_config.hidden_act 'gelu_new' has no open_clip equivalent",
        ),
        ("vision_config", {"hidden_act": "relu"}, "vision_config.hidden_act 'relu' has no open_clip"),
        # open_clip has one quick_gelu flag, which followed the vision tower: the text tower was wrong
        (
            "text_config",
            {"hidden_act": "gelu"},
            "text_config.hidden_act 'gelu' and vision_config.hidden_act 'quick_gelu' differ",
        ),
        # open_clip's AssertionError, with a hint to pass --arch, instead of the config's own fault
        (
            "vision_config",
            {"num_attention_heads": 5},
            "vision_config.hidden_size 48 is not divisible by num_attention_heads 5",
        ),
        (
            "text_config",
            {"num_attention_heads": 3},
            "text_config.hidden_size 32 is not divisible by num_attention_heads 3",
        ),
    ],
)
def test_a_transformers_config_open_clip_cannot_follow_is_named(tmp_path, tower, edit, needle):
    """What transformers' CLIPModel would compute from config.json, open_clip must too, or the
    checkpoint is refused: it is never loaded as another function."""
    tiny_hf_clip().save_pretrained(tmp_path / "clip")
    config_path = tmp_path / "clip" / "config.json"
    config = json.loads(config_path.read_text())
    config[tower].update(edit)
    config_path.write_text(json.dumps(config))
    with (
        pytest.raises(MicromergeError, match=re.escape(needle)),
        open_source(str(tmp_path / "clip")) as source,
    ):
        load_model(source)


def test_export_to_transformers_round_trips(tmp_path):
    from micromerge.merging.export import export_checkpoint

    hf_model = tiny_hf_clip(seed=3)
    hf_model.save_pretrained(tmp_path / "src")
    with pytest.warns(UserWarning, match="no tokenizer written"):  # a 1000-token vocabulary
        export_checkpoint(str(tmp_path / "src"), tmp_path / "exported")
    reloaded = transformers.CLIPModel.from_pretrained(tmp_path / "exported").eval()
    with open_source(str(tmp_path / "src")) as source:
        oc_model, _ = load_model(source)
    assert_same_embeddings(reloaded, oc_model)


def test_export_leaves_out_the_causal_mask_a_state_dict_may_carry(tmp_path):
    """The text tower's causal mask is derived from the context length (transformers builds its own);
    a state dict that carries it as a tensor exports the same weights as one without."""
    from micromerge.merging.hf_clip import openclip_to_hf

    state = random_state_dict(2)
    with_mask = {"attn_mask": torch.full((16, 16), float("-inf")).triu(1), **state}  # first: the rest follow
    plain, exported = openclip_to_hf(state), openclip_to_hf(with_mask)
    assert plain.keys() == exported.keys() and all(torch.equal(plain[k], exported[k]) for k in plain)


def test_pytorch_bin_and_sharded_safetensors_forms_of_transformers_checkpoints(tmp_path):
    hf_model = tiny_hf_clip(seed=4)
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    # checkpoints saved before transformers 4.31 (openai/clip-vit-base-patch32's, PLIP's) also hold
    # both towers' position_ids buffers, non-persistent since (transformers PRs 24505 and 45385)
    state["text_model.embeddings.position_ids"] = torch.arange(16).expand(1, -1)
    state["vision_model.embeddings.position_ids"] = torch.arange(17).expand(1, -1)
    (tmp_path / "bin").mkdir()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text(hf_model.config.to_json_string())
    (tmp_path / "sharded").mkdir()
    keys = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    for name, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, str(tmp_path / "sharded" / name))
    index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "sharded" / "config.json").write_text(hf_model.config.to_json_string())
    for folder in ("bin", "sharded"):
        with open_source(str(tmp_path / folder)) as source:
            oc_model, _ = load_model(source)
        assert_same_embeddings(hf_model, oc_model)


def test_open_clip_training_checkpoint_with_module_prefix(tmp_path):
    tensors = random_state_dict(5)
    torch.save(
        {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in tensors.items()}},
        tmp_path / "epoch_3.pt",
    )
    with open_source(str(tmp_path / "epoch_3.pt")) as source:
        assert sorted(source.keys()) == sorted(tensors)
        assert torch.equal(source.read("visual.conv1.weight"), tensors["visual.conv1.weight"])
        config = infer_model_config({k: source.meta(k) for k in source.keys()})
    reference = get_model_config("nano-clip")
    assert config["vision_cfg"]["width"] == reference["vision_cfg"]["width"]
    assert build_model(config).state_dict().keys() == tensors.keys()


def _shapes_of(config):
    """The tensor shapes an open_clip model of `config` has, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = build_model(config)
    return {k: TensorMeta(tuple(v.shape), "F32") for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("name", "vision"),
    [
        ("ViT-B-32", {"image_size": 224, "layers": 12, "width": 768, "head_width": 64, "patch_size": 32}),
        ("narrow", {"image_size": 32, "layers": 3, "width": 96, "head_width": 32, "patch_size": 8}),
    ],
)
def test_a_config_read_off_the_shapes_takes_gelu_and_the_head_width_it_says(name, vision):
    """What `infer_model_config` reads off shapes equals the config the shapes came from; what
    shapes cannot show it guesses as its warning says: GELU, and 64-wide heads where the width is a
    multiple of 64 (OpenAI's and open_clip's), else about 32-wide ones (96 wide: three of 32)."""
    config = {
        "embed_dim": 512 if name == "ViT-B-32" else 24,
        "quick_gelu": True,
        "vision_cfg": {"mlp_ratio": 4.0, **vision},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 2,
                     "mlp_ratio": 4.0},
    }  # fmt: skip
    inferred = infer_model_config(_shapes_of(config))
    assert inferred["quick_gelu"] is False
    assert inferred["vision_cfg"] == config["vision_cfg"]
    assert inferred["text_cfg"] == config["text_cfg"] and inferred["embed_dim"] == config["embed_dim"]


@pytest.mark.parametrize("arrays", ["torch", "numpy"])
def test_a_safetensors_file_saved_from_a_ddp_wrapped_model_reads_as_the_model_names_its_keys(
    tmp_path, arrays
):
    """Saved from a DDP/DataParallel-wrapped model (or converted from open_clip_train's epoch_N.pt),
    every key starts with `module.`: read as the .pt of the test above is, not refused as 86 keys
    missing; a file where only some keys have it keeps them, and the names stay unique."""
    tensors = random_state_dict(5)
    save_file({f"module.{k}": v.contiguous() for k, v in tensors.items()}, str(tmp_path / "ddp.safetensors"))
    with open_source(str(tmp_path / "ddp.safetensors"), arrays=arrays) as source:
        assert sorted(source.keys()) == sorted(tensors)
        assert (source.read("visual.conv1.weight") == tensors["visual.conv1.weight"].numpy()).all()
    some = {**tensors, "module.extra": torch.zeros(2)}
    save_file({k: v.contiguous() for k, v in some.items()}, str(tmp_path / "some.safetensors"))
    with open_source(str(tmp_path / "some.safetensors"), arrays=arrays) as source:
        assert sorted(source.keys()) == sorted(some)


def _install_legacy_classes(monkeypatch):
    """Stand-ins for wise-ft's `src.models.modeling` and old open_clip's `VisualTransformer`."""
    import open_clip.model as oc_model
    import open_clip.transformer as oc_transformer

    modeling = types.ModuleType("src.models.modeling")

    class ImageEncoder(torch.nn.Module):
        def __init__(self, clip):
            super().__init__()
            self.model = clip
            self.train_preprocess = "transforms would be here"

    class ClassificationHead(torch.nn.Linear):
        def __init__(self, weights):
            super().__init__(weights.shape[1], weights.shape[0])
            self.weight = torch.nn.Parameter(weights.clone())
            self.normalize = True

    class ImageClassifier(torch.nn.Module):
        def __init__(self, encoder, head):
            super().__init__()
            self.image_encoder = encoder
            self.classification_head = head

    class VisualTransformer(oc_transformer.VisionTransformer):
        pass

    for cls, module in (
        (ImageEncoder, modeling),
        (ClassificationHead, modeling),
        (ImageClassifier, modeling),
    ):
        cls.__module__ = "src.models.modeling"
        cls.__qualname__ = cls.__name__
        setattr(module, cls.__name__, cls)
    VisualTransformer.__module__ = "open_clip.model"
    VisualTransformer.__qualname__ = "VisualTransformer"
    for name in ("src", "src.models", "src.models.modeling"):
        monkeypatch.setitem(
            sys.modules, name, modeling if name.endswith("modeling") else types.ModuleType(name)
        )
    monkeypatch.setattr(oc_model, "VisualTransformer", VisualTransformer, raising=False)
    return ImageEncoder, ClassificationHead, ImageClassifier, VisualTransformer


def test_legacy_wise_ft_pickle_is_read_without_its_classes(tmp_path, monkeypatch):
    tensors = random_state_dict(6)
    with monkeypatch.context() as patch:
        ImageEncoder, ClassificationHead, ImageClassifier, VisualTransformer = _install_legacy_classes(patch)
        clip = build_model(get_model_config("nano-clip"))
        clip.load_state_dict(tensors)
        clip.visual.__class__ = VisualTransformer
        head_weights = torch.randn(5, clip.visual.proj.shape[1])
        classifier = ImageClassifier(ImageEncoder(clip), ClassificationHead(head_weights))
        torch.save(classifier, tmp_path / "wiseft_finetuned.pt")
    # Outside the old code base the pickle does not load at all...
    with pytest.raises(Exception, match="VisualTransformer|No module named 'src'"):
        torch.load(tmp_path / "wiseft_finetuned.pt", weights_only=False)
    # ...and micromerge refuses it without the explicit flag:
    with pytest.raises(MicromergeError, match="--allow-pickle"):
        open_source(str(tmp_path / "wiseft_finetuned.pt"))
    with open_source(str(tmp_path / "wiseft_finetuned.pt"), allow_pickle=True) as source:
        # exactly the state dict: the text tower's causal `attn_mask` is a non-persistent buffer
        # (open_clip registers it so), in the pickle but not a weight
        assert set(source.keys()) == {*tensors, "classification_head.weight", "classification_head.bias"}
        for key, value in tensors.items():
            assert torch.equal(source.read(key), value), key
        assert torch.equal(source.read("classification_head.weight"), head_weights)


def test_restricted_unpickler_runs_no_code_from_the_file(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"weight": torch.ones(2), "payload": Evil()}, tmp_path / "evil.pt")
    with open_source(str(tmp_path / "evil.pt"), allow_pickle=True) as source:
        assert torch.equal(source.read("weight"), torch.ones(2))
    assert not marker.exists()


def _hub_cache(repo: str, files: dict[str, bytes]) -> Path:
    """Lay files out exactly as huggingface_hub's cache does (refs/main -> snapshots/<rev>/)."""
    root = Path(os.environ["HF_HUB_CACHE"]) / f"models--{repo.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    snapshot = root / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return snapshot


def test_zoo_transformers_entry_resolves_through_the_hub_cache_offline(tmp_path):
    hf_model = tiny_hf_clip(seed=7)
    hf_model.save_pretrained(tmp_path / "plip")
    _hub_cache(
        "vinid/plip", {n: (tmp_path / "plip" / n).read_bytes() for n in ("config.json", "model.safetensors")}
    )
    with open_source("plip") as source:
        assert source.label == "zoo:plip"
        oc_model, _ = load_model(source)
    assert_same_embeddings(hf_model, oc_model)


def test_zoo_transformers_entry_with_only_pytorch_model_bin_cached(tmp_path):
    hf_model = tiny_hf_clip(seed=9)
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    files = {
        "config.json": hf_model.config.to_json_string().encode(),
        "pytorch_model.bin": (tmp_path / "pytorch_model.bin").read_bytes(),
    }
    _hub_cache("vinid/plip", files)
    with open_source("plip") as source:
        oc_model, _ = load_model(source)
    assert_same_embeddings(hf_model, oc_model)


def test_zoo_transformers_entry_with_its_config_but_no_weights_cached_says_how_to_fetch_them():
    """Offline, with config.json cached (a `hf download vinid/plip config.json`) but no form of the
    weights: not the hub saying the repo has none, so the offline hint, not "no model weights"."""
    _hub_cache("vinid/plip", {"config.json": tiny_hf_clip(seed=9).config.to_json_string().encode()})
    with pytest.raises(MicromergeError) as info:
        open_source("plip")
    message = str(info.value)
    assert "cannot fetch vinid/plip (HF_HUB_OFFLINE=1 and it is not in the Hugging Face cache)" in message
    assert "no config.json with model weights" not in message


def test_zoo_open_clip_entries_resolve_through_open_clip_and_the_hub_cache(tmp_path):
    tensors = random_state_dict(8)
    save_file(tensors, str(tmp_path / "w.safetensors"))
    data = (tmp_path / "w.safetensors").read_bytes()
    _hub_cache("timm/vit_base_patch32_clip_224.openai", {"open_clip_model.safetensors": data})
    config = {"model_cfg": get_model_config("nano-clip"), "preprocess_cfg": {}}
    _hub_cache(
        "wisdomik/QuiltNet-B-32",
        {"open_clip_config.json": json.dumps(config).encode(), "open_clip_model.safetensors": data},
    )
    with open_source("openai-vit-b-32") as source:
        assert source.arch.name == "ViT-B-32-quickgelu"
        assert torch.equal(source.read("visual.proj"), tensors["visual.proj"])
    with open_source("quiltnet-b-32") as source:
        model, _ = load_model(source)  # the architecture comes from the repo's open_clip_config.json
        assert torch.equal(model.state_dict()["visual.proj"], tensors["visual.proj"])
    with open_source("hf-hub:wisdomik/QuiltNet-B-32") as source:
        assert sorted(source.keys()) == sorted(tensors)


class _Payload:
    """Runs `touch marker` when unpickled by the standard unpickler."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("spec", ["hf-hub:wisdomik/QuiltNet-B-32", "plip"])
def test_a_hub_pickle_holding_objects_takes_allow_pickle_as_a_local_file_does(tmp_path, spec):
    """A hub repo's weights as a `.bin` that holds Python objects besides its tensors (an
    `open_clip_pytorch_model.bin`, the name open_clip falls back to when a repo has no safetensors; a
    transformers `pytorch_model.bin`): refused by default, with the flag to pass, and read by the
    restricted reader when it is passed, as a local file is. The refusal said to pass
    `--allow-pickle`, which hub and zoo checkpoints ignored. No code from the file runs either way."""
    marker = tmp_path / "pwned"
    if spec == "plip":
        hf_model = tiny_hf_clip(seed=9)
        tensors = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
        name, repo, extra = (
            "pytorch_model.bin",
            "vinid/plip",
            {"config.json": hf_model.config.to_json_string()},
        )
    else:
        tensors = random_state_dict(8)
        config = {"model_cfg": get_model_config("nano-clip"), "preprocess_cfg": {}}
        name, repo, extra = (
            "open_clip_pytorch_model.bin",
            "wisdomik/QuiltNet-B-32",
            {"open_clip_config.json": json.dumps(config)},
        )
    torch.save({**tensors, "payload": _Payload(marker)}, tmp_path / name)
    _hub_cache(repo, {name: (tmp_path / name).read_bytes(), **{k: v.encode() for k, v in extra.items()}})
    with pytest.raises(MicromergeError, match="holds Python objects, not just tensors; pass --allow-pickle"):
        open_source(spec)
    with open_source(spec, allow_pickle=True) as source:
        if spec == "plip":  # keys converted from transformers' names: compare the models
            model, _ = load_model(source)
            assert_same_embeddings(hf_model, model)
        else:
            assert torch.equal(source.read("visual.proj"), tensors["visual.proj"])
    assert not marker.exists()


@pytest.mark.parametrize(
    "name,repo",
    [
        ("plip", "vinid/plip"),
        ("openai-vit-b-32", "timm/vit_base_patch32_clip_224.openai"),
        ("quiltnet-b-16", "wisdomik/QuiltNet-B-16"),
    ],
)
def test_zoo_offline_without_cache_says_how_to_use_a_local_copy(name, repo):
    with pytest.raises(MicromergeError) as info:
        open_source(name)
    message = str(info.value)
    assert (
        repo in message and "HF_HUB_OFFLINE=1" in message and "--local-dir" in message and "\n" not in message
    )


def test_zoo_lists_the_checkpoints_researchers_use():
    zoo = load_zoo()
    assert {
        "openai-vit-b-32",
        "openai-vit-b-16",
        "plip",
        "quiltnet-b-32",
        "quiltnet-b-16",
        "biomedclip",
        "pubmedclip",
    } <= set(zoo)
    assert zoo["plip"].format == "transformers_hub" and zoo["plip"].finetuned_from == "openai-vit-b-32"


@pytest.mark.slow
def test_biomedclip_architecture_builds_without_any_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = load_zoo()["biomedclip"].model_config()
    model = build_model(config)
    n_params = sum(p.numel() for p in model.parameters())
    assert 180e6 < n_params < 220e6  # ViT-B/16 + PubMedBERT-base
    assert type(model.text.transformer).__name__ == "BertModel"


# torch's own notice on a plain pickle.dump (protocol 4) read by its weights_only unpickler
@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4:UserWarning")
def test_a_blank_checkpoint_name_is_named_empty():
    """`--base "$UNSET "` or spaces alone: no file, folder or zoo name, and not looked up as one."""
    for spec in ("", "   ", "\t"):
        with pytest.raises(MicromergeError, match=r"empty \(an unset variable\?\)"):
            open_source(spec)


def test_pickle_suffix_with_bad_bytes_is_a_clear_error(tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"not a zip or pickle at all")
    with pytest.raises(MicromergeError, match="broken.pt"):
        open_source(str(tmp_path / "broken.pt"))
    with open(tmp_path / "obj.pt", "wb") as handle:
        pickle.dump([1, 2, 3], handle)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(MicromergeError, match="obj.pt"):
        warnings.simplefilter("always")
        open_source(str(tmp_path / "obj.pt"))
    assert not caught, "the one line, without torch's protocol warning before it"


def test_unknown_name_and_missing_file(tmp_path):
    with pytest.raises(MicromergeError, match=r"zoo name \(see"):
        open_source("no-such-model")
    with pytest.raises(MicromergeError, match=r"zoo name \(did you mean quiltnet-b-32\?\)"):
        open_source("quiltnet-b32")  # a near miss of a zoo name is answered with it
    with pytest.raises(MicromergeError, match="no such file"):
        open_source(str(tmp_path / "missing.safetensors"))
    write_checkpoint(tmp_path / "ok.safetensors", 0)
    with open_source(str(tmp_path / "ok.safetensors")) as source:
        assert source.arch.name == "nano-clip"


def test_a_zoo_entry_with_an_unknown_format_is_named(tmp_path):
    """A zoo file edited by hand: an entry whose format no loader handles fails at load, naming it,
    not later as a KeyError when a merge asks for that checkpoint."""
    zoo = tmp_path / "zoo.toml"
    zoo.write_text('[mine]\nformat = "pickle"\nrepo = "me/mine"\n')
    with pytest.raises(MicromergeError, match=r"\[mine\] format must be one of"):
        load_zoo(zoo)


def test_a_zoo_entry_with_an_unknown_field_is_named(tmp_path):
    zoo = tmp_path / "zoo.toml"
    zoo.write_text('[mine]\nformat = "open_clip_hub"\nrepo = "me/mine"\nrevison = "main"\n')
    with pytest.raises(MicromergeError, match=r"zoo.toml: \[mine\] .*'revison'"):
        load_zoo(zoo)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('mine = "me/mine"\n', r"zoo.toml: mine = 'me/mine' is not a table; write it as \[mine\]"),
        (
            '[mine]\ndescription = "d"\nformat = "open_clip_hub"\n',
            r"\[mine\] format 'open_clip_hub' needs repo",
        ),
        (  # an empty repo is none: it was fetched as `hf-hub:`
            '[mine]\ndescription = "d"\nformat = "open_clip_hub"\nrepo = ""\n',
            r"\[mine\] format 'open_clip_hub' needs repo",
        ),
        (
            '[mine]\ndescription = "d"\nformat = "open_clip_tag"\narch = "ViT-B-32"\n',
            r"\[mine\] format 'open_clip_tag' needs open_clip_name and tag",
        ),
        (
            '[mine]\ndescription = "d"\nformat = "transformers_hub"\nrepo = 5\n',
            r"\[mine\] repo must be a quoted",
        ),
        (
            '[mine]\ndescription = "d"\nformat = "open_clip_hub"\nrepo = "me/mine"\nfinetuned_from = "opnai"\n',
            r"\[mine\] finetuned_from = 'opnai' names no zoo entry",
        ),
        (
            '[mine]\ndescription = "d"\nformat = "open_clip_hub"\nrepo = "me/mine"\narch_config = "nope.json"\n',
            r"\[mine\] arch_config 'nope.json': no such file",
        ),
        ("# all entries commented out\n", r"zoo.toml: the zoo has no entries"),
    ],
)
def test_a_hand_edited_zoo_entry_is_checked_when_the_zoo_is_read(tmp_path, text, message):
    """Each of these loaded before (or failed with an AttributeError / a bare ValueError from
    `micromerge zoo`), and a merge naming the entry went on to download `hf-hub:None` or
    `pretrained='None'`: now the entry and what it lacks are named when the zoo is read."""
    zoo = tmp_path / "zoo.toml"
    zoo.write_text(text)
    with pytest.raises(MicromergeError, match=message):
        load_zoo(zoo)


def test_the_shipped_zoo_passes_its_own_checks():
    """Every shipped entry has its format's fields, and every finetuned_from names an entry."""
    zoo = load_zoo()
    assert zoo["plip"].finetuned_from in zoo and zoo["biomedclip"].model_config() is not None


def test_a_zoo_file_that_is_no_toml_is_named(tmp_path):
    zoo = tmp_path / "zoo.toml"
    zoo.write_text('[mine]\nformat = "open_clip_hub\n')
    with pytest.raises(
        MicromergeError, match=r"zoo.toml: not a readable zoo \(.*\); fix the entry you edited"
    ):
        load_zoo(zoo)


def test_zoo_sources_say_where_each_format_is_fetched_from():
    """`micromerge zoo` shows each entry's source: the open_clip tag, or the hub repo and whether
    open_clip or transformers reads it."""
    zoo = load_zoo()
    assert zoo["openai-vit-b-32"].source == "open_clip ViT-B-32 pretrained='openai'"
    assert zoo["quiltnet-b-32"].source == "hf-hub:wisdomik/QuiltNet-B-32"
    assert zoo["plip"].source == "transformers hf-hub:vinid/plip"
