"""`micromerge ablate CONFIG`: a grid of checkpoint pairs x methods x rule sets through sweep and report.

Resumable because every sweep is: re-running the same config finishes what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from analysis.report import build_report
from eval.engine import EvalSettings, SweepPlan, run_sweep
from merging.job import job_from_mapping
from micromerge.config_files import load_config_file, reject_unknown_keys
from micromerge.errors import MicromergeError


@dataclass(frozen=True)
class Ablation:
    data: str
    store: Path
    report: Path
    alphas: str
    pairs: tuple[dict[str, Any], ...]
    methods: tuple[str, ...]
    rule_sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks: str = "all"
    protocol: str = "ubench"
    bootstrap: int = 1000
    seed: int = 0
    batch_size: int = 256
    target: str | None = None
    method_parameters: dict[str, dict[str, Any]] = field(default_factory=dict)


def load_ablation(path: str | Path) -> Ablation:
    data = load_config_file(path)
    section = data.get("ablation", data)
    allowed = {
        "data",
        "store",
        "report",
        "alphas",
        "pairs",
        "methods",
        "rule_sets",
        "tasks",
        "protocol",
        "bootstrap",
        "seed",
        "batch_size",
        "target",
        "method_parameters",
    }
    reject_unknown_keys(f"{path} [ablation]", section, allowed)
    for key in ("data", "store", "report", "pairs", "methods"):
        if not section.get(key):
            raise MicromergeError(f"{path}: [ablation] needs {key!r}")
    base_dir = Path(path).parent

    def resolve(value: str) -> str:
        return str(base_dir / value) if value.startswith(("./", "../")) else value

    pairs = []
    for pair in section["pairs"]:
        reject_unknown_keys(f"{path} pair", pair, {"name", "base", "finetuned"})
        if not pair.get("base") or not pair.get("finetuned"):
            raise MicromergeError(f"{path}: every pair needs base and finetuned")
        finetuned = pair["finetuned"] if isinstance(pair["finetuned"], list) else [pair["finetuned"]]
        pairs.append(
            {
                "name": pair.get("name") or pair["base"],
                "base": resolve(pair["base"]),
                "finetuned": [resolve(f) for f in finetuned],
            }
        )
    return Ablation(
        data=resolve(section["data"]),
        store=Path(resolve(section["store"])),
        report=Path(resolve(section["report"])),
        alphas=str(section.get("alphas", "0:1:0.1")),
        pairs=tuple(pairs),
        methods=tuple(section["methods"]),
        rule_sets=section.get("rule_sets") or {"all": {}},
        tasks=section.get("tasks", "all"),
        protocol=str(section.get("protocol", "ubench")),
        bootstrap=int(section.get("bootstrap", 1000)),
        seed=int(section.get("seed", 0)),
        batch_size=int(section.get("batch_size", 256)),
        target=section.get("target"),
        method_parameters=section.get("method_parameters") or {},
    )


def run_ablation(
    ablation: Ablation,
    cache_dir: Path,
    device: torch.device,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> Path:
    settings = EvalSettings(
        data=ablation.data,
        store=ablation.store,
        cache_dir=cache_dir,
        tasks=ablation.tasks,
        protocol=ablation.protocol,
        batch_size=ablation.batch_size,
        bootstrap=ablation.bootstrap,
        seed=ablation.seed,
        progress=progress,
        rank=rank,
        world_size=world_size,
    )
    for pair in ablation.pairs:
        for method in ablation.methods:
            for rule_name, rules in ablation.rule_sets.items():
                reject_unknown_keys(f"rule set {rule_name!r}", rules, {"include", "exclude", "alpha_rules"})
                job = job_from_mapping(
                    {
                        "base": pair["base"],
                        "finetuned": pair["finetuned"],
                        "method": method,
                        "alphas": ablation.alphas,
                        "seed": ablation.seed,
                        **ablation.method_parameters.get(method, {}),
                        **rules,
                    }
                )
                label = f"{pair['name']} / {method} / {rule_name}"
                run_sweep(
                    SweepPlan(job.base, job.finetuned, job.spec, job.alphas or (), label=label),
                    settings,
                    device,
                )
    return build_report(ablation.store, ablation.report, ablation.target)
