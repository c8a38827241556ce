"""Issue #11 on the fine-tuning path: hyper-parameters validated up front (M3), a resume refuses
changed data or base (M7), state left by a kill after the manifest is cleaned (smaller), and
caption files with bad bytes are one line (C9). Each test fails on the code before the fix."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import pytest

from micromerge.core.errors import MicromergeError
from micromerge.finetune.config import FinetuneConfig
from micromerge.finetune.trainer import run_finetune
from tests.test_finetune import _png, config, write_csv_folder


@pytest.fixture
def base(tmp_path):
    from tests.helpers import write_checkpoint

    write_checkpoint(tmp_path / "base.safetensors", 0)
    return tmp_path / "base.safetensors"


@pytest.mark.parametrize(
    "override, needle",
    [
        ({"lr": float("inf")}, "--lr inf"),
        ({"weight_decay": float("nan")}, "--weight-decay nan"),
        ({"grad_clip": -1.0}, "--grad-clip -1.0"),
        ({"max_steps": 0}, "--max-steps 0"),
        ({"max_steps": -3}, "--max-steps -3"),
        ({"lp_epochs": -5}, "--lp-epochs -5"),
        ({"seed": -1}, "--seed -1"),
        ({"lr": 0.0}, "--lr 0.0: must be a finite number > 0"),  # a run that cannot move
        ({"max_bad_fraction": 1.5}, "--max-bad-fraction 1.5"),
        ({"epochs": True}, "--epochs True"),  # a bool is an int to Python, not a count
        ({"workers": -1}, "--workers -1"),
        ({"workers": True}, "--workers True: must be an integer"),  # a config file's `workers = true`
        ({"batch_size": 0}, "--batch-size 0: must be an integer of at least 1"),
        ({"accum_steps": 0}, "--accum-steps 0: must be an integer of at least 1"),
        ({"warmup_steps": -1}, "--warmup-steps -1: must be an integer of at least 0"),
        ({"save_every": -1}, "--save-every -1: must be an integer of at least 0"),
        ({"weight_decay": -0.1}, "--weight-decay -0.1: must be a finite number >= 0"),
        (
            {"mode": "supervised", "task": "t", "freeze_text": False},
            "finetune supervised: --train-text would train nothing",
        ),
        ({"resume": True, "force": True}, "--resume and --force: one continues the run in --out, the other"),
        ({"precision": "fp8"}, "--precision fp8: expected no, bf16 or fp16"),
        ({"data_in_memory": "maybe"}, "--data-in-memory maybe: expected auto, yes or no"),
        ({"mode": "supervised"}, "finetune supervised: --task is required"),
        # a [finetune] table can name what the contrastive command has no flag for
        ({"lp_epochs": 1}, "finetune contrastive: lp_epochs applies to supervised fine-tuning only"),
        (
            {"task": "kather_et_al_2016"},
            "finetune contrastive: task applies to supervised fine-tuning only .* run `finetune supervised`",
        ),
    ],
)
def test_hyper_parameters_out_of_range_are_refused(tmp_path, override, needle):
    with pytest.raises(MicromergeError, match=needle.replace("+", r"\+")):
        FinetuneConfig(**{**config("b", "d", tmp_path).__dict__, **override})


def test_the_recorded_hyper_parameters_are_exactly_what_can_change_the_weights(tmp_path):
    """`hyperparameters()` is the manifest's record and the digest a resume compares: how the data
    is read, where and with how much progress output must not refuse a resume; the seed and
    every training choice must. `freeze_text` is recorded as resolved (contrastive: False)."""
    from dataclasses import replace

    run = config("b", "d", tmp_path / "run")
    logistics = replace(
        run, out=tmp_path / "elsewhere", workers=0, data_in_memory="no", device="cuda", progress=True
    )
    assert logistics.hyperparameters() == run.hyperparameters()
    for change in ({"seed": 1}, {"lr": 2e-3}, {"augment": ("flip",)}, {"freeze_text": True}):
        assert replace(run, **change).hyperparameters() != run.hyperparameters(), change
    assert run.hyperparameters()["freeze_text"] is False
    assert "augment" not in run.hyperparameters()  # runs from before augmentation keep their digest
    assert replace(run, mode="supervised", task="t").hyperparameters()["freeze_text"] is True


@pytest.mark.parametrize("mode", ["supervised", "other"])
def test_a_config_files_mode_other_than_the_subcommand_is_refused(tmp_path, mode):
    """The subcommand is the mode: a file's `mode = "supervised"` under `finetune contrastive`
    was overridden silently, and the task it named was then refused with the advice to set
    mode = "supervised", the very line the file had."""
    from click.testing import CliRunner

    from micromerge.cli import cli

    path = tmp_path / "ft.toml"
    path.write_text(f'[finetune]\nmode = "{mode}"\nbase = "b"\ndata = "d"\nout = "o"\n')
    result = CliRunner().invoke(cli, ["finetune", "contrastive", "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert f"ft.toml [finetune]: mode = '{mode}', but this is `finetune contrastive`" in result.output


@pytest.mark.parametrize("required", ["mode", "base", "data", "out"])
def test_a_finetune_config_file_must_name_what_it_trains_and_where(required):
    """Without `out` the file's table reached Path(None): a TypeError traceback, not one line."""
    from micromerge.finetune.config import config_from_mapping

    values = {"mode": "contrastive", "base": "b", "data": "d", "out": "o"}
    del values[required]
    with pytest.raises(MicromergeError, match=f"finetune: --{required} is required"):
        config_from_mapping(values)


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("warmup_steps = -1", "--warmup-steps -1: must be an integer of at least 0"),
        ("batch_size = 0", "--batch-size 0: must be an integer of at least 1"),
    ],
)
def test_a_finetune_config_files_value_is_not_replaced_by_a_flags_default(tmp_path, line, needle):
    """A key the file sets and the command line leaves out keeps the file's value: the flag's default
    (warmup 0, batch 64) would have trained silently with what the file did not ask for. Values
    that are refused show which one reached the run, before any data is read."""
    from click.testing import CliRunner

    from micromerge.cli import cli

    path = tmp_path / "ft.toml"
    path.write_text(f'[finetune]\nbase = "b"\ndata = "d"\nout = "o"\n{line}\n')
    result = CliRunner().invoke(cli, ["finetune", "contrastive", "--config", str(path)])
    assert result.exit_code == 2 and needle in result.output, result.output


