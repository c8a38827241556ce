"""What a fine-tune trains on, made ready before its first step: the base model (with a zero-shot
head for a supervised run), and the data on the path that suits it, with the reason recorded: in
memory when the decoded images fit, else streamed by index, or in order from shards or a hub
dataset. Everything a run's manifest says of its inputs (sha256, lineage, data fingerprint) is
gathered here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from micromerge.core.errors import MicromergeError
from micromerge.core.provenance import task_data_fingerprint
from micromerge.eval.pairs import DecodedData, decode_checked
from micromerge.finetune.config import FinetuneConfig
from micromerge.finetune.hub_stream import HubStream, is_hub_layout
from micromerge.finetune.losses import ImageClassifier, ZeroShotHead
from micromerge.finetune.shard_stream import ShardStream, is_shard_stream
from micromerge.finetune.streaming import (
    FINGERPRINTS,
    CorpusIndex,
    SampleRecipe,
    StreamedSamples,
    choose_in_memory,
    index_pairs,
    indexed_pairs,
)
from micromerge.merging.execute import input_hashes
from micromerge.merging.lineage import sources_lineage, sources_select_halves
from micromerge.merging.models import load_model, tokenizer_for
from micromerge.merging.sources import open_source


@dataclass
class Prepared:
    model: torch.nn.Module  # what is trained (CLIP, or CLIP + head)
    clip: torch.nn.Module
    model_config: dict[str, Any]
    data: DecodedData | None  # the in-memory path; None when streaming
    tokens: torch.Tensor | None
    classes: list[str] | None
    data_fingerprint: str
    base_label: str
    base_sha256: dict[str, str]
    arch_name: str | None
    base_supervised_on: list[str]  # the base's supervised lineage, carried on (merging.lineage)
    base_learned_from_halves: list[str]  # the select halves the base learned from, carried on
    stream: StreamedSamples | None = None  # the streaming path, by index
    shards: ShardStream | HubStream | None = None  # the streaming path, in order (webdataset, datasets)
    count: int = 0  # usable examples
    data_path: dict[str, Any] = field(default_factory=dict)  # which path, and why
    task_domain: str | None = None  # supervised: the trained task's domain, what --domain defaults to


class _Tokenize:
    """A caption to its token row, in a data worker (a class, so spawned workers can unpickle it)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def __call__(self, caption: str) -> torch.Tensor:
        return self.tokenizer([caption])[0]


def _label(value: int) -> torch.Tensor:
    return torch.tensor(int(value))


