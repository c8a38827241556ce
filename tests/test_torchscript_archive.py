"""TorchScript archives: the format OpenAI released CLIP in, read without running them.

Facts the fixtures follow, and where they come from:
- OpenAI's CLIP files (`ViT-B-32.pt`, ...) are TorchScript archives: openai/CLIP `clip/clip.py`
  `load()` calls `torch.jit.load` on them, and for `jit=False` rebuilds the model from that
  archive's `state_dict()`; open_clip `openai.py` `load_openai_model` does the same.
- That state dict holds `input_resolution`, `context_length` and `vocab_size` besides the weights:
  openai/CLIP `clip/model.py` `build_model` deletes them, as open_clip's
  `build_model_from_openai_state_dict` callers do. The weights are fp16 (`convert_weights`).
- The release URL's folder is the file's sha256 (`https://openaipublic.azureedge.net/clip/models/
  <sha256>/ViT-B-32.pt`): openai/CLIP `_download` and open_clip `download_pretrained_from_url`
  check it; both keep the file in `~/.cache/clip`. open_clip's pretrained table (tag `openai`)
  lists those URLs with `quick_gelu=True`.
- `torch.load(weights_only=True)` refuses TorchScript archives (torch `serialization.py`).
The archives here are written by torch's own serializer (`torch.jit.script(...).save`), from a
module laid out as OpenAI's (its state-dict names, the three scalars, fp16 weights).
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from torch import nn

from micromerge.cli import cli
from micromerge.core.errors import MicromergeError
from micromerge.core.hashing import sha256_file
from micromerge.merging import openai_release
from micromerge.merging.models import build_model, get_model_config, load_model
from micromerge.merging.sources import open_source
from micromerge.merging.torchscript_archive import read_torchscript_archive

OPENAI_SCALARS = {"input_resolution": 32, "context_length": 16, "vocab_size": 49408}


class _OpenAIRelease(nn.Module):
    """A CLIP laid out as OpenAI's archives are: the open_clip (= OpenAI) names at the root, plus
    the three scalar buffers and the causal mask."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        for name in ("visual", "transformer", "token_embedding", "ln_final"):
            setattr(self, name, getattr(clip, name))
        for name in ("positional_embedding", "text_projection", "logit_scale"):
            setattr(self, name, getattr(clip, name))
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        for name, value in OPENAI_SCALARS.items():
            self.register_buffer(name, torch.tensor(value))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)


def _clip(quick_gelu: bool = True, seed: int = 0) -> nn.Module:
    """nano-clip with QuickGELU; its heads are 32 wide (2 per tower), not the 64 shapes suggest."""
    config = {**get_model_config("nano-clip"), "quick_gelu": quick_gelu}
    torch.manual_seed(seed)
    model = build_model(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model


def _archive(path: Path, clip: nn.Module) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated in torch 2.14, still supported
        torch.jit.script(_OpenAIRelease(clip).half()).save(str(path))
    return path


@pytest.fixture
def clip() -> nn.Module:
    return _clip()


@pytest.fixture
def archive(tmp_path, clip) -> Path:
    return _archive(tmp_path / "ViT-B-32.pt", clip)


def test_the_archive_reads_as_torch_jit_load_states_it_without_loading_it(archive, clip, monkeypatch):
    """The weights are torch's own `torch.jit.load(path).state_dict()`, less the three OpenAI
    scalars and the mask, with the same fp16 values; and jit.load is never called to get them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(archive)).state_dict()
    assert OPENAI_SCALARS.keys() <= loaded.keys() and "attn_mask" in loaded
    expected = {k: v for k, v in loaded.items() if k not in OPENAI_SCALARS and k != "attn_mask"}
    assert expected.keys() == clip.state_dict().keys()

    def refuse(*_args, **_kwargs):
        raise AssertionError("torch.jit.load compiles and runs the archive's code")

    monkeypatch.setattr(torch.jit, "load", refuse)
    contents = read_torchscript_archive(archive)
    assert contents.tensors.keys() == expected.keys()
    for key, tensor in expected.items():
        assert contents.tensors[key].dtype == torch.float16
        assert torch.equal(contents.tensors[key], tensor), key
    assert contents.activation == "quick_gelu"
    assert contents.heads == {"visual": 2, "text": 2}


def test_an_archive_is_refused_without_allow_pickle_and_says_so(archive):
    """torch.load's refusal surfaced as "corrupt or truncated checkpoint", which it is not."""
    with pytest.raises(MicromergeError, match=r"a TorchScript archive .* pass --allow-pickle"):
        open_source(str(archive))
    result = CliRunner().invoke(
        cli, ["merge", "--base", str(archive), "--ft", str(archive), "--out", "m.safetensors"]
    )
    assert result.exit_code == 2 and "TorchScript archive" in result.output


def test_the_model_read_from_an_archive_embeds_as_the_original(archive, clip):
    """Shapes alone would build GELU and 64-wide heads (1 head per tower here): the activation class
    and the attention modules' head counts in the archive make the model the original one."""
    with open_source(str(archive), allow_pickle=True) as source:
        model, config = load_model(source)
    assert config["quick_gelu"] is True
    assert config["vision_cfg"]["head_width"] == 32 and config["text_cfg"]["heads"] == 2
    reference = clip.half().float()  # the archive's weights are fp16
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(0, 49408, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images), reference.encode_image(images), atol=1e-5)
        assert torch.allclose(model.encode_text(tokens), reference.encode_text(tokens), atol=1e-5)


