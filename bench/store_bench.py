"""Results-store benchmark: the time to append one alpha's rows, and to read one run's rows back, as
the store grows to the size of a paper-size ablation.

A demo row is about 1.4 kB (its provenance rides on every row) and a μ-Bench alpha writes about 160
rows (tasks x caption keys x splits x metrics); the paper-size ablation grid (about 130 sweeps of 11
alphas) writes some 230,000 rows, over 300 MB. In one run, for stores of --sizes rows (copies of a
real demo row under 16 run ids): one append of --batch fresh rows of one run by a store object that has
appended before (a sweep's case), the same by a fresh object (its first append), `done(run_id)`
(a sweep's resume check) by a fresh reader and by one that has read another run (the next sweep of
a grid, sharing `Prepared.results`), and `rows()` (a report's read).
Run: .venv/bin/python bench/store_bench.py [--sizes 10000,50000,230000] [--batch 160]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

from micromerge.eval.store import ResultStore

ROW = {  # a demo row's fields (ubench protocol), as a sweep writes it
    "alpha": 0.0,
    "bootstrap": 500,
    "caption_key": "modality_0",
    "chance": 0.2,
    "ci_high": 0.8884615384615384,
    "ci_low": 0.8461538461538461,
    "dataset": {"fingerprint": "790ce3d607c5e9e9", "source": "/tmp/demo-out/data/ubench-synthetic"},
    "groups": {
        k: "all" for k in ("domain", "modality", "paper", "scale", "subdomain", "submodality", "taxonomy")
    },
    "label": "wise-ft [ubench]: base + pathology specialist",
    "level": "coarse",
    "method": "wise-ft",
    "metric": "accuracy",
    "micromerge_version": "0.1.1",
    "model": {
        "base": "/tmp/demo-out/runs/base/model.safetensors",
        "base_sha256": ["a401a72b124883ff9dda79cfe6ea10b0a889edf2625ee0fbb2c88eedcdfa4c9b"],
        "finetuned": ["/tmp/demo-out/runs/pathology-specialist/model.safetensors"],
        "finetuned_sha256": ["9e3359df42e8e1cef8dda0be4d257bc9dce51c2f1c8f68ae1d9b410d4a81a8aa"],
    },
    "n_classes": 3,
    "n_images": 1040,
    "parameters": {"alpha_rules": [], "exclude": [], "include": []},
    "process": "0/1",
    "protocol": "ubench",
    "seed": 0,
    "split": "all",
    "value": 0.8692307692307693,
}


def rows(count: int, start: int = 0, run_id: str | None = None) -> list[dict]:
    """`count` distinct rows, of 16 runs in turn or all of `run_id` (one sweep's alpha)."""
    return [
        {**ROW, "run_id": run_id or f"run{i % 16:02d}", "alpha": float(i), "task": f"task{i % 160}"}
        for i in range(start, start + count)
    ]


def seconds(work, *args) -> float:
    started = time.perf_counter()
    work(*args)
    return time.perf_counter() - started


def measure(path: Path, size: int, batch: int) -> str:
    """One table row: a store of `size` rows, then its four timings."""
    store = ResultStore(path)
    store.append(rows(size))
    warm, cold = rows(batch, size, "run03"), rows(batch, size + batch, "run03")
    appended = seconds(store.append, warm)
    fresh = seconds(ResultStore(path).append, cold)
    done = seconds(ResultStore(path).done, "run03")
    shared = ResultStore(path)  # a grid's reader (Prepared.results): it read another run before
    shared.done("run01")
    next_done = seconds(shared.done, "run03")
    every = seconds(ResultStore(path).rows)
    megabytes = path.stat().st_size / 1e6
    return (
        f"| {size:,} | {megabytes:.0f} | {appended * 1e3:.1f} ms | {fresh:.2f} s | {done:.2f} s | "
        f"{next_done * 1e3:.1f} ms | {every:.2f} s |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,50000,230000")
    parser.add_argument("--batch", type=int, default=160)
    args = parser.parse_args()
    print(
        f"# {platform.processor() or platform.machine()}, python {platform.python_version()}, batch {args.batch}"
    )
    print(
        "| rows in store | MB | append (store appended before) | append (fresh object) | done(run_id) "
        "| done(run_id), a reader that read another run | rows() |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            print(measure(Path(tmp) / f"s{size}.jsonl", size, args.batch))


if __name__ == "__main__":
    main()
