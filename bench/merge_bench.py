"""Merge benchmark (issue 2): two ViT-B/16-sized checkpoints (150 M parameters, random, safetensors).

In one run, times
  (a) `merge` end to end (a fresh process, as a user runs it),
  (b) the naive script researchers write (torch.load both .pt files, a dict comprehension, torch.save),
  (c) a plain in-memory copy of one checkpoint's bytes (the bandwidth limit),
plus the in-memory merge step alone, and the peak RSS of (a) and (b).
`--engine auto` lets `merge` pick (numpy for this CPU WiSE-FT of safetensors files); the in-memory
figures use the arrays of the engine that ran (numpy arrays or torch tensors on --device).
Run: .venv/bin/python bench/merge_bench.py [--engine auto|numpy|torch] [--device cuda] [--repeats 3]
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
from collections.abc import Callable
from pathlib import Path

NAIVE = """
import sys, torch, resource
a = torch.load(sys.argv[1]); b = torch.load(sys.argv[2])
merged = {k: (1 - 0.5) * a[k] + 0.5 * b[k] for k in a}
torch.save(merged, sys.argv[3])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""
OURS = """
import sys, resource
from micromerge.cli import merge_main
sys.argv = ["merge"] + sys.argv[1:]
try:
    merge_main()
except SystemExit as exc:
    if exc.code:
        raise
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


MAKE = """
import sys, torch
from safetensors.torch import save_file
from micromerge.merging.models import build_model, get_model_config
folder = sys.argv[1]
for seed in (0, 1):
    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in build_model(get_model_config("ViT-B-16")).state_dict().items() if k != "attn_mask"}
    save_file(state, f"{folder}/m{seed}.safetensors")
    torch.save(state, f"{folder}/m{seed}.pt")
print(sum(v.numel() for v in state.values()))
"""


def make_checkpoints(folder: Path) -> tuple[Path, Path, Path, Path, int]:
    """In a subprocess: Linux carries a parent's peak RSS into its children's ru_maxrss, so the
    parent must stay small while it spawns the runs it measures."""
    result = subprocess.run(
        [sys.executable, "-c", MAKE, str(folder)], capture_output=True, text=True, check=True
    )
    n_params = int(result.stdout.strip().splitlines()[-1])
    return folder / "m0.safetensors", folder / "m1.safetensors", folder / "m0.pt", folder / "m1.pt", n_params


def timed(command: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, int(result.stdout.strip().splitlines()[-1])


def in_memory_figures(
    a_path: Path, b_path: Path, engine: str, device_name: str, repeats: int
) -> dict[str, float]:
    """Copy and merge timings on the arrays of the engine that ran: numpy arrays, or torch tensors on the device."""
    if engine == "numpy":
        import numpy as np
        from safetensors.numpy import load_file

        a, b = load_file(str(a_path)), load_file(str(b_path))
        out = {k: np.empty_like(v) for k, v in a.items()}
        flat = np.concatenate([v.reshape(-1) for v in a.values()])
        return _time_copy_and_merge(a, b, out, flat.copy, lambda: None, repeats)
    import torch
    from safetensors.torch import load_file

    device = torch.device(device_name)
    a = {k: v.to(device) for k, v in load_file(str(a_path)).items()}
    b = {k: v.to(device) for k, v in load_file(str(b_path)).items()}
    out = {k: torch.empty_like(v) for k, v in a.items()}
    flat = torch.cat([v.reshape(-1) for v in a.values()])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return _time_copy_and_merge(a, b, out, flat.clone, sync, repeats)


def _time_copy_and_merge(
    a: dict, b: dict, out: dict, copy: Callable[[], object], sync: Callable[[], None], repeats: int
) -> dict[str, float]:
    """Min over repeats of (c) one flat copy of a checkpoint and the WiSE-FT step into preallocated outputs."""
    from micromerge.merging.methods import METHODS, MethodParams

    copies, merges = [], []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        copy()
        sync()
        copies.append(time.perf_counter() - start)
        start = time.perf_counter()
        for key in a:
            METHODS["wise-ft"].merge(key, a[key], [b[key]], 0.5, MethodParams(), out=out[key])
        sync()
        merges.append(time.perf_counter() - start)
    return {"copy_s": min(copies), "merge_step_s": min(merges)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--engine", default="auto", choices=["auto", "numpy", "torch"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        a_st, b_st, a_pt, b_pt, n_params = make_checkpoints(folder)
        size_mb = a_st.stat().st_size / 2**20
        baseline_s, baseline_rss = timed(
            [
                sys.executable,
                "-c",
                "import torch, resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)",
            ]
        )
        ours, naive = [], []
        for i in range(args.repeats):
            ours.append(
                timed(
                    [
                        sys.executable,
                        "-c",
                        OURS,
                        "--base",
                        str(a_st),
                        "--ft",
                        str(b_st),
                        "--alpha",
                        "0.5",
                        "--out",
                        str(folder / f"o{i}.safetensors"),
                        "--quiet",
                        "--device",
                        args.device,
                        "--engine",
                        args.engine,
                    ]
                )
            )
            naive.append(timed([sys.executable, "-c", NAIVE, str(a_pt), str(b_pt), str(folder / f"n{i}.pt")]))
            engine = json.loads((folder / f"o{i}.safetensors.manifest.json").read_text())["engine"]
            (folder / f"o{i}.safetensors").unlink()
            (folder / f"n{i}.pt").unlink()
        memory = in_memory_figures(a_st, b_st, engine, args.device, args.repeats)
    import torch

    best_ours, best_naive = min(t for t, _ in ours), min(t for t, _ in naive)
    figures = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, torch {torch.__version__}",
        "device": args.device,
        "engine": engine,
        "parameters": n_params,
        "checkpoint_mb": round(size_mb, 1),
        "a_merge_end_to_end_s": round(best_ours, 3),
        "b_naive_script_s": round(best_naive, 3),
        "speedup_a_over_b": round(best_naive / best_ours, 2),
        "c_memory_copy_s": round(memory["copy_s"], 4),
        "merge_step_s": round(memory["merge_step_s"], 4),
        "merge_step_over_copy": round(memory["merge_step_s"] / memory["copy_s"], 2),
        "a_peak_rss_mb": max(r for _, r in ours),
        "b_peak_rss_mb": max(r for _, r in naive),
        "a_peak_rss_over_checkpoint": round(max(r for _, r in ours) / size_mb, 2),
        "all_runs_a_s": [round(t, 3) for t, _ in ours],
        "all_runs_b_s": [round(t, 3) for t, _ in naive],
        "python_and_torch_import_rss_mb": baseline_rss,
        "python_and_torch_import_s": round(baseline_s, 3),
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
