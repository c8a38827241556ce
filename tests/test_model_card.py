"""The model card: every fact on it comes from the checkpoint's provenance, found where micromerge
writes it, and is printed as it was measured. test_export checks a card end to end; these check each
field against the record it comes from (mutation audit round 12: the hub ids, the evaluation's
percentages and intervals, the fine-tuning hyperparameters, the learned-from data and the
header-only provenance had no test).

Hugging Face model-card metadata (the YAML block, `library_name`, `base_model` as a list of repo
ids): huggingface.co/docs/hub/model-cards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import save_file

from micromerge.merging.model_card import checkpoint_provenance, model_card
from tests.helpers import random_state_dict


def _header(card: str) -> list[str]:
    return card.split("---\n")[1].splitlines()


def test_hub_inputs_become_base_model_ids_and_the_library_is_what_loads_the_folder():
    record = {
        "method": "ties",
        "base": "hf-hub:org/base-clip",
        "inputs": ["hf-hub:org/plip", "local/ft.safetensors", "hf-hub:org/plip"],
    }
    header = _header(model_card("m", record, "micromerge"))
    assert header == [
        "library_name: open_clip",
        "license: other",
        "tags:",
        "- micromerge",
        "- clip",
        "- microscopy",
        "- ties",
        "base_model:",
        "- org/base-clip",
        "- org/plip",
    ]
    assert "base_model:" not in model_card(
        "m", {"method": "ties", "inputs": ["a.safetensors"]}, "transformers"
    )


def test_zoo_inputs_name_the_hub_repos_their_weights_come_from():
    """The flagship merge, WiSE-FT of PLIP (`--base openai-vit-b-32 --ft plip`), records its inputs
    as zoo labels, and a fine-tune of a zoo model its base as the bare name: the card had no
    base_model for either. A zoo hub entry is its repo; an open_clip tag is the repo open_clip
    fetches it from (open_clip/pretrained.py: ViT-B-32 'openai' -> timm/vit_base_patch32_clip_224.openai)."""
    merged = _header(
        model_card("m", {"method": "wise-ft", "inputs": ["zoo:openai-vit-b-32", "zoo:plip"]}, "open_clip")
    )
    assert merged[merged.index("base_model:") + 1 :] == [
        "- timm/vit_base_patch32_clip_224.openai",
        "- vinid/plip",
    ]
    tuned = _header(
        model_card("run", {"kind": "finetune-contrastive", "base": "quiltnet-b-32"}, "micromerge")
    )
    assert tuned[tuned.index("base_model:") + 1 :] == ["- wisdomik/QuiltNet-B-32"]


def test_a_zoo_file_that_does_not_read_costs_the_card_its_base_model_not_the_export(monkeypatch):
    """A hand-edited zoo.toml with an error stops `merge --base plip`, but a card written for an
    export of a finished checkpoint only loses the Hub ids it would have drawn from the zoo."""
    from micromerge.core.errors import MicromergeError
    from micromerge.merging import model_card as cards

    def broken_zoo():
        raise MicromergeError("zoo.toml: not a readable zoo")

    monkeypatch.setattr(cards, "load_zoo", broken_zoo)
    header = _header(
        model_card("m", {"method": "wise-ft", "inputs": ["zoo:plip", "hf-hub:org/b"]}, "open_clip")
    )
    assert header[header.index("base_model:") + 1 :] == ["- org/b"]


def test_a_bare_name_that_is_a_local_folder_is_not_taken_for_the_zoo_entry(tmp_path, monkeypatch):
    """`--base plip` opens a folder named plip before the zoo (merging/sources.py): its card must
    not claim vinid/plip as the base."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plip").mkdir()
    card = model_card("run", {"kind": "finetune-contrastive", "base": "plip"}, "micromerge")
    assert "base_model:" not in card


def test_the_evaluation_table_prints_percentages_and_both_interval_ends():
    rows = [
        {
            "task": "ubench:coarse",
            "protocol": "ubench",
            "split": "report",
            "value": 0.8125,
            "ci_low": 0.7004,
            "ci_high": 0.9051,
        }
    ]
    card = model_card("m", {"method": "wise-ft"}, "open_clip", rows)
    assert "| ubench:coarse | ubench | report | 81.2 % | 70.0 – 90.5 |" in card.splitlines()
    assert "Evaluated on:" not in card, "rows without their run's provenance: nothing to say of it"
    # evaluated with --bootstrap 0: the row's ci_low/ci_high are its point value, no interval
    unbooted = [{**rows[0], "ci_low": 0.8125, "ci_high": 0.8125, "bootstrap": 0}]
    card = model_card("m", {"method": "wise-ft"}, "open_clip", unbooted)
    assert "| ubench:coarse | ubench | report | 81.2 % | not computed (--bootstrap 0) |" in card.splitlines()


