"""The evaluation and sweep engine.

Images are decoded once into the cache, prompts tokenized once, the model built once; for a
sweep every alpha's weights are written in place into that one model. Each alpha is one unit
of work appended to the store in one write, so a killed sweep resumes where it stopped, and
several processes (accelerate launch) split the alphas between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import micromerge
from eval.data import Benchmark, load_benchmark
from eval.images import ImageCache, PixelFeed, build_image_cache
from eval.metrics import classification_metrics
from eval.store import ResultStore
from eval.tasks import Task, discover_tasks, select_tasks
from eval.zeroshot import class_embeddings, image_embeddings, predict
from merging.execute import input_hashes
from merging.models import OPENAI_MEAN, OPENAI_STD, load_model, tokenizer_for
from merging.plan import MergeSpec
from merging.resident import ResidentMerge
from merging.sources import open_source
from micromerge.hashing import sha256_json


@dataclass(frozen=True)
class EvalSettings:
    data: str
    store: Path
    cache_dir: Path
    tasks: str = "all"
    batch_size: int = 256
    precision: str = "bf16"
    bootstrap: int = 1000
    seed: int = 0
    prompts: str = "names"
    progress: bool = True
    rank: int = 0
    world_size: int = 1


@dataclass(frozen=True)
class SweepPlan:
    base: str
    finetuned: tuple[str, ...]
    spec: MergeSpec
    alphas: tuple[float, ...]
    allow_pickle: bool = False
    arch: str | None = None
    label: str | None = (
        None  # a name for reports (ablations name pair/method/rule set); not part of the run id
    )


class Evaluator:
    """Scores one resident model on the selected tasks; everything model-independent is cached."""

    def __init__(
        self,
        bench: Benchmark,
        tasks: list[Task],
        model_config: dict[str, Any],
        settings: EvalSettings,
        device: torch.device,
    ):
        self.bench, self.tasks, self.settings, self.device = bench, tasks, settings, device
        size = int(model_config.get("vision_cfg", {}).get("image_size", 224))
        self.cache: ImageCache = build_image_cache(
            bench.dataset, bench.fingerprint, size, settings.cache_dir, settings.progress
        )
        preprocess = model_config.get("preprocess_cfg", {})
        self.tokenizer = tokenizer_for(model_config)
        self.token_cache: dict = {}
        needed = sorted({r for t in tasks for r in t.rows})
        self.rows = np.array([r for r in needed if self.cache.valid[r]], dtype=np.int64)
        self.position = {int(r): i for i, r in enumerate(self.rows)}
        self.pixels = PixelFeed(
            self.cache,
            self.rows,
            torch.tensor(preprocess.get("mean", OPENAI_MEAN)),
            torch.tensor(preprocess.get("std", OPENAI_STD)),
            device,
        )

    def _splits(self, task_name: str, n: int) -> dict[str, np.ndarray]:
        """All images, and two seeded halves: 'select' (to choose alpha on) and 'report' (to report on)."""
        seed = int(sha256_json({"seed": self.settings.seed, "task": task_name})[:8], 16)
        order = np.random.default_rng(seed).permutation(n)
        half = n // 2
        return {"all": np.arange(n), "select": np.sort(order[:half]), "report": np.sort(order[half:])}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        model.eval()
        images = image_embeddings(model, self.pixels, self.settings.batch_size, self.settings.precision)
        results = []
        for task in self.tasks:
            keep = [(r, y) for r, y in zip(task.rows, task.labels, strict=True) if self.cache.valid[r]]
            n_corrupt = len(task.rows) - len(keep)
            if not keep:
                continue
            index = torch.tensor([self.position[r] for r, _ in keep], device=images.device)
            labels = np.array([y for _, y in keep])
            texts = class_embeddings(
                model, self.tokenizer, task, self.device, self.settings.prompts, self.token_cache
            )
            predictions = predict(images[index], texts)
            for split, members in self._splits(task.name, len(keep)).items():
                metrics = classification_metrics(
                    labels[members],
                    predictions[members],
                    len(task.classes),
                    self.settings.bootstrap,
                    self.settings.seed,
                )
                for metric, values in metrics.items():
                    results.append(
                        {
                            "task": task.name,
                            "level": task.level,
                            "groups": task.groups,
                            "split": split,
                            "metric": metric,
                            **values,
                            "n_images": int(len(members)),
                            "n_corrupt": n_corrupt,
                            "n_classes": len(task.classes),
                        }
                    )
        return results


def _base_row(
    run_id: str, settings: EvalSettings, bench: Benchmark, provenance: dict[str, Any]
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "dataset": {"source": bench.source, "fingerprint": bench.fingerprint},
        "seed": settings.seed,
        "bootstrap": settings.bootstrap,
        "prompts": settings.prompts,
        "micromerge_version": micromerge.__version__,
        "process": f"{settings.rank}/{settings.world_size}",
        **provenance,
    }


def prepare(settings: EvalSettings) -> tuple[Benchmark, list[Task]]:
    bench = load_benchmark(settings.data)
    tasks = select_tasks(discover_tasks(bench.dataset), settings.tasks)
    return bench, tasks


def run_eval(
    model_spec: str,
    settings: EvalSettings,
    device: torch.device,
    allow_pickle: bool = False,
    arch: str | None = None,
) -> list[dict[str, Any]]:
    """Evaluate one checkpoint; rows go to the store (alpha is null). Re-running skips finished work."""
    bench, tasks = prepare(settings)
    with open_source(model_spec, allow_pickle=allow_pickle, arch=arch) as source:
        hashes = input_hashes([source])
        run_id = sha256_json(
            {
                "model": sorted(hashes.values()),
                "data": bench.fingerprint,
                "prompts": settings.prompts,
                "bootstrap": settings.bootstrap,
                "seed": settings.seed,
            }
        )[:16]
        store = ResultStore(settings.store)
        done = store.done(run_id)
        if done and all((None, t.name, "all", "accuracy") in done for t in tasks):
            return [r for r in store.rows() if r["run_id"] == run_id]
        model, config = load_model(source)
    model.to(device)
    evaluator = Evaluator(bench, tasks, config, settings, device)
    provenance = {
        "method": "none",
        "model": {
            "base": model_spec,
            "base_sha256": list(hashes.values()),
            "finetuned": [],
            "finetuned_sha256": [],
        },
        "parameters": {},
    }
    rows = [
        {**_base_row(run_id, settings, bench, provenance), "alpha": None, **r}
        for r in evaluator.evaluate(model)
    ]
    store.append([r for r in rows if (None, r["task"], r["split"], r["metric"]) not in done])
    return rows


def run_sweep(plan: SweepPlan, settings: EvalSettings, device: torch.device) -> list[dict[str, Any]]:
    """Every alpha on every task; resumable; this process takes alphas rank, rank+world, ..."""
    bench, tasks = prepare(settings)
    store = ResultStore(settings.store)
    base = open_source(plan.base, allow_pickle=plan.allow_pickle, arch=plan.arch)
    finetuned = [open_source(f, allow_pickle=plan.allow_pickle, arch=plan.arch) for f in plan.finetuned]
    try:
        hashes = input_hashes([base, *finetuned])
        base_hashes = [hashes[str(f)] for f in base.files]
        ft_hashes = [hashes[str(f)] for s in finetuned for f in s.files]
        parameters = plan.spec.describe()
        parameters.pop("alpha", None)
        run_id = sha256_json(
            {
                "base": base_hashes,
                "ft": ft_hashes,
                "method": plan.spec.method,
                "parameters": parameters,
                "data": bench.fingerprint,
                "prompts": settings.prompts,
                "bootstrap": settings.bootstrap,
                "seed": settings.seed,
            }
        )[:16]
        done = store.done(run_id)
        todo = [a for a in plan.alphas if not all((a, t.name, "report", "macro_f1") in done for t in tasks)]
        mine = todo[settings.rank :: settings.world_size]
        if mine:
            model, config = load_model(base)
            merger = ResidentMerge(model, plan.spec, base, finetuned, device)
            evaluator = Evaluator(bench, tasks, config, settings, device)
            provenance = {
                "method": plan.spec.method,
                "parameters": parameters,
                "model": {
                    "base": plan.base,
                    "base_sha256": base_hashes,
                    "finetuned": list(plan.finetuned),
                    "finetuned_sha256": ft_hashes,
                },
                "label": plan.label,
            }
            for alpha in tqdm(
                mine, desc=f"sweep {plan.spec.method}", unit="alpha", disable=not settings.progress
            ):
                merger.apply(alpha)
                rows = [
                    {**_base_row(run_id, settings, bench, provenance), "alpha": alpha, **r}
                    for r in evaluator.evaluate(merger.model)
                ]
                store.append([r for r in rows if (alpha, r["task"], r["split"], r["metric"]) not in done])
    finally:
        base.close()
        for source in finetuned:
            source.close()
    return [r for r in store.rows() if r["run_id"] == run_id]