def test_a_finetune_config_files_freeze_must_be_a_list(tmp_path):
    """`freeze = "visual.*"` (one pattern, not in a list) became the patterns 'v', 'i', 's', ...: the
    schema names the key and what it takes."""
    from click.testing import CliRunner

    from micromerge.cli import cli

    path = tmp_path / "ft.toml"
    path.write_text('[finetune]\nbase = "b"\ndata = "d"\nout = "o"\nfreeze = "visual.*"\n')
    result = CliRunner().invoke(cli, ["finetune", "contrastive", "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert "ft.toml [finetune]: freeze must be a list of strings" in result.output


def test_an_unknown_key_in_a_finetune_config_file_is_named():
    """A misspelt key (`learning_rate` for `lr`) would otherwise train with the default silently."""
    from micromerge.finetune.config import config_from_mapping

    values = {"mode": "contrastive", "base": "b", "data": "d", "out": "o", "learning_rate": 1e-4}
    with pytest.raises(MicromergeError, match=r"unknown key\(s\) \['learning_rate'\]"):
        config_from_mapping(values)


def test_the_bounds_themselves_are_accepted(tmp_path):
    """Each bound is a setting users give: --grad-clip 0 disables clipping, --weight-decay 0 and
    --warmup-steps 0 turn them off, --save-every 0 saves no state, --seed 0 is a seed."""
    settings = dict(grad_clip=0.0, weight_decay=0.0, warmup_steps=0, save_every=0, lp_epochs=0, seed=0)
    built = config(tmp_path, tmp_path, tmp_path / "out", **settings)
    assert all(getattr(built, name) == value for name, value in settings.items())


def test_a_config_built_in_python_is_as_careful_as_the_cli(tmp_path, base):
    """FinetuneConfig's defaults are the CLI's: a script that builds one without resume, force or
    allow_pickle neither continues nor replaces an earlier run, nor reads a pickle that needs more
    than torch's weights_only reader (a trainer checkpoint with its argparse arguments)."""
    import argparse

    import torch
    from safetensors.torch import load_file

    data = write_csv_folder(tmp_path / "pairs")
    minimal = dict(
        mode="contrastive", base=str(base), data=str(data), out=tmp_path / "run", max_steps=1, batch_size=8,
        device="cpu", progress=False,
    )  # fmt: skip
    run_finetune(FinetuneConfig(**minimal))
    with pytest.raises(MicromergeError, match="pass --resume to continue a run or --force to replace them"):
        run_finetune(FinetuneConfig(**minimal))
    pickled = tmp_path / "trainer.pt"
    torch.save({"state_dict": load_file(str(base)), "args": argparse.Namespace(lr=1e-5)}, pickled)
    with pytest.raises(MicromergeError, match="--allow-pickle"):
        run_finetune(FinetuneConfig(**{**minimal, "base": str(pickled), "out": tmp_path / "other"}))


def _killed_after_step_two(tmp_path, base, data, monkeypatch) -> None:
    """The run folder a kill after the step-2 save leaves: state, no manifest, no model."""
    with monkeypatch.context() as patch:  # keep the step-2 state a kill would have left behind
        patch.setattr("micromerge.finetune.trainer.shutil.rmtree", lambda *a, **k: None)
        run_finetune(config(base, data, tmp_path / "run", max_steps=4, save_every=2))
    for name in ("manifest.json", "model.safetensors"):
        (tmp_path / "run" / name).unlink()
    assert (tmp_path / "run" / "state" / "LATEST").is_file()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names descriptors through /proc")
def test_a_saved_state_reaches_the_disk_before_latest_names_it(tmp_path, base, monkeypatch):
    """accelerate writes the model, optimizer and RNG files without fsync; LATEST is published and
    the older state removed right after. Were LATEST's rename to reach the disk first, a power loss
    would leave a resume only torn files, and no older state to fall back on."""
    from tests.test_atomic import _DiskLog

    data = write_csv_folder(tmp_path / "pairs")
    log = _DiskLog(monkeypatch)
    with monkeypatch.context() as patch:  # keep the state folder to list what it held
        patch.setattr("micromerge.finetune.trainer.shutil.rmtree", lambda *a, **k: None)
        run_finetune(config(base, data, tmp_path / "run", max_steps=3, save_every=2))
    state = tmp_path / "run" / "state" / "step-00000002"
    accelerates = {str(path) for path in state.rglob("*") if path.is_file()} - {
        str(state / "trainer_state.json")
    }
    before_latest = log.events[: log.index("rename", tmp_path / "run" / "state" / "LATEST")]
    synced = {path for kind, path in before_latest if kind == "fsync"}
    assert len(accelerates) >= 3 and accelerates <= synced, sorted(accelerates - synced)
    assert ("rename", str(state / "trainer_state.json")) in before_latest  # atomic: synced as written


def test_resume_refuses_changed_data_at_the_same_path(tmp_path, base, monkeypatch):
    data = write_csv_folder(tmp_path / "pairs")
    _killed_after_step_two(tmp_path, base, data, monkeypatch)
    (data / "img0.png").write_bytes(_png(99))  # the same path now holds other bytes
    with pytest.raises(MicromergeError, match="the data changed since that run started"):
        run_finetune(config(base, data, tmp_path / "run", max_steps=4, save_every=2, resume=True))


def test_a_resumed_run_logs_each_step_once(tmp_path, base, monkeypatch):
    """The kill left a log running past the saved state (steps 3 and 4 were logged, not saved):
    the resumed run drops them before it trains those steps again."""
    data = write_csv_folder(tmp_path / "pairs")
    _killed_after_step_two(tmp_path, base, data, monkeypatch)
    log = tmp_path / "run" / "train_log.jsonl"
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]
    run_finetune(config(base, data, tmp_path / "run", max_steps=4, save_every=2, resume=True))
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]


