"""Sweep benchmark (issues 3 and 12): the sweep engine against the model's forward and the naive loop, 11 alphas.

Fixture: thousands of images in μ-Bench's real structure (Hub layout: Arrow stream shards; nested
caption structs with per-image options, ten caption keys) stored at 224 px (real μ-Bench images are
larger than the model input), a small open_clip model (micro-clip, 64 px). `--protocol ubench` (the
default) scores every image against its own options, as the authors do; `closed-set` against every
class. In one run:
  engine (cold cache)  `run_sweep` with a fresh image cache (decodes once, then reuses it),
  engine (warm cache)  the same sweep again into a new store (the cache from the first run),
  naive                for each alpha: rebuild the merged model from state dicts, decode every image
                       through a DataLoader with open_clip's preprocess, forward, score,
  forward only         the model's pure image forward over the same images, 11 times.
Accuracies of engine and naive must be identical (the naive loop is closed-set only; the ubench
protocol's scoring is checked against open_clip in tests/test_eval.py).
Run: .venv/bin/python bench/sweep_bench.py [--images 2000] [--stored-px 224] [--rows 17315 --skip-naive]

On a GPU (full-μ-Bench figures): --model ViT-B-16 --device cuda --rows 17315 --skip-naive. --rows
repeats the fixture's rows up to μ-Bench's 17,315 rows, so the sweep is full-sized; the forward pass
runs in bf16 autocast, as the engine does on a GPU.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import save_file

from micromerge.eval.data import load_benchmark
from micromerge.eval.engine import run_sweep
from micromerge.eval.hub_layout import HUB_FOLDER, write_hub_layout
from micromerge.eval.schema import ubench_features
from micromerge.eval.settings import EvalSettings, SweepPlan
from micromerge.eval.synthetic.generate import write_benchmark
from micromerge.eval.synthetic.spec import all_label_names
from micromerge.eval.tasks import discover_tasks
from micromerge.eval.zeroshot import autocast_for, class_embeddings
from micromerge.merging.methods import MethodParams
from micromerge.merging.models import build_model, get_model_config, tokenizer_for
from micromerge.merging.plan import MergeSpec

ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


def make_fixture(folder: Path, images: int, stored_px: int, rows: int) -> tuple[Path, int]:
    """μ-Bench-schema fixture stored at `stored_px`; returns its folder and its number of distinct images."""
    per_class = max(2, images // len(all_label_names()))
    workers = os.cpu_count() or 2
    small = write_benchmark(folder / "small", per_class=per_class, workers=workers, layout="save_to_disk")

    def upscale(example):
        image = Image.open(io.BytesIO(example["image"]["bytes"])).resize(
            (stored_px, stored_px), Image.BICUBIC
        )
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=6)
        return {"image": {"bytes": buffer.getvalue(), "path": None}}

    big = small.cast_column("image", datasets.Image(decode=False)).map(
        upscale, features=ubench_features(all_label_names()), num_proc=min(8, workers)
    )
    distinct = len(big)
    if rows:  # repeated up to `rows`, or its first `rows` (a quick rehearsal of the GPU command on a CPU)
        big = datasets.concatenate_datasets([big] * -(-rows // distinct)).select(range(rows))
        distinct = min(distinct, rows)
    write_hub_layout(big, folder / "bench" / HUB_FOLDER, 7)
    return folder / "bench", distinct


def make_checkpoints(folder: Path, arch: str) -> tuple[Path, Path]:
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        state = {
            k: v.contiguous()
            for k, v in build_model(get_model_config(arch)).state_dict().items()
            if k != "attn_mask"
        }
        save_file(state, str(folder / f"m{seed}.safetensors"), metadata={"micromerge.arch": arch})
        paths.append(folder / f"m{seed}.safetensors")
    return paths[0], paths[1]


class _Images(torch.utils.data.Dataset):
    def __init__(self, dataset, preprocess):
        self.dataset, self.preprocess = dataset, preprocess

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.preprocess(self.dataset[index]["image"])


def naive_sweep(
    bench: Path, base: Path, ft: Path, batch_size: int, arch: str, device: torch.device
) -> dict[tuple[float, str], float]:
    """What researchers write: per alpha, a new model from a merged state dict, images re-decoded through a DataLoader."""
    from safetensors.torch import load_file

    config = get_model_config(arch)
    size = config["vision_cfg"]["image_size"]
    dataset = load_benchmark(str(bench)).dataset
    tasks = discover_tasks(dataset)
    a, b = load_file(str(base)), load_file(str(ft))
    results = {}
    for alpha in ALPHAS:
        model = build_model(config)
        model.load_state_dict({k: (1 - alpha) * a[k] + alpha * b[k] for k in a}, strict=False)
        model.to(device).eval()
        preprocess = open_clip.image_transform(size, is_train=False)
        loader = torch.utils.data.DataLoader(
            _Images(dataset, preprocess), batch_size=batch_size, num_workers=2
        )
        with torch.no_grad():
            with autocast_for(device, "bf16"):
                features = torch.cat(
                    [
                        torch.nn.functional.normalize(model.encode_image(x.to(device)).float(), dim=-1)
                        for x in loader
                    ]
                )
            tokenizer = tokenizer_for(config)
            for task in tasks:
                text = class_embeddings(model, tokenizer, task, device)
                predictions = (features[list(task.rows)] @ text.T).argmax(1).cpu().numpy()
                results[(alpha, task.name)] = float((predictions == np.array(task.labels)).mean())
    return results


def engine_sweep(
    bench: Path,
    base: Path,
    ft: Path,
    store: Path,
    cache: Path,
    batch_size: int,
    device: torch.device,
    bootstrap: int,
    protocol: str,
) -> dict[tuple[float, str], float]:
    settings = EvalSettings(
        data=str(bench),
        store=store,
        cache_dir=cache,
        bootstrap=bootstrap,
        batch_size=batch_size,
        protocol=protocol,
        progress=False,
    )
    spec = MergeSpec(method="wise-ft", params=MethodParams())
    rows = run_sweep(SweepPlan(str(base), (str(ft),), spec, ALPHAS), settings, device)
    return {
        (r["alpha"], r["task"]): r["value"]
        for r in rows
        if r["metric"] == "accuracy" and r["split"] == "all" and r.get("caption_key") in (None, "all")
    }


def forward_only(bench: Path, cache: Path, base: Path, batch_size: int, device: torch.device) -> float:
    """The model's image forward over the same images, 11 times: pixels already resident, no merge, no scoring."""
    from micromerge.eval.images import PixelFeed, build_image_cache
    from micromerge.merging.models import OPENAI_MEAN, OPENAI_STD, load_model
    from micromerge.merging.sources import open_source

    loaded = load_benchmark(str(bench))
    with open_source(str(base)) as source:
        model, config = load_model(source)
    model.to(device).eval()
    size = config["vision_cfg"]["image_size"]
    images = build_image_cache(loaded.dataset, loaded.fingerprint, size, cache, progress=False)
    feed = PixelFeed(
        images, np.arange(len(images.valid)), torch.tensor(OPENAI_MEAN), torch.tensor(OPENAI_STD), device
    )
    with torch.no_grad(), autocast_for(device, "bf16"):
        model.encode_image(feed.batch(0, batch_size))  # warm-up: kernels and allocator
        _synchronize(device)
        start = time.perf_counter()
        for _ in ALPHAS:
            for i in range(0, len(feed), batch_size):
                model.encode_image(feed.batch(i, i + batch_size))
        _synchronize(device)
    return time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000, help="Distinct images in the fixture.")
    parser.add_argument(
        "--rows", type=int, default=0, help="Repeat (or cut) the fixture's rows to this many."
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--stored-px", type=int, default=224, help="Size the fixture's images are stored at.")
    parser.add_argument("--model", default="micro-clip")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--protocol", choices=["ubench", "closed-set"], default="ubench")
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=0,
        help="The engine's bootstrap replicates (the CLI default is 1000).",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        bench, distinct = make_fixture(folder, args.images, args.stored_px, args.rows)
        fixture_s = time.perf_counter() - start
        base, ft = make_checkpoints(folder, args.model)
        start = time.perf_counter()
        loaded = load_benchmark(str(bench), cache_dir=folder / "cache")
        discovered = discover_tasks(loaded.dataset)
        discovery_s = time.perf_counter() - start
        start = time.perf_counter()
        engine = engine_sweep(
            bench,
            base,
            ft,
            folder / "s1.jsonl",
            folder / "cache",
            args.batch_size,
            device,
            args.bootstrap,
            args.protocol,
        )
        engine_cold = time.perf_counter() - start
        start = time.perf_counter()
        engine_sweep(
            bench,
            base,
            ft,
            folder / "s2.jsonl",
            folder / "cache",
            args.batch_size,
            device,
            args.bootstrap,
            args.protocol,
        )
        engine_warm = time.perf_counter() - start
        naive_s, naive = float("nan"), {}
        if not args.skip_naive and args.protocol == "closed-set":
            start = time.perf_counter()
            naive = naive_sweep(bench, base, ft, args.batch_size, args.model, device)
            naive_s = time.perf_counter() - start
        forward_s = forward_only(bench, folder / "cache", base, args.batch_size, device)
        n_images = len(load_benchmark(str(bench)).dataset)
    mismatched = [k for k in naive if abs(naive[k] - engine[k]) > 1e-12]
    figures = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "images": n_images,
        "distinct_images": min(
            n_images, len(all_label_names()) * max(2, args.images // len(all_label_names()))
        ),
        "alphas": len(ALPHAS),
        "model": args.model,
        "stored_image_px": args.stored_px,
        "batch_size": args.batch_size,
        "engine_bootstrap": args.bootstrap,
        "protocol": args.protocol,
        "caption_keys": 10,
        "fixture_build_s": round(fixture_s, 1),
        "load_and_discover_tasks_s": round(discovery_s, 2),
        "tasks": len(discovered),
        "option_questions": sum(len(q.rows) for t in discovered for q in t.questions),
        "engine_cold_cache_s": round(engine_cold, 2),
        "engine_warm_cache_s": round(engine_warm, 2),
        "forward_only_s": round(forward_s, 2),
        "forward_images_per_s": round(len(ALPHAS) * n_images / forward_s, 1),
        "engine_warm_images_per_s": round(len(ALPHAS) * n_images / engine_warm, 1),
        "engine_cold_over_forward": round(engine_cold / forward_s, 2),
        "engine_warm_over_forward": round(engine_warm / forward_s, 2),
    }
    if naive:
        figures.update(
            naive_s=round(naive_s, 2),
            speedup_cold=round(naive_s / engine_cold, 2),
            speedup_warm=round(naive_s / engine_warm, 2),
            accuracies_identical=not mismatched,
            mismatched=mismatched[:5],
        )
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
