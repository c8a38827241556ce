"""GPU correctness: the CUDA paths agree with the CPU paths the rest of the suite checks.

CI has no GPU, so these skip there; they run by hand on a lent GPU machine
(`pytest -m gpu`, see BENCHMARKS.md for the last run).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from micromerge.cli import cli
from micromerge.eval.data import load_benchmark
from micromerge.eval.engine import prepare, run_sweep
from micromerge.eval.evaluator import Evaluator
from micromerge.eval.images import PixelFeed, build_image_cache
from micromerge.eval.settings import EvalSettings, SweepPlan
from micromerge.eval.zeroshot import image_embeddings
from micromerge.finetune.trainer import LOSS_READ_EVERY, run_finetune
from micromerge.merging.in_memory import merge_state_dicts
from micromerge.merging.methods import METHODS, MethodParams
from micromerge.merging.models import OPENAI_MEAN, OPENAI_STD, load_model
from micromerge.merging.plan import MergeSpec
from micromerge.merging.sources import open_source
from tests.helpers import launch_failure, write_checkpoint
from tests.test_finetune import config, write_csv_folder
from tests.ubench_fixture import write_fixture

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")


@pytest.fixture
def models(tmp_path):
    for name, seed in (("base", 0), ("ft", 1), ("ft2", 2)):
        write_checkpoint(tmp_path / f"{name}.safetensors", seed)
    return tmp_path / "base.safetensors", tmp_path / "ft.safetensors", tmp_path / "ft2.safetensors"


@pytest.mark.parametrize(
    "method, extra, atol",
    [
        ("linear", [], 1e-6),
        ("wise-ft", ["--alpha", "0.3"], 1e-6),
        ("task-arithmetic", ["--alpha", "0.7"], 1e-6),
        ("ties", ["--alpha", "1.0", "--density", "0.3"], 1e-6),
        ("ties", ["--alpha", "1.0", "--density", "0.3", "--topk-scope", "tensor"], 1e-6),
        ("dare", ["--alpha", "0.8", "--drop-rate", "0.5", "--seed", "3"], 1e-6),
        ("slerp", ["--alpha", "0.4"], 1e-6),
        ("slerp", ["--alpha", "0.4", "--slerp-scope", "row"], 1e-6),
        ("lines", ["--alpha", "0.3", "--beta", "0.6"], 1e-6),
        ("lines-ties", ["--alpha", "0.3", "--beta", "0.6", "--density", "0.3"], 1e-6),
        ("model-stock", [], 1e-6),
        ("breadcrumbs", ["--alpha", "0.9", "--density", "0.4", "--gamma", "0.05"], 1e-6),
        ("della", ["--alpha", "0.9", "--density", "0.4", "--epsilon", "0.1", "--seed", "2"], 1e-6),
        ("della", ["--alpha", "0.9", "--density", "0.4", "--rescale", "inverse", "--seed", "2"], 1e-6),
        ("della-linear", ["--alpha", "0.9", "--density", "0.4", "--seed", "2"], 1e-6),
        ("dare", ["--alpha", "0.8", "--drop-rate", "0.5", "--rescale", "l1", "--seed", "3"], 1e-6),
        ("dare-ties", ["--alpha", "0.8", "--drop-rate", "0.5", "--seed", "3"], 1e-6),
        ("breadcrumbs-ties", ["--alpha", "0.9", "--density", "0.4", "--gamma", "0.05"], 1e-6),
        ("tsv", [], 1e-4),  # LAPACK vs cuSOLVER SVDs: equal to rounding, not bit for bit
        ("iso-c", [], 1e-4),
    ],
)
def test_merge_on_cuda_equals_merge_on_cpu(tmp_path, models, method, extra, atol):
    """The same entries kept at every cut-off (ties broken by position, masks drawn on the CPU)."""
    base, ft, ft2 = models
    several = METHODS[method].max_finetuned is None
    finetuned = ["--ft", str(ft)] + (["--ft", str(ft2)] if several else [])
    outputs = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{method}-{device}.safetensors"
        args = ["merge", "--base", str(base), *finetuned, "--method", method, *extra]
        result = CliRunner().invoke(cli, [*args, "--device", device, "--out", str(out), "--quiet", "--force"])
        assert result.exit_code == 0, result.output
        outputs[device] = load_file(str(out))
    assert outputs["cpu"].keys() == outputs["cuda"].keys()
    for key, expected in outputs["cpu"].items():
        torch.testing.assert_close(outputs["cuda"][key], expected, rtol=0, atol=atol, msg=key)


def test_whole_model_ties_keeps_the_same_tied_entries_on_cuda():
    """Equal magnitudes straddle the cut-off: CPU and CUDA must keep exactly the same ones."""
    base = {"a": torch.zeros(1000), "b": torch.zeros(24, 50)}
    ft = {"a": torch.ones(1000), "b": torch.ones(24, 50)}
    ft["a"][::7] = 2.0
    params = MethodParams(density=0.3)
    on_cpu = merge_state_dicts("ties", base, [ft], params, strength=1.0)
    on_gpu = merge_state_dicts(
        "ties",
        {k: v.to(CUDA) for k, v in base.items()},
        [{k: v.to(CUDA) for k, v in ft.items()}],
        params,
        1.0,
    )
    for key in base:
        assert torch.equal(on_gpu[key].cpu(), on_cpu[key]), key


def test_resident_pixels_equal_streamed_pixels(tmp_path):
    loaded = load_benchmark(str(write_fixture(tmp_path / "ubench")))
    cache = build_image_cache(loaded.dataset, loaded.fingerprint, 32, tmp_path / "cache", progress=False)
    rows = np.flatnonzero(cache.valid)[::-1].copy()  # any order: the feed follows `rows`
    mean, std = torch.tensor(OPENAI_MEAN), torch.tensor(OPENAI_STD)
    on_gpu, on_cpu = (
        PixelFeed(cache, rows, mean, std, CUDA),
        PixelFeed(cache, rows, mean, std, torch.device("cpu")),
    )
    assert on_gpu.resident is not None and on_cpu.resident is None
    for start in range(0, len(rows), 16):
        torch.testing.assert_close(on_gpu.batch(start, start + 16).cpu(), on_cpu.batch(start, start + 16))


def _embeddings(tmp_path, bench, model_path, device, precision):
    settings = EvalSettings(
        data=str(bench), store=tmp_path / "unused.jsonl", cache_dir=tmp_path / "cache", precision=precision
    )
    prepared = prepare(settings)
    with open_source(str(model_path)) as source:
        model, model_config = load_model(source)
    evaluator = Evaluator(prepared.bench, prepared.tasks, model_config, settings, device)
    with torch.no_grad():
        return image_embeddings(model.to(device).eval(), evaluator.pixels, 16, precision).float().cpu()


def test_image_embeddings_on_cuda_agree_with_cpu(tmp_path, models):
    bench = write_fixture(tmp_path / "ubench")
    reference = _embeddings(tmp_path, bench, models[0], torch.device("cpu"), "fp32")
    for precision, floor in (("fp32", 0.9999), ("bf16", 0.99)):
        on_gpu = _embeddings(tmp_path, bench, models[0], CUDA, precision)
        cosine = (on_gpu * reference).sum(dim=1)
        assert cosine.min().item() > floor, (precision, cosine.min().item())


def test_sweep_on_cuda_in_bf16_tracks_the_cpu_sweep(tmp_path, models):
    bench = write_fixture(tmp_path / "ubench")
    spec = MergeSpec(method="wise-ft", params=MethodParams())
    plan = SweepPlan(str(models[0]), (str(models[1]),), spec, (0.0, 0.5, 1.0))
    accuracy = {}
    for device in ("cpu", "cuda"):
        settings = EvalSettings(
            data=str(bench), store=tmp_path / f"{device}.jsonl", cache_dir=tmp_path / "cache", bootstrap=0
        )
        rows = run_sweep(plan, settings, torch.device(device))
        accuracy[device] = {
            (r["alpha"], r["task"], r["caption_key"]): (r["value"], r["n_questions"])
            for r in rows
            if r["metric"] == "accuracy" and r["split"] == "all" and r["caption_key"] != "all"
        }
    assert accuracy["cpu"].keys() == accuracy["cuda"].keys() and len(accuracy["cpu"]) == 3 * (9 * 2 + 2)
    flipped = sum(round(abs(accuracy["cuda"][k][0] - value) * n) for k, (value, n) in accuracy["cpu"].items())
    total = sum(n for _, n in accuracy["cpu"].values())
    assert flipped <= 0.02 * total, f"bf16 on GPU changed {flipped} of {total} predictions"


def test_finetune_on_cuda_in_bf16_trains_and_starts_where_cpu_starts(tmp_path, models):
    data = write_csv_folder(tmp_path / "pairs", n=48)
    steps = LOSS_READ_EVERY + 3  # crosses one grouped loss read and ends on a partial group
    runs = {}
    for name, device, precision in (("cpu", "cpu", "no"), ("fp32", "cuda", "no"), ("bf16", "cuda", "bf16")):
        run_finetune(
            config(models[0], data, tmp_path / name, device=device, precision=precision, max_steps=steps)
        )
        runs[name] = [row["loss"] for row in _log(tmp_path / name, device, precision)]
    assert [len(losses) for losses in runs.values()] == [steps] * 3
    assert all(math.isfinite(v) for losses in runs.values() for v in losses)
    assert runs["fp32"][0] == pytest.approx(runs["cpu"][0], rel=1e-3)
    assert runs["bf16"][0] == pytest.approx(runs["cpu"][0], rel=3e-2)
    assert runs["bf16"][-1] < runs["bf16"][0], "bf16 training lowers the loss"


@pytest.mark.parametrize("mode", ["contrastive", "supervised"])
def test_a_stream_with_unreadable_images_on_cuda_leaves_them_out_as_the_cpu_run_does(tmp_path, models, mode):
    """The mask of unreadable samples lives on the device (finetune/unreadable.py): on CUDA the
    same samples are left out, the same count is recorded and listed, and the losses follow the
    CPU run's."""
    if mode == "contrastive":
        data, values = write_csv_folder(tmp_path / "pairs", n=48), {}
        for i in (5, 29):
            (data / f"img{i}.png").write_bytes(b"not a png")
    else:  # one corrupt image in the task
        data = write_fixture(tmp_path / "bench", per_class=8, corrupt=1)
        values = dict(mode="supervised", task="kather_et_al_2016", batch_size=4)
    runs = {}
    for device in ("cpu", "cuda"):
        cfg = config(models[0], data, tmp_path / device, device=device, precision="no", max_steps=6,
                     data_in_memory="no", workers=0, max_bad_fraction=0.2, **values)  # fmt: skip
        run_finetune(cfg)
        runs[device] = [row["loss"] for row in _log(tmp_path / device, device, "no")]
    counts = [
        json.loads((tmp_path / d / "manifest.json").read_text())["corrupt_images_skipped"] for d in runs
    ]
    assert counts[0] == counts[1] > 0
    listed = [(tmp_path / d / "unreadable.txt").read_text() for d in runs]
    assert listed[0] == listed[1], "the same samples listed"
    assert runs["cuda"] == pytest.approx(runs["cpu"], rel=1e-3)


