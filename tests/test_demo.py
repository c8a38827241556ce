"""The embedded default: the demo's own output must show real forgetting and real recovery."""

import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from micromerge.analysis.metrics import curve
from micromerge.analysis.tables import load_runs
from micromerge.cli import cli
from micromerge.core.errors import MicromergeError
from micromerge.demo import DemoConfig, _stage, run_demo

# A demo of half the default's work: half the pairs, 3 epochs of the base in batches of 32 instead of
# 4 in batches of 64, 24 benchmark images a class instead of 40, alpha in steps of 0.2. It takes 225 s
# against 435 s for the default on two threads of this machine, and shows every property the
# default does (base mean 64 %, biology forgets 20 points, alpha 0.4 beats both ends).
HALF_THE_WORK = dict(
    corpus_per_class=150, pretrain_epochs=3, bench_per_class=24, batch_size=32, alphas="0:1:0.2"
)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_demo_of_half_the_work_shows_forgetting_and_recovery(tmp_path):
    """What `make test` runs: the whole loop, every stage as the default demo runs it, on less data
    and fewer steps. The default demo itself took 775 s of the 2,956 s two workers spent on a slow CI
    machine (27 min with the install, over the suite's 20), so it has a test of its own, below."""
    out = tmp_path / "demo"
    summary_headline = run_demo(DemoConfig(out=out, progress=False, **HALF_THE_WORK), say=lambda _: None)
    check_forgetting_and_recovery(out, summary_headline)


@pytest.mark.slow
@pytest.mark.default_demo
@pytest.mark.timeout(1800)  # 485 s on one thread of a 2-core machine, 775 s on a slow one
def test_the_default_demo_shows_forgetting_and_recovery(tmp_path):
    """The demo as `make demo` runs it, whose numbers README shows: run by `make test-demo` (not by
    `make test`) when the demo, training or evaluation changes, and before a release."""
    out = tmp_path / "demo"
    summary_headline = run_demo(DemoConfig(out=out, progress=False), say=lambda _: None)
    check_forgetting_and_recovery(out, summary_headline)
    messages = []
    run_demo(DemoConfig(out=out, progress=False), say=messages.append)
    assert sum("done before" in m for m in messages) == 5, "every finished stage is reused"


