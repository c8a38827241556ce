"""Cost of the data-aware merges (issue 14): time and peak memory to estimate Fishers and Gram
matrices and to learn AdaMerging / supervised-α coefficients, at CLIP size on μ-Bench-sized data.

Fixture: μ-Bench's structure (Hub layout, nested caption structs, ten caption keys) with
--images distinct images stored at --stored-px, repeated to --rows rows (17,315 = μ-Bench), so the
select half and its question pool are full-sized; a random --model base and two "specialists" =
base + small random task vectors (std 1e-3). Each kind runs in a fresh process, as `merge` runs it,
from an empty statistics cache but a warm image cache (decoding is the sweep's cost, measured by
bench/sweep_bench.py): wall seconds, the process's peak RSS and, on CUDA, peak allocated memory.
Fisher and Gram are per model (three models); coefficients are learned once for the three.

Run: .venv/bin/python bench/data_aware_bench.py [--model ViT-B-16 --device cuda]
      CPU-sized: --model micro-clip --images 400 --rows 2000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sweep_bench import make_fixture

MAKE = """
import sys, torch
from safetensors.torch import save_file
from micromerge.merging.models import build_model, get_model_config
folder, arch = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
base = {k: v.contiguous() for k, v in build_model(get_model_config(arch)).state_dict().items() if k != "attn_mask"}
save_file(base, f"{folder}/base.safetensors", metadata={"micromerge.arch": arch})
for index in (1, 2):
    generator = torch.Generator().manual_seed(index)
    save_file({k: (v + 1e-3 * torch.randn(v.shape, generator=generator)).contiguous() for k, v in base.items()},
              f"{folder}/ft{index}.safetensors", metadata={"micromerge.arch": arch})
"""

RUN = """
import json, sys, time, torch
from pathlib import Path
from micromerge.eval.settings import EvalSettings
from micromerge.eval.statistics import statistics_input
from micromerge.merging.methods import MethodParams
kind, folder, data, cache, device, samples, steps = sys.argv[1:8]
device = torch.device(device)
settings = EvalSettings(data=data, store=Path(folder) / "unused.jsonl", cache_dir=Path(cache), progress=False,
                        batch_size=256)
models = tuple(f"{folder}/{name}.safetensors" for name in ("base", "ft1", "ft2"))
params = MethodParams(samples=int(samples), steps=int(steps),
                      granularity="block" if kind == "supervised" else "layer")
if kind == "warm":  # decode the images into the cache once, untimed
    statistics_input("gram", models[:1], MethodParams(samples=1), settings, device)
    kind = None
started = time.perf_counter()
if kind:
    statistics_input(kind, models, params, settings, device)
if device.type == "cuda":
    torch.cuda.synchronize()
seconds = time.perf_counter() - started
peak = torch.cuda.max_memory_allocated() // 2**20 if device.type == "cuda" else None
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) // 1024
print(json.dumps({"seconds": seconds, "peak_rss_mb": rss, "cuda_peak_mb": peak}))
"""


def run(kind: str, folder: Path, data: Path, cache: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-c", RUN, kind, str(folder), str(data), str(cache), args.device]
    command += [str(args.samples), str(args.steps)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{kind}: {result.stderr.strip().splitlines()[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=17315)
    parser.add_argument("--stored-px", type=int, default=224)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--kinds", default="fisher,gram,adamerging,supervised")
    args = parser.parse_args()
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        subprocess.run([sys.executable, "-c", MAKE, tmp, args.model], check=True)
        data, _ = make_fixture(folder / "fixture", args.images, args.stored_px, args.rows)
        cache = folder / "cache"
        run("warm", folder, data, cache, args)
        for kind in args.kinds.split(","):
            figures[kind] = run(kind, folder, data, cache, args)
            if kind in ("fisher", "gram"):
                figures[kind]["seconds_per_model"] = figures[kind]["seconds"] / 3
            print(kind, figures[kind], flush=True)
    import torch

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
    print(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{device or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
                "model": args.model,
                "rows": args.rows,
                "samples": args.samples,
                "steps": args.steps,
                "figures": figures,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
