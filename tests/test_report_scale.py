"""Reports of many runs (the paper grid: 4 pairs x 3 rule sets x 16 methods): runs are drawn per
comparison set, each run's own figures are drawn up to a limit (or on request) and linked rather
than embedded beyond it. At 192 runs the old layout drew one 67,552-pixel-wide figure and wrote
an 89 MB page in 4.5 minutes (BENCHMARKS.md, "Reports at the paper grid's size").

The limits are lowered here (monkeypatch) so that a few tiny runs cross them; the store is
tests.test_analysis.write_store's (three tasks at alpha 0, 0.5, 1)."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.collections import PathCollection

from micromerge.analysis import figures, report, report_page
from micromerge.analysis.ablate import load_ablation
from micromerge.analysis.metrics import curve, summarise, task_changes
from micromerge.analysis.sets import comparison_sets
from micromerge.analysis.tables import load_runs
from micromerge.cli import cli
from micromerge.eval.store import ResultStore
from tests.test_analysis import VALUES, write_store

TARGET = "domain:pathology"
PAIRS = {"p0": ("b0", "f0"), "p1": ("b1", "f1"), "p2": ("b0", "f1"), "p3": ("b1", "f0")}


def grid_store(path: Path, pairs=("p0", "p1"), rules=("all",), methods=("wise-ft", "ties", "dare")) -> Path:
    """One run per (pair, rules, method), labelled as `ablate` labels them; each method moves every
    accuracy above alpha 0 by its own amount, so no two curves of a pair coincide. The select half
    chooses alpha 0.5 for each run but "ties" (1.0)."""
    for pair in pairs:
        base, finetuned = PAIRS[pair]
        for rule in rules:
            for index, method in enumerate(methods):
                write_store(
                    path,
                    run_id=f"{pair}-{rule}-{method}",
                    method=method,
                    shift_all=-0.02 * index,
                    label=f"{pair} / {method} / {rule}",
                    select_shift={1.0: 0.3} if method == "ties" else None,
                    fields={
                        "model": {"base": base, "base_sha256": [base * 32], "finetuned": [finetuned],
                                  "finetuned_sha256": [finetuned * 32]},
                        "parameters": {"include": [] if rule == "all" else ["visual.*"]},
                    },
                )  # fmt: skip
    return path


def _sets(path: Path):
    runs = load_runs(path)
    return comparison_sets(runs, [summarise(r, TARGET) for r in runs])


def test_a_specialist_is_one_set_by_its_sha256_wherever_its_file_lay_and_by_path_without_one(tmp_path):
    """A checkpoint copied or moved between two sweeps is the same model when its sha256 is recorded;
    rows that record no sha256 (written by hand, or by an older version) are told apart by path."""
    for name, digests in (("sha", {"base_sha256": ["aa"], "finetuned_sha256": ["bb"]}), ("paths", {})):
        store = tmp_path / f"{name}.jsonl"
        for n, path in enumerate(("runs/ft/model.safetensors", "copy/model.safetensors")):
            model = {"base": "b.safetensors", "finetuned": [path], **digests}
            write_store(store, run_id=f"r{n}", label=f"p / m{n}", fields={"model": model})
        assert len(_sets(store)) == (1 if digests else 2), name


def test_runs_of_the_same_models_rules_data_protocol_and_target_form_one_set(tmp_path):
    sets = _sets(grid_store(tmp_path / "r.jsonl", rules=("all", "vision")))
    assert [s.title for s in sets] == ["p0 / … / all", "p0 / … / vision", "p1 / … / all", "p1 / … / vision"]
    assert all(s.names == ("wise-ft", "ties", "dare") for s in sets)
    assert [r.run_id for r in sets[1].runs] == ["p0-vision-wise-ft", "p0-vision-ties", "p0-vision-dare"]
    # the same models and rules on another protocol, or with another target, are another set
    store = grid_store(tmp_path / "one.jsonl", pairs=("p0",))
    write_store(store, run_id="ubench", label="p0 / wise-ft [ubench] / all",
                fields={"model": load_runs(store)[0].model, "parameters": {"include": []}, "protocol": "ubench"})  # fmt: skip
    runs = load_runs(store)
    assert [len(s.runs) for s in comparison_sets(runs, [summarise(r, TARGET) for r in runs])] == [3, 1]
    targets = [summarise(r, TARGET if r.method != "dare" else "level:coarse") for r in runs]
    assert [len(s.runs) for s in comparison_sets(runs, targets)] == [2, 1, 1]
    # ... and so are runs whose tasks a --sources table read otherwise (its rows hold its sha256)
    store = grid_store(tmp_path / "two.jsonl", pairs=("p0",))
    write_store(store, run_id="moved", label="p0 / lines / all",
                fields={"model": load_runs(store)[0].model, "parameters": {"include": []},
                        "sources": {"file": "moved.toml", "sha256": "t" * 64}})  # fmt: skip
    assert [len(s.runs) for s in _sets(store)] == [3, 1]
    # one model in common is not both: the same base with another specialist, or the reverse
    assert [len(s.runs) for s in _sets(grid_store(tmp_path / "base.jsonl", pairs=("p0", "p2")))] == [3, 3]
    assert [len(s.runs) for s in _sets(grid_store(tmp_path / "ft.jsonl", pairs=("p0", "p3")))] == [3, 3]
    # ... and runs scored on another copy of the data (its files' fingerprint)
    store = grid_store(tmp_path / "three.jsonl", pairs=("p0",))
    write_store(store, run_id="copy", label="p0 / lines / all",
                fields={"model": load_runs(store)[0].model, "parameters": {"include": []},
                        "dataset": {"source": "fixture", "fingerprint": "another copy"}})  # fmt: skip
    assert [len(s.runs) for s in _sets(store)] == [3, 1]


def test_a_sets_accuracy_figure_draws_each_runs_group_means_in_percent_and_rings_its_chosen_alpha(tmp_path):
    store = grid_store(tmp_path / "r.jsonl", pairs=("p0",))
    write_store(store, run_id="twin", label="p0 / task-arithmetic / all",
                fields={"model": load_runs(store)[0].model, "parameters": {"include": []}})  # fmt: skip
    (comparison,) = _sets(store)
    figure = figures.set_accuracy_vs_alpha(comparison)
    panels = [ax for ax in figure.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == [TARGET, "domain:biology", "all tasks"]
    for ax, group in zip(panels, [TARGET, "domain:biology", None], strict=True):
        lines = {line.get_label(): line for line in ax.get_lines()}
        # WiSE-FT and its twin (task arithmetic of one specialist) are one line with both names
        assert sorted(lines) == ["dare", "ties", "wise-ft = task-arithmetic"]
        for run, name in zip(comparison.runs, comparison.names, strict=True):
            label = next(label for label in lines if name in label.split(" = "))
            frame = curve(run, group)
            np.testing.assert_allclose(lines[label].get_xdata(), frame["alpha"])
            np.testing.assert_allclose(lines[label].get_ydata(), frame["value"] * 100)
        rings = [c for c in ax.collections if isinstance(c, PathCollection)]
        assert len(rings) == 3
        chosen = [s.best_alpha["all_task_mean"] for s in comparison.summaries]
        assert chosen == [0.5, 1.0, 0.5, 0.5]
        for ring, run, best in zip(rings, comparison.runs, chosen, strict=False):
            value = curve(run, group).set_index("alpha")["value"][best]
            np.testing.assert_allclose(ring.get_offsets(), [[best, value * 100]])
    assert len({(line.get_color(), line.get_linestyle()) for line in panels[0].get_lines()}) == 3
    assert [t.get_text() for t in figure.legends[0].get_texts()] == [
        "wise-ft = task-arithmetic",
        "ties",
        "dare",
    ]


def test_a_sets_per_task_figure_draws_each_tasks_values_for_each_run(tmp_path):
    (comparison,) = _sets(grid_store(tmp_path / "r.jsonl", pairs=("p0",)))
    figure = figures.set_per_task(comparison)
    panels = [ax for ax in figure.axes if ax.get_title()]
    assert [ax.get_title().split("\n")[0] for ax in panels] == ["modality", "bio-a", "path-a"]
    for ax in panels:
        task = ax.get_title().split("\n")[0]
        for line, run in zip(ax.get_lines(), comparison.runs, strict=True):
            changes = task_changes(run)
            np.testing.assert_allclose(line.get_ydata(), changes[changes["task"] == task]["value"] * 100)
    assert [ax.axison for ax in figure.axes][3:] == [False], "the empty fourth panel is hidden"


def test_a_task_only_some_runs_of_a_set_scored_gets_its_panel_too(tmp_path):
    store = grid_store(tmp_path / "r.jsonl", pairs=("p0",), methods=("wise-ft",))
    extra = {**VALUES, ("path-b", "fine", "pathology"): (0.3, 0.6, 0.9)}
    write_store(store, run_id="more", label="p0 / ties / all", values_by_task=extra,
                fields={"model": load_runs(store)[0].model, "parameters": {"include": []}})  # fmt: skip
    (comparison,) = _sets(store)
    panels = {
        ax.get_title().split("\n")[0]: ax for ax in figures.set_per_task(comparison).axes if ax.get_title()
    }
    assert list(panels) == ["modality", "bio-a", "path-a", "path-b"]
    drawn = {t: [line for line in ax.get_lines() if len(line.get_ydata())] for t, ax in panels.items()}
    assert [len(lines) for lines in drawn.values()] == [2, 2, 2, 1]
    np.testing.assert_allclose(drawn["path-b"][0].get_ydata(), [30, 60, 90])


def test_a_panel_above_a_hidden_one_shows_its_alpha_ticks():
    figure, axes = figures._panels(6, 4, 3.0, 2.0)

    def labelled(ax) -> bool:
        return all(tick.label1.get_visible() for tick in ax.xaxis.get_major_ticks())

    assert [labelled(ax) for ax in axes.flat[:6]] == [False, False, True, True, True, True]
    assert [ax.axison for ax in axes.flat] == [True] * 6 + [False] * 2


def test_legends_stay_small_however_many_runs_share_a_curve_or_a_figure(tmp_path):
    assert figures._joined(["a", "b"]) == "a = b"
    assert figures._joined(["a", "b", "c"]) == "a = b = c", "three names, nothing to count"
    assert figures._joined([f"copy{i}" for i in range(48)]) == "copy0 = copy1 = copy2 (+45 more)"
    runs = load_runs(grid_store(tmp_path / "r.jsonl", methods=("wise-ft", "ties", "dare")))
    ax = figures.pareto(runs, [summarise(r, TARGET) for r in runs], title="six runs").axes[0]
    fronts = [c.get_label() for c in ax.collections if not c.get_label().startswith("_")]
    assert fronts == ["Pareto front of each run (hollow circles)"], "one entry for six fronts"
    assert len([c for c in ax.collections if isinstance(c, PathCollection)]) == 6
    assert "six runs" in ax.get_title()
    assert len({(line.get_color(), line.get_linestyle()) for line in ax.get_lines()}) == 6


def _report(store: Path, out: Path, **kwargs) -> tuple[str, str, set[str]]:
    page = report.build_report(store, out, target=TARGET, **kwargs).read_text()
    files = {str(p.relative_to(out)) for p in (out / "figures").glob("*.png")}
    return page, (out / "report.md").read_text(), files


def test_beyond_the_overview_limit_each_comparison_set_gets_its_own_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "OVERVIEW_RUNS", 4)
    monkeypatch.setattr(report, "RUN_FIGURE_RUNS", 6)  # at the limit: still drawn and embedded
    four = grid_store(tmp_path / "four.jsonl", methods=("wise-ft", "ties"))
    _, _, files = _report(four, tmp_path / "four", run_figures=False)
    assert files == {"figures/accuracy_vs_alpha.png", "figures/pareto_target_vs_control.png"}, "at the limit"
    page, markdown, files = _report(grid_store(tmp_path / "r.jsonl"), tmp_path / "rep")  # six runs
    sets = {f"figures/{name}_set{n}.png" for n in (0, 1)
            for name in ("accuracy_vs_alpha", "pareto_target_vs_control", "per_task")}  # fmt: skip
    per_run = {f"figures/{name}_run{n}.png" for n in range(6) for name in ("per_task", "heatmap")}
    assert files == sets | per_run, "no one figure of all six runs"
    assert page.count("data:image/png;base64,") == 18, "up to the run limit every figure is embedded"
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert sorted(links) == sorted(files)
    assert json.loads((tmp_path / "rep" / "tables" / "comparison_sets.json").read_text())[:4] == [
        {"set": 0, "title": "p0 / … / all", "run": name, "run_id": f"p0-all-{name}"}
        for name in ("wise-ft", "ties", "dare")
    ] + [{"set": 1, "title": "p1 / … / all", "run": "wise-ft", "run_id": "p1-all-wise-ft"}]
    # a store that shrinks back under the limit: one overview again, the set figures removed
    store = write_store(tmp_path / "small.jsonl")
    _, _, files = _report(store, tmp_path / "rep")
    assert files == {f"figures/{n}.png" for n in ("accuracy_vs_alpha", "pareto_target_vs_control",
                                                  "per_task_run0", "heatmap_run0")}  # fmt: skip
    assert not (tmp_path / "rep" / "tables" / "comparison_sets.csv").exists()


def test_a_set_whose_labels_share_no_words_is_named_by_its_number(tmp_path, monkeypatch):
    """A set's title is what its runs' labels share; labels given by hand may share nothing, and
    its figures are then captioned "comparison set N", never with an empty title."""
    monkeypatch.setattr(report, "OVERVIEW_RUNS", 4)
    store = tmp_path / "r.jsonl"
    for index, label in enumerate(("wise-ft", "my ties", "dare run", "slerp", "lines")):
        write_store(store, run_id=f"r{index}", method=label, shift_all=-0.02 * index, label=label)
    (only,) = _sets(store)
    assert only.title == "" and only.names == ("wise-ft", "my ties", "dare run", "slerp", "lines")
    page, markdown, _ = _report(store, tmp_path / "rep", run_figures=False)
    captions = re.findall(r"!\[([^\]]*)\]\(figures/[^)]+_set0\.png\)", markdown)
    assert captions == [
        f"comparison set 0: {c}" for c in ("accuracy versus α", "target versus control", "per task")
    ]
    assert html.escape("comparison set 0: per task") in page


def test_beyond_the_run_limit_runs_figures_are_drawn_on_request_and_linked(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "OVERVIEW_RUNS", 4)
    monkeypatch.setattr(report, "RUN_FIGURE_RUNS", 5)
    store = grid_store(tmp_path / "r.jsonl")
    page, markdown, files = _report(store, tmp_path / "default")
    assert not any("_run" in f for f in files) and len(files) == 6
    assert "not drawn (6 runs, more than 5)" in page and "--run-figures" in page
    assert "data:image" not in page, "linked: 192 runs made 89 MB"
    assert page.count("<details>") == 6 + 1, "each run folded, and the provenance"
    assert sorted(re.findall(r"<a href='(figures/[^']+_set\d+\.png)'>", page)) == sorted(files)
    assert "<b>6 runs</b> in 2 comparison sets" in page and "fine-tuning changed" not in page
    drawn = html.escape(report_page.SETS_TEXT).replace(
        "`tables/comparison_sets.csv`", "<code>tables/comparison_sets.csv</code>"
    )
    assert report_page.SETS_TEXT in markdown and drawn in page, "what a set is, on both"
    page, markdown, files = _report(store, tmp_path / "asked", run_figures=True)
    assert len([f for f in files if "_run" in f]) == 12
    assert "data:image" not in page, "each run's figures linked, not embedded"
    linked = re.findall(r"<a href='(figures/[^']+_run\d+\.png)'>", page)
    assert sorted(linked) == sorted(f for f in files if "_run" in f)
    assert "not drawn" not in page
    # at the limit itself they are drawn; runs with curves get no "single alpha" note
    monkeypatch.setattr(report, "RUN_FIGURE_RUNS", 6)
    page, _, files = _report(store, tmp_path / "at-limit")
    assert len([f for f in files if "_run" in f]) == 12 and "not drawn" not in page
    assert "single alpha" not in page
    # under the limit, a user can still leave them out
    monkeypatch.setattr(report, "RUN_FIGURE_RUNS", 12)
    page, _, files = _report(store, tmp_path / "without", run_figures=False)
    assert not any("_run" in f for f in files) and "not drawn (--no-run-figures)" in page


def test_the_limits_the_help_and_the_ablation_config_agree(tmp_path):
    assert (report.OVERVIEW_RUNS, report.RUN_FIGURE_RUNS) == (4, 12)
    help_text = CliRunner().invoke(cli, ["report", "--help"]).output
    assert "up to 12 runs" in " ".join(help_text.split())
    store = write_store(tmp_path / "r.jsonl")
    result = CliRunner().invoke(cli, ["report", str(store), "--out", str(tmp_path / "rep"),
                                      "--target", TARGET, "--no-run-figures"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not list((tmp_path / "rep" / "figures").glob("*_run0.png"))
    config = tmp_path / "a.toml"
    config.write_text(
        '[ablation]\ndata = "d"\nstore = "s.jsonl"\nreport = "rep"\nmethods = ["wise-ft"]\nrun_figures = true\n'
        '[[ablation.pairs]]\nbase = "b.safetensors"\nfinetuned = "f.safetensors"\n'
    )
    assert load_ablation(config).run_figures is True
    config.write_text(config.read_text().replace("run_figures = true", 'run_figures = "yes"'))
    with pytest.raises(Exception, match="run_figures"):
        load_ablation(config)


def test_a_grid_report_is_the_same_bytes_each_time(tmp_path):
    """Set figures, the sets table and the linked page are functions of the store, as a small
    report is (test_analysis; each run's own figures are left out here, that test has them)."""
    store = grid_store(tmp_path / "r.jsonl")
    folders = [tmp_path / "first", tmp_path / "second"]
    for folder in folders:
        report.build_report(store, folder, target=TARGET, run_figures=False)
    files = [sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file()) for folder in folders]
    assert files[0] == files[1] and Path("figures/per_task_set1.svg") in files[0]
    for relative in files[0]:
        assert (folders[0] / relative).read_bytes() == (folders[1] / relative).read_bytes(), relative