def check_forgetting_and_recovery(out: Path, summary_headline: dict) -> None:
    """What the demo exists to show, asserted on its store and report."""
    loaded = load_runs(out / "results" / "results.jsonl")
    runs = {(r.method, r.protocol): r for r in loaded if r.method != "none"}
    assert set(runs) == {
        ("wise-ft", "ubench"),
        ("task-arithmetic", "ubench"),
        ("ties", "ubench"),
        ("wise-ft", "closed-set"),
    }
    # base and specialist evaluated under both protocols: every sweep's "base" and "fine-tuned" are
    # those models, not its end points (TIES at alpha 1 is not the specialist)
    assert sorted(r.protocol for r in loaded if r.method == "none") == [
        "closed-set",
        "closed-set",
        "ubench",
        "ubench",
    ]
    assert all(r.base_reference is not None and r.finetuned_reference is not None for r in runs.values())
    assert "lowest and highest" not in (out / "report" / "report.md").read_text()
    wise = runs[("wise-ft", "ubench")]  # the properties hold under the authors' protocol
    table = wise.table[(wise.table["metric"] == "accuracy") & (wise.table["split"] == "all")]
    base = table[table["alpha"] == 0.0]
    rows = [json.loads(line) for line in (out / "results" / "results.jsonl").read_text().splitlines()]
    chance = {
        r["task"]: r["chance"]
        for r in rows
        if r["protocol"] == "ubench"
        and r["caption_key"] == "all"
        and r["alpha"] == 0.0
        and r["split"] == "all"
    }
    assert len(chance) == len(base) == 10 and all(0.15 < c < 0.4 for c in chance.values())
    for _, row in base.iterrows():  # above chance on every task (chance: 1 / the image's own options)
        assert row["value"] >= chance[row["task"]] + 0.1, row["task"]
    assert base["value"].mean() >= 0.6
    headline = wise.headline[(wise.headline["split"] == "all")].set_index(["task", "alpha"])["value"]
    assert headline["ubench:fine", 1.0] > headline["ubench:fine", 0.0], "the paper's fine headline gains"
    assert headline["ubench:coarse", 1.0] < headline["ubench:coarse", 0.0], "and its coarse headline forgets"
    fine = table[table["level"] == "fine"]
    for task in fine[fine["domain"] == "pathology"][
        "task"
    ].unique():  # the specialist gains on every pathology task
        values = fine[fine["task"] == task].set_index("alpha")["value"]
        assert values[1.0] > values[0.0], task
    biology = curve(wise, "domain:biology").set_index("alpha")["value"]
    assert biology[0.0] - biology[1.0] >= 0.10, (
        "catastrophic forgetting of at least 10 points on the non-pathology average"
    )
    overall = curve(wise, None).set_index("alpha")["value"]
    interior = overall.drop([0.0, 1.0])
    assert interior.max() > max(overall[0.0], overall[1.0]), (
        "an interior alpha beats both end points on the all-task mean"
    )
    assert 0.0 < summary_headline["chosen_alpha"] < 1.0
    html = (out / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4


def _result_values(out: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (out / "results" / "results.jsonl").read_text().splitlines()]
    keys = ("method", "protocol", "alpha", "task", "caption_key", "split", "metric", "value")
    # alpha is null in the base's and the specialist's evaluation rows, caption_key in some
    return sorted(tuple(str(r[k]) if k in ("alpha", "caption_key") else r[k] for k in keys) for r in rows)


def _check_printed_numbers(printed: dict, out: Path) -> None:
    """What the demo prints is what its store holds: WiSE-FT's ends are the base and the
    specialist, forgetting is the biology (control) mean's drop, in points, and the paper's
    headline at alpha 0 and 1 is the run's headline rows. Its sweeps ran with the methods'
    parameters it documents (TIES at density 0.2)."""
    runs = load_runs(out / "results" / "results.jsonl")
    (wise,) = [r for r in runs if (r.method, r.protocol) == ("wise-ft", "ubench")]
    for domain in ("pathology", "biology"):
        values = curve(wise, f"domain:{domain}").set_index("alpha")["value"]
        assert printed[f"base_{domain}"] == pytest.approx(values[0.0], abs=1e-9), domain
        assert printed[f"specialist_{domain}"] == pytest.approx(values[1.0], abs=1e-9), domain
    assert printed["forgetting_points"] == pytest.approx(
        100 * (printed["base_biology"] - printed["specialist_biology"])
    )
    rows = wise.headline[wise.headline["split"] == "all"]
    assert printed["paper_headline"] == {
        f"{task.split(':')[1]}@{alpha:g}": value
        for task, alpha, value in zip(rows["task"], rows["alpha"], rows["value"], strict=True)
        if alpha in (0.0, 1.0)
    }
    assert {"coarse@0", "coarse@1", "fine@0", "fine@1"} <= set(printed["paper_headline"])
    parameters = {r.method: r.parameters for r in runs if r.protocol == "ubench"}
    assert parameters["ties"]["density"] == 0.2, "the demo's TIES keeps the top 20%"
    assert "density" not in parameters["wise-ft"] and "density" not in parameters["task-arithmetic"]


@pytest.mark.slow
def test_demo_is_seeded_same_numbers_every_run(tmp_path):
    small = dict(
        bench_per_class=4,
        corpus_per_class=12,
        pretrain_epochs=1,
        finetune_epochs=1,
        batch_size=16,
        alphas="0,0.5,1",
        bootstrap=40,
        progress=False,
    )
    values = []
    for name in ("a", "b"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            printed = run_demo(DemoConfig(out=tmp_path / name, **small), say=lambda _: None)
        values.append(_result_values(tmp_path / name))
        # a demo this small is shorter than its warm-up of 30 and 10 steps: it shortens them
        assert not [w for w in caught if "--warmup-steps" in str(w.message)], [str(w.message) for w in caught]
    assert values[0] == values[1]
    _check_printed_numbers(printed, tmp_path / "b")
    from safetensors.torch import load_file

    weights = [
        load_file(str(tmp_path / n / "runs" / "pathology-specialist" / "model.safetensors")) for n in "ab"
    ]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), "same seed, same weights"
    # A finished stage whose product was deleted runs again (the reused sweep stage made the report
    # fail on the missing store); training is deterministic, so the base comes back byte for byte.
    base_weights = tmp_path / "b" / "runs" / "base" / "model.safetensors"
    before = base_weights.read_bytes()
    base_weights.unlink()
    (tmp_path / "b" / "results" / "results.jsonl").unlink()
    said: list[str] = []
    run_demo(DemoConfig(out=tmp_path / "b", **small), say=said.append)
    assert base_weights.read_bytes() == before
    assert [m.split("]")[0] for m in said if "is gone: again" in m] == [
        "[3/6 pretrain the base on the general corpus",
        "[5/6 evaluate the base and the specialist, sweep alpha on every task",
    ], said
    assert sum("done before" in m for m in said) == 3, "the data, the init and the specialist are reused"
    assert _result_values(tmp_path / "b") == values[1], "the sweeps again, the same numbers"
    # Another --finetune-epochs: the specialist is trained again and swept into an emptied store
    # (it used to be kept, and its old sweep reported, under the new settings).
    messages: list[str] = []
    users_own = tmp_path / "a" / "results" / "eval.jsonl"  # where README's eval example writes
    users_own.write_text("{}\n")
    run_demo(DemoConfig(out=tmp_path / "a", **{**small, "finetune_epochs": 2}), say=messages.append)
    assert users_own.read_text() == "{}\n", "only the demo's own store is rebuilt"
    assert sum("done before" in m for m in messages) == 3, messages
    manifest = json.loads((tmp_path / "a" / "runs" / "pathology-specialist" / "manifest.json").read_text())
    assert manifest["hyperparameters"]["epochs"] == 2
    store = (tmp_path / "a" / "results" / "results.jsonl").read_text().splitlines()
    assert len({json.loads(line)["run_id"] for line in store}) == 8, (
        "one run per sweep and per reference evaluation, none of the old specialist"
    )


def test_demo_validates_its_inputs(tmp_path):
    with pytest.raises(MicromergeError, match="--seed -1"):
        DemoConfig(seed=-1)
    with pytest.raises(MicromergeError, match="--bench-per-class 1"):
        DemoConfig(bench_per_class=1)
    # refused when its sweeps came, after minutes of data generation and training
    with pytest.raises(MicromergeError, match=r"--bootstrap -1: must be in \[0, 100,000\]"):
        DemoConfig(bootstrap=-1)
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "file")])
    assert result.exit_code == 2 and "not a folder" in result.stderr
    assert not Path(tmp_path / "file").is_dir()