def test_a_gelu_archive_is_built_with_gelu(tmp_path):
    clip = _clip(quick_gelu=False)
    with open_source(str(_archive(tmp_path / "gelu.pt", clip)), allow_pickle=True) as source:
        model, config = load_model(source)
    assert config["quick_gelu"] is False
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images), clip.half().float().encode_image(images), atol=1e-5)


def test_an_archive_naming_neither_activation_is_left_to_its_shapes_and_says_so(tmp_path):
    """An activation the archive's classes do not name (SiLU here) is no reason to guess one: the
    archive gets no architecture, and the shapes' guess comes with its warning to pass --arch."""
    clip = _clip()
    for block in [*clip.visual.transformer.resblocks, *clip.transformer.resblocks]:
        block.mlp.gelu = nn.SiLU()
    with open_source(str(_archive(tmp_path / "silu.pt", clip)), allow_pickle=True) as source:
        assert source.arch.name is None and source.arch.model_config is None
        with pytest.warns(UserWarning, match="names no architecture; read from its tensor shapes with GELU"):
            load_model(source)


def test_open_clip_names_every_openai_release_by_its_sha256():
    """The table comes from the installed open_clip: the digests are the ones openai/CLIP's
    `_MODELS` URLs carry, each for the QuickGELU config of its model."""
    releases = openai_release.openai_releases()
    assert (
        releases["40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"] == "ViT-B-32-quickgelu"
    )
    assert (
        releases["5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"] == "ViT-B-16-quickgelu"
    )
    assert len(releases) == 9
    for name in releases.values():
        assert get_model_config(name)["quick_gelu"] is True


def test_openai_s_own_file_is_read_without_allow_pickle_and_named_by_its_digest(archive, monkeypatch):
    digest = sha256_file(archive)
    monkeypatch.setattr(openai_release, "openai_releases", lambda: {digest: "nano-clip"})
    with open_source(str(archive)) as source:
        assert source.arch.name == "nano-clip"
        assert "visual.conv1.weight" in source.keys()


def test_a_release_url_names_a_digest_only_when_its_folder_is_64_hex_digits():
    """OpenAI's release URLs put the file's sha256 in the folder (open_clip's pretrained table, read
    here from the installed open_clip): ViT-B-32's is the one open_clip's table names. A folder of
    another length, or of 64 characters that are not all hex digits, names no digest (its file is
    never compared against it), nor does a URL of another host."""
    vit_b_32 = "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"
    assert openai_release.openai_releases()[vit_b_32] == "ViT-B-32-quickgelu"
    folder = "https://openaipublic.azureedge.net/clip/models/{}/ViT-B-32.pt"
    assert openai_release.release_digest(folder.format(vit_b_32)) == vit_b_32
    assert openai_release.release_digest(folder.format(vit_b_32[:40])) is None, "hex, but not 64 digits"
    assert openai_release.release_digest(folder.format("g" + vit_b_32[1:])) is None, "64, but not all hex"
    assert openai_release.release_digest(f"https://example.org/{vit_b_32}/ViT-B-32.pt") is None