def test_a_selection_decodes_its_runs_and_the_evaluations_only_and_gives_what_reading_all_gives(
    tmp_path, monkeypatch
):
    """`report --runs 'pair / *'` of a 192-sweep grid decoded all 392,832 rows to keep a few runs. The
    runs are now told by their first rows (found through the store's index of run lines), and only
    the selected runs and every evaluation (a sweep's references) are decoded: the same runs, tables
    and references as reading everything and filtering."""
    import pandas as pd

    from micromerge.analysis.tables import run_label
    from micromerge.eval import store as store_module

    store = grid_store(tmp_path / "r.jsonl", rules=("all", "vision"))
    evaluated = {"finetuned": [], "finetuned_sha256": []}
    write_store(store, run_id="e-b0", method="none", alphas=(0.0,),
                fields={"alpha": None, "model": {"base": "b0", "base_sha256": ["b0" * 32], **evaluated}})  # fmt: skip
    patterns = ("p0 / * / all",)
    every = [r for r in load_runs(store) if r.method == "none" or report.picked(r.label, r.run_id, patterns)]
    decoded = []
    real_loads = store_module.json.loads
    monkeypatch.setattr(store_module.json, "loads", lambda text: decoded.append(1) or real_loads(text))
    some = load_runs(store, lambda first: report.picked(run_label(first), first["run_id"], patterns))
    lines = len(store.read_text().splitlines())
    assert len(decoded) < lines / 3, (len(decoded), lines)
    assert (
        [r.run_id for r in some]
        == [r.run_id for r in every]
        == ["p0-all-wise-ft", "p0-all-ties", "p0-all-dare", "e-b0"]
    )
    for mine, theirs in zip(some, every, strict=True):
        pd.testing.assert_frame_equal(mine.table, theirs.table)
        assert (mine.base_reference is None) == (theirs.base_reference is None)
    assert all(r.base_reference is not None for r in some[:3]), "the evaluation of the pair's base"
    # a store whose lines do not all name their run as the store writes them is read whole
    row = real_loads(store.read_text().splitlines()[0])
    with open(store, "a") as handle:
        handle.write(json.dumps(row, separators=(",", ":")) + "\n")  # a copy, written by hand
    assert [r.run_id for r in load_runs(store, lambda first: first["run_id"] == "p1-all-ties")] == [
        r.run_id for r in load_runs(store)
    ]


