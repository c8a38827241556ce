"""How fast `micromerge data check` reads a corpus: N random-noise JPEGs as a caption folder and as a
hub-layout copy (parquet files), checked with each --workers count, against a 10-sample corpus for
the start-up (importing torch, datasets and webdataset), which every run pays once. A check reads
its corpus in parts of PART_SAMPLES a worker, each with worker processes of its own: --part-samples
sets it (a number larger than the corpus reads it in one part, as the check did before it had
parts), to measure what the parts cost; --out checks with a report kept, to measure its writes.

Each check runs in its own process (`micromerge data check --quiet`), timed from outside; its peak
RSS is the checking process's own (the data workers are processes of their own), its VmHWM:
getrusage's ru_maxrss outlives exec on Linux, so it gave this script's own peak (1,349 MB for every
check of 12,000 images, whose bytes this script held) when larger. Printed as JSON:
seconds per run, the samples per second beyond the start-up, and the peak RSS in MB.

Run: .venv/bin/python bench/corpus_check_bench.py [--images 3000] [--size 256] [--workers 0 2]
     [--part-samples 8192 1000000000] [--out]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

CHECK = """
import sys
from micromerge.cli import main
from micromerge.finetune import corpus_check
corpus_check.PART_SAMPLES = int(sys.argv[3])
out = ["--out", sys.argv[4]] if sys.argv[4] else []
sys.argv = ["micromerge", "data", "check", "--quiet", "--data", sys.argv[1], "--workers", sys.argv[2], *out]
try:
    main()
except SystemExit as stop:
    assert stop.code in (0, None), stop.code
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) // 1024)
"""


def write_corpora(folder: Path, images: int, size: int) -> dict[str, Path]:
    """The same noise JPEGs as a caption folder and as a hub-layout copy of four parquet files."""
    rng = np.random.default_rng(0)
    table, hub = folder / "pairs", folder / "hub" / "data"
    table.mkdir(parents=True)
    hub.mkdir(parents=True)
    payloads = []
    with open(table / "captions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for i in range(images):
            buffer = io.BytesIO()
            Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(
                buffer, "JPEG", quality=90
            )
            (table / f"img{i}.jpg").write_bytes(buffer.getvalue())
            writer.writerow([f"img{i}.jpg", f"cells {i}"])
            payloads.append(buffer.getvalue())
    for k, part in enumerate(np.array_split(np.arange(images), 4)):
        cells = [{"bytes": payloads[i], "path": None} for i in part]
        pq.write_table(
            pa.table({"image": cells, "caption": [f"cells {i}" for i in part]}),
            hub / f"train-{k:05d}-of-00004.parquet",
        )
    small = folder / "small"
    small.mkdir()
    (small / "captions.csv").write_text(
        "image,caption\n" + "".join(f"{table / f'img{i}.jpg'},cells {i}\n" for i in range(10))
    )
    return {"caption folder": table, "hub-layout copy": folder / "hub", "10 samples (start-up)": small}


def timed_check(corpus: Path, workers: int, part_samples: int, out: str) -> tuple[float, int]:
    if out:  # a finished report is checked again from the start anyway; no run reads another's
        Path(out).unlink(missing_ok=True)
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", CHECK, str(corpus), str(workers), str(part_samples), out],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return time.perf_counter() - started, int(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--part-samples", type=int, nargs="+", default=[8192])
    parser.add_argument("--out", action="store_true", help="Keep a report (--out) in every check.")
    args = parser.parse_args()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as temporary:
        corpora = write_corpora(Path(temporary), args.images, args.size)
        out = str(Path(temporary) / "check.json") if args.out else ""
        small = corpora.pop("10 samples (start-up)")
        for workers in args.workers:
            start_up, _ = timed_check(small, workers, 8192, out)
            results[f"10 samples (start-up), --workers {workers}"] = {"seconds": round(start_up, 2)}
            for name, corpus in corpora.items():
                for part_samples in args.part_samples:
                    seconds, rss = timed_check(corpus, workers, part_samples, out)
                    results[f"{name}, --workers {workers}, parts of {part_samples} a worker"] = {
                        "seconds": round(seconds, 2),
                        "samples_per_s": round(args.images / max(seconds - start_up, 1e-9)),
                        "peak_rss_mb": rss,
                    }
    print(
        json.dumps(
            {"machine": platform.platform(), "cpus": os.cpu_count(), "images": args.images, "size": args.size,
             "out": args.out, "results": results},
            indent=2,
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