def test_the_card_says_what_each_evaluation_was_on_and_under_which_task_table():
    """The rows' own provenance: the data's fingerprint, and the `--sources` table when one read the
    tasks (the same task names then hold other rows)."""
    row = {"task": "ubench:coarse", "split": "all", "value": 0.5, "ci_low": 0.4, "ci_high": 0.6,
           "dataset": {"source": "/data/ubench", "fingerprint": "f00d"}, "micromerge_version": "0.1.3"}  # fmt: skip
    rows = [
        {**row, "run_id": "r1", "protocol": "ubench", "sources": None},
        {
            **row,
            "run_id": "r2",
            "protocol": "closed-set",
            "sources": {"file": "moved.toml", "sha256": "ab" * 32},
        },
    ]
    lines = model_card("m", {"method": "wise-ft"}, "open_clip", rows).splitlines()
    assert (
        "- `ubench` (run `r1`, micromerge 0.1.3): /data/ubench (data fingerprint `f00d`), tasks as "
        "micromerge's shipped source table reads them" in lines
    )
    assert (
        "- `closed-set` (run `r2`, micromerge 0.1.3): /data/ubench (data fingerprint `f00d`), tasks read "
        f"under `--sources moved.toml` (sha256 `{'ab' * 32}`)" in lines
    )


def test_a_finetuned_runs_card_has_its_kind_base_digests_and_hyperparameters():
    record = {
        "kind": "finetune-contrastive",
        "base": "clip-b32",
        "base_sha256": {"clip-b32/open_clip_model.safetensors": "ab" * 32},
        "hyperparameters": {"lr": 1e-05, "epochs": 3},
        "data_fingerprint": "ef" * 32,  # its caption corpus: captions, not a benchmark task's labels
    }
    card = model_card("run", record, "micromerge")
    assert "Trained with labels on benchmark data" not in card
    assert "- finetune-contrastive" in _header(card) and "(`finetune-contrastive`)" in card
    assert f"| `clip-b32/open_clip_model.safetensors` | `{'ab' * 32}` |" in card.splitlines()
    assert json.dumps(record["hyperparameters"], indent=2, sort_keys=True) in card
    single = model_card(
        "run",
        {"kind": "finetune-contrastive", "base": "b.safetensors", "base_sha256": "cd" * 32},
        "open_clip",
    )
    assert f"| `b.safetensors` | `{'cd' * 32}` |" in single.splitlines()


def test_a_finetuned_runs_card_says_what_it_was_trained_on_how_far_and_its_loss():
    """The input table names only the base: the corpus that made the specialist (and its
    fingerprint, so a changed corpus is told apart) was only in the manifest, not on the card a
    user shares. Values as finetune/trainer.py records them."""
    record = {
        "kind": "finetune-supervised",
        "base": "clip-b32",
        "base_sha256": {"clip-b32.safetensors": "ab" * 32},
        "data": "ubench-copy/perception/0.1.0",
        "data_fingerprint": "ef" * 32,
        "data_path": {"in_memory": True, "why": "fits", "fingerprint": "the benchmark's files"},
        "domain": "pathology",
        "classes": ["benign", "malignant"],
        "steps": 120,
        "images_seen": 7680,
        "processes": 2,
        "device": "cuda:0",
        "corrupt_images_skipped": 3,
        "corrupt_images_listed": "unreadable.txt",
        "loss_summary": {"first": 0.69314, "last": 0.12345, "min": 0.1, "mean_last_10": 0.13579},
    }
    lines = model_card("run", record, "open_clip").splitlines()
    training = lines[lines.index("Training:") :]
    for row in (
        "| data | `ubench-copy/perception/0.1.0` |",
        f"| data fingerprint | `{'ef' * 32}` (over the benchmark's files) |",
        "| domain | pathology |",
        "| classes | benign, malignant |",
        "| steps | 120, 7680 images seen |",
        "| processes | 2 on cuda:0 |",
        "| unreadable images left out | 3 (listed in `unreadable.txt` beside the run's model) |",
        "| loss | 0.6931 at the first step, 0.1235 at the last (mean of the last 10: 0.1358) |",
    ):
        assert row in training, row
    merged = {"method": "wise-ft", "inputs_sha256": {"a": "1" * 64}, "data_fingerprint": "ef" * 32}
    assert "Training:" not in model_card("run", merged, "open_clip"), "a merge was not trained"
    clean = model_card("run", {**record, "corrupt_images_skipped": 0}, "open_clip")
    assert "unreadable images" not in clean, "nothing left out: no row"