def test_runs_picks_the_runs_of_one_pair_by_label_or_run_id(tmp_path):
    store = grid_store(tmp_path / "r.jsonl")
    report.build_report(store, tmp_path / "p0", target=TARGET, run_figures=False, selected=("p0 / *",))
    headline = json.loads((tmp_path / "p0" / "tables" / "headline.json").read_text())
    assert [row["run"] for row in headline] == ["p0 / wise-ft / all", "p0 / ties / all", "p0 / dare / all"]
    provenance = json.loads((tmp_path / "p0" / "provenance.json").read_text())
    assert provenance["runs_selected"] == ["p0 / *"] and len(provenance["runs"]) == 3
    report.build_report(store, tmp_path / "two", target=TARGET, selected=("p0 / wise-ft / *", "p1-all-d*"))
    headline = json.loads((tmp_path / "two" / "tables" / "headline.json").read_text())
    assert [row["run"] for row in headline] == ["p0 / wise-ft / all", "p1 / dare / all"]
    result = CliRunner().invoke(cli, ["report", str(store), "--out", str(tmp_path / "none"), "--target", TARGET,
                                      "--runs", "p2 / *"])  # fmt: skip
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "--runs p2 / *: matches no run label or run id" in result.output
    assert (
        "p0 / dare / all; p0 / ties / all; p0 / wise-ft / all; p1 / dare / all; p1 / ties / all"
        in result.output
    )
    assert "(and 1 more)" in result.output and not (tmp_path / "none" / "report.html").exists()


