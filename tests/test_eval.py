"""Evaluation: loader validation, task registry, metrics, zero-shot parity, CLI, sweeps, resume."""

import json
import os
import signal
import subprocess
import sys
import time

import datasets
import numpy as np
import open_clip
import pytest
import torch
from click.testing import CliRunner

from eval.data import load_benchmark
from eval.metrics import classification_metrics, confusion_matrix, metrics_from_confusion
from eval.store import ResultStore
from eval.tasks import discover_tasks
from merging.models import load_model
from merging.sources import open_source
from micromerge.cli import cli
from micromerge.errors import MicromergeError
from tests.helpers import two_process_launch, write_checkpoint
from tests.ubench_fixture import write_fixture


@pytest.fixture
def bench(tmp_path):
    return write_fixture(tmp_path / "ubench")


@pytest.fixture
def models(tmp_path):
    write_checkpoint(tmp_path / "base.safetensors", 0)
    write_checkpoint(tmp_path / "ft.safetensors", 1)
    return tmp_path / "base.safetensors", tmp_path / "ft.safetensors"


def test_loader_reads_save_to_disk_and_parquet_through_one_path(tmp_path):
    a = load_benchmark(str(write_fixture(tmp_path / "disk")))
    b = load_benchmark(str(write_fixture(tmp_path / "pq", fmt="parquet")))
    assert len(a.dataset) == len(b.dataset) == 42
    assert a.dataset["label_name"] == b.dataset["label_name"]
    assert isinstance(a.dataset.features["captions"], dict)


def test_loader_rejects_missing_and_mistyped_columns_and_keeps_extras(tmp_path, bench):
    dataset = datasets.load_from_disk(str(bench))
    dataset.remove_columns(["dataset"]).save_to_disk(str(tmp_path / "missing"))
    with pytest.raises(MicromergeError, match=r"missing required column\(s\) \['dataset'\]"):
        load_benchmark(str(tmp_path / "missing"))
    dataset.cast_column("label", datasets.Value("string")).save_to_disk(str(tmp_path / "typed"))
    with pytest.raises(MicromergeError, match="column 'label' must be a ClassLabel"):
        load_benchmark(str(tmp_path / "typed"))
    dataset.add_column("a_new_column", ["x"] * len(dataset)).save_to_disk(str(tmp_path / "extra"))
    assert "a_new_column" in load_benchmark(str(tmp_path / "extra")).dataset.column_names


def test_hub_copy_offline_without_cache_is_a_clear_error():
    with pytest.raises(MicromergeError, match="jnirschl/uBench.*save_to_disk"):
        load_benchmark("ubench")


def test_tasks_are_discovered_from_the_data(bench):
    tasks = {t.name: t for t in discover_tasks(load_benchmark(str(bench)).dataset)}
    assert set(tasks) == {"modality", "submodality", "domain", "stain", "fix-tissue", "fix-cells", "fix-em"}
    assert tasks["stain"].n_images == 30, "rows without a stain are not in the stain task"
    assert tasks["fix-tissue"].classes == ("adipose", "stroma", "tumor")
    assert tasks["fix-tissue"].groups == {
        "level": "fine",
        "domain": "pathology",
        "modality": "light microscopy",
        "scale": "tissue",
    }
    assert tasks["fix-cells"].class_captions == ("An image of g1.", "An image of metaphase.")
    assert tasks["modality"].level == "coarse" and len(tasks["modality"].classes) == 3


