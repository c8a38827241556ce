"""Every merge method on the embedded default (issue 13): one table of forgetting and recovery.

The demo's base and pathology specialist, plus a second pathology specialist fine-tuned by the
demo's own pipeline on a second, independently drawn pathology corpus (seed 1): two specialists of
one base, as PLIP and QuiltNet are of OpenAI CLIP, which Model Stock and the multi-model merges
need. For every method: a sweep over alpha 0:1:0.1 under the μ-Bench protocol, alpha chosen on
the select half by all-task mean, and at that alpha the all-task mean on the report half, the
target gain (pathology, over the base) and the control forgetting (every other domain, under the
base), from the real base and specialist evaluations; then the merge time of one checkpoint at
that alpha (`merge` on the CPU, engine auto). The greedy soup is chosen on the select half
directly (no alpha). Learned merges (AdaMerging, the supervised α) are swept along --alpha, which
scales their learned task vector, and also reported as learned (alpha 1).

Every data-aware method (Fisher, RegMean, AdaMerging, supervised α, greedy soup) is compared with
the best data-free method of the same specialists (the highest report-half all-task mean, which
can only shrink the data-aware gain): the difference of their all-task means on the report half,
with a paired bootstrap 95% interval that resamples each task's images (`paired_task_mean_difference`).

Run (nothing else running; `make demo` first or let this run it):
    .venv/bin/python bench/methods_table.py [--out demo-out]
Writes OUT/methods/table.md and table.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
import warnings
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import torch

from micromerge.analysis.metrics import curve, summarise
from micromerge.analysis.soup import greedy_soup
from micromerge.analysis.tables import Run, load_runs
from micromerge.core.hashing import default_cache_dir
from micromerge.demo import DemoConfig, run_demo, train_contrastive
from micromerge.eval.coefficients import LEARNED
from micromerge.eval.engine import prepare, run_eval, run_sweep
from micromerge.eval.evaluator import Evaluator
from micromerge.eval.metrics import paired_task_mean_difference
from micromerge.eval.settings import EvalSettings, SweepPlan
from micromerge.eval.statistics import KINDS, statistics_input
from micromerge.eval.synthetic.generate import write_corpus
from micromerge.merging.job import job_from_mapping, run_merge_job
from micromerge.merging.methods import METHODS, MethodParams
from micromerge.merging.models import load_model
from micromerge.merging.resident import ResidentMerge
from micromerge.merging.sources import open_source

TARGET = "domain:pathology"
ALPHAS = "0:1:0.1"
PARAMETERS = {  # as configs/ablation-paper.toml
    "ties": {"density": 0.2},
    "lines-ties": {"density": 0.2, "beta": 0.5},
    "lines": {"beta": 0.5},
    "breadcrumbs": {"density": 0.9, "gamma": 0.01},
    "breadcrumbs-ties": {"density": 0.9, "gamma": 0.01},
    "della": {"density": 0.4, "epsilon": 0.15},
    "della-linear": {"density": 0.4, "epsilon": 0.15},
}
VARIANTS = {"supervised-alpha, grid search": ("supervised-alpha", {"search": "grid"})}
"""Rows beyond each method at its defaults: the same method with other parameters."""
ONE = [
    m
    for m in METHODS
    if m != "linear" and METHODS[m].min_finetuned == 1 and METHODS[m].same_with_one_finetuned is None
]
"""With one specialist: each method once (a sign-electing or linear variant is then its method's merge)."""
TWO = [m for m in METHODS if m != "linear" and METHODS[m].max_finetuned is None]


def second_specialist(out: Path, cfg: DemoConfig) -> Path:
    run = out / "runs" / "pathology-specialist-b"
    if (run / "model.safetensors").is_file():
        return run / "model.safetensors"
    corpus = out / "data" / "corpus-pathology-b"
    if not corpus.is_dir():
        write_corpus(corpus, "pathology", seed=cfg.seed + 1, per_class=cfg.corpus_per_class)
    train_contrastive(
        replace(cfg, seed=cfg.seed + 1),
        out / "runs" / "base" / "model.safetensors",
        corpus,
        run,
        cfg.finetune_epochs,
        "pathology",
        10,
    )
    return run / "model.safetensors"


def at(run: Run, group: str | None, alpha: float) -> float:
    table = curve(run, group, "accuracy", "all").set_index("alpha")["value"]
    return float(table.get(alpha, table.iloc[0]))


def row_for(
    run: Run, label: str, base_eval: dict[str, float], point: float | None = None
) -> dict[str, object]:
    """One method's row at the alpha chosen on the select half (or at `point`: a learned merge as learned)."""
    summary = summarise(run, TARGET)
    alpha = summary.best_alpha["all_task_mean"] if run.method != "greedy-soup" else None
    alpha = alpha if point is None else point
    point = alpha if alpha is not None else float(run.table["alpha"].iloc[0])
    controls = [at(run, group, point) for group in summary.controls]
    report = curve(run, None, "accuracy", "report").set_index("alpha")["value"]
    return {
        "method": label,
        "run": run.label,
        "alpha": alpha,
        "point": point,
        "report_all_task_mean": float(report.loc[point]),
        "target_gain": at(run, TARGET, point) - base_eval[TARGET],
        "control_forgetting": sum(base_eval[g] - c for g, c in zip(summary.controls, controls, strict=True))
        / len(controls),
    }


def merge_seconds(
    base: str,
    finetuned: list[str],
    method: str,
    parameters: dict,
    alpha: float | None,
    folder: Path,
    settings: EvalSettings,
) -> float:
    """One `merge` at `alpha`; a data-aware method's statistics are cached by then (timed apart)."""
    values = {"base": base, "finetuned": finetuned, "method": method, **parameters}
    if alpha is not None:
        values["alpha"] = alpha
    out = folder / f"{method}-{len(finetuned)}.safetensors"
    job = job_from_mapping({**values, "out": str(out), "force": True})
    kind = METHODS[method].statistics
    models = (base, *finetuned)
    statistics = (
        statistics_input(kind, models, job.spec.params, settings, torch.device("cpu")) if kind else None
    )
    started = time.perf_counter()
    run_merge_job(job, progress=False, statistics=statistics)
    return time.perf_counter() - started


def statistics_seconds(models: tuple[str, ...], settings: EvalSettings) -> dict[str, float]:
    """Seconds per model to estimate each kind of statistics, and seconds to learn each kind of
    coefficients (base + two specialists, default parameters), from an empty statistics cache."""
    shutil.rmtree(Path(settings.cache_dir) / "statistics", ignore_errors=True)
    seconds = {}
    for kind in (*KINDS, *LEARNED):
        params = MethodParams(granularity="block") if kind == "supervised" else MethodParams()
        started = time.perf_counter()
        statistics_input(kind, models, params, settings, torch.device("cpu"))
        per = len(models) if kind in KINDS else 1
        seconds[kind if kind in KINDS else f"learn {kind}"] = (time.perf_counter() - started) / per
    return seconds


def report_outcomes(
    base: str,
    finetuned: list[str],
    method: str,
    parameters: dict,
    alpha: float,
    weights,
    settings: EvalSettings,
) -> dict[str, object]:
    """Each task's right/wrong per report-half question of one merge (the sweep's in-place path)."""
    values = {"base": base, "finetuned": finetuned, "method": method, **parameters}
    values.update({"weights": weights} if weights else {"alpha": alpha})
    job = job_from_mapping(values)
    kind = METHODS[method].statistics
    cpu = torch.device("cpu")
    statistics = statistics_input(kind, (base, *finetuned), job.spec.params, settings, cpu) if kind else None
    prepared = prepare(settings, writes_results=False)
    with ExitStack() as stack:
        base_source = stack.enter_context(open_source(base))
        sources = [stack.enter_context(open_source(f)) for f in finetuned]
        model, config = load_model(base_source)
        merger = ResidentMerge(
            model, job.spec, base_source, sources, cpu, statistics.values if statistics else None
        )
        merger.apply(job.spec.params.strength)
        evaluator = Evaluator(
            prepared.bench, prepared.tasks, config, settings, cpu, prepared.outside_paper_rows
        )
        return evaluator.task_correctness(merger.model, "report")


def data_aware(method: str) -> bool:
    return method == "greedy-soup" or METHODS[method].statistics is not None


def add_gains(rows: list[dict], labels: dict, runs: dict, base: str, settings: EvalSettings) -> None:
    """Each data-aware row's report-half gain over the best data-free row of the same specialists."""
    outcomes: dict[str, dict] = {}

    def of(row: dict) -> dict:
        if row["method"] not in outcomes:
            method, finetuned, parameters = labels[row["run"]]
            weights = runs[row["run"]].parameters.get("weights") if method == "greedy-soup" else None
            merge_method = "linear" if method == "greedy-soup" else method
            outcomes[row["method"]] = report_outcomes(
                base, finetuned, merge_method, parameters, row["point"], weights, settings
            )
        return outcomes[row["method"]]

    for count in {len(finetuned) for _, finetuned, _ in labels.values()}:
        mine = [r for r in rows if len(labels[r["run"]][1]) == count]
        free = max(
            (r for r in mine if not data_aware(labels[r["run"]][0])), key=lambda r: r["report_all_task_mean"]
        )
        for row in mine:
            if data_aware(labels[row["run"]][0]):
                a, b = of(row), of(free)
                gain = paired_task_mean_difference(
                    [(a[t][0], b[t][0], b[t][1]) for t in sorted(b)], settings.bootstrap, settings.seed
                )
                expected = row["report_all_task_mean"] - free["report_all_task_mean"]
                if abs(gain["value"] - expected) > 1e-9:
                    raise RuntimeError(f"{row['method']}: paired difference {gain['value']} != {expected}")
                row["gain_over_best_data_free"] = {**gain, "versus": free["method"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--bootstrap", type=int, default=200)
    args = parser.parse_args()
    cfg = DemoConfig(out=args.out, progress=False)
    run_demo(cfg, say=lambda _line: None)
    base = str(args.out / "runs" / "base" / "model.safetensors")
    first = str(args.out / "runs" / "pathology-specialist" / "model.safetensors")
    second = str(second_specialist(args.out, cfg))
    folder = args.out / "methods"
    settings = EvalSettings(
        data=str(args.out / "data" / "ubench-synthetic"),
        store=folder / "results.jsonl",
        cache_dir=default_cache_dir(),
        bootstrap=args.bootstrap,
        progress=False,
    )
    device = torch.device("cpu")
    for model in (base, first, second):
        run_eval(model, settings, device)
    estimation = statistics_seconds((base, first, second), settings)
    labels: dict[str, tuple[str, list[str], dict]] = {}
    for count, finetuned, methods in ((1, [first], ONE), (2, [first, second], TWO)):
        runs_of = [(m, m, PARAMETERS.get(m, {})) for m in methods]
        runs_of += [(name, m, p) for name, (m, p) in VARIANTS.items() if m in methods]
        for name, method, parameters in runs_of:
            values = {"base": base, "finetuned": finetuned, "method": method, "alphas": ALPHAS}
            job = job_from_mapping({**values, **parameters})
            label = f"{name} ({count} specialist{'s' if count > 1 else ''})"
            run_sweep(
                SweepPlan(job.base, job.finetuned, job.spec, job.alphas or (), label=label), settings, device
            )
            labels[label] = (method, finetuned, parameters)
        soup_label = f"greedy-soup ({count} specialist{'s' if count > 1 else ''})"
        greedy_soup(base, tuple(finetuned), settings, device, label=soup_label)
        labels[soup_label] = ("greedy-soup", finetuned, {})

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = {r.label: r for r in load_runs(settings.store)}
    base_run = next(r for r in runs.values() if r.method == "none" and r.model["base"] == base)
    base_eval = {g: float(curve(replace(base_run, table=base_run.table.assign(alpha=0.0)), g)["value"].iloc[0])
                 for g in [TARGET, *summarise(runs[next(iter(labels))], TARGET).controls]}  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for label, (method, finetuned, parameters) in labels.items():
            row = row_for(runs[label], label, base_eval)
            if method in ("adamerging", "supervised-alpha"):
                learned = row_for(runs[label], f"{label}, as learned", base_eval, point=1.0)
                learned["merge_seconds"] = merge_seconds(
                    base, finetuned, method, parameters, 1.0, Path(scratch), settings
                )
                rows.append(learned)
            merge_method = "linear" if method == "greedy-soup" else method
            if method == "greedy-soup":
                weights = runs[label].parameters["weights"]
                job = job_from_mapping(
                    {"base": base, "finetuned": finetuned, "method": "linear", "weights": weights,
                     "out": str(Path(scratch) / "soup.safetensors"), "force": True}
                )  # fmt: skip
                started = time.perf_counter()
                run_merge_job(job, progress=False)
                row["merge_seconds"] = time.perf_counter() - started
            else:
                row["merge_seconds"] = merge_seconds(
                    base, finetuned, merge_method, parameters, row["alpha"], Path(scratch), settings
                )
            rows.append(row)
    add_gains(rows, labels, runs, base, settings)
    lines = [
        "| method | α (select half) | all-task mean, report half | target gain (pathology) | control forgetting "
        "| gain over best data-free (95% CI) | merge time |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        alpha = "chosen" if row["alpha"] is None else f"{row['alpha']:g}"
        gain = row.get("gain_over_best_data_free")
        versus = (
            f"{100 * gain['value']:+.1f} pts [{100 * gain['ci_low']:+.1f}, {100 * gain['ci_high']:+.1f}] "
            f"vs {gain['versus']}"
            if gain
            else ""
        )
        lines.append(
            f"| {row['method']} | {alpha} | {100 * row['report_all_task_mean']:.1f} % | "
            f"{100 * row['target_gain']:+.1f} pts | {100 * row['control_forgetting']:+.1f} pts | {versus} | "
            f"{row['merge_seconds']:.2f} s |"
        )
    table = "\n".join(lines)
    (folder / "table.md").write_text(table + "\n")
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    (folder / "table.json").write_text(
        json.dumps({"machine": machine, "rows": rows, "statistics_seconds_per_model": estimation}, indent=1)
        + "\n"
    )
    print(table)
    print(f"\nstatistics per model, coefficients per merge (256 select-half questions, CPU): {estimation}")
    print(f"\nbase (evaluated): pathology {100 * base_eval[TARGET]:.1f} %; machine: {machine}")


if __name__ == "__main__":
    main()
