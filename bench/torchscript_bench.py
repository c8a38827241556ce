"""Reading OpenAI's CLIP release format: a ViT-B/16 TorchScript archive (fp16, 150 M parameters,
OpenAI's state-dict names and root scalars; random weights, written by `torch.jit.script(...).save`).

Times, each in a fresh process (a user's command; the read itself, after the imports, and the whole
process), the weights read three ways:
  (a) micromerge's restricted reader (`open_source(..., allow_pickle=True)`, every tensor read),
  (b) what open_clip's `load_openai_model` does first: `torch.jit.load(path).state_dict()`,
  (c) the same weights as a safetensors file (`safetensors.torch.load_file`), for scale,
with each process's peak RSS (VmHWM: ru_maxrss would carry over this process's own, which built
the archive, through fork and exec).
Run from the checkout (the fixture module comes from tests/): .venv/bin/python -m bench.torchscript_bench [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

READERS = {
    "micromerge restricted reader": """
import sys, time
PEAK = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) // 1024
from micromerge.merging.sources import open_source
t = time.perf_counter()
with open_source(sys.argv[1], allow_pickle=True) as source:
    n = sum(source.read(k).numel() for k in source.keys())
print(n, PEAK(), time.perf_counter() - t)
""",
    "torch.jit.load().state_dict()": """
import sys, time, warnings, torch
PEAK = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) // 1024
warnings.simplefilter("ignore")
t = time.perf_counter()
state = torch.jit.load(sys.argv[1], map_location="cpu").state_dict()
n = sum(v.numel() for k, v in state.items() if k not in ("input_resolution", "context_length", "vocab_size", "attn_mask"))
print(n, PEAK(), time.perf_counter() - t)
""",
    "safetensors load_file (same weights)": """
import sys, time
PEAK = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) // 1024
from safetensors.torch import load_file
t = time.perf_counter()
state = load_file(sys.argv[2])
n = sum(v.sum().item() * 0 + v.numel() for v in state.values())  # every tensor touched
print(n, PEAK(), time.perf_counter() - t)
""",
}


def _write_archive(folder: Path) -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file

    from micromerge.merging.models import build_model, get_model_config
    from tests.test_torchscript_archive import _OpenAIRelease

    torch.manual_seed(0)
    clip = build_model(get_model_config("ViT-B-16-quickgelu")).eval().half()
    archive = folder / "ViT-B-16.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(_OpenAIRelease(clip)).save(str(archive))
    same = folder / "ViT-B-16.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(same))
    return archive, same


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        archive, same = _write_archive(Path(tmp))
        results = {
            "machine": platform.processor() or platform.machine(),
            "archive_mb": archive.stat().st_size >> 20,
        }
        for name, script in READERS.items():
            times, reads, rss, count = [], [], [], 0
            for _ in range(args.repeats):
                start = time.perf_counter()
                done = subprocess.run(
                    [sys.executable, "-c", script, str(archive), str(same)],
                    capture_output=True,
                    text=True,
                    check=True,
                    env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
                )
                times.append(time.perf_counter() - start)
                count, peak, read = done.stdout.split()
                count = int(float(count))
                rss.append(int(peak))
                reads.append(round(float(read), 3))
            results[name] = {
                "read_seconds": sorted(reads),
                "process_seconds": [round(t, 2) for t in sorted(times)],
                "peak_rss_mb": max(rss),
                "parameters": count,
            }
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
