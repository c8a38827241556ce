"""A model fine-tuned (supervised) on a benchmark's own task is never reported as zero-shot on it.

`finetune supervised --data BENCH --task T` trains on T's images of BENCH (README's own example
trains on the demo's benchmark and evaluates on it). Its rows were stored as zero-shot accuracies,
and a merge or a further fine-tune of it lost even the manifest that said what it was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from micromerge.cli import cli
from micromerge.core.provenance import SUPERVISED_ON, TRAINED_ON, task_data_fingerprint
from micromerge.eval.data import load_benchmark
from micromerge.finetune.trainer import run_finetune
from micromerge.merging.tensor_source import parse_safetensors_header
from tests.helpers import write_checkpoint
from tests.test_finetune import config, write_csv_folder
from tests.ubench_fixture import write_fixture

TASK = "kather_et_al_2016"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained-on")
    bench = write_fixture(tmp / "bench", per_class=4, corrupt=0)
    write_checkpoint(tmp / "base.safetensors", 0)
    supervised = run_finetune(
        config(
            tmp / "base.safetensors",
            bench,
            tmp / "sup",
            mode="supervised",
            task=TASK,
            batch_size=6,
            max_steps=1,
        )
    )
    return tmp, bench, supervised


def _eval(tmp: Path, model: Path, bench: Path, store: str):
    result = CliRunner().invoke(
        cli,
        ["eval", "--model", str(model), "--data", str(bench), "--store", str(tmp / store),
         "--cache-dir", str(tmp / "cache"), "--bootstrap", "0", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp / store).read_text().splitlines()]
    return result, rows


def _sweep(trained, store: Path, *options: str):
    """A WiSE-FT sweep of the base and the supervised specialist on the benchmark it was trained on."""
    tmp, bench, supervised = trained
    result = CliRunner().invoke(
        cli,
        ["sweep", "--base", str(tmp / "base.safetensors"), "--ft", str(supervised), "--data", str(bench),
         *options, "--store", str(store), "--cache-dir", str(tmp / "cache"), "--bootstrap", "0", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return result, [json.loads(line) for line in store.read_text().splitlines()]


def _marks(rows: list[dict]) -> dict[str, set]:
    marks: dict[str, set] = {}
    for row in rows:
        marks.setdefault(row["task"], set()).add(row.get(TRAINED_ON))
    return marks


def _header_record(path: Path) -> dict:
    _, metadata, _ = parse_safetensors_header(path)
    return json.loads(metadata["micromerge.core.provenance"])


def test_the_tasks_trained_on_are_named_in_order_and_marked_by_what_they_share():
    """`trained_on_marks` on tasks made by hand: the names come sorted (the warning and the record
    read the same whatever order the lineage lists them in); a task sharing a trained task's image
    is marked "images", one sharing none is not marked."""
    from micromerge.eval.tasks import Task
    from micromerge.eval.trained_on import trained_on_marks

    names = ["zeta", "alpha", "mid", "beta", "other"]
    tasks = [Task(n, "fine", ("a", "b"), (), (), (i, 10 + i), (0, 1)) for i, n in enumerate(names)]
    shares = Task("shares", "coarse", ("a", "b"), (), (), (0, 99), (0, 1))
    lineage = [task_data_fingerprint("fp", n) for n in ("zeta", "mid", "alpha", "beta")]
    trained, marks = trained_on_marks(lineage, "fp", tasks, [*tasks, shares])
    assert trained == ["alpha", "beta", "mid", "zeta"]
    assert marks == {"zeta": "task", "alpha": "task", "mid": "task", "beta": "task", "shares": "images"}
    assert trained_on_marks(lineage, "other data", tasks, tasks) == ([], {})


def test_the_trained_task_and_the_tasks_sharing_its_images_are_marked_others_not(trained):
    tmp, bench, supervised = trained
    result, rows = _eval(tmp, supervised, bench, "sup.jsonl")
    assert f"fine-tuned (supervised) on this benchmark's own images of {TASK}" in result.output
    assert (
        "(trained on its task: not zero-shot)" in result.output and "(trained on its images" in result.output
    )
    marks = _marks(rows)
    assert marks[TASK] == {"task"}
    assert marks["modality"] == marks["domain"] == {"images"}, "coarse tasks score the trained images too"
    assert marks["opencell"] == {None}, "a task of other images is still zero-shot"
    assert {r.get(TRAINED_ON) for r in rows if r["level"] == "headline"} == {"images"}
    _, rows = _eval(tmp, tmp / "base.safetensors", bench, "base.jsonl")
    assert all(TRAINED_ON not in r for r in rows), "the base was not trained on it"


def test_another_copy_of_other_images_marks_nothing(trained, tmp_path):
    tmp, _, supervised = trained
    other = write_fixture(tmp_path / "other", per_class=4, corrupt=0, seed=1)
    result, rows = _eval(tmp_path, supervised, other, "other.jsonl")
    assert all(TRAINED_ON not in r for r in rows) and "fine-tuned (supervised)" not in result.output


def test_merges_and_further_fine_tunes_carry_the_lineage_and_are_marked(trained, tmp_path):
    tmp, bench, supervised = trained
    fingerprint = task_data_fingerprint(load_benchmark(str(bench)).fingerprint, TASK)
    assert json.loads((supervised.parent / "manifest.json").read_text())["data_fingerprint"] == fingerprint
    merged = tmp_path / "merged.safetensors"
    result = CliRunner().invoke(
        cli,
        ["merge", "--base", str(tmp / "base.safetensors"), "--ft", str(supervised), "--alpha", "0.5",
         "--out", str(merged), "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert _header_record(merged)[SUPERVISED_ON] == [fingerprint]
    manifest = json.loads(merged.with_name(merged.name + ".manifest.json").read_text())
    assert manifest[SUPERVISED_ON] == [fingerprint]
    _, rows = _eval(tmp_path, merged, bench, "merged.jsonl")
    assert _marks(rows)[TASK] == {"task"}
    further = run_finetune(
        config(
            merged, write_csv_folder(tmp_path / "pairs", n=8), tmp_path / "further", batch_size=4, max_steps=1
        )
    )
    assert _header_record(further)[SUPERVISED_ON] == [fingerprint]
    plain = tmp_path / "plain.safetensors"
    write_checkpoint(plain, 1)
    other = CliRunner().invoke(
        cli,
        ["merge", "--base", str(tmp / "base.safetensors"), "--ft", str(plain), "--alpha", "0.5",
         "--out", str(tmp_path / "plain-merge.safetensors"), "--quiet"],
    )  # fmt: skip
    assert other.exit_code == 0 and SUPERVISED_ON not in _header_record(tmp_path / "plain-merge.safetensors")


def test_a_merge_that_leaves_the_base_carries_only_the_bases_lineage(trained, tmp_path):
    """`merge --alpha 0` writes the base's weights bit for bit, as a sweep's alpha 0 evaluates them."""
    tmp, bench, supervised = trained
    cases = (("numpy", (), False), ("torch", (), False), ("numpy", ("--alpha-rule", "visual.*=0.5"), True))
    for engine, rule, marked in cases:
        out = tmp_path / f"alpha-0-{engine}-{len(rule)}.safetensors"
        result = CliRunner().invoke(
            cli,
            ["merge", "--base", str(tmp / "base.safetensors"), "--ft", str(supervised), "--alpha", "0",
             *rule, "--engine", engine, "--out", str(out), "--quiet"],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        manifest = json.loads(out.with_name(out.name + ".manifest.json").read_text())
        assert (SUPERVISED_ON in _header_record(out)) is marked and (SUPERVISED_ON in manifest) is marked
    _, rows = _eval(tmp_path, tmp_path / "alpha-0-numpy-0.safetensors", bench, "alpha0.jsonl")
    assert all(TRAINED_ON not in r for r in rows)


def test_a_sweep_with_the_specialist_is_marked_and_its_report_says_so(trained, tmp_path):
    """Its alpha 0 is the base's weights bit for bit: those rows are zero-shot and stay unmarked."""
    store = tmp_path / "sweep.jsonl"
    result, rows = _sweep(trained, store, "--alphas", "0,1")
    assert "fine-tuned (supervised) on this benchmark's own images" in result.output
    specialist = [r for r in rows if r["alpha"] == 1]
    assert _marks(specialist)[TASK] == {"task"} and _marks(specialist)["opencell"] == {None}
    assert {r.get(TRAINED_ON) for r in specialist if r["level"] == "headline"} == {"images"}
    assert all(TRAINED_ON not in r for r in rows if r["alpha"] == 0), "alpha 0 is the base, which saw nothing"
    printed = {line.split()[0]: line for line in result.output.splitlines() if line.strip()}
    assert printed[TASK].endswith("(trained on its task: not zero-shot at some α)"), result.output
    assert printed["ubench:coarse"].endswith("(trained on its images: not zero-shot at some α)")
    assert "(" not in printed["opencell"], "a task of other images is zero-shot at every α"
    report = CliRunner().invoke(cli, ["report", str(store), "--out", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    text = (tmp_path / "report" / "report.md").read_text()
    assert f"fine-tuned (supervised) on this benchmark's own images ({TASK})" in text
    marked = sorted({r["task"] for r in specialist if r.get(TRAINED_ON) and r["level"] != "headline"})
    headline = {r["task"] for r in specialist if r["level"] == "headline"}
    # the headline rows pool tasks: the note names them once, as "the headline", not as tasks
    assert f"the numbers of {', '.join(marked)} and the headline are not zero-shot" in text
    assert headline and not headline & set(marked)
    assert "no fine-tuning domain recorded" not in text, "the specialist's domain is its task's"


def test_a_supervised_specialist_is_for_its_tasks_domain_unless_told_otherwise(trained, tmp_path):
    """Without --domain, the manifest records the trained task's domain (its rows' `domain`), so the
    report's default target is that domain, not a guess with a note."""
    tmp, bench, supervised = trained
    assert json.loads((supervised.parent / "manifest.json").read_text())["domain"] == "pathology"
    told = run_finetune(
        config(tmp / "base.safetensors", bench, tmp_path / "told", mode="supervised", task=TASK,
               batch_size=6, max_steps=1, domain="gastrointestinal pathology")
    )  # fmt: skip
    assert json.loads((told.parent / "manifest.json").read_text())["domain"] == "gastrointestinal pathology"


def test_a_sweep_alpha_0_that_is_not_the_base_under_a_per_key_rule_stays_marked(trained, tmp_path):
    """With `--alpha-rule 'visual.*=0.5'` the image tower is half the specialist's at every alpha."""
    _, rows = _sweep(trained, tmp_path / "rule.jsonl", "--alphas", "0", "--alpha-rule", "visual.*=0.5")
    assert _marks(rows)[TASK] == {"task"}


def test_the_model_card_says_what_the_model_was_trained_on(trained, tmp_path):
    """An exported specialist's card lists its μ-Bench numbers: the ones of the task it was trained
    on are marked, and the card says it was trained with labels on benchmark data."""
    tmp, bench, supervised = trained
    _eval(tmp_path, supervised, bench, "card.jsonl")
    result = CliRunner().invoke(
        cli,
        ["export", str(supervised), "--out", str(tmp_path / "export"), "--format", "open_clip",
         "--results", str(tmp_path / "card.jsonl")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    card = (tmp_path / "export" / "README.md").read_text()
    assert f"| {TASK} (trained on its task: not zero-shot) |" in card
    assert "| opencell |" in card and "Trained with labels on benchmark data" in card


def test_rows_trained_on_stay_marked_under_a_sources_table_that_moves_them(trained, tmp_path):
    """`finetune supervised` reads tasks under the shipped source table (it takes no --sources).
    The Held H2B rows have a null `dataset` and reach their task through its `null_dataset_match`
    rule (eval/ubench_sources.toml). An evaluation whose `--sources` table moves them under
    kather_et_al_2016 found no task named as the lineage names it, and scored the trained images
    as zero-shot."""
    tmp, bench, _ = trained
    held = run_finetune(
        config(tmp / "base.safetensors", bench, tmp_path / "held", mode="supervised",
               task="held_et_al_2010_h2b", batch_size=6, max_steps=1)
    )  # fmt: skip
    table = tmp_path / "moved.toml"
    table.write_text(
        '[sources.held_et_al_2010_h2b]\nnull_dataset_match = ""\n'
        '[sources.kather_et_al_2016]\nnull_dataset_match = "h2b|chromatin"\n'
    )
    result = CliRunner().invoke(
        cli,
        ["eval", "--model", str(held), "--data", str(bench), "--sources", str(table), "--store",
         str(tmp_path / "moved.jsonl"), "--cache-dir", str(tmp / "cache"), "--bootstrap", "0", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "on this benchmark's own images of held_et_al_2010_h2b" in result.output
    marks = _marks([json.loads(line) for line in (tmp_path / "moved.jsonl").read_text().splitlines()])
    assert "held_et_al_2010_h2b" not in marks and marks[TASK] == {"images"}, "kather holds the Held rows now"
    assert marks["opencell"] == {None}


def test_the_lineages_of_several_inputs_are_recorded_sorted(tmp_path):
    """The union of several inputs' lineages is a set; recorded as it iterates, its order would
    follow the process's string hashing, and one merge made twice would differ in its provenance
    bytes. Five fine-tunes given in reverse order: the union comes back sorted (a set's order
    would be this one by chance once in 120)."""
    import contextlib

    from micromerge.core.provenance import LEARNED_FROM_HALVES
    from micromerge.merging.lineage import sources_lineage, sources_select_halves
    from micromerge.merging.sources import open_source

    marks = [f"fingerprint-{letter}" for letter in "edcba"]
    paths = []
    for mark in marks:
        path = tmp_path / f"{mark}.safetensors"
        write_checkpoint(path, 0)
        record = {"micromerge_version": "0.1.7", "kind": "finetune-supervised", "data_fingerprint": mark}
        (tmp_path / f"{mark}.safetensors.manifest.json").write_text(
            json.dumps({**record, LEARNED_FROM_HALVES: [f"select-half:{mark}:seed=0"]})
        )
        paths.append(path)
    with contextlib.ExitStack() as stack:
        sources = [stack.enter_context(open_source(str(path))) for path in paths]
        assert sources_lineage(sources) == sorted(marks)
        assert sources_select_halves(sources) == sorted(f"select-half:{mark}:seed=0" for mark in marks)