def test_resume_refuses_other_hyper_parameters(tmp_path, base, monkeypatch):
    """Continuing a run's optimizer state under another learning rate would give weights that
    neither setting produces; the config digest saved with the state catches it."""
    data = write_csv_folder(tmp_path / "pairs")
    _killed_after_step_two(tmp_path, base, data, monkeypatch)
    changed = config(base, data, tmp_path / "run", max_steps=4, save_every=2, resume=True, lr=2e-3)
    with pytest.raises(MicromergeError, match="the run there used other settings"):
        run_finetune(changed)


def test_each_saved_state_replaces_the_one_before(tmp_path, base, monkeypatch):
    """A run keeps one resumable state: each holds the weights and AdamW's two moments (three times
    the model), so keeping every one would fill the disk of a long run with --save-every."""
    from micromerge.finetune import trainer

    listings, save = [], trainer._save_state

    def save_and_look(accelerator, cfg, *args):
        save(accelerator, cfg, *args)
        listings.append(sorted(path.name for path in (cfg.out / "state").iterdir()))

    monkeypatch.setattr(trainer, "_save_state", save_and_look)
    data = write_csv_folder(tmp_path / "pairs")
    run_finetune(config(base, data, tmp_path / "run", max_steps=6, save_every=2))
    assert listings == [["LATEST", "step-00000002"], ["LATEST", "step-00000004"]]


