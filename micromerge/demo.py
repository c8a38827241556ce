"""`micromerge demo`: the whole loop offline on the embedded default, in minutes on a laptop CPU.

generate data -> pretrain a tiny CLIP on the general corpus -> fine-tune a pathology specialist
-> evaluate both, and sweep WiSE-FT, task arithmetic and TIES over alpha on every task -> write the report.
Each stage writes its outputs atomically and is reused on a second run (`fresh` starts over);
an interrupted demo resumes from the last finished stage (training resumes mid-run).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import torch

import micromerge
from micromerge.core.atomic import output_folder, sync_folder, sync_tree, write_json_atomic
from micromerge.core.errors import MicromergeError
from micromerge.core.folder_lock import sole_writer
from micromerge.core.hashing import sha256_json
from micromerge.core.json_text import parse_json

ARCH = "micro-clip"
METHODS = ("wise-ft", "task-arithmetic", "ties")
# Every method under the authors' protocol; WiSE-FT also closed-set, so the report shows both.
SWEEPS = (*((method, "ubench") for method in METHODS), ("wise-ft", "closed-set"))
DATA_FORMAT = "ubench-hub-layout-v1"
# what the sweep stage evaluates besides the sweeps (in its digest: a demo folder of before re-sweeps)
REFERENCES = "base and specialist evaluated under each protocol"


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("demo-out")
    seed: int = 0
    bench_per_class: int = 40
    corpus_per_class: int = 300
    pretrain_epochs: int = 4
    finetune_epochs: int = 3
    batch_size: int = 64
    lr: float = 5e-4
    alphas: str = "0:1:0.1"
    bootstrap: int = 500
    fresh: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        from micromerge.eval.settings import check_bootstrap

        if self.seed < 0:
            raise MicromergeError(f"--seed {self.seed}: must be a non-negative integer")
        if self.bench_per_class < 4:
            raise MicromergeError(
                f"--bench-per-class {self.bench_per_class}: need at least 4 images per class"
            )
        if self.corpus_per_class < 10:
            raise MicromergeError(
                f"--corpus-per-class {self.corpus_per_class}: need at least 10 pairs per class"
            )
        if self.pretrain_epochs < 1 or self.finetune_epochs < 1:
            raise MicromergeError("--pretrain-epochs and --finetune-epochs must be at least 1")
        check_bootstrap(self.bootstrap)  # the sweeps come after minutes of training
        if self.batch_size < 2:
            raise MicromergeError(f"--batch-size {self.batch_size}: contrastive training needs at least 2")
        if self.out.exists() and not self.out.is_dir():
            raise MicromergeError(f"--out {self.out}: exists and is not a folder")

    def digest(self, *fields: str) -> str:
        values = asdict(self)
        return sha256_json({f: values[f] for f in fields})[:16]


def _stage(
    name: str,
    marker: Path,
    digest: str,
    work: Callable[[], None],
    say: Callable[[str], None],
    outputs: tuple[Path, ...] = (),
    products: tuple[Path, ...] = (),
) -> None:
    """Run a stage unless its marker says it finished with the same settings and its `products`
    (what later stages read) are all still there.

    The marker is written before the work too (unfinished): an interrupted stage resumes under
    the same settings. Under other settings, like a finished stage of other settings, its `outputs`
    are removed first, so no model or result of the old settings is taken for the new; so are they
    when a finished stage's product was deleted (a reused stage then handed later stages a missing
    file: `rm results.jsonl` made the report fail). Training is deterministic, so the stage's
    outputs come back as they were and the later stages' records stay true."""
    recorded = _read_marker(marker)
    finished = recorded is not None and recorded.get("finished", True)
    missing = [path for path in products if not path.exists()]
    if recorded is not None and recorded.get("digest") == digest and finished and not missing:
        say(f"[{name}] done before: reusing {marker.parent}")
        return
    if recorded is not None and (recorded.get("digest") != digest or (finished and missing)):
        for output in outputs:
            if output.is_dir():
                shutil.rmtree(output)
            else:
                output.unlink(missing_ok=True)
    started = time.perf_counter()
    say(f"[{name}] ..." if not (finished and missing) else f"[{name}] ... ({missing[0]} is gone: again)")
    write_json_atomic(marker, {"digest": digest, "finished": False})
    work()
    seconds = round(time.perf_counter() - started, 1)
    write_json_atomic(marker, {"digest": digest, "finished": True, "seconds": seconds})
    say(f"[{name}] finished in {seconds:.0f} s")


def _read_marker(marker: Path) -> dict[str, Any] | None:
    """A stage's marker; one that cannot be read (written by hand, or by a version that did not
    write it atomically) stands for a stage of unknown settings, so its outputs are rebuilt."""
    if not marker.is_file():
        return None
    try:
        recorded = parse_json(marker.read_text())
    except (OSError, ValueError):
        return {"digest": None}
    return recorded if isinstance(recorded, dict) else {"digest": None}


