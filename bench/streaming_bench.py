"""Fine-tuning from webdataset shards (issue 16): micromerge's streaming trainer against open_clip's
own training script (`open_clip_train`, which ships in the open_clip wheel) on the same shards,
model, batch size, steps, workers and augmentation (open_clip's random resized crop).

Shards: the demo's pathology corpus (3,900 image-caption pairs; generated here when `make demo`
has not made it) written as webdataset tar shards of 500 samples (`KEY.png` + `KEY.txt`), read through `pipe:cat` by both.
Each trainer runs in a fresh process: wall seconds (imports, model build and data start included),
images/s = steps x batch / seconds, and the process's peak RSS (VmHWM). Both start from the same
random-initialised model config; throughput does not depend on the weights.

Run: .venv/bin/python bench/streaming_bench.py [--model micro-clip --batch-size 64 --steps 60]
GPU: --model ViT-B-32 --device cuda --batch-size 256 --steps 200 --precision bf16
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

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


def timed(command: list[str], cwd: Path) -> tuple[float, int, str]:
    started = time.perf_counter()
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    seconds = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"{command[:4]} failed:\n{result.stderr[-3000:]}")
    return seconds, int(result.stdout.strip().splitlines()[-1]), result.stderr


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, default=Path("demo-out/data/corpus-pathology"))
    parser.add_argument("--model", default="micro-clip")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--precision", default="fp32", help="open_clip_train's name: fp32, bf16 (amp_bf16 there)"
    )
    args = parser.parse_args()
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        corpus = args.corpus
        if not corpus.is_dir():
            from micromerge.eval.synthetic.generate import write_corpus

            corpus = folder / "corpus"
            write_corpus(corpus, "pathology", seed=0, per_class=300)
        count = write_shards(corpus, folder / "shards")
        spec = f"pipe:cat {folder}/shards/shard-{{000000..{count - 1:06d}}}.tar"
        base = folder / "base.safetensors"
        subprocess.run([sys.executable, "-c", MAKE_BASE, str(base), args.model], check=True)
        ours = [sys.executable, "-c", OURS, "finetune", "contrastive", "--base", str(base), "--data", spec]
        ours += [
            "--out",
            str(folder / "ours"),
            "--max-steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
        ]
        ours += ["--workers", str(args.workers), "--augment", "crop", "--device", args.device, "--lr", "5e-4"]
        ours += ["--precision", "no" if args.precision == "fp32" else args.precision, "--quiet"]
        theirs = [
            sys.executable,
            "-c",
            OPEN_CLIP,
            "--train-data",
            spec.removeprefix("pipe:cat "),
            "--dataset-type",
        ]
        theirs += [
            "webdataset",
            "--train-num-samples",
            str(args.steps * args.batch_size),
            "--model",
            args.model,
        ]
        theirs += ["--batch-size", str(args.batch_size), "--epochs", "1", "--workers", str(args.workers)]
        theirs += ["--device", args.device, "--precision", "fp32" if args.precision == "fp32" else "amp_bf16"]
        theirs += ["--lr", "5e-4", "--warmup", "0", "--save-frequency", "0", "--logs", str(folder / "logs")]
        theirs += ["--log-every-n-steps", "10", "--seed", "0", "--report-to", ""]
        for name, command in (("micromerge (streaming)", ours), ("open_clip_train", theirs)):
            seconds, rss, _ = timed(command, folder)
            figures[name] = {
                "seconds": round(seconds, 1),
                "images_per_s": round(args.steps * args.batch_size / seconds, 1),
                "peak_rss_mb": rss,
            }
            print(name, figures[name], flush=True)
        log = [json.loads(line) for line in (folder / "ours" / "train_log.jsonl").read_text().splitlines()]
        figures["micromerge (streaming)"]["steady_images_per_s"] = log[-1]["images_per_s"]
    import torch

    print(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
                "device": args.device,
                "model": args.model,
                "batch_size": args.batch_size,
                "steps": args.steps,
                "workers": args.workers,
                "shards": count,
                "figures": figures,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
