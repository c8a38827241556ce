"""A merge job as plain data: built once from CLI flags and/or a config file, then run.

`--alphas 0:1:0.1` (or `alphas = [..]` in the file) writes one checkpoint per alpha.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from micromerge.core.atomic import same_file
from micromerge.core.config_schema import FLAG_NAMES, refuse_blank, refuse_unknown_keys
from micromerge.core.errors import MicromergeError
from micromerge.merging.engines import EngineRequest, open_inputs
from micromerge.merging.execute import MergeOutput, StatisticsInput, finished_output, merge_to_file
from micromerge.merging.methods import METHODS, TUNABLE, MethodParams, get_method
from micromerge.merging.plan import MergeSpec, check_method_params
from micromerge.merging.rules import KeyRules, parse_strength_rule
from micromerge.merging.sources import CheckpointAccess

JOB_KEYS = {
    "base",
    "finetuned",
    "method",
    "alpha",
    "alphas",
    "weights",
    *TUNABLE,
    "data",
    "base_data",
    "ft_data",
    "cache_dir",
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


MAX_ALPHAS = 10_000


def _finite(name: str, value: Any, typed: str | None = None) -> float:
    """A parameter as a finite float, or a one-line error naming it (NaN/Inf would write an all-NaN
    model). `typed`: the whole value as the user typed it, where `value` is one part of it (a rule's
    VALUE, a range's STOP), so the error quotes what they wrote."""
    shown = repr(value) if typed is None else repr(typed)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MicromergeError(f"{name} {shown}: expected a number") from None
    if not math.isfinite(number):
        raise MicromergeError(f"{name} {shown}: must be a finite number")
    return number


def _number(values: dict[str, Any], key: str, flag: str, default: float) -> float:
    value = values.get(key)
    return default if value is None else _finite(flag, value)


def _count(values: dict[str, Any], key: str, flag: str, default: int) -> int:
    value = values.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MicromergeError(f"{flag} {value!r}: must be a positive integer")
    return value


def parse_alphas(text: str | list[float]) -> list[float]:
    """`START:STOP:STEP` (inclusive of STOP) or `a,b,c` -> distinct finite alphas rounded to 10
    digits, in order (a repeated alpha is one output and one set of result rows)."""
    if isinstance(text, list):
        alphas = [_finite("--alphas", a) for a in text]
    elif ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise MicromergeError(f"--alphas {text!r}: expected START:STOP:STEP, e.g. 0:1:0.1")
        start, stop, step = (_finite("--alphas", part, text) for part in parts)
        if step <= 0 or stop < start:
            raise MicromergeError(f"--alphas {text!r}: STEP must be > 0 and STOP >= START")
        count = round((stop - start) / step)
        if count + 1 > MAX_ALPHAS:
            raise MicromergeError(f"--alphas {text!r}: {count + 1:,} values; at most {MAX_ALPHAS:,}")
        alphas = [round(start + i * step, 10) for i in range(count + 1)]
    else:
        alphas = [_finite("--alphas", part) for part in text.split(",") if part.strip()]
    if not alphas:
        raise MicromergeError(f"--alphas {text!r}: no values; e.g. 0:1:0.1 or 0,0.5,1")
    if len(alphas) > MAX_ALPHAS:
        raise MicromergeError(f"--alphas: {len(alphas):,} values; at most {MAX_ALPHAS:,}")
    return list(dict.fromkeys(alphas))


def alpha_file_name(alpha: float) -> str:
    """A file name per alpha, distinct for distinct alphas (repr round-trips every float)."""
    return f"alpha-{alpha!r}.safetensors" if alpha != int(alpha) else f"alpha-{alpha:.1f}.safetensors"


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
    access: CheckpointAccess = CheckpointAccess()
    data: str | None = None
    """Data-aware methods: the μ-Bench copy whose select half the statistics are estimated on."""
    model_data: tuple[str | None, ...] = ()
    """Fisher/RegMean: per model (base first), a corpus of its own to estimate its statistics on."""
    cache_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def outputs(self) -> list[tuple[float | None, Path]]:
        """(alpha, path) for each checkpoint this job writes."""
        stem = f"{_slug(self.base)}+{'+'.join(_slug(f) for f in self.finetuned)}-{self.spec.method}"
        if self.alphas is None:
            strength = None if self.spec.method == "linear" else self.spec.params.strength
            default = Path("checkpoints/merged") / (
                stem + (f"-a{strength:g}" if strength is not None else "") + ".safetensors"
            )
            hint = " (a folder of checkpoints takes --alphas)"
            return [(strength, check_file_out(Path(self.out), hint) if self.out else default)]
        folder = Path(self.out) if self.out else Path("checkpoints/merged") / stem
        if folder.suffix == ".safetensors":
            raise MicromergeError(
                f"--out {folder}: with --alphas, --out is a folder (one checkpoint per alpha)"
            )
        return [(alpha, folder / alpha_file_name(alpha)) for alpha in self.alphas]


def check_file_out(path: Path, folder_hint: str = "") -> Path:
    """A merge writes one safetensors file: under another name (`merged.pt`, `merged`) the bytes were
    written all the same, and every reader then took them for what the name said (a .pt for a
    pickle: "holds Python objects ... --allow-pickle"; no suffix: an unknown format)."""
    if path.suffix != ".safetensors":
        raise MicromergeError(
            f"--out {path}: the merged checkpoint is safetensors; end its name in .safetensors{folder_hint}"
        )
    return path


def warn_of_a_variant_with_one_finetuned(job: MergeJob) -> None:
    """`merge --method dare-ties` with one --ft wrote dare's merge without a word: the variants that
    elect a sign or sum plainly differ from their method only when two or more specialists combine."""
    same = get_method(job.spec.method).same_with_one_finetuned
    if same and len(job.finetuned) == 1:
        warnings.warn(
            f"{job.spec.method} with one --ft is the same merge as {same} (they differ only in how two "
            f"or more specialists combine); give more --ft, or use {same}",
            stacklevel=2,
        )


def job_from_mapping(values: dict[str, Any]) -> MergeJob:
    """Build a MergeJob from flag/config values (keys as in JOB_KEYS)."""
    refuse_unknown_keys("merge config", values, JOB_KEYS)
    refuse_blank(values, FLAG_NAMES)
    if not values.get("base"):
        raise MicromergeError("merge: --base is required (a zoo name, hf-hub: id, file or folder)")
    finetuned = values.get("finetuned") or []
    if isinstance(finetuned, str):
        finetuned = [finetuned]
    if not finetuned:
        raise MicromergeError("merge: at least one --ft is required")
    method = str(values.get("method") or "wise-ft")
    weights = values.get("weights")
    if isinstance(weights, str):
        weights = [w for w in weights.split(",") if w.strip()]
    if weights:
        if method != "linear":
            raise MicromergeError(f"--weights: only the linear method takes weights ({method} uses --alpha)")
        weights = [_finite("--weights", w) for w in weights]
    rules_in = values.get("alpha_rules") or []
    if isinstance(rules_in, dict):
        rules_in = [[k, v] for k, v in rules_in.items()]
    rules = tuple(parse_strength_rule(r) if isinstance(r, str) else (str(r[0]), r[1]) for r in rules_in)
    rules = tuple((pattern, _finite("--alpha-rule", value, f"{pattern}={value}")) for pattern, value in rules)
    alphas = values.get("alphas")
    given = [
        flag for flag, key in (("--alpha", "alpha"), ("--alphas", "alphas")) if values.get(key) is not None
    ]
    if given and not get_method(method).takes_alpha:
        # linear read past them: `--alphas 0,1` wrote, and `sweep` evaluated, one merge at every alpha
        raise MicromergeError(
            f"{given[-1]}: {method} takes no alpha (it weighs the models by --weights), so every alpha gives "
            f"the same merge: merge {method} without one, and sweep a method that has one (wise-ft, task-arithmetic ...)"
        )
    if len(given) == 2:
        raise MicromergeError("--alpha and --alphas: one merge at one alpha, or one per alpha; give one")
    seed = values.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise MicromergeError(f"--seed {seed!r}: must be a non-negative integer")
    unused = [
        name for name in TUNABLE if values.get(name) is not None and name not in get_method(method).uses
    ]
    if unused:  # silently ignored, it would read as applied (--density with wise-ft merges no sparser)
        takes = [f"--{n.replace('_', '-')}" for n in get_method(method).uses if n in TUNABLE]
        raise MicromergeError(
            f"--{unused[0].replace('_', '-')}: {method} does not use it"
            + (f" (it takes {', '.join(takes)})" if takes else "")
            + "; remove it, or choose a method that does (`micromerge methods`)"
        )
    defaults = replace(MethodParams(), **dict(get_method(method).param_defaults))
    alpha = values.get("alpha")
    params = MethodParams(
        strength=_finite("--alpha", alpha) if alpha is not None else get_method(method).default_strength,
        weights=tuple(weights) if weights else None,
        density=_number(values, "density", "--density", defaults.density),
        drop_rate=_number(values, "drop_rate", "--drop-rate", defaults.drop_rate),
        topk_scope=str(values.get("topk_scope") or defaults.topk_scope),
        slerp_scope=str(values.get("slerp_scope") or defaults.slerp_scope),
        gamma=_number(values, "gamma", "--gamma", defaults.gamma),
        epsilon=_number(values, "epsilon", "--epsilon", defaults.epsilon),
        rescale=values.get("rescale") or defaults.rescale,
        beta=_number(values, "beta", "--beta", defaults.beta),
        samples=_count(values, "samples", "--samples", defaults.samples),
        offdiag_scale=_number(values, "offdiag_scale", "--offdiag-scale", defaults.offdiag_scale),
        granularity=str(values.get("granularity") or defaults.granularity),
        search=str(values.get("search") or defaults.search),
        steps=_count(values, "steps", "--steps", defaults.steps),
        learning_rate=_number(values, "learning_rate", "--learning-rate", defaults.learning_rate),
        init=_number(values, "init", "--init", defaults.init),
        seed=seed,
    )
    check_method_params(get_method(method), params)
    if values.get("data") and get_method(method).statistics is None:  # it was read past in silence
        learners = ", ".join(name for name, m in METHODS.items() if m.statistics)
        raise MicromergeError(
            f"--data: {method} learns from no data; remove it, or choose a method that does ({learners})"
        )
    spec = MergeSpec(
        method=method,
        params=params,
        rules=KeyRules(tuple(values.get("include") or ()), tuple(values.get("exclude") or ()), rules),
        out_dtype=values.get("dtype"),
        allow_nonfinite=bool(values.get("allow_nonfinite", False)),
    )
    return MergeJob(
        base=str(values["base"]),
        finetuned=tuple(str(f) for f in finetuned),
        spec=spec,
        alphas=tuple(parse_alphas(alphas)) if alphas is not None else None,
        out=values.get("out"),
        device=str(values.get("device") or "auto"),
        engine=str(values.get("engine") or "auto"),
        force=bool(values.get("force", False)),
        access=CheckpointAccess(bool(values.get("allow_pickle", False)), values.get("arch")),
        data=values.get("data"),
        model_data=model_data(values, method, len(finetuned)),
        cache_dir=values.get("cache_dir"),
    )


def model_data(values: dict[str, Any], method: str, count: int) -> tuple[str | None, ...]:
    """--base-data and --ft-data (one per --ft, in order) as data per model, base first."""
    base = values.get("base_data") or None
    finetuned = values.get("ft_data") or []
    if isinstance(finetuned, str):
        finetuned = [finetuned]
    if not base and not finetuned:
        return ()
    if get_method(method).statistics not in ("fisher", "gram"):
        raise MicromergeError(
            f"--base-data/--ft-data: only fisher and regmean estimate per-model statistics ({method} does not)"
        )
    if finetuned and len(finetuned) != count:
        raise MicromergeError(
            f"--ft-data given {len(finetuned)} times for {count} --ft: give one per --ft, in order"
        )
    return (base, *(finetuned or [None] * count))


def run_merge_job(
    job: MergeJob, progress: bool = True, statistics: StatisticsInput | None = None
) -> list[MergeOutput]:
    """Write every output; an output an earlier run finished from the same inputs and parameters
    is kept (so `merge --alphas` resumes after a kill), any other existing output needs --force."""
    outputs = job.outputs()
    request = EngineRequest(
        engine=job.engine,
        device=job.device,
        method=job.spec.method,
        out_dtype=job.spec.out_dtype,
        checkpoints=(job.base, *job.finetuned),
        access=job.access,
    )
    backend, sources = open_inputs(request)
    base, finetuned = sources[0], sources[1:]
    results = []
    try:
        inputs = [f for source in sources for f in source.files]
        for _, path in outputs:
            clash = next((f for f in inputs if same_file(path, f)), None)
            if clash is not None:
                raise MicromergeError(f"--out {path}: is an input ({clash}); choose another --out")
        for alpha, path in outputs:
            spec = (
                job.spec
                if alpha is None
                else replace(job.spec, params=replace(job.spec.params, strength=alpha))
            )
            if not job.force and os.path.lexists(path):
                done = (
                    finished_output(spec, base, finetuned, path, backend, statistics)
                    if path.is_file()
                    else None
                )
                if done is None:
                    raise MicromergeError(
                        f"{path}: output exists (not from these inputs and parameters); pass --force to overwrite "
                        "or choose another --out"
                    )
                results.append(done)
                continue
            results.append(
                merge_to_file(
                    spec,
                    base,
                    finetuned,
                    path,
                    backend=backend,
                    force=job.force,
                    progress=progress,
                    extra_manifest=job.extra,
                    statistics=statistics,
                )
            )
    finally:
        for source in sources:
            source.close()
    return results