def prepare_training(cfg: FinetuneConfig) -> Prepared:
    with open_source(cfg.base, allow_pickle=cfg.allow_pickle, arch=cfg.arch) as source:
        hashes = input_hashes([source])
        clip, model_config = load_model(source)
        arch_name = source.arch.name
        lineage = sources_lineage([source])
        halves = sources_select_halves([source])
    size = int(model_config["vision_cfg"]["image_size"])
    tokenizer = tokenizer_for(model_config)
    common = (cfg.base, hashes, arch_name, lineage, halves)
    captions = SampleRecipe(size, cfg.augment, cfg.seed, _Tokenize(tokenizer))  # contrastive samples
    hub, hub_why = None, ""
    if cfg.mode == "contrastive" and is_hub_layout(cfg.data) and cfg.data_in_memory != "yes":
        hub = HubStream(cfg.data, captions)
        in_memory, hub_why = choose_in_memory(cfg.data_in_memory, hub.rows or 0, size, cfg.augment)
        if in_memory and hub.rows is None:
            hub_why = "its size is not known before download"
        elif in_memory:
            hub = None  # small enough: loaded whole by the in-memory path below
    if cfg.mode == "contrastive" and (is_shard_stream(cfg.data) or hub is not None):
        if cfg.max_steps is None:
            raise MicromergeError(
                f"--data {cfg.data}: a stream has no length here: give --max-steps "
                "(open_clip_train asks for --train-num-samples likewise)"
            )
        shards: ShardStream | HubStream
        if hub is not None:
            shards = hub
            count = f"{hub.num_shards} shard" + ("s" if hub.num_shards != 1 else "")
            why = f"a hub-layout dataset of {count} streamed by datasets (streaming=True): {hub_why}"
            fingerprint = "data file paths (hub: at their commit) and local sizes"
        else:
            shards = ShardStream(cfg.data, captions)
            why = f"a stream of {len(shards.urls)} shards, read in order by the webdataset library"
            fingerprint = "shard names"
        path = {"in_memory": False, "why": why, "fingerprint": fingerprint}
        return Prepared(clip, clip, model_config, None, None, None, shards.fingerprint, *common,
                        shards=shards, data_path=path)  # fmt: skip
    if cfg.mode == "contrastive":
        index = index_pairs(cfg.data)
        in_memory, why = choose_in_memory(cfg.data_in_memory, len(index), size, cfg.augment)
        if not in_memory:
            stream = StreamedSamples(index, captions)
            path = {"in_memory": False, "why": why, "fingerprint": FINGERPRINTS[index.kind]}
            return Prepared(clip, clip, model_config, None, None, None, index.fingerprint, *common,
                            stream=stream, count=len(index), data_path=path)  # fmt: skip
        pairs = indexed_pairs(index)
        fingerprint = pairs.fingerprint()
        data = decode_checked(
            pairs.payloads,
            pairs.captions,
            size,
            cfg.max_bad_fraction,
            cfg.data,
            cfg.progress,
            index.sample_name,
        )
        path = {"in_memory": True, "why": why, "fingerprint": "every byte"}
        return Prepared(clip, clip, model_config, data, tokenizer(data.targets), None, fingerprint, *common,
                        count=len(data.targets), data_path=path)  # fmt: skip
    from datasets import Image

    from micromerge.eval.data import column_values, load_benchmark
    from micromerge.eval.task_selection import select_tasks
    from micromerge.eval.tasks import discover_tasks
    from micromerge.eval.zeroshot import class_embeddings

    bench = load_benchmark(cfg.data, progress=cfg.progress)
    assert cfg.task is not None  # FinetuneConfig requires it of a supervised run
    chosen = select_tasks(discover_tasks(bench.dataset), cfg.task, option="--task")
    if len(chosen) != 1 or len(chosen[0].classes) < 2:
        names = ", ".join(t.name for t in chosen)
        raise MicromergeError(
            f"--task {cfg.task}: supervised fine-tuning trains one task with two or more classes; "
            f"this selects {len(chosen)} ({names[:200]}): name one task"
        )
    task = chosen[0]
    domain = task.groups.get("domain")
    task_domain = domain if domain and domain != "unknown" else None
    texts = class_embeddings(clip, tokenizer, task, torch.device("cpu"))
    head = ZeroShotHead(texts, float(clip.logit_scale.detach().exp()))
    fingerprint = task_data_fingerprint(bench.fingerprint, task.name)
    model = ImageClassifier(clip, head)
    in_memory, why = choose_in_memory(cfg.data_in_memory, len(task.rows), size, cfg.augment)
    if not in_memory:
        index = CorpusIndex(cfg.data, "arrow", list(task.rows), list(task.labels), fingerprint, "ubench")
        stream = StreamedSamples(index, SampleRecipe(size, cfg.augment, cfg.seed, _label))
        path = {"in_memory": False, "why": why, "fingerprint": "the benchmark's files"}
        return Prepared(model, clip, model_config, None, None, list(task.classes), fingerprint, *common,
                        stream=stream, count=len(index), data_path=path, task_domain=task_domain)  # fmt: skip
    images = column_values(bench.dataset.select(task.rows).cast_column("image", Image(decode=False)), "image")
    data = decode_checked(images, list(task.labels), size, cfg.max_bad_fraction, cfg.data, cfg.progress,
                          lambda i: f"row {task.rows[i]}")  # fmt: skip
    path = {"in_memory": True, "why": why, "fingerprint": "the benchmark's files"}
    return Prepared(model, clip, model_config, data, None, list(task.classes), fingerprint, *common,
                    count=len(data.targets), data_path=path, task_domain=task_domain)  # fmt: skip
