"""Merge time and peak memory of every method at ViT-B/16 size (issue 13), `merge` end to end.

Three ViT-B/16-sized checkpoints (150 M parameters, safetensors): a random base and two
"specialists" = base + small random task vectors (std 1e-3, as fine-tuning moves weights little).
Each method merges base + both specialists (base + the first where it takes one), in a fresh
process as a user runs it, on --device. Whole-model TIES reads every tensor four times (three
radix-select passes and the merge); TSV-Merge and Iso-C run SVDs of every 2-D tensor.
Run: .venv/bin/python bench/methods_merge_bench.py [--device cpu|cuda] [--methods ties,tsv]
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

from merge_bench import OURS, timed

MAKE = """
import sys, torch
from safetensors.torch import save_file
from micromerge.merging.models import build_model, get_model_config
folder = sys.argv[1]
torch.manual_seed(0)
base = {k: v.contiguous() for k, v in build_model(get_model_config("ViT-B-16")).state_dict().items() if k != "attn_mask"}
save_file(base, f"{folder}/base.safetensors")
for index in (1, 2):
    generator = torch.Generator().manual_seed(index)
    save_file({k: (v + 1e-3 * torch.randn(v.shape, generator=generator)).contiguous() for k, v in base.items()},
              f"{folder}/ft{index}.safetensors")
print(sum(v.numel() for v in base.values()))
"""
EXTRA = {
    "ties": ["--density", "0.2"],
    "lines-ties": ["--density", "0.2"],
    "breadcrumbs": ["--density", "0.9"],
    "breadcrumbs-ties": ["--density", "0.9"],
    "della": ["--density", "0.4"],
    "della-linear": ["--density", "0.4"],
}


def main() -> None:
    from micromerge.merging.methods import METHODS

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    data_free = [name for name, method in METHODS.items() if method.statistics is None]
    parser.add_argument(
        "--methods", default=",".join(data_free), help="data-aware methods: bench/data_aware_bench.py"
    )
    args = parser.parse_args()
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        made = subprocess.run([sys.executable, "-c", MAKE, tmp], capture_output=True, text=True, check=True)
        parameters = int(made.stdout.strip().splitlines()[-1])
        for name in args.methods.split(","):
            method = METHODS[name]
            count = 2 if method.max_finetuned is None else 1
            fts = [arg for i in range(1, count + 1) for arg in ("--ft", str(folder / f"ft{i}.safetensors"))]
            alpha = [] if name == "linear" else ["--alpha", "0.5"]
            command = [sys.executable, "-c", OURS, "--base", str(folder / "base.safetensors"), *fts]
            command += ["--method", name, *alpha, *EXTRA.get(name, []), "--device", args.device]
            command += ["--out", str(folder / "out.safetensors"), "--force", "--quiet"]
            seconds, rss = timed(command)
            engine = json.loads((folder / "out.safetensors.manifest.json").read_text())["engine"]
            figures[f"{name} ({count} ft)"] = {
                "seconds": round(seconds, 2),
                "peak_rss_mb": rss,
                "engine": engine,
            }
            print(name, figures[f"{name} ({count} ft)"], flush=True)
    import torch

    print(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
                "device": args.device,
                "parameters": parameters,
                "methods": figures,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