def test_a_data_aware_merge_says_what_data_it_learned_from():
    statistics = [{"model": "base", "data": "ubench", "split": "select", "samples": 256}]
    card = model_card("m", {"method": "fisher", "statistics": statistics}, "open_clip")
    assert "Data it learned from" in card and json.dumps(statistics, indent=2, sort_keys=True) in card
    assert "Data it learned from" not in model_card("m", {"method": "ties"}, "open_clip")


def _safetensors_with_provenance(path: Path, record: dict) -> Path:
    save_file(random_state_dict(0), str(path), metadata={"micromerge.core.provenance": json.dumps(record)})
    return path


def test_provenance_is_found_in_the_manifest_beside_the_file_first_then_the_folders_then_the_header(tmp_path):
    model = _safetensors_with_provenance(
        tmp_path / "m.safetensors", {"method": "from-header", "micromerge_version": "0.1"}
    )
    assert checkpoint_provenance([model]) == {"method": "from-header", "micromerge_version": "0.1"}, (
        "a lone file: its header"
    )
    (tmp_path / "manifest.json").write_text(
        json.dumps({"method": "from-folder", "micromerge_version": "0.1"})
    )
    assert checkpoint_provenance([model]) == {"method": "from-folder", "micromerge_version": "0.1"}
    (tmp_path / "m.safetensors.manifest.json").write_text(
        json.dumps({"method": "from-file", "micromerge_version": "0.1"})
    )
    assert checkpoint_provenance([model]) == {"method": "from-file", "micromerge_version": "0.1"}


def test_a_corrupt_manifest_falls_back_to_the_header_and_a_foreign_file_has_none(tmp_path):
    model = _safetensors_with_provenance(
        tmp_path / "m.safetensors", {"method": "from-header", "micromerge_version": "0.1"}
    )
    (tmp_path / "m.safetensors.manifest.json").write_text('{"method": ')
    (tmp_path / "manifest.json").write_text("not json")
    assert checkpoint_provenance([model]) == {"method": "from-header", "micromerge_version": "0.1"}
    foreign = tmp_path / "other" / "weights.safetensors"
    foreign.parent.mkdir()
    save_file(random_state_dict(0), str(foreign))
    assert checkpoint_provenance([foreign]) == {}
    assert "No micromerge provenance was found" in model_card("weights", {}, "open_clip")


@pytest.mark.parametrize("foreign", ['{"name": "web app", "files": ["a.js"]}', "[1, 2]", '"text"'])
def test_another_tools_manifest_beside_a_checkpoint_is_not_its_provenance(tmp_path, foreign):
    """A folder's manifest.json may be any tool's: a JSON object without `micromerge_version` made
    a card "Made with micromerge (`unknown`)" with an empty input table, and a JSON list crashed
    export with an AttributeError. Only micromerge's own records count; the header is next."""
    model = tmp_path / "m.safetensors"
    save_file(random_state_dict(0), str(model))
    (tmp_path / "manifest.json").write_text(foreign)
    assert checkpoint_provenance([model]) == {}
    header = _safetensors_with_provenance(
        tmp_path / "h.safetensors", {"method": "ties", "micromerge_version": "0.1"}
    )
    assert checkpoint_provenance([header]) == {"method": "ties", "micromerge_version": "0.1"}


def test_the_card_names_the_version_that_made_the_model_and_the_one_that_wrote_the_card():
    """The card said "Made with micromerge <the exporting version>": a model merged by 0.1.0 and
    exported by a later one was credited to the later one."""
    import micromerge

    card = model_card("m", {"method": "ties", "micromerge_version": "0.0.9"}, "open_clip")
    assert f"Made with micromerge 0.0.9 (`ties`); this card by micromerge {micromerge.__version__}." in card


def test_the_card_is_titled_by_the_checkpoints_name(tmp_path):
    """A run folder's model.safetensors by its folder, a file by its stem, a hub id by its repo
    name, dots and all (it was cut at the last dot, as if it were a file suffix)."""
    from micromerge.merging.model_card import write_model_card

    for checkpoint, title in (
        ("runs/pathology/model.safetensors", "pathology"),
        ("merged-a0.5.safetensors", "merged-a0.5"),
        ("hf-hub:org/clip.v2", "clip.v2"),
        ("plip", "plip"),
    ):
        card = write_model_card(tmp_path, checkpoint, [], "open_clip").read_text()
        assert f"\n# {title}\n" in card, checkpoint