@pytest.mark.parametrize("version", ["1", "2"])
def test_fsdp_through_accelerate_ends_where_a_plain_gpu_run_ends(tmp_path, models, version):
    """`accelerate launch --use_fsdp` (one GPU, so one shard: what this machine can show) takes the
    FSDP paths of the trainer — gradient clipping by the global norm, a sharded save_state, the
    state gathered whole for model.safetensors — and must end where the plain run ends."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.test_finetune import _contrastive_args

    data = write_csv_folder(tmp_path / "pairs", n=48)
    plain = run_finetune(
        config(models[0], data, tmp_path / "plain", device="cuda", precision="no", max_steps=4)
    )
    launcher = Path(sys.executable).with_name("accelerate")
    fsdp = [str(launcher), "launch", "--use_fsdp", "--fsdp_version", version, "--num_processes", "1",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
            "--fsdp_transformer_layer_cls_to_wrap", "ResidualAttentionBlock",
            "--fsdp_state_dict_type", "SHARDED_STATE_DICT", "-m", "micromerge.cli"]  # fmt: skip
    args = _contrastive_args(models[0], data, tmp_path / "fsdp", steps=4)
    args[args.index("--device") + 1] = "cuda"
    result = subprocess.run(
        [*fsdp, *args, "--lr", "1e-3", "--save-every", "2"], capture_output=True, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, launch_failure(result)
    assert json.loads((tmp_path / "fsdp" / "manifest.json").read_text())["distributed"] == "FSDP"
    sharded, whole = load_file(str(tmp_path / "fsdp" / "model.safetensors")), load_file(str(plain))
    assert sharded.keys() == whole.keys()
    for key in whole:
        torch.testing.assert_close(sharded[key], whole[key], rtol=0, atol=1e-5, msg=key)


def _log(run_dir, device, precision):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["device"].split(":")[0] == device and manifest["mixed_precision"] == precision
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["fisher", "gram", "adamerging", "supervised"])
def test_statistics_and_learned_coefficients_on_cuda_agree_with_cpu(tmp_path, models, kind):
    """Issue 14 on CUDA: the same select-half questions give the same Fishers, Grams and learned
    coefficients (float32 both sides; reductions differ in order, hence the tolerances)."""
    from micromerge.eval.statistics import statistics_input

    bench = write_fixture(tmp_path / "bench", fmt="save_to_disk", per_class=4)
    params = MethodParams(samples=24, steps=10, learning_rate=0.05, granularity="block")
    results = {}
    for device in ("cpu", "cuda"):
        settings = EvalSettings(
            data=str(bench),
            store=tmp_path / "s.jsonl",
            cache_dir=tmp_path / f"cache-{device}",
            progress=False,
        )
        results[device] = statistics_input(
            kind, tuple(str(m) for m in models), params, settings, torch.device(device)
        )
    if kind in ("fisher", "gram"):
        for cpu, cuda in zip(results["cpu"].values, results["cuda"].values, strict=True):
            for key in cpu:
                torch.testing.assert_close(cuda[key], cpu[key], rtol=1e-3, atol=1e-6, msg=key)
    else:
        cpu, cuda = (torch.tensor(r.values[0].values) for r in (results["cpu"], results["cuda"]))
        torch.testing.assert_close(cuda, cpu, rtol=0, atol=1e-3)