def test_demo_takes_its_smallest_settings_and_refuses_one_less():
    """The bounds themselves run (4 images a class, 10 pairs a class, one epoch each, batches of
    2); one less is one line naming the option. A DemoConfig built in Python keeps an existing
    demo folder (fresh is off) and shows progress, as the command does."""
    smallest = {
        "bench_per_class": 4,
        "corpus_per_class": 10,
        "pretrain_epochs": 1,
        "finetune_epochs": 1,
        "batch_size": 2,
    }
    DemoConfig(**smallest)
    for option, needle in [
        ("bench_per_class", "--bench-per-class 3"),
        ("corpus_per_class", "--corpus-per-class 9"),
        ("pretrain_epochs", "--pretrain-epochs and --finetune-epochs"),
        ("finetune_epochs", "--pretrain-epochs and --finetune-epochs"),
        ("batch_size", "--batch-size 1"),
    ]:
        with pytest.raises(MicromergeError, match=re.escape(needle)):
            DemoConfig(**{**smallest, option: smallest[option] - 1})
    assert DemoConfig().fresh is False and DemoConfig().progress is True


def test_fresh_empties_a_demo_folder_only(tmp_path):
    """`demo --out . --fresh` removed the folder whole (a checkout, a home): --fresh now refuses a
    non-empty folder without the demo's stages/ record, and still starts a demo folder over. It
    empties the folder rather than removing it: the folder is what the running demo has locked."""
    from micromerge.demo import _empty_demo_folder

    mine = tmp_path / "my-project"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    result = CliRunner().invoke(cli, ["demo", "--out", str(mine), "--fresh"])
    assert result.exit_code == 2 and "not a demo folder (no stages/ in it)" in result.stderr
    assert (mine / "thesis.tex").read_text() == "years of work"
    demo = tmp_path / "demo-out"
    (demo / "stages").mkdir(parents=True)
    (demo / "runs" / "base").mkdir(parents=True)
    (demo / "report.md").write_text("old")
    (demo / "elsewhere").symlink_to(mine)  # a link is removed, never what it points to
    _empty_demo_folder(demo)
    assert demo.is_dir() and list(demo.iterdir()) == []
    assert (mine / "thesis.tex").read_text() == "years of work"
    (tmp_path / "empty").mkdir()
    _empty_demo_folder(tmp_path / "empty")
    _empty_demo_folder(tmp_path / "never-made")


@pytest.mark.parametrize("fresh", [False, True])
def test_a_demo_into_the_folder_of_a_running_demo_is_refused_before_it_changes_anything(tmp_path, fresh):
    """A second demo into a running one's folder (`make demo` again in another terminal) stops at
    once with one line naming the process; with --fresh it would have emptied the folder under
    the running demo. The running demo is stood for by its lock, taken in this process."""
    from micromerge.core.folder_lock import sole_writer

    demo = tmp_path / "demo-out"
    (demo / "stages").mkdir(parents=True)
    (demo / "stages" / "data.json").write_text('{"digest": "x", "finished": false}\n')
    args = ["demo", "--out", str(demo), "--quiet", *(["--fresh"] if fresh else [])]
    with sole_writer(demo, "--out"):
        result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert (
        f"--out {demo}: another run (process {os.getpid()}) is writing into this folder now" in result.stderr
    )
    assert result.stdout == ""  # refused before its first stage said anything
    assert sorted(path.name for path in demo.rglob("*")) == ["data.json", "stages"]