def test_state_left_by_a_kill_after_the_manifest_is_removed(tmp_path, base):
    data = write_csv_folder(tmp_path / "pairs")
    run_finetune(config(base, data, tmp_path / "run"))
    (tmp_path / "run" / "state" / "step-00000001").mkdir(parents=True)  # what the kill left
    run_finetune(config(base, data, tmp_path / "run", resume=True))
    assert not (tmp_path / "run" / "state").exists()


DEEP = "[" * 100_000 + "]" * 100_000
"""JSON nested 100,000 deep: past what Python's parser reads (a RecursionError from 1,000 levels on
Python 3.10 and 3.11, 10,000 on 3.13)."""


def _tar(path, members):
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda d: (d / "captions.csv").write_bytes(b"image,caption\nimg0.png,\xff\xfe bad\n"), "not UTF-8"),
        (lambda d: (d / "captions.jsonl").write_text("42\n"), "a JSON object per line"),
        (lambda d: _tar(d / "a.tar", {"s1.png": _png(0), "s1.txt": b"\xff\xfe"}), "not UTF-8"),
        (
            lambda d: _tar(d / "a.tar", {"s1.png": _png(0), "s1.json": b"{not json"}),
            ".json is not valid JSON",
        ),
        (  # a quote left open: the rest of the file one field, past csv's 128 KiB (a csv.Error's traceback)
            lambda d: (d / "captions.csv").write_text(
                'image,caption\nimg0.png,a\nimg0.png,"open\n' + "img0.png,a caption\n" * 8000
            ),
            r"captions.csv: the row from line 3: not a table csv can read \(field larger than field limit",
        ),
        # JSON nested past Python's parser, which raises RecursionError: a traceback
        (
            lambda d: (d / "captions.jsonl").write_text(DEEP + "\n"),
            r"captions.jsonl:1: not valid JSON \(nested too",
        ),
        (
            lambda d: _tar(d / "a.tar", {"s1.png": _png(0), "s1.json": DEEP.encode()}),
            r".json is not valid JSON \(nested too deeply to read\)",
        ),
    ],
)
def test_caption_files_with_bad_bytes_are_one_line(tmp_path, base, make, needle):
    data = tmp_path / "pairs"
    data.mkdir()
    (data / "img0.png").write_bytes(_png(0))
    make(data)
    with pytest.raises(MicromergeError, match=needle):
        run_finetune(config(base, data, tmp_path / "run"))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda state: (state / "LATEST").write_text("step-00000009"), "(No such file or directory)"),
        (lambda state: (state / "LATEST").write_text("../../elsewhere"), "not a step-NNNNNNNN folder"),
        (lambda state: (state / "step-00000002" / "trainer_state.json").write_text("{cut"), "Expecting"),
        (
            lambda state: (state / "step-00000002" / "trainer_state.json").write_text("[]"),
            "lacks config_digest",
        ),
        (
            lambda state: (state / "step-00000002" / "trainer_state.json").write_text(
                json.dumps({"config_digest": "x", "micro_step": "2", "step": 2})
            ),
            "micro_step and step must be counts",
        ),
        (  # JSON's true is a count to Python
            lambda state: (state / "step-00000002" / "trainer_state.json").write_text(
                json.dumps({"config_digest": "x", "micro_step": 2, "step": True})
            ),
            "micro_step and step must be counts",
        ),
        (
            lambda state: (state / "step-00000002" / "trainer_state.json").write_text(
                json.dumps({"config_digest": "x", "micro_step": -2, "step": 2})
            ),
            "micro_step and step must be counts",
        ),
        (
            lambda state: (state / "step-00000002" / "trainer_state.json").write_text(
                json.dumps({"config_digest": "x", "step": 2})
            ),
            "lacks config_digest, micro_step or step",
        ),
    ],
)
def test_a_damaged_saved_state_is_one_line(tmp_path, base, monkeypatch, damage, message):
    """A state folder copied in part or edited by hand was a traceback on --resume (FileNotFoundError,
    JSONDecodeError, KeyError); LATEST naming a folder outside state/ was followed there."""
    data = write_csv_folder(tmp_path / "pairs")
    _killed_after_step_two(tmp_path, base, data, monkeypatch)
    damage(tmp_path / "run" / "state")
    with pytest.raises(
        MicromergeError, match=r"--resume .*run: its saved state state/.* is unreadable or incomplete"
    ) as raised:
        run_finetune(config(base, data, tmp_path / "run", max_steps=4, save_every=2, resume=True))
    assert message in str(raised.value) and "start over with --force" in str(raised.value)


