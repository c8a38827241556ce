"""Report benchmark at the paper grid's size: the time and size of `micromerge report` on a store of
the shape `configs/ablation-paper.toml` writes (4 checkpoint pairs x 3 rule sets x 16 methods = 192
sweeps of 11 alphas, about 350,000 rows).

No such store can be computed here (it needs the real checkpoints and μ-Bench, and GPU days), so
it is built from a demo store's ubench sweep: each grid cell copies its rows under its own run id,
label ("pair / method / rules", as `ablate` names them), models (one sha256 per pair), rules
(as `parameters`) and method, and moves every accuracy by a small amount of its own that grows
with alpha, so that no two curves coincide (coinciding curves are drawn once, which would hide the
layout's cost).
Run: make demo && .venv/bin/python bench/report_bench.py [--store demo-out/results/results.jsonl]
       [--pairs 4 --rule-sets 3 --methods 16] [--out /tmp/report-bench] [--run-figures]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import time
from pathlib import Path

from micromerge.analysis.report import build_report

METHODS = [
    "wise-ft", "task-arithmetic", "ties", "dare", "slerp", "lines", "lines-ties", "model-stock",
    "breadcrumbs", "della", "tsv", "iso-c", "fisher", "regmean", "adamerging", "supervised-alpha",
]  # fmt: skip
RULE_SETS = {"all": [], "vision-only": ["visual.*"], "late-blocks-strong": ["visual.transformer.*"]}


def _digest(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def template_rows(store: Path) -> list[dict]:
    """The rows of the store's first ubench sweep (the demo's WiSE-FT)."""
    rows = [json.loads(line) for line in store.read_text().splitlines() if line.strip()]
    sweeps = [r for r in rows if r.get("protocol") == "ubench" and r.get("alpha") is not None]
    if not sweeps:
        raise SystemExit(f"{store}: no ubench sweep rows (run `make demo` first)")
    return [r for r in sweeps if r["run_id"] == sweeps[0]["run_id"]]


def write_grid_store(template: list[dict], path: Path, pairs: int, rule_sets: int, methods: int) -> int:
    count = 0
    with path.open("w") as out:
        for pair in range(pairs):
            models = {
                "base": f"base-{pair}",
                "base_sha256": [_digest("base", pair)],
                "finetuned": [f"specialist-{pair}"],
                "finetuned_sha256": [_digest("specialist", pair)],
            }
            for rules in list(RULE_SETS)[:rule_sets]:
                for method in METHODS[:methods]:
                    run_id = _digest(pair, rules, method)[:16]
                    shift = (int(_digest(run_id, "shift")[:4], 16) / 0xFFFF - 0.5) * 0.1
                    for row in template:
                        move = shift * (row["alpha"] or 0.0)
                        changed = {
                            k: min(1.0, max(0.0, row[k] + move)) for k in ("value", "ci_low", "ci_high")
                        }
                        out.write(
                            json.dumps(
                                {
                                    **row,
                                    **changed,
                                    "run_id": run_id,
                                    "label": f"pair-{pair} / {method} / {rules}",
                                    "method": method,
                                    "model": models,
                                    "parameters": {**row["parameters"], "include": RULE_SETS[rules]},
                                },
                                sort_keys=True,
                            )
                            + "\n"
                        )
                        count += 1
    return count


def folder_size(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("demo-out/results/results.jsonl"))
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--rule-sets", type=int, default=3)
    parser.add_argument("--methods", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("/tmp/report-bench"))
    parser.add_argument("--run-figures", action="store_true", help="draw each run's own figures too")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    store = args.out / "grid.jsonl"
    rows = write_grid_store(template_rows(args.store), store, args.pairs, args.rule_sets, args.methods)
    runs = args.pairs * args.rule_sets * args.methods
    print(f"{platform.node()} {platform.processor() or platform.machine()}: {runs} runs, {rows} rows, "
          f"{store.stat().st_size / 1e6:.0f} MB")  # fmt: skip
    started = time.perf_counter()
    html = build_report(
        store, args.out / "report", target="domain:pathology", run_figures=args.run_figures or None
    )
    seconds = time.perf_counter() - started
    files, size = folder_size(args.out / "report" / "figures")
    print(f"report: {seconds:.1f} s; report.html {html.stat().st_size / 1e6:.1f} MB; "
          f"figures/ {files} files, {size / 1e6:.1f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