def test_beyond_the_run_limit_the_page_shows_each_runs_paper_headline_at_its_chosen_alpha(
    tmp_path, monkeypatch
):
    """Every α of every run stays in tables/paper_headline.csv; the page of a grid shows each run's
    chosen α, and says so (the paper grid's 200 runs x 11 α were 2,200 rows at the top of the page)."""
    monkeypatch.setattr(report, "RUN_FIGURE_RUNS", 5)
    store = grid_store(tmp_path / "r.jsonl")
    rows = [json.loads(line) for line in store.read_text().splitlines()]
    first = {row["run_id"]: row for row in reversed(rows)}
    headline = [
        {**row, "task": task, "level": "headline", "caption_key": key, "groups": {"level": "headline"},
         "split": "all", "metric": "accuracy", "alpha": alpha, "value": 0.5 + alpha / 4 + offset,
         "ci_low": 0.4, "ci_high": 0.9}
        for row in first.values() for alpha in (0.0, 0.5, 1.0)
        for task, key, offset in (("ubench:coarse", "coarse keys pooled", 0.0), ("ubench:fine", "classification_1", 0.1))
    ]  # fmt: skip
    soup = [  # a greedy soup of p0: one point, its rows at its candidate's α 1, shown without an α
        {**row, "run_id": "soup", "method": "greedy-soup", "label": "p0 / greedy-soup / all",
         "parameters": {"weights": [0.5, 0.5]}}
        for row in [*rows, *headline] if row["run_id"] == first_run(rows, "p0 / wise-ft / all") and row["alpha"] == 1.0
    ]  # fmt: skip
    ResultStore(store).append(headline + soup)
    page, markdown, _ = _report(store, tmp_path / "rep", run_figures=False)
    assert len(_table_rows(tmp_path / "rep", "paper_headline")) == 6 * 3 + 1, "every α in the table's files"
    assert "| p0 / greedy-soup / all | closed-set |  | 75.0 |" in markdown, (
        "the soup's one row, in many mode too"
    )
    shown = _paper_headline_rows(markdown)
    chosen = {"wise-ft": "0.5", "ties": "1.0", "dare": "0.5"}  # grid_store's select half
    assert sorted(shown) == sorted((f"{p} / {m} / all", a) for p in ("p0", "p1") for m, a in chosen.items())
    assert report_page.PAPER_HEADLINE_MANY_TEXT in markdown
    assert "every α of every run: <code>tables/paper_headline.csv</code>" in page
    # a few runs: every α on the page, nothing said
    monkeypatch.setattr(report, "RUN_FIGURE_RUNS", 12)
    _, markdown, _ = _report(store, tmp_path / "few", run_figures=False)
    few = _paper_headline_rows(markdown)
    assert len(few) == 18 and report_page.PAPER_HEADLINE_MANY_TEXT not in markdown


def first_run(rows: list[dict], label: str) -> str:
    """The run id of the run a grid store labels so."""
    return next(row["run_id"] for row in rows if row.get("label") == label)


def _paper_headline_rows(markdown: str) -> list[tuple[str, str]]:
    """(run, alpha) of each row of the page's paper-comparable table."""
    section = markdown.split("## Paper-comparable headline")[1].split("\n## ")[0]
    return re.findall(r"^\| (p\d / \S+ / all) \| \S* \| ([\d.]+) \|", section, flags=re.MULTILINE)


def _table_rows(out: Path, name: str) -> list[dict]:
    return json.loads((out / "tables" / f"{name}.json").read_text())