def test_a_device_the_run_would_not_use_is_refused(tmp_path, base):
    """`--device cuda` on a machine without a GPU trained on the CPU without a word, and `cuda:1`
    (or a typo such as `gpu`) was accepted while accelerate put the run on its own device."""
    import torch

    data = write_csv_folder(tmp_path / "pairs")
    for device in ("cuda:1", "gpu"):
        with pytest.raises(MicromergeError, match=f"--device {device}: expected auto, cpu or cuda"):
            config(base, data, tmp_path / "run", device=device)
    if not torch.cuda.is_available():
        with pytest.raises(MicromergeError, match="--device cuda: no CUDA device is available here"):
            run_finetune(config(base, data, tmp_path / "run", device="cuda", max_steps=1))
        assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "edit",
    [
        lambda schedule: {},
        lambda schedule: {**schedule, "base_lrs": [*schedule["base_lrs"], 0.1]},  # another group count
        lambda schedule: {**schedule, "last_epoch": 2.5},
        lambda schedule: {**schedule, "last_epoch": True},  # JSON's true is an int to Python
        lambda schedule: {k: 0 if isinstance(v, bool) else v for k, v in schedule.items()},
        lambda schedule: "warmup",
        lambda schedule: {**schedule, "base_lrs": schedule["base_lrs"][0]},  # a number for the list
        lambda schedule: {**schedule, "base_lrs": [[lr] for lr in schedule["base_lrs"]]},  # lists for numbers
        lambda schedule: {**schedule, "base_lrs": [schedule["base_lrs"][0], "1e-3"]},  # one group's lr text
        lambda schedule: {**schedule, "lr_lambdas": [0.5] * len(schedule["lr_lambdas"])},  # numbers for None
    ],
)
def test_a_schedule_that_is_not_this_runs_is_one_line(tmp_path, base, monkeypatch, edit):
    """The schedule is JSON in trainer_state.json: an edited or damaged one was a KeyError from inside
    torch, or loaded with another number of parameter groups and trained at the wrong rates."""
    data = write_csv_folder(tmp_path / "pairs")
    _killed_after_step_two(tmp_path, base, data, monkeypatch)
    path = tmp_path / "run" / "state" / "step-00000002" / "trainer_state.json"
    saved = json.loads(path.read_text())
    edited = edit(saved["scheduler"])
    assert json.dumps(edited) != json.dumps(saved["scheduler"]), "the edit must change the schedule"
    path.write_text(json.dumps({**saved, "scheduler": edited}))
    with pytest.raises(
        MicromergeError, match="the learning-rate schedule in its trainer_state.json is not this run's"
    ):
        run_finetune(config(base, data, tmp_path / "run", max_steps=4, save_every=2, resume=True))


def test_an_old_states_pickle_that_holds_no_schedule_is_refused_before_the_state_is_changed(
    tmp_path, base, monkeypatch
):
    """An earlier micromerge's state kept its schedule in `custom_checkpoint_0.pkl`, which a resume
    moves into trainer_state.json. A pickle torch reads without running code but holding no schedule
    (no integer `last_epoch`) is refused before anything is moved: the pickle stays, and
    trainer_state.json is as it was (moved first, the state was rewritten and then refused)."""
    import torch

    data = write_csv_folder(tmp_path / "pairs")
    _killed_after_step_two(tmp_path, base, data, monkeypatch)
    state = tmp_path / "run" / "state" / "step-00000002"
    saved = json.loads((state / "trainer_state.json").read_text())
    (state / "trainer_state.json").write_text(
        json.dumps({k: v for k, v in saved.items() if k != "scheduler"})
    )
    torch.save({"base_lrs": [1e-3], "last_epoch": "2"}, state / "custom_checkpoint_0.pkl")
    before = (state / "trainer_state.json").read_text()
    with pytest.raises(
        MicromergeError, match="custom_checkpoint_0.pkl is not a learning-rate schedule; start"
    ):
        run_finetune(config(base, data, tmp_path / "run", max_steps=4, save_every=2, resume=True))
    assert (state / "custom_checkpoint_0.pkl").is_file()
    assert (state / "trainer_state.json").read_text() == before