def _openai_table(monkeypatch, digest: str) -> None:
    """open_clip's table entry for ViT-B-32/openai, with the fixture's digest in its release URL."""
    import open_clip.pretrained as pretrained

    real = pretrained.get_pretrained_cfg

    def table(model: str, tag: str) -> dict:
        cfg = dict(real(model, tag))
        if (model, tag) == ("ViT-B-32", "openai"):
            cfg["url"] = f"https://openaipublic.azureedge.net/clip/models/{digest}/ViT-B-32.pt"
        return cfg

    monkeypatch.setattr(pretrained, "get_pretrained_cfg", table)
    monkeypatch.setattr(openai_release, "openai_releases", lambda: {digest: "nano-clip"})


def test_the_zoo_s_openai_entry_falls_back_to_the_file_in_the_clip_cache(tmp_path, clip, monkeypatch):
    """Offline, with the Hub copy not cached: the `clip` package's ~/.cache/clip/ViT-B-32.pt serves
    `openai-vit-b-32` when its sha256 is the release's; a file of that name with other bytes does not."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cache = tmp_path / "home" / ".cache" / "clip"
    cache.mkdir(parents=True)
    archive = _archive(cache / "ViT-B-32.pt", clip)
    _openai_table(monkeypatch, sha256_file(archive))
    with open_source("openai-vit-b-32") as source:
        assert source.label == "zoo:openai-vit-b-32" and source.arch.name == "nano-clip"
        assert torch.equal(
            source.read("visual.conv1.weight"), clip.half().state_dict()["visual.conv1.weight"]
        )
    _archive(cache / "ViT-B-32.pt", _clip(seed=1))  # another model under the same name
    with pytest.raises(MicromergeError, match=r"put OpenAI's ViT-B-32\.pt in ~/\.cache/clip"):
        open_source("openai-vit-b-32")


def test_a_merge_of_an_archive_with_allow_pickle_equals_the_formula(tmp_path, archive, clip):
    """fp16 base, fp32 fine-tune: the merge is (1-α)·base + α·ft in float32, to 1e-6."""
    finetuned = {k: v.contiguous() for k, v in _clip(seed=3).state_dict().items()}
    save_file(finetuned, str(tmp_path / "ft.safetensors"), metadata={"micromerge.arch": "nano-clip"})
    out = tmp_path / "merged.safetensors"
    result = CliRunner().invoke(
        cli,
        [
            "merge",
            "--base",
            str(archive),
            "--ft",
            str(tmp_path / "ft.safetensors"),
            "--alpha",
            "0.25",
            "--out",
            str(out),
            "--allow-pickle",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    merged = load_file(str(out))
    base = clip.half().state_dict()
    for key, value in finetuned.items():
        expected = 0.75 * base[key].float() + 0.25 * value
        assert torch.allclose(merged[key].float(), expected, atol=1e-6), key


def test_a_damaged_archive_is_named_not_a_traceback(tmp_path, archive):
    damaged = tmp_path / "damaged.pt"
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(damaged, "w") as copy:
        for item in source.infolist():
            data = source.read(item)
            copy.writestr(item, data[: len(data) // 2] if "/data/" in item.filename else data)
    with pytest.raises(
        MicromergeError, match=r"damaged\.pt: not a readable TorchScript archive .*fewer than"
    ):
        open_source(str(damaged), allow_pickle=True)


def test_a_state_dict_without_an_architecture_says_what_its_shapes_cannot(tmp_path, clip):
    """A bare .pt state dict of a QuickGELU model, evaluated without --arch, is built with GELU:
    that guess is said, with the --arch that fixes it; a named architecture says nothing."""
    torch.save(clip.state_dict(), tmp_path / "bare.pt")
    with (
        open_source(str(tmp_path / "bare.pt")) as source,
        pytest.warns(UserWarning, match=r"bare\.pt: names no architecture; .*GELU.*--arch"),
    ):
        load_model(source)
    with open_source(str(tmp_path / "bare.pt"), arch="nano-clip") as source, warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(source)
