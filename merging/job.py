"""A merge job as plain data: built once from CLI flags and/or a config file, then run.

`--alphas 0:1:0.1` (or `alphas = [..]` in the file) writes one checkpoint per alpha.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from merging.engines import EngineRequest, open_inputs
from merging.execute import MergeOutput, merge_to_file
from merging.methods import MethodParams
from merging.plan import MergeSpec
from merging.rules import KeyRules, parse_strength_rule
from micromerge.errors import MicromergeError

JOB_KEYS = {
    "base",
    "finetuned",
    "method",
    "alpha",
    "alphas",
    "weights",
    "density",
    "drop_rate",
    "seed",
    "include",
    "exclude",
    "alpha_rules",
    "dtype",
    "device",
    "engine",
    "out",
    "force",
    "allow_pickle",
    "allow_nonfinite",
    "arch",
}


def parse_alphas(text: str | list[float]) -> list[float]:
    """`START:STOP:STEP` (inclusive of STOP) or `a,b,c` -> a list of alphas rounded to 10 digits."""
    if isinstance(text, list):
        return [float(a) for a in text]
    if ":" in text:
        try:
            start, stop, step = (float(part) for part in text.split(":"))
        except ValueError:
            raise MicromergeError(f"--alphas {text!r}: expected START:STOP:STEP, e.g. 0:1:0.1") from None
        if step <= 0 or stop < start:
            raise MicromergeError(f"--alphas {text!r}: STEP must be > 0 and STOP >= START")
        count = int(round((stop - start) / step))
        return [round(start + i * step, 10) for i in range(count + 1)]
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise MicromergeError(f"--alphas {text!r}: expected numbers separated by commas") from None


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(spec).stem if Path(spec).exists() else spec).strip("-")[:40]


@dataclass(frozen=True)
class MergeJob:
    base: str
    finetuned: tuple[str, ...]
    spec: MergeSpec
    alphas: tuple[float, ...] | None = None
    out: str | None = None
    device: str = "auto"
    engine: str = "auto"
    force: bool = False
    allow_pickle: bool = False
    arch: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def outputs(self) -> list[tuple[float | None, Path]]:
        """(alpha, path) for each checkpoint this job writes."""
        stem = f"{_slug(self.base)}+{'+'.join(_slug(f) for f in self.finetuned)}-{self.spec.method}"
        if self.alphas is None:
            strength = None if self.spec.method == "linear" else self.spec.params.strength
            default = Path("checkpoints/merged") / (
                stem + (f"-a{strength:g}" if strength is not None else "") + ".safetensors"
            )
            return [(strength, Path(self.out) if self.out else default)]
        folder = Path(self.out) if self.out else Path("checkpoints/merged") / stem
        if folder.suffix == ".safetensors":
            raise MicromergeError(
                f"--out {folder}: with --alphas, --out is a folder (one checkpoint per alpha)"
            )
        return [(alpha, folder / f"alpha-{alpha:.4f}.safetensors") for alpha in self.alphas]


def job_from_mapping(values: dict[str, Any]) -> MergeJob:
    """Build a MergeJob from flag/config values (keys as in JOB_KEYS)."""
    unknown = sorted(set(values) - JOB_KEYS)
    if unknown:
        raise MicromergeError(f"merge config: unknown key(s) {unknown}; allowed: {sorted(JOB_KEYS)}")
    if not values.get("base"):
        raise MicromergeError("merge: --base is required (a zoo name, hf-hub: id, file or folder)")
    finetuned = values.get("finetuned") or []
    if isinstance(finetuned, str):
        finetuned = [finetuned]
    if not finetuned:
        raise MicromergeError("merge: at least one --ft is required")
    weights = values.get("weights")
    if isinstance(weights, str):
        try:
            weights = [float(w) for w in weights.split(",")]
        except ValueError:
            raise MicromergeError(f"--weights {weights!r}: expected numbers separated by commas") from None
    rules_in = values.get("alpha_rules") or []
    if isinstance(rules_in, dict):
        rules = tuple((str(k), float(v)) for k, v in rules_in.items())
    else:
        rules = tuple(
            parse_strength_rule(r) if isinstance(r, str) else (str(r[0]), float(r[1])) for r in rules_in
        )
    alphas = values.get("alphas")
    params = MethodParams(
        strength=float(values["alpha"]) if values.get("alpha") is not None else 0.5,
        weights=tuple(weights) if weights else None,
        density=float(values.get("density", 0.2)),
        drop_rate=float(values.get("drop_rate", 0.9)),
        seed=int(values.get("seed", 0)),
    )
    spec = MergeSpec(
        method=str(values.get("method") or "wise-ft"),
        params=params,
        rules=KeyRules(tuple(values.get("include") or ()), tuple(values.get("exclude") or ()), rules),
        out_dtype=values.get("dtype"),
        allow_nonfinite=bool(values.get("allow_nonfinite", False)),
    )
    return MergeJob(
        base=str(values["base"]),
        finetuned=tuple(str(f) for f in finetuned),
        spec=spec,
        alphas=tuple(parse_alphas(alphas)) if alphas not in (None, "") else None,
        out=values.get("out"),
        device=str(values.get("device") or "auto"),
        engine=str(values.get("engine") or "auto"),
        force=bool(values.get("force", False)),
        allow_pickle=bool(values.get("allow_pickle", False)),
        arch=values.get("arch"),
    )


def run_merge_job(job: MergeJob, progress: bool = True) -> list[MergeOutput]:
    outputs = job.outputs()
    if not job.force:
        for _, path in outputs:
            if path.exists():
                raise MicromergeError(
                    f"{path}: output exists; pass --force to overwrite or choose another --out"
                )
    request = EngineRequest(
        engine=job.engine,
        device=job.device,
        method=job.spec.method,
        out_dtype=job.spec.out_dtype,
        checkpoints=(job.base, *job.finetuned),
        allow_pickle=job.allow_pickle,
        arch=job.arch,
    )
    backend, sources = open_inputs(request)
    base, finetuned = sources[0], sources[1:]
    results = []
    try:
        for alpha, path in outputs:
            spec = (
                job.spec
                if alpha is None
                else replace(job.spec, params=replace(job.spec.params, strength=alpha))
            )
            results.append(
                merge_to_file(
                    spec, base, finetuned, path, backend=backend, force=job.force, progress=progress
                )
            )
    finally:
        for source in sources:
            source.close()
    return results