def test_a_damaged_loss_log_is_no_reason_to_stop_a_resume(tmp_path, base, monkeypatch):
    """train_log.jsonl feeds the manifest's loss summary, not the weights: a cut or edited line was a
    JSONDecodeError/KeyError traceback on --resume. The lines are dropped with one warning."""
    data = write_csv_folder(tmp_path / "pairs")
    _killed_after_step_two(tmp_path, base, data, monkeypatch)
    log = tmp_path / "run" / "train_log.jsonl"
    lines = log.read_text().splitlines()
    bad = ['{"step": 2, "lo', '{"no": "step"}', '{"step": 2, "loss": "0.7"}']
    log.write_text("\n".join([lines[0], *bad, *lines[2:]]) + "\n")
    with pytest.warns(UserWarning, match="3 line\\(s\\) that are not a step's loss record dropped"):
        run_finetune(config(base, data, tmp_path / "run", max_steps=4, save_every=2, resume=True))
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 3, 4]


def test_a_contrastive_batch_of_one_pair_is_refused_before_any_work(tmp_path, base):
    """Over one pair InfoNCE is log(1) = 0 whatever the weights: `--batch-size 1` ran and wrote
    a "specialist" and its manifest that had learned nothing from the data (weight decay alone moved it)."""
    import torch

    from micromerge.finetune.losses import clip_loss

    image, text = torch.randn(1, 8, requires_grad=True), torch.randn(1, 8, requires_grad=True)
    loss = clip_loss(image, text, torch.tensor(10.0))
    loss.backward()
    assert loss.item() == 0 and not image.grad.any() and not text.grad.any()

    data = write_csv_folder(tmp_path / "pairs", n=8)
    with pytest.raises(MicromergeError, match=r"--batch-size 1: contrastive training needs at least 2"):
        run_finetune(config(base, data, tmp_path / "run", batch_size=1))
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_mu_bench_given_as_a_caption_corpus_is_named_as_the_benchmark(tmp_path, base):
    """`finetune contrastive --data <μ-Bench copy>`: its Hub folder holds a dataset_info.json, so it
    was taken for a save_to_disk folder and datasets' FileNotFoundError traceback came out (its
    parent: "no captions.csv ..."). Both are named as the benchmark, in every reader of pairs; a
    folder that only looks saved is one line too."""
    from micromerge.eval.pairs import load_pairs
    from tests.ubench_fixture import write_fixture

    bench = write_fixture(tmp_path / "ubench", per_class=2, corrupt=0)
    for copy in (bench, bench.parent.parent):
        message = f"--data {copy}: a copy of μ-Bench (the benchmark), not a corpus of image-caption pairs"
        for in_memory in ("yes", "no"):
            with pytest.raises(MicromergeError, match=re.escape(message)):
                run_finetune(config(base, str(copy), tmp_path / "run", data_in_memory=in_memory))
        with pytest.raises(MicromergeError, match=re.escape(message)):
            load_pairs(str(copy))  # what --base-data/--ft-data of a data-aware merge read
    looks_saved = tmp_path / "looks-saved"
    looks_saved.mkdir()
    (looks_saved / "dataset_info.json").write_text("{}")
    with pytest.raises(MicromergeError, match="looks-saved: a save_to_disk folder that does not load"):
        load_pairs(str(looks_saved))
    assert not (tmp_path / "run").exists()


