"""Fine-tuning: every data format, both modes, freezing, resume after kill -9, DDP on two CPU processes, bad input."""

import csv
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

from micromerge.cli import cli
from micromerge.core.errors import MicromergeError
from micromerge.finetune.config import FinetuneConfig
from micromerge.finetune.micro_batches import epoch_order
from micromerge.finetune.trainer import run_finetune
from tests.helpers import (
    kill_at_step,
    launch_failure,
    run_two_processes,
    straight_and_resumed_launches,
    write_checkpoint,
)
from tests.ubench_fixture import write_fixture


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


CAPTIONS = ["a tumor in tissue", "stroma fibres", "adipose cells", "lymphocytes", "mucus", "a mitotic figure"]


@pytest.fixture
def base(tmp_path):
    write_checkpoint(tmp_path / "base.safetensors", 0)
    return tmp_path / "base.safetensors"


def write_csv_folder(folder: Path, n: int = 24) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "captions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for i in range(n):
            (folder / f"img{i}.png").write_bytes(_png(i))
            writer.writerow([f"img{i}.png", CAPTIONS[i % len(CAPTIONS)]])
    return folder


def config(base, data, out, **overrides) -> FinetuneConfig:
    values = dict(
        mode="contrastive",
        base=str(base),
        data=str(data),
        out=out,
        batch_size=8,
        max_steps=3,
        lr=1e-3,
        progress=False,
        device="cpu",
        save_every=0,
    )
    values.update(overrides)
    return FinetuneConfig(**values)


