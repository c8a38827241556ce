"""Execute a merge plan: stream tensors from the sources, compute on the device, write a file.

Peak memory is one tensor per input plus one output tensor. Inputs are computed in float32
and checked for NaN/Inf. Array work goes through an ArrayBackend (numpy or torch), so this
module imports neither.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from micromerge.core.atomic import write_json_atomic
from micromerge.core.errors import MicromergeError
from micromerge.core.hashing import default_cache_dir, sha256_file
from micromerge.core.json_text import parse_json
from micromerge.core.progress import progress_bar
from micromerge.core.provenance import LEARNED_FROM_HALVES, SUPERVISED_ON, provenance
from micromerge.merging.backend import ArrayBackend
from micromerge.merging.dtypes import READABLE_NAMES
from micromerge.merging.lineage import sources_lineage, sources_select_halves
from micromerge.merging.methods import ModelScan, get_method
from micromerge.merging.plan import LOGIT_SCALE_KEY, LOGIT_SCALE_MAX, KeyPlan, MergeSpec, plan_merge
from micromerge.merging.tensor_source import TensorMeta, TensorSource, parse_safetensors_header
from micromerge.merging.writer import SafetensorsStreamWriter

Sink = Callable[[str, Any], None]


def _check_finite(backend: ArrayBackend, array: Any, key: str, label: str, allow: bool) -> None:
    if not backend.all_finite(array):
        message = f"{label}: tensor {key!r} contains NaN or Inf"
        if not allow:
            raise MicromergeError(f"{message}; pass --allow-nonfinite to merge anyway")
        warnings.warn(message + " (merging anyway: --allow-nonfinite)", stacklevel=2)


def streamed_scan(
    plans: list[KeyPlan],
    base: TensorSource,
    finetuned: list[TensorSource],
    backend: ArrayBackend,
    statistics: tuple[dict[str, Any], ...] | None = None,
) -> ModelScan:
    """A scan that reads each key from the checkpoints when asked: whole-model statistics cost
    extra reads of the inputs, never more than one tensor per input in memory."""

    def read(key: str) -> tuple[Any, list[Any]]:
        return backend.to_float32(base.read(key)), [backend.to_float32(s.read(key)) for s in finetuned]

    merged = tuple(p.key for p in plans if p.merged)
    sizes = {p.key: p.meta.numel for p in plans}
    return ModelScan(tuple(p.key for p in plans), merged, read, sizes.__getitem__, statistics)


def stream_merge(
    spec: MergeSpec,
    plans: list[KeyPlan],
    base: TensorSource,
    finetuned: list[TensorSource],
    sink: Sink,
    order: Iterable[str],
    backend: ArrayBackend,
    progress: bool = True,
    statistics: tuple[dict[str, Any], ...] | None = None,
) -> None:
    """Compute every key in `order` and give it to `sink`, which must consume it before the next key.

    Results are computed into one reused float32 buffer (sized to the largest merged tensor), so
    the output side allocates nothing per tensor.
    """
    method = get_method(spec.method)
    by_key = {plan.key: plan for plan in plans}
    order = list(order)
    largest = max((p.meta.numel for p in plans if p.merged), default=0)
    context = method.prepare(streamed_scan(plans, base, finetuned, backend, statistics), spec.params)
    scratch = backend.empty_float32(largest)
    for key in progress_bar(
        order, desc=f"merge ({method.name})", unit="tensor", disable=not progress, leave=False
    ):
        plan = by_key[key]
        base_array = base.read(key)
        _check_finite(backend, base_array, key, base.label, spec.allow_nonfinite)
        if not plan.merged:
            sink(key, base_array)
            continue
        base32 = backend.to_float32(base_array)
        others = []
        for source in finetuned:
            array = source.read(key)
            _check_finite(backend, array, key, source.label, spec.allow_nonfinite)
            others.append(backend.to_float32(array))
        out = scratch[: plan.meta.numel].reshape(plan.meta.shape)
        result = method.merge(key, base32, others, plan.strength, spec.params, out=out, context=context)
        if key == LOGIT_SCALE_KEY:
            backend.clamp_max_(result, LOGIT_SCALE_MAX)
        sink(key, result)


def _file_metadata(record: dict[str, Any], base: TensorSource) -> dict[str, str]:
    metadata = {"format": "pt", "micromerge.core.provenance": json.dumps(record, sort_keys=True)}
    if base.arch.name:
        metadata["micromerge.arch"] = base.arch.name
    if base.arch.model_config:
        metadata["micromerge.model_config"] = json.dumps(base.arch.model_config, sort_keys=True)
    return metadata


@dataclass(frozen=True)
class StatisticsInput:
    """What a data-aware method merges with (per-model statistics, base first, or one learned
    coefficient table) and what data they came from."""

    values: tuple[Any, ...]
    described: list[dict[str, Any]]
    attachment: dict[str, Any] | None = None
    """Learned coefficients (table, loss history, data) to keep beside the output as
    `<out>.coefficients.json`, where users and the report read them."""

    def keep_beside(self, out_path: Path) -> dict[str, str]:
        """Write the attachment beside `out_path`; the manifest entry naming it (empty if none)."""
        if self.attachment is None:
            return {}
        path = out_path.with_name(out_path.name + ".coefficients.json")
        write_json_atomic(path, self.attachment)
        return {"coefficients": path.name}


@dataclass(frozen=True)
class MergeOutput:
    path: Path
    manifest_path: Path
    manifest: dict[str, Any]
    reused: bool = False  # finished by an earlier run with the same inputs and parameters


def _canonical(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def finished_output(
    spec: MergeSpec,
    base: TensorSource,
    finetuned: list[TensorSource],
    out_path: Path,
    backend: ArrayBackend,
    statistics: StatisticsInput | None = None,
) -> MergeOutput | None:
    """The existing `out_path` when an earlier run wrote it from the same inputs (sha256), method,
    parameters and output dtypes; None otherwise. Its provenance is in the file's own header, so a
    run killed between the checkpoint and its manifest is recovered: the manifest is rewritten."""
    try:
        entries, metadata, _ = parse_safetensors_header(out_path)
        record = parse_json(metadata.get("micromerge.core.provenance", "null"))
    except (MicromergeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict):
        return None
    sources = [base, *finetuned]
    plans = plan_merge(spec, base, finetuned)
    same = (
        record.get("method") == spec.method
        and _canonical(record.get("parameters")) == _canonical(spec.describe())
        and record.get("inputs_sha256") == input_hashes(sources)
        and _canonical(record.get("statistics")) == _canonical(statistics.described if statistics else None)
        and {k: e.meta for k, e in entries.items()}
        == {p.key: TensorMeta(p.meta.shape, p.out_dtype) for p in plans}
    )
    if not same:
        return None
    manifest_path = out_path.with_name(out_path.name + ".manifest.json")
    if statistics is not None:
        statistics.keep_beside(out_path)
    try:
        manifest = parse_json(manifest_path.read_text())
    except (OSError, ValueError):  # gone, cut, or not UTF-8 (a UnicodeDecodeError is a ValueError)
        manifest = None
    if not isinstance(manifest, dict):
        manifest = {**record, "output": str(out_path), "engine": backend.name, "recovered_from_header": True}
        write_json_atomic(manifest_path, manifest)
    return MergeOutput(out_path, manifest_path, manifest, reused=True)


def input_hashes(sources: list[TensorSource]) -> dict[str, str]:
    """sha256 of every input file, computed in parallel threads (hashlib releases the GIL)."""
    files = [f for source in sources for f in source.files]
    cache = default_cache_dir()
    with ThreadPoolExecutor(max_workers=max(1, len(files))) as pool:
        digests = list(pool.map(lambda f: sha256_file(f, cache), files))
    return {str(f): d for f, d in zip(files, digests, strict=True)}


def warn_repeated_inputs(sources: list[TensorSource], hashes: dict[str, str]) -> None:
    """Say when a fine-tuned model has the base's weights (its task vector is zero: a merge of it
    alone is the base at every alpha) or another fine-tuned model's (it is counted twice in a sum
    or a vote): usually a path typed twice or a copy, and the output does not show it."""
    digests = [tuple(hashes[str(f)] for f in source.files) for source in sources]
    seen: dict[tuple[str, ...], str] = {}
    for source, digest in zip(sources[1:], digests[1:], strict=True):
        if digest == digests[0]:
            warnings.warn(
                f"--ft {source.label}: the same weights as --base (sha256 {digest[0][:12]}…): its task "
                "vector is zero, so it adds nothing to a sum of task vectors, and where the models are "
                "weighed (linear, a soup, Model Stock, Fisher, RegMean) it gives the base a larger share",
                stacklevel=2,
            )
        elif digest in seen:
            warnings.warn(
                f"--ft {source.label}: the same weights as --ft {seen[digest]} (sha256 {digest[0][:12]}…): "
                "it is counted twice",
                stacklevel=2,
            )
        seen.setdefault(digest, source.label)


def merge_to_file(
    spec: MergeSpec,
    base: TensorSource,
    finetuned: list[TensorSource],
    out_path: Path,
    *,
    backend: ArrayBackend,
    force: bool = False,
    progress: bool = True,
    extra_manifest: dict[str, Any] | None = None,
    statistics: StatisticsInput | None = None,
) -> MergeOutput:
    """Merge into a safetensors file plus `<file>.manifest.json`; both appear only when complete."""
    start = time.perf_counter()
    plans = plan_merge(spec, base, finetuned)
    sources = [base, *finetuned]
    metas = {p.key: TensorMeta(p.meta.shape, p.out_dtype) for p in plans}
    record = provenance(
        method=spec.method,
        parameters=spec.describe(),
        inputs={str(f): "0" * 64 for s in sources for f in s.files},  # patched once hashing finishes
        seed=spec.params.seed if get_method(spec.method).stochastic else None,
        array_library=backend.name,
    )
    record["inputs"] = [s.label for s in sources]
    carried = {
        SUPERVISED_ON: (sources_lineage(sources), sources_lineage([base])),
        LEARNED_FROM_HALVES: (sources_select_halves(sources), sources_select_halves([base])),
    }
    for field, (lineage, _) in carried.items():
        if lineage:  # absent when empty: merges of other inputs keep their bytes
            record[field] = lineage
    # a merge that leaves the base's weights bit for bit (alpha 0) is the base, and carries only the
    # base's lineage (eval.trained_on); compared only where that changes the record
    holds_the_base = any(lineage != of_base for lineage, of_base in carried.values())
    if statistics is not None:
        record["statistics"] = statistics.described
    with ThreadPoolExecutor(max_workers=1) as hasher:
        hashes_future = hasher.submit(input_hashes, sources)
        with SafetensorsStreamWriter(out_path, metas, _file_metadata(record, base), force=force) as writer:
            merged = {p.key for p in plans if p.merged}

            def write(key: str, array: Any) -> None:
                nonlocal holds_the_base
                data = backend.host_bytes(array, metas[key].dtype)
                if key in merged:  # what is written, after the cast: float16 overflow shows up here
                    written = backend.view(np.frombuffer(data, dtype=np.uint8), metas[key])
                    _check_finite(
                        backend,
                        written,
                        key,
                        f"{out_path} (merged, {metas[key].dtype})",
                        spec.allow_nonfinite,
                    )
                    if holds_the_base:
                        own = backend.host_bytes(base.read(key), metas[key].dtype)
                        holds_the_base = bool(
                            np.array_equal(np.frombuffer(data, np.uint8), np.frombuffer(own, np.uint8))
                        )
                writer.write(key, data)

            stream_merge(
                spec,
                plans,
                base,
                finetuned,
                write,
                writer.order,
                backend,
                progress,
                statistics.values if statistics else None,
            )
            record["inputs_sha256"] = hashes_future.result()
            warn_repeated_inputs(sources, record["inputs_sha256"])
            if holds_the_base:
                for field, (_, of_base) in carried.items():
                    record.pop(field, None)
                    if of_base:
                        record[field] = of_base
            writer.replace_metadata(_file_metadata(record, base))
    elapsed = time.perf_counter() - start
    manifest = {
        **record,
        "output": str(out_path),
        "output_dtype": sorted({READABLE_NAMES[p.out_dtype] for p in plans}),
        "engine": backend.name,
        "device": backend.device,
        "seconds": round(elapsed, 3),
        "merged_keys": sum(p.merged for p in plans),
        "copied_keys": sum(not p.merged for p in plans),
        "logit_scale": f"merged like every parameter, then clamped to <= ln(100) = {LOGIT_SCALE_MAX:.4f}",
        **(extra_manifest or {}),
        **(statistics.keep_beside(out_path) if statistics else {}),
    }
    manifest_path = out_path.with_name(out_path.name + ".manifest.json")
    write_json_atomic(manifest_path, manifest)
    return MergeOutput(out_path, manifest_path, manifest)