def test_a_stage_resumes_under_its_settings_and_starts_over_under_others(tmp_path):
    """The marker is written before the work: an interrupted stage runs again over what it left
    (training resumes mid-run), but a stage of other settings, finished or not, loses its outputs
    first."""
    marker, output = tmp_path / "stages" / "train.json", tmp_path / "run"
    ran: list[bool] = []

    def work(fail: bool = False):
        ran.append(output.exists())
        output.mkdir(exist_ok=True)
        if fail:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _stage("train", marker, "a", lambda: work(fail=True), say=lambda _: None, outputs=(output,))
    assert json.loads(marker.read_text()) == {"digest": "a", "finished": False}
    _stage("train", marker, "a", work, say=lambda _: None, outputs=(output,))
    assert ran == [False, True], "same settings: resumed over the interrupted stage's outputs"
    _stage("train", marker, "a", work, say=lambda _: None, outputs=(output,))
    assert len(ran) == 2, "finished with the same settings: reused"
    _stage("train", marker, "b", work, say=lambda _: None, outputs=(output,))
    assert ran[-1] is False, "other settings: the old outputs removed first"
    marker.write_text(json.dumps({"digest": "b"}))  # a marker from before the 'finished' field
    _stage("train", marker, "b", work, say=lambda _: None, outputs=(output,))
    assert len(ran) == 3
    marker.write_text('{"digest": "b", "fin')  # cut short: settings unknown, so built again
    _stage("train", marker, "b", work, say=lambda _: None, outputs=(output,))
    assert ran[-1] is False and json.loads(marker.read_text())["finished"] is True


def test_a_finished_stage_whose_product_is_gone_runs_again_from_scratch(tmp_path):
    """`rm results/results.jsonl` (or a run's weights) after a finished demo: the stage was reused
    and the next one failed on the missing file. A finished stage with a product missing loses its
    outputs and runs again; an interrupted one still resumes over what it left."""
    marker, output = tmp_path / "stages" / "train.json", tmp_path / "run"
    product = output / "model.safetensors"
    ran: list[bool] = []

    def work():
        ran.append(output.exists())
        output.mkdir(exist_ok=True)
        (output / "state").mkdir(exist_ok=True)
        product.write_text("weights")

    def stage(say=lambda _: None):
        _stage("train", marker, "a", work, say=say, outputs=(output,), products=(product,))

    stage()
    stage()
    assert ran == [False], "finished, product there: reused"
    product.unlink()
    said: list[str] = []
    stage(say=said.append)
    assert ran == [False, False], "product gone: outputs removed, run again"
    assert product.read_text() == "weights" and any(f"{product} is gone: again" in m for m in said)
    marker.write_text(json.dumps({"digest": "a", "finished": False}))
    product.unlink()
    stage()
    assert ran[-1] is True, "interrupted: resumed over its outputs even without the product"


def test_a_stage_of_other_settings_removes_the_files_it_made_even_when_one_is_gone(tmp_path):
    """A stage's outputs may be files (a results store), and one may already be gone when the
    settings change: the others are removed, and the stage runs. Its marker records how long it took."""
    marker, kept, gone = tmp_path / "stages" / "sweep.json", tmp_path / "results.jsonl", tmp_path / "log.txt"
    _stage("sweep", marker, "a", lambda: kept.write_text("old"), say=lambda _: None, outputs=(kept, gone))
    assert 0 <= json.loads(marker.read_text())["seconds"] < 60
    seen: list[bool] = []
    _stage("sweep", marker, "b", lambda: seen.append(kept.exists()), say=lambda _: None, outputs=(kept, gone))
    assert seen == [False] and json.loads(marker.read_text())["digest"] == "b"


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names descriptors through /proc")
def test_the_demo_data_reaches_the_disk_before_it_is_published(tmp_path, monkeypatch):
    """The stage marker written next says "finished" and is never checked against the files: a
    power loss between an unsynced rename and the marker would leave torn data taken as whole."""
    from micromerge.demo import _write_data
    from micromerge.eval.synthetic import generate
    from tests.test_atomic import _DiskLog

    def small(folder, *_args, **_kwargs):
        folder.mkdir(parents=True)
        (folder / "data-00000-of-00001.arrow").write_bytes(b"rows")

    monkeypatch.setattr(generate, "write_benchmark", small)
    monkeypatch.setattr(generate, "write_corpus", small)
    log = _DiskLog(monkeypatch)
    _write_data(DemoConfig(out=tmp_path), tmp_path / "data")
    published = log.index("rename", tmp_path / "data")
    synced = {Path(path).parent.name for kind, path in log.events[:published] if kind == "fsync"}
    assert {"ubench-synthetic", "corpus-general", "corpus-pathology"} <= synced
    assert ("fsync", str(tmp_path)) in log.events[published:]