def test_ctrl_c_says_to_resume_with_the_flag_a_fine_tune_needs_and_that_command_finishes(
    tmp_path, base, monkeypatch
):
    """Ctrl-C after the step-2 checkpoint: exit 130 and one line that names --resume (run again as
    it was, a fine-tune refuses the folder it left); a run given --resume, stopped again after
    step 4, is told to run it again; the command named then ends with the weights of a run never
    interrupted."""
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from micromerge.cli import cli
    from micromerge.finetune import trainer
    from tests.test_finetune import _contrastive_args

    data = write_csv_folder(tmp_path / "pairs")
    args = [*_contrastive_args(base, data, tmp_path / "run", steps=6), "--save-every", "2"]
    assert (
        CliRunner().invoke(cli, _contrastive_args(base, data, tmp_path / "straight", steps=6)).exit_code == 0
    )
    real = trainer._save_state

    def interrupted_after_saving(*arguments):
        real(*arguments)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_save_state", interrupted_after_saving)
    for flags, again in (([], "with --resume"), (["--resume"], "again")):
        result = CliRunner().invoke(cli, [*args, *flags])
        assert result.exit_code == 130, result.output
        assert result.stderr.splitlines()[-1] == (
            "interrupted: the last checkpoint (saved every --save-every steps) is kept; "
            f"run the same command {again} to continue from it"
        )
    assert (tmp_path / "run" / "state" / "LATEST").read_text() == "step-00000004"
    monkeypatch.setattr(trainer, "_save_state", real)
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code == 2 and "pass --resume" in refused.stderr
    assert CliRunner().invoke(cli, [*args, "--resume"]).exit_code == 0
    straight, resumed = (
        load_file(str(tmp_path / name / "model.safetensors")) for name in ("straight", "run")
    )
    assert all(straight[key].equal(resumed[key]) for key in straight)


def test_a_run_that_diverges_stops_in_one_line_and_writes_no_model(tmp_path, base):
    """`--lr 1e6 --grad-clip 0` ran to the end and wrote a model of NaN weights, exit 0, with a
    manifest holding `NaN` (not JSON). The loss is read every few steps: the first non-finite one
    ends the run before anything after it is saved. Run at 1e30: weights near 1e30 overflow float32
    on any CPU, where whether 1e6 does depends on its kernels (learned merging's did not on one)."""
    data = write_csv_folder(tmp_path / "pairs", n=16)
    diverging = config(base, data, tmp_path / "run", batch_size=8, max_steps=6, lr=1e30, grad_clip=0.0)
    with pytest.raises(
        MicromergeError,
        match=r"^the loss became (nan|inf) at step \d \(learning rate .*\): training diverged; lower --lr",
    ):
        run_finetune(diverging)
    assert (
        not (tmp_path / "run" / "model.safetensors").exists()
        and not (tmp_path / "run" / "manifest.json").exists()
    )


def test_weights_that_became_non_finite_are_refused_before_a_save():
    """An update can overflow after a finite loss: the weights are checked before each save."""
    import torch
    from accelerate import Accelerator

    from micromerge.finetune.divergence import refuse_diverged_losses, refuse_diverged_weights

    accelerator = Accelerator(cpu=True)
    finite = [torch.ones(3), torch.zeros(2, 2)]
    refuse_diverged_weights(accelerator, finite, 4)
    with pytest.raises(
        MicromergeError, match=r"the weights became non-finite \(NaN or inf\) by step 4: training"
    ):
        refuse_diverged_weights(accelerator, [*finite, torch.tensor([1.0, float("inf")])], 4)
    refuse_diverged_losses(
        accelerator, [(1, 1e-3, 10.0, torch.tensor(2.0)), (2, 1e-3, 10.0, torch.tensor(1.5))]
    )
    with pytest.raises(MicromergeError, match=r"the loss became inf at step 2 \(learning rate 0.001\)"):
        refuse_diverged_losses(
            accelerator, [(1, 1e-3, 10.0, torch.tensor(2.0)), (2, 1e-3, 10.0, torch.tensor(float("inf")))]
        )


def test_every_process_of_a_launch_that_diverges_stops_on_the_same_line(tmp_path, base):
    """Under `accelerate launch` a divergence ends every process with the one line, no process's
    traceback, and nothing left in --out (the checks are collective: each process stops at the
    same read, whatever loss it computed itself)."""
    from tests.helpers import launch_failure, run_two_processes
    from tests.test_finetune import _contrastive_args

    data = write_csv_folder(tmp_path / "pairs", n=32)
    args = _contrastive_args(base, data, tmp_path / "ddp", steps=6, batch_size=4)
    result = run_two_processes(*args, "--lr", "1e30", "--grad-clip", "0")
    said = [line for line in result.stderr.splitlines() if line.startswith("error: the loss became")]
    # the launcher may stop the second process before it prints its line; neither prints a traceback
    assert result.returncode != 0 and said and "[rank" not in result.stderr, launch_failure(result)
    assert not (tmp_path / "ddp").exists()
