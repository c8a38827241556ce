"""Fine-tuning throughput, two comparisons (`--against`):

open_clip_train (issue 16, the default): micromerge's streaming trainer against open_clip's own
training script (`open_clip_train`, which ships in the open_clip wheel) on the same webdataset
shards, model, starting weights, batch size, steps, workers, optimiser settings (AdamW, lr 5e-4,
weight decay 0.1 on what open_clip_train decays, gradient norm clipped at 1, cosine, no warm-up) and
augmentation (open_clip's random resized crop). Shards: the demo's pathology corpus (3,900
image-caption pairs; generated here when `make demo` has not made it) as webdataset tar shards of
500 samples (`KEY.png` + `KEY.txt`), read from the same brace pattern by both. Each trainer runs in a fresh
process: wall seconds (imports, model build and data start included), images/s over the whole run
and over the steps after the first (from each trainer's own log), the process's peak RSS (VmHWM),
and both loss curves every 10 steps. The two use the same buffer sizes (2,000 shards, 5,000 samples) but
draw from them, and their crops, differently,
so the curves agree only statistically here; `tests/test_open_clip_alignment.py` feeds both the
same batches and holds them equal step for step. A third run streams the same pairs from a local
copy of a hub dataset repository (parquet files, one per shard) through `datasets` (`streaming=True`),
the path a `--data owner/name` corpus takes; open_clip_train has no such reader to compare with.

plain-loop (issue 4): the trainer against a minimal PyTorch loop on data decoded once in memory
(same model, batch, optimiser, steps), throughput from the first step.

Run: .venv/bin/python bench/finetune_bench.py [--against open_clip_train|plain-loop]
                                               [--model micro-clip --batch-size 64 --steps 60]
GPU: --model ViT-B-32 --device cuda --batch-size 256 --steps 200 --precision bf16 [--workers 8]
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from micromerge.eval.pairs import decode_checked, load_pairs
from micromerge.eval.synthetic.generate import write_corpus
from micromerge.eval.zeroshot import autocast_for
from micromerge.finetune.config import FinetuneConfig
from micromerge.finetune.losses import clip_loss
from micromerge.finetune.trainer import run_finetune
from micromerge.merging.models import OPENAI_MEAN, OPENAI_STD, build_model, get_model_config, tokenizer_for

HWM = 'print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) // 1024)'

OURS = f"""
import sys
from micromerge.cli import main
sys.argv = ["micromerge", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    if exc.code:
        raise
{HWM}
"""

OPEN_CLIP = f"""
import sys
import open_clip
from micromerge.merging.arch_names import CONFIG_DIR
open_clip.add_model_config(CONFIG_DIR)  # micromerge's tiny configs, for a CPU-sized comparison
from open_clip_train.main import main
main(sys.argv[1:])
{HWM}
"""

MAKE_BASE = """
import sys, torch
from safetensors.torch import save_file
from micromerge.merging.models import build_model, get_model_config
torch.manual_seed(0)
state = {k: v.contiguous() for k, v in build_model(get_model_config(sys.argv[2])).state_dict().items() if k != "attn_mask"}
save_file(state, sys.argv[1], metadata={"micromerge.arch": sys.argv[2]})
"""


def write_shards(corpus: Path, folder: Path, per_shard: int = 500) -> int:
    """The corpus (a save_to_disk dataset) as webdataset shards; returns the number of shards."""
    import datasets

    dataset = datasets.load_from_disk(str(corpus)).cast_column("image", datasets.Image(decode=False))
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for first in range(0, len(dataset), per_shard):
        rows = dataset.select(range(first, min(len(dataset), first + per_shard)))
        with tarfile.open(folder / f"shard-{count:06d}.tar", "w") as archive:
            for offset, row in enumerate(rows):
                for suffix, payload in ((".png", row["image"]["bytes"]), (".txt", row["caption"].encode())):
                    info = tarfile.TarInfo(f"{first + offset:08d}{suffix}")
                    info.size = len(payload)
                    archive.addfile(info, io.BytesIO(payload))
        count += 1
    return count


def write_parquet_repo(corpus: Path, folder: Path, files: int) -> Path:
    """The same corpus as a local copy of a hub dataset repository (`data/train-0000K-of-0000N.parquet`,
    the image feature in the schema metadata, as `push_to_hub` writes it), for the hub-stream row."""
    import datasets

    dataset = datasets.load_from_disk(str(corpus))
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for k in range(files):
        part = dataset.shard(files, k, contiguous=True)
        part.to_parquet(str(folder / "data" / f"train-{k:05d}-of-{files:05d}.parquet"))
    return folder


def timed(command: list[str], cwd: Path) -> tuple[float, int, str]:
    started = time.perf_counter()
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    seconds = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"{command[:4]} failed:\n{result.stderr[-3000:]}")
    return seconds, int(result.stdout.strip().splitlines()[-1]), result.stderr


def plain_loop(data_dir: Path, steps: int, batch: int, lr: float, arch: str, device: torch.device) -> float:
    config = get_model_config(arch)
    torch.manual_seed(0)
    model = build_model(config).to(device)
    pairs = load_pairs(str(data_dir))
    size = config["vision_cfg"]["image_size"]
    data = decode_checked(pairs.payloads, pairs.captions, size, 0.05, str(data_dir), progress=False)
    tokens = tokenizer_for(config)(data.targets)
    mean = torch.tensor(OPENAI_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, device=device).view(1, 3, 1, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05)
    order = torch.randperm(len(data.targets), generator=torch.Generator().manual_seed(0))
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        index = order[(step * batch) % (len(order) - batch) :][:batch].numpy()
        pixels = torch.from_numpy(np.ascontiguousarray(data.pixels[np.sort(index)])).to(device)
        pixels = (pixels.float() / 255 - mean) / std
        with autocast_for(device, "bf16"):
            image_f, text_f, scale = model(pixels, tokens[torch.from_numpy(np.sort(index))].to(device))[:3]
            loss = clip_loss(image_f.float(), text_f.float(), scale.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * batch / (time.perf_counter() - start)


OPEN_CLIP_LINE = re.compile(r"\[\s*(\d+)/\d+ .*?Batch \(t\): ([\d.]+),.*?Contrastive_loss: ([\d.]+)")


def open_clip_log(path: Path, batch: int) -> tuple[list[tuple[int, float, float]], float]:
    """(step from 1, mean batch seconds of its logging window, loss) per logged line of open_clip_train,
    and its images/s after the first step (its meter restarts at every logged line)."""
    rows = [
        (int(m[1]) // batch, float(m[2]), float(m[3]))
        for m in (OPEN_CLIP_LINE.search(line) for line in path.read_text().splitlines())
        if m
    ]
    windows = [
        (step - previous, seconds) for (previous, _, _), (step, seconds, _) in itertools.pairwise(rows)
    ]
    after_first = sum(n for n, _ in windows) * batch / sum(n * s for n, s in windows)
    return rows, after_first


def ours_after_first(log: list[dict], batch: int, world: int = 1) -> float:
    """micromerge logs a cumulative rate per step (images so far / seconds so far): the time of step
    k is k*B/rate_k, so the rate after the first step is (N-1)*B / (t_N - t_1)."""
    first, last = log[0], log[-1]
    t_first = first["step"] * batch * world / first["images_per_s"]
    t_last = last["step"] * batch * world / last["images_per_s"]
    return (last["step"] - first["step"]) * batch * world / (t_last - t_first)


def against_open_clip_train(args: argparse.Namespace) -> dict:
    figures, curves = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        corpus = args.corpus
        if not corpus.is_dir():
            corpus = folder / "corpus"
            write_corpus(corpus, "pathology", seed=0, per_class=300)
        count = write_shards(corpus, folder / "shards")
        spec = f"{folder}/shards/shard-{{000000..{count - 1:06d}}}.tar"  # read alike by both
        base = folder / "base.safetensors"
        subprocess.run([sys.executable, "-c", MAKE_BASE, str(base), args.model], check=True)
        settings = {"lr": "5e-4", "weight_decay": "0.1", "grad_clip": "1.0"}
        ours = [sys.executable, "-c", OURS, "finetune", "contrastive", "--base", str(base), "--data", spec,
                "--out", str(folder / "ours"), "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
                "--workers", str(args.workers), "--augment", "crop", "--device", args.device,
                "--lr", settings["lr"], "--weight-decay", settings["weight_decay"], "--grad-clip", settings["grad_clip"],
                "--precision", "no" if args.precision == "fp32" else args.precision, "--quiet"]  # fmt: skip
        theirs = [sys.executable, "-c", OPEN_CLIP, "--train-data", spec,
                  "--dataset-type", "webdataset", "--train-num-samples", str(args.steps * args.batch_size),
                  "--model", args.model, "--pretrained", str(base), "--batch-size", str(args.batch_size),
                  "--epochs", "1", "--workers", str(args.workers), "--device", args.device,
                  "--precision", "fp32" if args.precision == "fp32" else "amp_bf16",
                  "--lr", settings["lr"], "--wd", settings["weight_decay"], "--grad-clip-norm", settings["grad_clip"],
                  "--warmup", "0", "--save-frequency", "0", "--logs", str(folder / "logs"), "--name", "bench",
                  "--log-every-n-steps", "10", "--seed", "0", "--report-to", ""]  # fmt: skip
        hub = write_parquet_repo(corpus, folder / "hub", count)
        ours_hub = [*ours, "--data-in-memory", "no"]
        ours_hub[ours_hub.index("--data") + 1] = str(hub)
        ours_hub[ours_hub.index("--out") + 1] = str(folder / "ours-hub")
        runs = (("micromerge (streaming)", ours), ("micromerge (hub parquet stream)", ours_hub),
                ("open_clip_train", theirs))  # fmt: skip
        for name, command in runs:
            seconds, rss, _ = timed(command, folder)
            figures[name] = {
                "seconds": round(seconds, 1),
                "images_per_s": round(args.steps * args.batch_size / seconds, 1),
                "peak_rss_mb": rss,
            }
            print(name, figures[name], flush=True)
        logs = {}
        for name, run in (
            ("micromerge (streaming)", "ours"),
            ("micromerge (hub parquet stream)", "ours-hub"),
        ):
            lines = (folder / run / "train_log.jsonl").read_text().splitlines()
            logs[name] = {row["step"]: row for row in map(json.loads, lines)}
            rows_of_run = list(logs[name].values())
            figures[name]["images_per_s_after_first_step"] = round(
                ours_after_first(rows_of_run, args.batch_size), 1
            )
        rows, rate = open_clip_log(folder / "logs" / "bench" / "out.log", args.batch_size)
        figures["open_clip_train"]["images_per_s_after_first_step"] = round(rate, 1)
        curves = [
            {
                "step": step,
                "open_clip_train": loss,
                "micromerge": logs["micromerge (streaming)"].get(step, {}).get("loss"),
                "micromerge_hub": logs["micromerge (hub parquet stream)"].get(step, {}).get("loss"),
            }
            for step, _, loss in rows
        ]
    return {"figures": figures, "settings": settings, "shards": count, "loss_curves": curves}


def against_plain_loop(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_corpus(folder / "pairs", "pathology", per_class=120, workers=os.cpu_count() or 2)
        torch.manual_seed(0)
        from safetensors.torch import save_file

        state = {
            k: v.contiguous()
            for k, v in build_model(get_model_config(args.model)).state_dict().items()
            if k != "attn_mask"
        }
        save_file(state, str(folder / "init.safetensors"), metadata={"micromerge.arch": args.model})
        plain = plain_loop(folder / "pairs", args.steps, args.batch_size, 5e-4, args.model, device)
        run_finetune(
            FinetuneConfig(
                mode="contrastive",
                base=str(folder / "init.safetensors"),
                data=str(folder / "pairs"),
                out=folder / "run",
                max_steps=args.steps,
                batch_size=args.batch_size,
                lr=5e-4,
                weight_decay=0.05,
                save_every=0,
                progress=False,
                device=args.device,
                precision="bf16",
            )
        )
        ours = json.loads((folder / "run" / "manifest.json").read_text())["images_per_s"]
    return {
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "micromerge_images_per_s": ours,
        "plain_pytorch_images_per_s": round(plain, 1),
        "ratio": round(ours / plain, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--against", choices=("open_clip_train", "plain-loop"), default="open_clip_train")
    parser.add_argument("--corpus", type=Path, default=Path("demo-out/data/corpus-pathology"))
    parser.add_argument("--model", default="micro-clip")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", help="fp32 or bf16 (open_clip_train's amp_bf16)")
    args = parser.parse_args()
    result = against_open_clip_train(args) if args.against == "open_clip_train" else against_plain_loop(args)
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
                "device": device,
                "against": args.against,
                "model": args.model,
                "batch_size": args.batch_size,
                "steps": args.steps,
                "workers": args.workers,
                **result,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
