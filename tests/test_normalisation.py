"""A checkpoint's image normalisation comes with it: from an open_clip folder or hub repo
(`open_clip_config.json`'s `preprocess_cfg` mean/std) and from a transformers folder or hub repo
(`preprocessor_config.json`'s `image_mean`/`image_std`), into the model config that the evaluation,
fine-tuning and both exports read, and through a merge into the merged checkpoint.

Before: only `model_cfg` and `config.json` were read, so a model trained with other statistics than
OpenAI CLIP's (SigLIP-style 0.5/0.5, for one) was evaluated and exported with OpenAI's. Found while
auditing the export (mutation round 12), by exporting an open_clip folder with its own mean and std.

Formats: open_clip's `open_clip_config.json` = {"model_cfg", "preprocess_cfg": {"mean", "std", ...}}
(open_clip factory.py reads `preprocess_cfg` for `local-dir:` and `hf-hub:`); transformers'
CLIPImageProcessor stores `image_mean` and `image_std` in `preprocessor_config.json`."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from safetensors.torch import save_file

from micromerge.cli import cli
from micromerge.core.errors import MicromergeError
from micromerge.merging.export import export_checkpoint
from micromerge.merging.models import OPENAI_MEAN, OPENAI_STD, get_model_config, load_model, normalisation
from micromerge.merging.sources import open_source
from tests.helpers import random_state_dict
from tests.test_sources import _hub_cache, tiny_hf_clip

transformers = pytest.importorskip("transformers")
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.5, 0.75]


def _open_clip_folder(folder, seed: int = 0, preprocess: dict | None = None):
    folder.mkdir()
    save_file(random_state_dict(seed), str(folder / "open_clip_model.safetensors"))
    config = {
        "model_cfg": get_model_config("nano-clip"),
        "preprocess_cfg": preprocess or {"mean": MEAN, "std": STD},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return folder


def _normalisation_of(spec: str) -> tuple[list[float], list[float]]:
    with open_source(spec) as source:
        _, config = load_model(source)
    mean, std = normalisation(config)
    return mean.tolist(), std.tolist()


def test_an_open_clip_folders_normalisation_reaches_the_model_config_both_exports_and_a_merge(tmp_path):
    base, ft = _open_clip_folder(tmp_path / "base", 0), _open_clip_folder(tmp_path / "ft", 1)
    assert _normalisation_of(str(base)) == (MEAN, STD)

    export_checkpoint(str(base), tmp_path / "hf")
    processor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert (processor["image_mean"], processor["image_std"]) == (MEAN, STD)
    assert _normalisation_of(str(tmp_path / "hf")) == (MEAN, STD), "and read back from the export"
    export_checkpoint(str(base), tmp_path / "oc", fmt="open_clip")
    exported = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())
    assert (exported["preprocess_cfg"]["mean"], exported["preprocess_cfg"]["std"]) == (MEAN, STD)
    assert "preprocess_cfg" not in exported["model_cfg"], "open_clip builds the model from model_cfg"

    merged = tmp_path / "merged.safetensors"
    args = ["merge", "--base", str(base), "--ft", str(ft), "--alpha", "0.5", "--out", str(merged), "--quiet"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert _normalisation_of(str(merged)) == (MEAN, STD)


def test_a_transformers_folders_processor_config_gives_the_normalisation(tmp_path):
    tiny_hf_clip(seed=1).save_pretrained(tmp_path / "hf")
    assert _normalisation_of(str(tmp_path / "hf")) == (
        pytest.approx(OPENAI_MEAN),
        pytest.approx(OPENAI_STD),
    ), "no preprocessor_config.json: OpenAI CLIP's"
    processor = transformers.CLIPImageProcessor(image_mean=MEAN, image_std=STD)
    processor.save_pretrained(tmp_path / "hf")
    assert _normalisation_of(str(tmp_path / "hf")) == (MEAN, STD)


def test_one_number_is_every_channels(tmp_path):
    """CLIPImageProcessor takes a single float for image_mean/image_std (every channel)."""
    tiny_hf_clip(seed=1).save_pretrained(tmp_path / "hf")
    transformers.CLIPImageProcessor(image_mean=0.5, image_std=0.25).save_pretrained(tmp_path / "hf")
    assert _normalisation_of(str(tmp_path / "hf")) == ([0.5] * 3, [0.25] * 3)


def test_a_mean_without_a_std_keeps_the_mean_as_the_libraries_do(tmp_path):
    """CLIPImageProcessor defaults `image_std` on its own (OPENAI_CLIP_STD) when a config names only
    `image_mean`; a half-given normalisation is not thrown away whole."""
    tiny_hf_clip(seed=1).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps({"image_mean": MEAN}))
    processor = transformers.CLIPImageProcessor.from_pretrained(tmp_path / "hf")
    assert _normalisation_of(str(tmp_path / "hf")) == (
        pytest.approx(processor.image_mean),
        pytest.approx(processor.image_std),
    )
    assert _normalisation_of(str(tmp_path / "hf")) == (pytest.approx(MEAN), pytest.approx(OPENAI_STD))


def test_a_std_without_a_mean_keeps_the_std(tmp_path):
    """The other half of the above: each field is defaulted on its own."""
    tiny_hf_clip(seed=1).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps({"image_std": STD}))
    assert _normalisation_of(str(tmp_path / "hf")) == (pytest.approx(OPENAI_MEAN), pytest.approx(STD))


def test_a_transformers_hub_repo_brings_its_processor_config_when_cached(tmp_path):
    tiny_hf_clip(seed=2).save_pretrained(tmp_path / "plip")
    transformers.CLIPImageProcessor(image_mean=MEAN, image_std=STD).save_pretrained(tmp_path / "plip")
    names = ("config.json", "model.safetensors")
    _hub_cache("vinid/plip", {n: (tmp_path / "plip" / n).read_bytes() for n in names})
    assert _normalisation_of("plip")[0] == pytest.approx(OPENAI_MEAN), "offline, not cached: OpenAI's"
    _hub_cache(
        "vinid/plip",
        {"preprocessor_config.json": (tmp_path / "plip" / "preprocessor_config.json").read_bytes()},
    )
    assert _normalisation_of("plip") == (MEAN, STD)


@pytest.mark.parametrize(
    "preprocess, needle",
    [
        ({"mean": [0.5, 0.5], "std": STD}, r"mean must be three numbers .*not \[0.5, 0.5\]"),
        ({"mean": MEAN, "std": [0.5, 0.0, 0.5]}, "std must be three numbers"),
        ({"mean": MEAN, "std": "0.5"}, "std must be three numbers"),
        ({"mean": MEAN, "std": [0.5, float("nan"), 0.5]}, "std must be three numbers"),
        ({"mean": [0.5, float("inf"), 0.5], "std": STD}, "mean must be three numbers"),
    ],
)
def test_a_malformed_normalisation_is_one_line_naming_the_file(tmp_path, preprocess, needle):
    folder = _open_clip_folder(tmp_path / "m", preprocess=preprocess)
    with pytest.raises(MicromergeError, match=needle) as info:
        open_source(str(folder)).close()
    assert "open_clip_config.json" in str(info.value) and "\n" not in str(info.value)
