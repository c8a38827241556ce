"""What durable outputs cost: `core.atomic.atomic_output` (fsync of the file before its rename,
then of the folder) against the write-and-rename it replaced, for a manifest-sized file, a small
checkpoint and a CLIP-sized one.

Each size is written --repeats times into --dir (the file system outputs go to: its fsync cost is
what is measured), alternating the two ways so that both meet the same disk state; the median
seconds per file are printed as JSON.

Run: .venv/bin/python bench/atomic_write_bench.py [--dir checkpoints/bench-fsync] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

from micromerge.core.atomic import atomic_output

SIZES = {"manifest (4 KiB)": 4 << 10, "checkpoint (16 MiB)": 16 << 20, "ViT-B/32 fp32 (578 MiB)": 578 << 20}
CHUNK = 8 << 20


def write_plain(path: Path, size: int, block: bytes) -> None:
    """The way before: write a temporary file, flush, rename (no fsync)."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        for start in range(0, size, CHUNK):
            handle.write(block[: min(CHUNK, size - start)])
        handle.flush()
    os.replace(temporary, path)


def write_durable(path: Path, size: int, block: bytes) -> None:
    with atomic_output(path, "wb") as handle:
        for start in range(0, size, CHUNK):
            handle.write(block[: min(CHUNK, size - start)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("checkpoints/bench-fsync"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    block = os.urandom(CHUNK)
    results = {}
    try:
        for name, size in SIZES.items():
            times: dict[str, list[float]] = {"write and rename": [], "atomic_output (fsync)": []}
            for _ in range(args.repeats):
                for way, write in (
                    ("write and rename", write_plain),
                    ("atomic_output (fsync)", write_durable),
                ):
                    started = time.perf_counter()
                    write(args.dir / "out.bin", size, block)
                    times[way].append(time.perf_counter() - started)
            results[name] = {way: round(statistics.median(t), 4) for way, t in times.items()}
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    print(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(), "seconds": results}, indent=2))


if __name__ == "__main__":
    main()