def _write_data(cfg: DemoConfig, data: Path) -> None:
    from micromerge.eval.synthetic.generate import write_benchmark, write_corpus

    staging = data.with_name(data.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    write_benchmark(staging / "ubench-synthetic", seed=cfg.seed, per_class=cfg.bench_per_class)
    write_corpus(staging / "corpus-general", "general", seed=cfg.seed, per_class=cfg.corpus_per_class)
    write_corpus(staging / "corpus-pathology", "pathology", seed=cfg.seed, per_class=cfg.corpus_per_class)
    sync_tree(staging)  # the marker that follows says "finished": the files must be on the disk first
    shutil.rmtree(data, ignore_errors=True)
    os.replace(staging, data)
    sync_folder(data.parent)


def _write_init(cfg: DemoConfig, path: Path) -> None:
    from micromerge.merging.models import build_model, get_model_config
    from micromerge.merging.torch_save import save_tensors

    torch.manual_seed(cfg.seed)
    model = build_model(get_model_config(ARCH))
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "micromerge.arch": ARCH,
        "micromerge.core.provenance": json.dumps(
            {"kind": "random init", "seed": cfg.seed, "micromerge_version": micromerge.__version__}
        ),
    }
    save_tensors(path, tensors, metadata)


def train_contrastive(
    cfg: DemoConfig, base: Path, data: Path, out: Path, epochs: int, domain: str | None, warmup: int
) -> None:
    import datasets

    from micromerge.finetune.config import FinetuneConfig
    from micromerge.finetune.trainer import run_finetune

    # a demo made small (--corpus-per-class, --*-epochs) would end inside its warm-up and say so in
    # a warning the user cannot act on; the default demo's runs are 16 and 18 times their warm-ups
    steps = epochs * (len(datasets.load_from_disk(str(data))) // cfg.batch_size)
    run_finetune(
        FinetuneConfig(
            mode="contrastive",
            base=str(base),
            data=str(data),
            out=out,
            epochs=epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            warmup_steps=min(warmup, steps // 4),
            weight_decay=0.05,
            seed=cfg.seed,
            save_every=50,
            resume=True,
            progress=cfg.progress,
            domain=domain,
            device="cpu" if not torch.cuda.is_available() else "auto",
        )
    )


def _empty_demo_folder(out: Path) -> None:
    """`--fresh` empties a demo's folder only: `--out . --fresh` (or `~`) removed the whole folder,
    a checkout or a home with it. A demo folder is one with the demo's `stages/` record. The
    folder itself stays: it is what the running demo holds the lock of."""
    if not out.is_dir():
        return
    if any(out.iterdir()) and not (out / "stages").is_dir():
        raise MicromergeError(
            f"--out {out}: not a demo folder (no stages/ in it), so --fresh will not remove it; "
            "choose a new or a demo folder"
        )
    for entry in out.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def run_demo(cfg: DemoConfig, say: Callable[[str], None] = click.echo) -> dict[str, Any]:
    """The demo's stages into cfg.out, one demo at a time: a second demo started into the folder
    (a `make demo` run again in another terminal) is refused at once, before --fresh empties it.
    Two at once each replaced the data folder under the other's training, and both failed."""
    with output_folder(cfg.out), sole_writer(cfg.out, "--out"):
        if cfg.fresh:
            _empty_demo_folder(cfg.out)
        return _run_stages(cfg, say)


def _run_stages(cfg: DemoConfig, say: Callable[[str], None]) -> dict[str, Any]:
    from micromerge.analysis.metrics import summarise
    from micromerge.analysis.report import build_report
    from micromerge.analysis.tables import load_runs
    from micromerge.eval.engine import prepare, run_eval, run_sweep
    from micromerge.eval.settings import HALVES, EvalSettings, SweepPlan
    from micromerge.merging.job import job_from_mapping

    out = cfg.out
    data, init = out / "data", out / "checkpoints" / "init.safetensors"
    base_run, specialist_run = out / "runs" / "base", out / "runs" / "pathology-specialist"
    store, report_dir = out / "results" / "results.jsonl", out / "report"
    stages = out / "stages"
    # The benchmark's format is part of the digest: outputs of the earlier (guessed) schema are rebuilt.
    data_digest = sha256_json([cfg.digest("seed", "bench_per_class", "corpus_per_class"), DATA_FORMAT])[:16]
    _stage(
        "1/6 generate synthetic μ-Bench and corpora",
        stages / "data.json",
        data_digest,
        lambda: _write_data(cfg, data),
        say,
        products=tuple(data / name for name in ("ubench-synthetic", "corpus-general", "corpus-pathology")),
    )
    init_digest = sha256_json([cfg.digest("seed"), ARCH])[:16]
    _stage(
        "2/6 initialise a tiny CLIP",
        stages / "init.json",
        init_digest,
        lambda: _write_init(cfg, init),
        say,
        products=(init,),
    )
    # Each stage's digest holds the digests of the stages it reads: new data or a new base is
    # trained on again, never reused.
    train_digest = sha256_json([data_digest, init_digest, cfg.digest("pretrain_epochs", "batch_size", "lr")])[
        :16
    ]
    _stage(
        "3/6 pretrain the base on the general corpus",
        stages / "pretrain.json",
        train_digest,
        lambda: train_contrastive(
            cfg, init, data / "corpus-general", base_run, cfg.pretrain_epochs, "general", 30
        ),
        say,
        outputs=(base_run,),
        products=(base_run / "model.safetensors",),
    )
    specialist_digest = sha256_json([train_digest, cfg.digest("finetune_epochs", "batch_size", "lr")])[:16]
    _stage(
        "4/6 fine-tune the pathology specialist",
        stages / "specialist.json",
        specialist_digest,
        lambda: train_contrastive(
            cfg,
            base_run / "model.safetensors",
            data / "corpus-pathology",
            specialist_run,
            cfg.finetune_epochs,
            "pathology",
            10,
        ),
        say,
        outputs=(specialist_run,),
        products=(specialist_run / "model.safetensors",),
    )

    jobs = [
        (
            method,
            protocol,
            job_from_mapping(
                {
                    "base": str(base_run / "model.safetensors"),
                    "finetuned": [str(specialist_run / "model.safetensors")],
                    "method": method,
                    "alphas": cfg.alphas,
                    **({"density": 0.2} if method == "ties" else {}),
                }
            ),
        )
        for method, protocol in SWEEPS
    ]

    def sweeps() -> None:
        from micromerge.core.hashing import default_cache_dir

        cpu = torch.device("cpu")
        for protocol in dict.fromkeys(protocol for _, protocol in SWEEPS):
            settings = EvalSettings(
                data=str(data / "ubench-synthetic"),
                store=store,
                cache_dir=default_cache_dir(),
                bootstrap=cfg.bootstrap,
                seed=cfg.seed,
                protocol=protocol,
                progress=cfg.progress,
            )
            prepared = prepare(settings)
            # The report's "base" and "fine-tuned" are these evaluations, as README asks of a user:
            # a sweep's end points are only stand-ins (TIES at alpha 1 is not the specialist).
            for model in (base_run, specialist_run):
                run_eval(str(model / "model.safetensors"), settings, cpu, prepared=prepared)
            for method, _, job in (j for j in jobs if j[1] == protocol):
                run_sweep(
                    SweepPlan(
                        job.base,
                        job.finetuned,
                        job.spec,
                        job.alphas or (),
                        label=f"{method} [{protocol}]: base + pathology specialist",
                    ),
                    settings,
                    cpu,
                    prepared=prepared,
                )

    # The methods' parameters and conventions, and how the halves split, are part of the digest: a change re-sweeps.
    described = [job.spec.describe() for _, _, job in jobs]
    _stage(
        "5/6 evaluate the base and the specialist, sweep alpha on every task",
        stages / "sweeps.json",
        sha256_json(
            [specialist_digest, data_digest, cfg.alphas, cfg.bootstrap, SWEEPS, described, HALVES, REFERENCES]
        )[:16],
        sweeps,
        say,
        outputs=(store,),  # only the demo's own store: README's examples write beside it
        products=(store,),
    )
    say("[6/6 report] ...")
    html = build_report(store, report_dir, target="domain:pathology")
    runs = load_runs(store)
    wise_ft = next(r for r in runs if r.method == "wise-ft" and r.protocol == "ubench")
    summary = summarise(wise_ft, "domain:pathology")
    paper = wise_ft.headline[(wise_ft.headline["split"] == "all")].set_index(["alpha", "task"])["value"]
    headline: dict[str, Any] = {  # the numbers the demo prints, returned for tests and benches
        "report": str(html),
        "base_pathology": summary.base["domain:pathology"],
        "specialist_pathology": summary.finetuned["domain:pathology"],
        "base_biology": summary.base["domain:biology"],
        "specialist_biology": summary.finetuned["domain:biology"],
        "forgetting_points": 100 * summary.forgetting,
        "chosen_alpha": summary.best_alpha["all_task_mean"],
        "all_task_at_chosen_alpha_report_half": summary.best_report["all_task_mean"],
        "paper_headline": {
            f"{task.split(':')[1]}@{alpha:g}": value
            for (alpha, task), value in paper.items()
            if alpha in (0.0, 1.0)
        },
    }
    say("")
    say(f"report: {html}  (also {report_dir / 'report.md'})")
    say(
        f"pathology (target): base {100 * headline['base_pathology']:.1f}% -> specialist {100 * headline['specialist_pathology']:.1f}%"
    )
    say(
        f"biology (control):  base {100 * headline['base_biology']:.1f}% -> specialist {100 * headline['specialist_biology']:.1f}%  "
        f"(forgetting {headline['forgetting_points']:.1f} points)"
    )
    say(
        f"WiSE-FT: alpha={headline['chosen_alpha']:g} chosen on the select half gives "
        f"{100 * headline['all_task_at_chosen_alpha_report_half']:.1f}% mean accuracy over all tasks on the report half"
    )
    say(
        "μ-Bench headline (ubench protocol; base -> specialist): coarse "
        f"{100 * headline['paper_headline']['coarse@0']:.1f}% -> {100 * headline['paper_headline']['coarse@1']:.1f}%, "
        f"fine {100 * headline['paper_headline']['fine@0']:.1f}% -> {100 * headline['paper_headline']['fine@1']:.1f}%"
    )
    return headline