def test_contrastive_from_csv_writes_a_checkpoint_merge_accepts(tmp_path, base):
    data = write_csv_folder(tmp_path / "pairs")
    path = run_finetune(config(base, data, tmp_path / "run", domain="pathology"))
    trained, original = load_file(str(path)), load_file(str(base))
    assert set(trained) == set(original) - {"attn_mask"}
    assert not torch.equal(trained["visual.proj"], original["visual.proj"])
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert (
        manifest["domain"] == "pathology"
        and manifest["steps"] == 3
        and len(manifest["data_fingerprint"]) == 64
    )
    assert (
        manifest["hyperparameters"]["lr"] == 1e-3
        and manifest["base_sha256"]
        and manifest["loss_summary"]["last"] is not None
    )
    assert manifest["images_per_s"] > 0
    # the weights' digest (one per process) is the file's tensors in key order, as a reader recomputes it
    digest = hashlib.sha256()
    for key in sorted(trained):
        digest.update(key.encode())
        digest.update(trained[key].numpy().tobytes())
    assert manifest["rank_weight_sha256"] == [digest.hexdigest()]
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3] and {"loss", "lr", "images_per_s"} <= set(log[0])
    result = CliRunner().invoke(
        cli,
        [
            "merge",
            "--base",
            str(base),
            "--ft",
            str(path),
            "--alpha",
            "0.5",
            "--out",
            str(tmp_path / "m.safetensors"),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output


def test_the_same_run_twice_writes_the_same_checkpoint_bytes(tmp_path, base):
    """Same inputs and seed, same sha256 (results and reports find checkpoints by it): the
    checkpoint carries four metadata keys, which safetensors' own `save` wrote in a random order."""
    data = write_csv_folder(tmp_path / "pairs")
    first = run_finetune(config(base, data, tmp_path / "first", domain="pathology"))
    second = run_finetune(config(base, data, tmp_path / "second", domain="pathology"))
    assert first.read_bytes() == second.read_bytes()


def test_jsonl_saved_dataset_and_tar_shards_give_the_same_training(tmp_path, base):
    n = 16
    (tmp_path / "jsonl").mkdir()
    lines = []
    for i in range(n):
        (tmp_path / "jsonl" / f"{i}.png").write_bytes(_png(i))
        lines.append(json.dumps({"file": f"{i}.png", "text": CAPTIONS[i % 6]}))
    (tmp_path / "jsonl" / "captions.jsonl").write_text("\n".join(lines) + "\n")
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    datasets.Dataset.from_dict(
        {
            "image": [{"bytes": _png(i), "path": None} for i in range(n)],
            "caption": [CAPTIONS[i % 6] for i in range(n)],
        },
        features=features,
    ).save_to_disk(str(tmp_path / "hf"))
    (tmp_path / "wds").mkdir()
    with tarfile.open(tmp_path / "wds" / "shard-000000.tar", "w") as archive:
        for i in range(n):
            for suffix, payload in ((".png", _png(i)), (".txt", CAPTIONS[i % 6].encode())):
                info = tarfile.TarInfo(f"sample{i:04d}{suffix}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    weights = {}
    for name in ("jsonl", "hf", "wds"):
        weights[name] = load_file(
            str(run_finetune(config(base, tmp_path / name, tmp_path / f"run-{name}", max_steps=2)))
        )
    for key in weights["jsonl"]:
        assert torch.equal(weights["jsonl"][key], weights["hf"][key]), key
        assert torch.equal(weights["jsonl"][key], weights["wds"][key]), key


def test_supervised_head_starts_as_the_zero_shot_head_and_text_tower_stays_frozen(tmp_path, base):
    from micromerge.eval.data import load_benchmark
    from micromerge.eval.task_selection import select_tasks
    from micromerge.eval.tasks import discover_tasks
    from micromerge.eval.zeroshot import class_embeddings
    from micromerge.merging.models import load_model, tokenizer_for
    from micromerge.merging.sources import open_source

    bench = write_fixture(tmp_path / "bench", per_class=8, corrupt=0)
    path = run_finetune(
        config(
            base,
            bench,
            tmp_path / "sup",
            mode="supervised",
            task="kather_et_al_2016",
            batch_size=6,
            max_steps=2,
            lr=1e-3,
        )
    )
    trained, original = load_file(str(path)), load_file(str(base))
    assert torch.equal(trained["token_embedding.weight"], original["token_embedding.weight"]), (
        "text tower frozen by default"
    )
    assert torch.equal(trained["logit_scale"], original["logit_scale"])
    assert not torch.equal(trained["visual.proj"], original["visual.proj"])
    head = load_file(str(tmp_path / "sup" / "head.safetensors"))
    with open_source(str(base)) as source:
        model, model_config = load_model(source)
    task = select_tasks(discover_tasks(load_benchmark(str(bench)).dataset), "kather_et_al_2016")[0]
    zero_shot = (
        class_embeddings(model, tokenizer_for(model_config), task, torch.device("cpu"))
        * model.logit_scale.exp()
    )
    assert head["weight"].shape == zero_shot.shape
    assert torch.allclose(head["weight"], zero_shot, atol=0.05), "two small steps from the zero-shot head"
    # WiSE-FT's head is a linear layer with a bias, started at zero and trained with the weights
    assert head["bias"].shape == (len(zero_shot),) and head["bias"].abs().max() > 0


def test_clip_loss_equals_open_clips_own():
    """Our symmetric InfoNCE against open_clip.loss.ClipLoss (one process), the loss
    open_clip_train minimises, on features of any norm and a logit scale already exponentiated.
    In float64: the loss is near 56, where one float32 step is 3.8e-6, and which of two float32
    roundings a CPU's kernels take differs between machines."""
    from open_clip.loss import ClipLoss

    from micromerge.finetune.losses import clip_loss

    generator = torch.Generator().manual_seed(0)
    image, text = (torch.randn(8, 16, generator=generator, dtype=torch.float64) for _ in range(2))
    scale = torch.tensor(14.3, dtype=torch.float64)
    torch.testing.assert_close(
        clip_loss(image, text, scale), ClipLoss()(image, text, scale), atol=1e-6, rtol=0
    )


def test_the_zero_shot_head_scores_logit_scale_times_cosine_whatever_the_feature_norm():
    """WiSE-FT's head: at initialisation its logits are the zero-shot classifier's, logit_scale times
    the cosine of the image feature and each class embedding."""
    from micromerge.finetune.losses import ZeroShotHead

    generator = torch.Generator().manual_seed(1)
    classes = torch.nn.functional.normalize(torch.randn(3, 16, generator=generator), dim=-1)
    features = 7 * torch.randn(5, 16, generator=generator)
    expected = 100.0 * torch.nn.functional.normalize(features, dim=-1) @ classes.T
    head = ZeroShotHead(classes, 100.0)
    torch.testing.assert_close(head(features), expected, atol=1e-5, rtol=0)
    with torch.no_grad():  # once trained, a linear layer's bias: added to each class's logit
        head.bias.copy_(torch.tensor([0.5, -2.0, 3.0]))
    torch.testing.assert_close(head(features), expected + head.bias, atol=1e-5, rtol=0)


def test_supervised_refuses_a_selection_of_several_tasks(tmp_path, base):
    bench = write_fixture(tmp_path / "bench", per_class=2, corrupt=0)
    for task in ("all", "fine", "kather_et_al_2016,opencell"):
        with pytest.raises(MicromergeError, match=f"--task {task}: supervised fine-tuning trains one task"):
            run_finetune(config(base, bench, tmp_path / "sup", mode="supervised", task=task, max_steps=1))
    with pytest.raises(MicromergeError, match=r"^--task: unknown task\(s\) \['no_such_source'\]"):
        run_finetune(
            config(base, bench, tmp_path / "sup", mode="supervised", task="no_such_source", max_steps=1)
        )
    assert not (tmp_path / "sup" / "model.safetensors").exists()


def test_lp_ft_trains_the_head_alone_first_and_freeze_patterns_hold(tmp_path, base, monkeypatch):
    bench = write_fixture(tmp_path / "bench", per_class=8, corrupt=0)
    # 24 images, batch 6 -> 4 steps per epoch: the state saved at step 4 is the LP epoch's end
    import micromerge.finetune.trainer as trainer

    def stop(*args, **kwargs):  # Ctrl-C before the final write: the run keeps its saved state
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_write_final", stop)
    lp = dict(mode="supervised", task="kather_et_al_2016", batch_size=6, max_steps=None, lp_epochs=1)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(config(base, bench, tmp_path / "lp", epochs=1, save_every=4, **lp))
    after_lp = load_file(str(tmp_path / "lp" / "state" / "step-00000004" / "model.safetensors"))
    original = load_file(str(base))
    assert all(torch.equal(after_lp[f"clip.{k}"], original[k]) for k in original), (
        "LP phase changes only the head"
    )
    monkeypatch.undo()
    path = run_finetune(config(base, bench, tmp_path / "lp-ft", epochs=1, **lp))
    assert len((tmp_path / "lp-ft" / "train_log.jsonl").read_text().splitlines()) == 4 + 4, (
        "LP epoch, then FT's"
    )
    assert not torch.equal(load_file(str(path))["visual.proj"], original["visual.proj"])
    frozen = "visual.transformer.resblocks.0.*"
    path = run_finetune(
        config(base, write_csv_folder(tmp_path / "p"), tmp_path / "fr", freeze=(frozen,), max_steps=2)
    )
    trained = load_file(str(path))
    assert torch.equal(
        trained["visual.transformer.resblocks.0.mlp.c_fc.weight"],
        original["visual.transformer.resblocks.0.mlp.c_fc.weight"],
    )
    assert not torch.equal(
        trained["visual.transformer.resblocks.1.mlp.c_fc.weight"],
        original["visual.transformer.resblocks.1.mlp.c_fc.weight"],
    )


def test_a_linear_probe_that_takes_the_whole_run_is_refused_and_a_warm_up_longer_than_it_said(tmp_path, base):
    """`--lp-epochs 1 --max-steps 4` (4 steps an epoch) trained the head alone for the whole run
    and saved the base's weights as the specialist (the head is kept apart, in head.safetensors). A warm-up
    longer than the run never reaches --lr, which the user is told."""
    bench = write_fixture(tmp_path / "bench", per_class=8, corrupt=0)
    lp = dict(mode="supervised", task="kather_et_al_2016", batch_size=6, lp_epochs=1)
    with pytest.raises(
        MicromergeError, match=r"--lp-epochs 1: the linear probe takes 4 steps and --max-steps 4 "
    ):
        run_finetune(config(base, bench, tmp_path / "lp", max_steps=4, **lp))
    assert not (tmp_path / "lp" / "model.safetensors").exists()
    with pytest.warns(
        UserWarning, match=r"--warmup-steps 10 is longer than the run \(5 steps\): .* 50% of --lr"
    ):
        run_finetune(config(base, bench, tmp_path / "warm", max_steps=5, warmup_steps=10, **lp))


# ---- bad input ----


def test_bad_data_is_a_one_line_error(tmp_path, base):
    folder = write_csv_folder(tmp_path / "pairs", n=10)
    rows = (folder / "captions.csv").read_text().splitlines()
    (folder / "captions.csv").write_text("\n".join([*rows, "img3.png,"]) + "\n")
    with pytest.raises(MicromergeError, match="img3.png has no caption"):
        run_finetune(config(base, folder, tmp_path / "r1"))
    (folder / "captions.csv").write_text("\n".join([*rows, "missing.png,a caption"]) + "\n")
    with pytest.raises(MicromergeError, match="missing.png but the file does not exist"):
        run_finetune(config(base, folder, tmp_path / "r2"))
    (folder / "captions.csv").write_text("image,caption\n")
    with pytest.raises(MicromergeError, match="no rows"):
        run_finetune(config(base, folder, tmp_path / "r3"))
    with pytest.raises(MicromergeError, match="no such file"):
        run_finetune(config(base, tmp_path / "nothing", tmp_path / "r4"))
    with pytest.raises(MicromergeError, match="nope.safetensors"):
        run_finetune(config(tmp_path / "nope.safetensors", folder, tmp_path / "r5"))


def test_corrupt_images_are_skipped_and_counted_up_to_a_limit(tmp_path, base):
    folder = write_csv_folder(tmp_path / "pairs", n=24)
    (folder / "img0.png").write_bytes(b"garbage")
    path = run_finetune(config(base, folder, tmp_path / "ok", max_bad_fraction=0.1))
    manifest = json.loads((path.parent / "manifest.json").read_text())
    assert manifest["corrupt_images_skipped"] == 1 and manifest["corrupt_images_listed"] == "unreadable.txt"
    assert (path.parent / "unreadable.txt").read_text() == f"{str(folder / 'img0.png')!r}\n"
    for i in range(1, 6):
        (folder / f"img{i}.png").write_bytes(b"garbage")
    with pytest.raises(MicromergeError, match=r"6 of 24 images are unreadable .*, the first '.*img0\.png', "):
        run_finetune(config(base, folder, tmp_path / "bad", max_bad_fraction=0.1))


@pytest.mark.parametrize("kind", ["tar", "arrow"])
def test_too_many_unreadable_images_in_memory_are_named_as_the_stream_names_them(tmp_path, base, kind):
    """The in-memory path decodes an indexed corpus's samples without their index: it named a tar
    member by its place among all the members. Named by the index, the error points at the member."""
    from tests.test_unreadable_stream import _corpus_with_a_bad_sixth_image

    _corpus_with_a_bad_sixth_image(tmp_path / "corpus", kind)
    named = f"'sample0005' of '{tmp_path / 'corpus' / 'shard-000000.tar'}'" if kind == "tar" else "row 5"
    with pytest.raises(MicromergeError, match=f"1 of 24 images .*, the first {re.escape(named)}; fix"):
        run_finetune(
            config(base, tmp_path / "corpus", tmp_path / "run", data_in_memory="yes", max_bad_fraction=0.01)
        )


def test_a_tasks_unreadable_images_are_named_by_their_benchmark_rows(tmp_path, base):
    """A supervised task's images are some rows of the benchmark (held_et_al_2010_h2b: rows 20-31
    of the fixture, whose rows 1, 6, 11 ... do not decode): named by their place in the task, they
    pointed at other images."""
    from tests.ubench_fixture import write_fixture

    bench = write_fixture(tmp_path / "bench", per_class=4, corrupt=8)
    supervised = dict(mode="supervised", task="held_et_al_2010_h2b", data_in_memory="yes", max_steps=1)
    with pytest.raises(MicromergeError, match=r"3 of 12 images .*, the first row 21, row 26, row 31; fix"):
        run_finetune(config(base, bench, tmp_path / "run", **supervised))


def test_output_folder_with_another_run_is_refused(tmp_path, base):
    data = write_csv_folder(tmp_path / "pairs")
    run_finetune(config(base, data, tmp_path / "run"))
    args = _contrastive_args(base, data, tmp_path / "run", steps=1)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "--resume" in result.stderr and "--force" in result.stderr
    result = CliRunner().invoke(cli, [*args, "--force"])
    assert result.exit_code == 0, result.output


def test_a_base_inside_the_output_folder_is_never_replaced_or_deleted(tmp_path, base):
    """`--base runs/x/model.safetensors --out runs/x` replaced the base with the fine-tuned model,
    and with --force deleted it before reading it ("no such file"). Refused, the base untouched;
    a folder holding a model.safetensors of the user's (no run) needs --force as a run does."""
    data = write_csv_folder(tmp_path / "pairs")
    folder = tmp_path / "runs" / "x"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(base.read_bytes())
    for extra in ((), ("--force",), ("--resume",)):
        args = _contrastive_args(folder / "model.safetensors", data, folder, steps=1)
        result = CliRunner().invoke(cli, [*args, *extra])
        assert result.exit_code == 2 and "lies inside --out" in result.stderr, result.output
        assert (folder / "model.safetensors").read_bytes() == base.read_bytes()
    args = _contrastive_args(base, data, folder, steps=1)
    result = CliRunner().invoke(cli, args)
    assert (
        result.exit_code == 2 and "holds model.safetensors (another run, or files of yours)" in result.stderr
    )
    assert (folder / "model.safetensors").read_bytes() == base.read_bytes()
    assert CliRunner().invoke(cli, [*args, "--force"]).exit_code == 0
    killed_early = tmp_path / "killed-early"  # only a state/ of a run killed before its first log
    (killed_early / "state").mkdir(parents=True)
    result = CliRunner().invoke(cli, _contrastive_args(base, data, killed_early, steps=1))
    assert result.exit_code == 2 and "holds state/" in result.stderr, result.output


def test_freeze_text_in_contrastive_training_trains_the_image_tower_and_the_temperature(tmp_path, base):
    """--freeze-text holds every text-tower weight; the temperature is shared by both towers and
    keeps training (LiT-style image-side tuning)."""
    path = run_finetune(config(base, write_csv_folder(tmp_path / "p"), tmp_path / "run", freeze_text=True))
    trained, original = load_file(str(path)), load_file(str(base))
    changed = {k for k in trained if not torch.equal(trained[k], original[k])}
    assert "logit_scale" in changed and "visual.proj" in changed
    assert changed - {"logit_scale"} == {k for k in changed if k.startswith("visual.")}


def test_each_epoch_is_its_own_seeded_permutation():
    first, again, second = epoch_order(50, 3, 0), epoch_order(50, 3, 0), epoch_order(50, 3, 1)
    assert sorted(first.tolist()) == list(range(50)) and torch.equal(first, again)
    assert not torch.equal(first, second) and not torch.equal(first, epoch_order(50, 4, 0))


def test_resuming_a_finished_run_hands_back_its_model_only_under_its_own_settings(tmp_path, base):
    """A finished run resumed with its own settings is a no-op; with others (here --max-steps 13
    where it trained 12) it would pass the old model off as the new one, so it is refused. The
    manifest's loss summary is the log's."""
    data = write_csv_folder(tmp_path / "pairs")
    path = run_finetune(config(base, data, tmp_path / "run", max_steps=12))
    trained = path.read_bytes()
    assert run_finetune(config(base, data, tmp_path / "run", max_steps=12, resume=True)) == path
    log = (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in log]
    assert len(losses) == 12
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["loss_summary"] == {
        "first": losses[0],
        "last": losses[-1],
        "min": min(losses),
        "mean_last_10": pytest.approx(sum(losses[-10:]) / 10),
    }
    with pytest.raises(
        MicromergeError,
        match=r"--resume .*run: that run finished with other settings \(max_steps\); .*--force",
    ):
        run_finetune(config(base, data, tmp_path / "run", max_steps=13, resume=True))
    others = dict(max_steps=13, lr=2e-3, seed=1, grad_clip=2.0, warmup_steps=1, weight_decay=0.2)
    with pytest.raises(MicromergeError, match=r"other settings \(grad_clip, lr, max_steps, seed\); "):
        run_finetune(config(base, data, tmp_path / "run", resume=True, **others))  # the first four by name
    assert path.read_bytes() == trained
    for damaged in (b"{cut", b"\xff\xfe", b'{"hyperparameters": [{"lr": 1}]}'):  # the list: a traceback
        (tmp_path / "run" / "manifest.json").write_bytes(damaged)
        with pytest.raises(MicromergeError, match="manifest.json is unreadable"):
            run_finetune(config(base, data, tmp_path / "run", max_steps=12, resume=True))


def _contrastive_args(base, data, out, steps, batch_size=8):
    """`finetune contrastive` arguments as the CLI tests run it: on the CPU, quiet."""
    return [
        "finetune",
        "contrastive",
        "--base",
        str(base),
        "--data",
        str(data),
        "--out",
        str(out),
        "--max-steps",
        str(steps),
        "--batch-size",
        str(batch_size),
        "--device",
        "cpu",
        "--quiet",
    ]


def _train_command(base, data, out, steps):
    return [
        sys.executable,
        "-m",
        "micromerge.cli",
        *_contrastive_args(base, data, out, steps),
        "--save-every",
        "5",
        "--lr",
        "1e-3",
    ]


@pytest.mark.slow
def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path, base):
    data = write_csv_folder(tmp_path / "pairs", n=40)
    steps = 60
    subprocess.run(_train_command(base, data, tmp_path / "straight", steps), check=True, capture_output=True)
    kill_at_step(_train_command(base, data, tmp_path / "killed", steps), tmp_path / "killed", 10)
    resumed = subprocess.run(
        [*_train_command(base, data, tmp_path / "killed", steps), "--resume"], capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log = [
        json.loads(line)["step"]
        for line in (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()
    ]
    assert log == list(range(1, steps + 1))


def test_the_temperature_is_kept_within_clip_s_bound_after_every_step(tmp_path, base):
    """open_clip's training loop clamps logit_scale to [0, ln 100] after each optimizer step (as
    CLIP's paper bounds the temperature at 100): a base whose scale lies above it ends at the bound."""
    from micromerge.merging.plan import LOGIT_SCALE_MAX

    weights = load_file(str(base))
    weights["logit_scale"] = torch.tensor(5.0)
    save_file(weights, str(tmp_path / "hot.safetensors"), metadata={"micromerge.arch": "nano-clip"})
    data = write_csv_folder(tmp_path / "pairs", n=8)
    out = run_finetune(config(tmp_path / "hot.safetensors", data, tmp_path / "run", max_steps=1))
    assert float(load_file(str(out))["logit_scale"]) == pytest.approx(LOGIT_SCALE_MAX, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("micro_batch, accum", [(6, 1), (3, 2)])
def test_two_cpu_processes_end_with_identical_weights(tmp_path, base, micro_batch, accum):
    """Two gloo processes of batch 6 end identical, and equal to one process of batch 12: the
    contrastive loss gathers both processes' features (open_clip's ClipLoss does likewise), so
    each image's negatives are the global batch. Without the gather they would train two
    separate 6-way tasks and end elsewhere. The two processes run one epoch, which is 4 steps of
    2 x 6 of the 48 pairs, as the one process's 4 steps of 12 are: an epoch counted per process
    (48 / 6) ran 8. Each process may reach its 6 as two accumulated micro-batches of 3: their
    gradients are kept local until the step's last, whose backward averages the sum over the
    processes (synchronising the first instead would leave each process its own second half)."""
    data = write_csv_folder(tmp_path / "pairs", n=48)
    args = _contrastive_args(base, data, tmp_path / "ddp", steps=4, batch_size=micro_batch)
    at = args.index("--max-steps")
    args[at : at + 2] = ["--epochs", "1", "--accum-steps", str(accum)]
    result = run_two_processes(*args, "--save-every", "0", "--lr", "1e-3")
    assert result.returncode == 0, launch_failure(result)
    manifest = json.loads((tmp_path / "ddp" / "manifest.json").read_text())
    assert manifest["processes"] == 2
    assert len(set(manifest["rank_weight_sha256"])) == 1
    assert manifest["images_seen"] == 4 * 6 * 2
    one = run_finetune(config(base, data, tmp_path / "one", max_steps=4, batch_size=12))
    two, one = load_file(str(tmp_path / "ddp" / "model.safetensors")), load_file(str(one))
    losses = [(tmp_path / name / "train_log.jsonl").read_text().splitlines() for name in ("ddp", "one")]
    ddp_losses, one_losses = ([json.loads(row)["loss"] for row in log] for log in losses)
    # logged to 6 decimals: the float noise below can round a loss the other way (seen at torch 2.6)
    assert ddp_losses == pytest.approx(one_losses, rel=0, abs=2e-6)
    for key in one:  # float noise only (sums in another order): the steps move weights ~2e-3
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=5e-6, msg=key)


@pytest.mark.slow
def test_two_processes_killed_and_resumed_end_with_the_same_weights(tmp_path, base):
    """The whole launch killed mid-run (every process at once, as a lost node or a scheduler's
    preemption kills it) and launched again with --resume: both processes load the last saved
    state, accumulated micro-batches included, and end bit-identical to an uninterrupted launch."""
    data = write_csv_folder(tmp_path / "pairs", n=48)

    def arguments(out: Path) -> list[str]:
        args = _contrastive_args(base, data, out, steps=16, batch_size=3)
        return [*args, "--save-every", "2", "--lr", "1e-3", "--accum-steps", "2"]

    straight, killed = straight_and_resumed_launches(arguments, tmp_path)
    a = load_file(str(straight / "model.safetensors"))
    b = load_file(str(killed / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log = (killed / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == list(range(1, 17))


@pytest.mark.slow
def test_two_cpu_processes_of_supervised_accumulation_train_like_one_batch(tmp_path, base):
    """Supervised fine-tuning across processes: two processes of two accumulated micro-batches of 3
    take the epoch's permutation 12 rows a step, as one process of 12 does, and end with its
    weights. DDP averages the processes' mean cross-entropies, which is the mean over all 12."""
    data = write_fixture(tmp_path / "bench", per_class=8, corrupt=0)
    args = ["finetune", "supervised", "--base", str(base), "--data", str(data), "--out", str(tmp_path / "ddp"),
            "--task", "kather_et_al_2016", "--max-steps", "3", "--batch-size", "3", "--accum-steps", "2",
            "--lr", "1e-4", "--save-every", "0", "--device", "cpu", "--quiet"]  # fmt: skip
    result = run_two_processes(*args)
    assert result.returncode == 0, launch_failure(result)
    manifest = json.loads((tmp_path / "ddp" / "manifest.json").read_text())
    assert manifest["processes"] == 2 and len(set(manifest["rank_weight_sha256"])) == 1
    one_cfg = config(
        base, data, tmp_path / "one", mode="supervised", task="kather_et_al_2016", lr=1e-4, batch_size=12
    )
    one, two = load_file(str(run_finetune(one_cfg))), load_file(str(tmp_path / "ddp" / "model.safetensors"))
    losses = [(tmp_path / name / "train_log.jsonl").read_text().splitlines() for name in ("ddp", "one")]
    ddp_losses, one_losses = ([json.loads(row)["loss"] for row in log] for log in losses)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=5e-6, msg=key)
    assert ddp_losses == pytest.approx(one_losses, rel=0, abs=2e-6) and len(one_losses) == 3


@pytest.mark.parametrize("mode", ["contrastive", "supervised"])
def test_accumulating_micro_batches_trains_like_one_batch_of_their_size(tmp_path, base, mode):
    """Two micro-batches of 6 per step equal one batch of 12: for the contrastive loss, because the
    step's loss is taken over the whole accumulated batch (open_clip_train's --accum-freq: cached
    features, each micro-batch's gradient through its own rows), for cross-entropy because the step
    averages over every row. Averaging two 6-way contrastive losses would end elsewhere."""
    if mode == "contrastive":
        data, extra = write_csv_folder(tmp_path / "pairs", n=48), {}
    else:
        data = write_fixture(tmp_path / "bench", per_class=8, corrupt=0)
        extra = dict(mode="supervised", task="kather_et_al_2016", lr=1e-4)
    runs = {}
    for name, batch, accum in (("one", 12, 1), ("accumulated", 6, 2)):
        cfg = config(base, data, tmp_path / name, max_steps=3, batch_size=batch, accum_steps=accum, **extra)
        weights = load_file(str(run_finetune(cfg)))
        log = [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
        runs[name] = (weights, [row["loss"] for row in log])
    (one, one_losses), (accumulated, accumulated_losses) = runs["one"], runs["accumulated"]
    assert accumulated_losses == pytest.approx(one_losses, abs=2e-6) and len(one_losses) == 3
    for key in one:
        torch.testing.assert_close(accumulated[key], one[key], rtol=0, atol=5e-6, msg=key)


class _TwoTowers(torch.nn.Module):
    """The smallest model with CLIP's forward: unit image and text features and a learned temperature."""

    def __init__(self) -> None:
        super().__init__()
        self.image = torch.nn.Linear(4, 3)
        self.text = torch.nn.Embedding(10, 3)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        image = torch.nn.functional.normalize(self.image(pixels), dim=-1)
        text = torch.nn.functional.normalize(self.text(tokens).mean(1), dim=-1)
        return image, text, self.logit_scale.exp()


def _gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    return grads


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("mode", ["contrastive", "supervised"])
def test_three_uneven_micro_batches_give_one_batchs_loss_and_gradients(mode, masked):
    """A step's micro-batches (3, 2 and 2 rows) give the loss and the gradients of one batch of all
    7, the temperature's included: its gradient is taken once, at the last micro-batch. Two
    micro-batches cannot show that (taking it at every micro-batch but the last is also once),
    nor a run's logged losses alone (a loss summed with the wrong sign compares equal to itself).
    Masked (a stream's unreadable samples, 2 of the 7), they give those of one batch of the 5
    readable rows alone: the contrastive mask spans the whole step, the supervised mean counts the
    readable rows of every micro-batch (finetune/unreadable.py)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from micromerge.finetune import trainer
    from micromerge.finetune.losses import clip_loss
    from micromerge.finetune.micro_batches import MicroBatch

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    pixels = torch.randn(7, 4)
    keep = (
        torch.tensor([True, False, True, True, False, True, True])
        if masked
        else torch.ones(7, dtype=torch.bool)
    )
    if mode == "contrastive":
        model: torch.nn.Module = _TwoTowers()
        second = torch.randint(0, 10, (7, 5))
        whole = clip_loss(*model(pixels[keep], second[keep]))
    else:
        model, second = torch.nn.Linear(4, 3), torch.tensor([0, 1, 2, 0, 1, 2, 2])
        whole = torch.nn.functional.cross_entropy(model(pixels[keep]), second[keep])
    whole.backward()
    expected = _gradients(model)
    micro = [
        MicroBatch(pixels[a:b], second[a:b], keep[a:b], int((~keep[a:b]).sum())) if masked
        else MicroBatch(pixels[a:b], second[a:b])
        for a, b in ((0, 3), (3, 5), (5, 7))
    ]  # fmt: skip
    if mode == "contrastive":
        loss = trainer._contrastive_gradients(model, accelerator, micro, across_ranks=False)
    else:
        loss = trainer._supervised_gradients(model, accelerator, micro)
    assert float(loss) == pytest.approx(float(whole.detach()), abs=1e-6) and float(loss) > 0
    for name, grad in _gradients(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=0, atol=1e-6, msg=name)
    AcceleratorState._reset_state(reset_partial_state=True)


def test_an_epoch_that_is_no_multiple_of_the_accumulation_ends_with_a_shorter_step(tmp_path, base):
    """30 pairs in micro-batches of 6 are 5 micro-batches an epoch; accumulating 2 a step, the epoch
    is steps of 2, 2 and 1, and no micro-batch of the next epoch is drawn into the last step."""
    data = write_csv_folder(tmp_path / "pairs", n=30)
    run_finetune(config(base, data, tmp_path / "run", max_steps=None, epochs=1, batch_size=6, accum_steps=2))
    assert len((tmp_path / "run" / "train_log.jsonl").read_text().splitlines()) == 3
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["images_seen"] == 30


def test_fsdp_on_the_cpu_is_refused_in_one_line(tmp_path, base, monkeypatch):
    """accelerate runs FSDP on GPUs only: launched with --use_fsdp on CPUs, its processes would not
    form one sharded job (measured: each believed itself rank 0 of 1)."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(MicromergeError, match="--use_fsdp: accelerate shards models over GPUs only"):
        run_finetune(config(base, write_csv_folder(tmp_path / "pairs"), tmp_path / "run"))


def test_runs_in_one_process_each_get_their_own_accelerate_state(tmp_path, base):
    """accelerate's state is process-wide: a run must not inherit or trip over an earlier one's."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # whatever earlier tests left
    Accelerator(cpu=True, mixed_precision="bf16")  # what an earlier run or a notebook cell left behind
    data = write_csv_folder(tmp_path / "pairs")
    run_finetune(config(base, data, tmp_path / "run", max_steps=2))
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["device"] == "cpu" and manifest["mixed_precision"] == "no"


def test_a_corpus_smaller_than_a_batch_and_a_freeze_pattern_matching_nothing_are_named(tmp_path, base):
    data = write_csv_folder(tmp_path / "pairs", n=6)
    with pytest.raises(
        MicromergeError,
        match=r"6 usable examples is less than one batch \(8 x 1 processes\); lower --batch-size",
    ):
        run_finetune(config(base, data, tmp_path / "small", max_steps=None, epochs=1))
    with pytest.raises(MicromergeError, match=r"--freeze visual\.nothing\.\*: matches no parameter"):
        run_finetune(config(base, data, tmp_path / "frozen", batch_size=2, freeze=("visual.nothing.*",)))
    assert not (tmp_path / "small").exists(), "a refused run leaves no empty --out folder"
    # everything frozen: the optimiser's 'empty parameter list' traceback, before this line
    with pytest.raises(
        MicromergeError,
        match=r"^--freeze visual\.\* --freeze \*: freezes every weight of the checkpoint, so the run would train nothing",
    ):
        run_finetune(config(base, data, tmp_path / "all", batch_size=2, freeze=("visual.*", "*")))
    repeated = CliRunner().invoke(  # the flag is repeatable: both patterns reach the run
        cli, [*_contrastive_args(base, data, tmp_path / "cli", 1, 2), "--freeze", "visual.*", "--freeze", "*"]
    )
    assert repeated.exit_code == 2 and "error: --freeze visual.* --freeze *: freezes every" in repeated.output
    (tmp_path / "mine").mkdir()
    with pytest.raises(MicromergeError, match="freezes every weight"):
        run_finetune(config(base, data, tmp_path / "mine", batch_size=2, freeze=("*",)))
    assert (tmp_path / "mine").is_dir(), "a folder the user made stays"
    # what is left would change no prediction of the saved checkpoint: the temperature alone, or
    # (supervised) the head, kept apart in head.safetensors
    with pytest.raises(
        MicromergeError, match=r"would train only logit_scale, which changes no prediction; freeze"
    ):
        run_finetune(
            config(base, data, tmp_path / "scale", batch_size=2, freeze=("visual.*",), freeze_text=True)
        )
    bench = write_fixture(tmp_path / "bench", per_class=2, corrupt=0)
    head_only = config(
        base, bench, tmp_path / "head", mode="supervised", task="kather_et_al_2016", freeze=("visual.*",)
    )
    with pytest.raises(
        MicromergeError, match=r"\(text tower frozen\): .* would train nothing \(the head is kept apart"
    ):
        run_finetune(head_only)
    assert not (tmp_path / "scale" / "model.safetensors").exists() and not (tmp_path / "head").exists()


def test_augment_is_repeatable_on_the_command_line_and_recorded_in_its_order(tmp_path, base):
    """`--augment rot90 --augment flip`: both reach the run in the order given (the order they are
    applied in), and the manifest's hyperparameters, which a resume compares, record them so."""
    data = write_csv_folder(tmp_path / "pairs", n=8)
    args = [*_contrastive_args(base, data, tmp_path / "run", 1, 4), "--augment", "rot90", "--augment", "flip"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["hyperparameters"]["augment"] == ["rot90", "flip"]
    assert result.stderr == "", "--quiet (as the CLI tests run it): no progress lines at all"