def test_metrics_equal_hand_computed_values():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 2, 2])
    values = metrics_from_confusion(np.bincount(y_true * 3 + y_pred, minlength=9).reshape(3, 3))
    assert values["accuracy"] == pytest.approx(4 / 6)
    assert values["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # F1 per class: c0 2*2/(3+2)=0.8, c1 2*1/(2+2)=0.5, c2 2*1/(1+2)=2/3
    assert values["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    with_ci = classification_metrics(y_true, y_pred, 3, bootstrap=200, seed=1)
    assert with_ci["accuracy"]["ci_low"] <= 4 / 6 <= with_ci["accuracy"]["ci_high"]
    assert with_ci == classification_metrics(y_true, y_pred, 3, bootstrap=200, seed=1), "seeded"


def test_confusion_bootstrap_matches_resampling_images():
    """Drawing confusion matrices from the multinomial gives the intervals that resampling images gives."""
    rng = np.random.default_rng(5)
    y_true = rng.integers(0, 4, 300)
    y_pred = np.where(rng.random(300) < 0.7, y_true, rng.integers(0, 4, 300))
    result = classification_metrics(y_true, y_pred, 4, bootstrap=20000, seed=3)
    draws = np.random.default_rng(4).integers(0, 300, (20000, 300))
    resampled = {name: [] for name in result}
    for row in draws:
        for name, value in metrics_from_confusion(confusion_matrix(y_true[row], y_pred[row], 4)).items():
            resampled[name].append(value)
    for name, values in resampled.items():
        low, high = np.nanpercentile(values, [2.5, 97.5])
        assert result[name]["ci_low"] == pytest.approx(low, abs=0.006), name
        assert result[name]["ci_high"] == pytest.approx(high, abs=0.006), name
        assert high - low > 0.05, "the interval has width"


def _clip_benchmark_accuracy(model, preprocess, tokenizer, dataset, task) -> float:
    """An independent zero-shot implementation in the way CLIP_benchmark computes it."""
    with torch.no_grad():
        weights = []
        for classname in task.class_texts:
            texts = tokenizer([template.format(classname) for template in task.templates])
            embeddings = model.encode_text(texts)
            embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
            mean = embeddings.mean(dim=0)
            weights.append(mean / mean.norm())
        classifier = torch.stack(weights, dim=1)
        correct = total = 0
        for row, label in zip(task.rows, task.labels, strict=True):
            try:
                image = dataset[row]["image"]
            except Exception:
                continue  # the corrupt image
            features = model.encode_image(preprocess(image).unsqueeze(0))
            features = features / features.norm(dim=-1, keepdim=True)
            prediction = (100.0 * features @ classifier).argmax(dim=-1).item()
            correct += int(prediction == label)
            total += 1
    return correct / total


def _eval_args(tmp_path, bench, model, store="r.jsonl", bootstrap=0):
    """`micromerge eval` of one checkpoint on the fixture, quietly, with the image cache in tmp_path."""
    return ["eval", "--model", str(model), "--data", str(bench), "--store", str(tmp_path / store),
            "--bootstrap", str(bootstrap), "--cache-dir", str(tmp_path / "cache"), "--quiet"]  # fmt: skip


def test_zero_shot_accuracy_equals_an_independent_implementation(tmp_path, bench, models):
    result = CliRunner().invoke(cli, _eval_args(tmp_path, bench, models[0]))
    assert result.exit_code == 0, result.output
    rows = {
        r["task"]: r
        for r in ResultStore(tmp_path / "r.jsonl").rows()
        if r["metric"] == "accuracy" and r["split"] == "all"
    }
    with open_source(str(models[0])) as source:
        model, config = load_model(source)
    preprocess = open_clip.image_transform(config["vision_cfg"]["image_size"], is_train=False)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=config["text_cfg"]["context_length"])
    dataset = load_benchmark(str(bench)).dataset
    for task in discover_tasks(dataset):
        assert rows[task.name]["value"] == pytest.approx(
            _clip_benchmark_accuracy(model, preprocess, tokenizer, dataset, task), abs=1e-12
        ), task.name
    assert rows["fix-tissue"]["n_corrupt"] == 1 and rows["modality"]["n_corrupt"] == 1
    assert (
        "fix-tissue" in result.output
        and "mean accuracy" in result.output
        and "corrupt images skipped" in result.output
    )


def test_eval_twice_adds_no_rows(tmp_path, bench, models):
    args = _eval_args(tmp_path, bench, models[0], bootstrap=10)
    assert CliRunner().invoke(cli, args).exit_code == 0
    first = (tmp_path / "r.jsonl").read_text()
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert (tmp_path / "r.jsonl").read_text() == first


def _sweep_args(tmp_path, bench, models, alphas="0:1:0.5", store="s.jsonl"):
    return [
        "sweep",
        "--base",
        str(models[0]),
        "--ft",
        str(models[1]),
        "--alphas",
        alphas,
        "--data",
        str(bench),
        "--store",
        str(tmp_path / store),
        "--bootstrap",
        "20",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--quiet",
        "--device",
        "cpu",
    ]


def test_sweep_rows_and_end_points_equal_plain_evaluation(tmp_path, bench, models):
    result = CliRunner().invoke(cli, _sweep_args(tmp_path, bench, models))
    assert result.exit_code == 0, result.output
    rows = ResultStore(tmp_path / "s.jsonl").rows()
    assert len(rows) == 3 * 7 * 3 * 3  # alphas x tasks x splits (all, select, report) x metrics
    assert len({(r["alpha"], r["task"], r["split"], r["metric"]) for r in rows}) == len(rows)
    halves = [
        r for r in rows if r["alpha"] == 0.0 and r["task"] == "fix-tissue" and r["metric"] == "accuracy"
    ]
    sizes = {r["split"]: r["n_images"] for r in halves}
    assert sizes == {"all": 17, "select": 8, "report": 9}
    row = rows[0]
    assert (
        row["method"] == "wise-ft"
        and row["dataset"]["fingerprint"]
        and len(row["model"]["base_sha256"][0]) == 64
    )
    for alpha, model in ((0.0, models[0]), (1.0, models[1])):
        store = f"e{alpha}.jsonl"
        CliRunner().invoke(cli, _eval_args(tmp_path, bench, model, store=store, bootstrap=20))
        plain = {
            (r["task"], r["split"], r["metric"]): r["value"] for r in ResultStore(tmp_path / store).rows()
        }
        swept = {(r["task"], r["split"], r["metric"]): r["value"] for r in rows if r["alpha"] == alpha}
        assert swept == pytest.approx(plain, abs=1e-6)


def test_sweep_with_rules_and_ties(tmp_path, bench, models):
    args = _sweep_args(tmp_path, bench, models, alphas="0.5,1") + [
        "--method",
        "ties",
        "--include",
        "visual.*",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    rows = ResultStore(tmp_path / "s.jsonl").rows()
    assert {r["alpha"] for r in rows} == {0.5, 1.0} and rows[0]["parameters"]["include"] == ["visual.*"]


def test_store_ignores_and_repairs_a_torn_last_line(tmp_path):
    store = ResultStore(tmp_path / "r.jsonl")
    store.append([{"run_id": "x", "alpha": 0.0, "task": "t", "metric": "accuracy", "value": 1.0}])
    with open(tmp_path / "r.jsonl", "a") as handle:
        handle.write('{"schema": 1, "run_id": "x", "alpha": 0.5, "ta')
    assert len(store.rows()) == 1
    store.append([{"run_id": "x", "alpha": 0.5, "task": "t", "metric": "accuracy", "value": 0.5}])
    assert [r["alpha"] for r in store.rows()] == [0.0, 0.5]
    with open(tmp_path / "r.jsonl", "a") as handle:
        handle.write(json.dumps({"schema": 99, "run_id": "x"}) + "\n")
    with pytest.warns(UserWarning, match="another version"):
        assert len(store.rows()) == 2


@pytest.mark.slow
def test_sweep_killed_with_sigkill_resumes_without_redoing_rows(tmp_path, bench, models):
    command = [
        sys.executable,
        "-m",
        "micromerge.cli",
        *_sweep_args(tmp_path, bench, models, alphas="0:1:0.05"),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    store = ResultStore(tmp_path / "s.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and len({r["alpha"] for r in store.rows()}) < 3:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished_before = {r["alpha"] for r in store.rows()}
    assert 3 <= len(finished_before) < 21, "the kill must land mid-sweep for this test to mean anything"
    before = {(r["alpha"], r["task"], r["split"], r["metric"]): r["value"] for r in store.rows()}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = store.rows()
    keys = [(r["alpha"], r["task"], r["split"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys)) == 21 * 7 * 3 * 3
    assert all(dict(zip(keys, [r["value"] for r in rows], strict=True))[k] == v for k, v in before.items())


@pytest.mark.slow
def test_two_processes_split_a_sweep_through_accelerate_launch(tmp_path, bench, models):
    command = two_process_launch(*_sweep_args(tmp_path, bench, models, alphas="0:1:0.25"))
    result = subprocess.run(
        command,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = ResultStore(tmp_path / "s.jsonl").rows()
    keys = [(r["alpha"], r["task"], r["split"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys)) == 5 * 7 * 3 * 3
    by_process = {}
    for row in rows:
        by_process.setdefault(row["process"], set()).add(row["alpha"])
    assert by_process == {"0/2": {0.0, 0.5, 1.0}, "1/2": {0.25, 0.75}}


def test_tasks_command_lists_counts(bench):
    result = CliRunner().invoke(cli, ["tasks", "--data", str(bench)])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("fix-tissue"))
    assert line.split()[1:4] == ["fine", "18", "3"] and "pathology / light microscopy / tissue" in line


def test_caption_prompts_use_the_class_captions(tmp_path, bench, models):
    from eval.zeroshot import class_embeddings
    from merging.models import tokenizer_for

    task = next(t for t in discover_tasks(load_benchmark(str(bench)).dataset) if t.name == "fix-cells")
    with open_source(str(models[0])) as source:
        model, config = load_model(source)
    tokenizer = tokenizer_for(config)
    seen = []

    def spy(texts):
        seen.append(list(texts))
        return tokenizer(texts)

    by_caption = class_embeddings(model, spy, task, torch.device("cpu"), prompts="captions")
    by_name = class_embeddings(model, spy, task, torch.device("cpu"), prompts="names")
    assert seen[0] == ["An image of g1.", "An image of metaphase."]
    assert len(seen[1]) == len(task.templates) * 2 and not torch.allclose(by_caption, by_name)
    result = CliRunner().invoke(cli, [*_eval_args(tmp_path, bench, models[0]), "--prompts", "captions"])
    assert result.exit_code == 0, result.output
    assert {r["prompts"] for r in ResultStore(tmp_path / "r.jsonl").rows()} == {"captions"}
