"""Analysis: metrics against hand-computed values, figures, the report, bad input, ablations."""

import dataclasses
import json
import re
import warnings
from pathlib import Path

import pytest

from micromerge.analysis import ablate, figures
from micromerge.analysis.ablate import grid_jobs, load_ablation, run_ablation
from micromerge.analysis.metrics import check_group, pareto_front, summarise, task_changes, valid_groups
from micromerge.analysis.report import build_report
from micromerge.analysis.tables import load_runs
from micromerge.core.errors import MicromergeError
from micromerge.eval.store import ResultStore
from micromerge.merging.methods import METHODS
from tests.helpers import write_checkpoint
from tests.ubench_fixture import write_fixture

# accuracy per task at alpha 0, 0.5, 1 (the 'report' half is 1 point lower everywhere)
VALUES = {
    ("modality", "coarse", "all"): (0.90, 0.85, 0.60),
    ("path-a", "fine", "pathology"): (0.50, 0.80, 0.90),
    ("bio-a", "fine", "biology"): (0.80, 0.75, 0.40),
}


def write_store(
    path: Path,
    alphas=(0.0, 0.5, 1.0),
    drop: tuple[str, float] | None = None,
    run_id: str = "r1",
    method: str = "wise-ft",
    shift_all: float = 0.0,
    label: str | None = None,
    values_by_task: dict | None = None,
    select_shift: dict[float, float] | None = None,
    fields: dict | None = None,
) -> Path:
    """`select_shift` adds to the select half's values at the alphas it names (the other halves
    keep theirs), so the alpha chosen there can differ from the report half's best. `fields`
    replace the rows' own (another `model`, `parameters`, `protocol`)."""
    rows = []
    for (task, level, domain), values in (values_by_task or VALUES).items():
        for alpha, value in zip((0.0, 0.5, 1.0), values, strict=True):
            if alpha not in alphas or (drop and drop == (task, alpha)):
                continue
            for split, shift in (("all", 0.0), ("select", 0.0), ("report", -0.01)):
                for metric in ("accuracy", "balanced_accuracy", "macro_f1"):
                    v = value + shift + (shift_all if alpha > 0 else 0.0)
                    if split == "select":
                        v += (select_shift or {}).get(alpha, 0.0)
                    rows.append(
                        {
                            "run_id": run_id,
                            **({"label": label} if label else {}),
                            "alpha": alpha,
                            "task": task,
                            "level": level,
                            "split": split,
                            "metric": metric,
                            "groups": {
                                "level": level,
                                "domain": domain,
                                "modality": "light microscopy"
                                if domain == "pathology"
                                else "fluorescence microscopy",
                                "scale": "cell",
                            },
                            "value": v,
                            "ci_low": v - 0.05,
                            "ci_high": v + 0.05,
                            "n_images": 100,
                            "n_corrupt": 0,
                            "n_classes": 3,
                            "method": method,
                            "parameters": {},
                            "model": {"base": "base.safetensors", "finetuned": ["ft.safetensors"]},
                            "dataset": {"source": "fixture", "fingerprint": "abc"},
                            **(fields or {}),
                        }
                    )
    ResultStore(path).append(rows)
    return path


def test_metrics_equal_hand_computed_values(tmp_path):
    run = load_runs(write_store(tmp_path / "r.jsonl"))[0]
    summary = summarise(run, "domain:pathology")
    assert summary.controls == ("domain:biology",)
    assert summary.gain == pytest.approx(0.40) and summary.forgetting == pytest.approx(0.40)
    assert summary.best_alpha == {"all_task_mean": 0.5, "worst_group": 0.5, "harmonic_target_control": 0.5}
    assert summary.best_report["all_task_mean"] == pytest.approx((0.85 + 0.80 + 0.75) / 3 - 0.01)
    overall = [sum(v[i] for v in VALUES.values()) / 3 for i in range(3)]
    assert summary.auc["all tasks"] == pytest.approx(
        0.5 * ((overall[0] + overall[1]) / 2 + (overall[1] + overall[2]) / 2)
    )
    assert [p[0] for p in summary.pareto] == [0.0, 0.5, 1.0]
    changes = task_changes(run)
    assert list(changes.columns) == [
        "task", "level", "domain", "alpha", "value", "ci_low", "ci_high", "vs_base", "vs_finetuned", "normalised"
    ]  # fmt: skip
    row = changes[(changes["task"] == "path-a") & (changes["alpha"] == 0.5)].iloc[0]
    assert (
        row["vs_base"] == pytest.approx(0.30)
        and row["vs_finetuned"] == pytest.approx(-0.10)
        and row["normalised"] == pytest.approx(0.8 / 0.9)
    )


def test_task_changes_are_against_the_evaluated_models_when_the_store_has_them(tmp_path):
    """With `eval` rows of the base and the specialist (as an ablation with α rules writes them), each
    task's change is against those models' whole-benchmark accuracy, not the sweep's α ends."""
    run = load_runs(write_store(tmp_path / "r.jsonl"))[0]
    evaluation = run.table[run.table["alpha"] == 0.5].assign(alpha=float("nan"))  # path-a 0.8 everywhere
    changes = task_changes(
        dataclasses.replace(run, base_reference=evaluation, finetuned_reference=evaluation)
    )
    row = changes[(changes["task"] == "path-a") & (changes["alpha"] == 1.0)].iloc[0]
    assert (row["vs_base"], row["vs_finetuned"], row["normalised"]) == pytest.approx((0.1, 0.1, 0.9 / 0.8))


def test_the_harmonic_criterion_prefers_balance_where_the_arithmetic_mean_would_not(tmp_path):
    """alpha 0 and 1 each sacrifice one side (target 0.2 / control 0.9, then 0.95 / 0.2); alpha 0.5
    holds both at 0.5. Their arithmetic means (0.55, 0.5, 0.575) favour alpha 1; their harmonic
    means (0.33, 0.5, 0.33) favour 0.5, which is what the criterion is for."""
    values = {
        ("path-a", "fine", "pathology"): (0.20, 0.50, 0.95),
        ("bio-a", "fine", "biology"): (0.90, 0.50, 0.20),
    }
    run = load_runs(write_store(tmp_path / "r.jsonl", values_by_task=values))[0]
    best = summarise(run, "domain:pathology").best_alpha
    assert best["harmonic_target_control"] == 0.5 and best["all_task_mean"] == 1.0


def test_the_worst_group_counts_each_level_beside_each_domain(tmp_path):
    """The worst-group criterion takes the minimum over the fine domains and the two levels: at α 0.5
    the domains are at their best (0.8, 0.8) but the coarse tasks collapse (0.3), so α 1 is the
    choice (worst 0.6 against 0.5 at α 0); over the domains alone it would be 0.5."""
    values = {
        ("modality", "coarse", "all"): (0.90, 0.30, 0.90),
        ("path-a", "fine", "pathology"): (0.50, 0.80, 0.70),
        ("bio-a", "fine", "biology"): (0.60, 0.80, 0.60),
    }
    run = load_runs(write_store(tmp_path / "r.jsonl", values_by_task=values))[0]
    assert summarise(run, "domain:pathology").best_alpha["worst_group"] == 1.0


def test_the_pareto_front_is_drawn_from_the_whole_benchmark_not_the_select_half(tmp_path):
    """α 0 is raised on the select half only, where it would dominate every other α; on all the
    images (what the front shows) the three trade target against control as before."""
    run = load_runs(write_store(tmp_path / "r.jsonl", select_shift={0.0: 0.5}))[0]
    assert [p[0] for p in summarise(run, "domain:pathology").pareto] == [0.0, 0.5, 1.0]


def test_unknown_is_never_offered_as_a_group(tmp_path):
    """A source whose scale the metadata table does not know is left out of the scale groups, not
    grouped with every other unknown source as if that were a scale."""
    run = load_runs(write_store(tmp_path / "r.jsonl"))[0]
    run.table.loc[run.table["task"] == "bio-a", "scale"] = "unknown"
    groups = valid_groups(run)
    assert "scale:cell" in groups and not any(group.endswith(":unknown") for group in groups)


def test_groups_are_offered_sorted_and_any_group_with_tasks_is_accepted(tmp_path):
    """The groups offered (in an error, in the report's target list) are sorted; a group that is
    not offered but names fine-grained tasks (scale:unknown) is still accepted when asked for,
    and one naming none is refused with the offered list."""
    run = load_runs(write_store(tmp_path / "r.jsonl"))[0]
    run.table.loc[run.table["task"] == "bio-a", "scale"] = "unknown"
    offered = [
        "domain:biology",
        "domain:pathology",
        "level:coarse",
        "level:fine",
        "modality:fluorescence microscopy",
        "modality:light microscopy",
        "scale:cell",
    ]
    assert valid_groups(run) == offered
    check_group(run, "scale:unknown")
    check_group(run, "domain:pathology")
    with pytest.raises(
        MicromergeError,
        match=re.escape(f"'domain:virology' does not exist in run {run.label}; valid groups: {offered}"),
    ):
        check_group(run, "domain:virology")


def test_alpha_is_chosen_on_the_select_half_and_reported_on_the_report_half(tmp_path):
    """The select half favours alpha 1 (every task +0.5 there, on that half only); the report half
    still favours 0.5. The honest protocol picks 1 and reports the report half's value at 1."""
    run = load_runs(write_store(tmp_path / "r.jsonl", select_shift={1.0: 0.5}))[0]
    summary = summarise(run, "domain:pathology")
    assert summary.best_alpha["all_task_mean"] == 1.0
    assert summary.best_report["all_task_mean"] == pytest.approx((0.60 + 0.90 + 0.40) / 3 - 0.01)


def test_pareto_front_drops_points_dominated_with_a_tie_and_auc_is_normalised_by_the_alpha_range(tmp_path):
    values = {
        **VALUES,
        ("path-a", "fine", "pathology"): (0.50, 0.80, 0.80),
    }  # alpha 1: target tied, control lower
    run = load_runs(write_store(tmp_path / "r.jsonl", values_by_task=values))[0]
    assert [p[0] for p in summarise(run, "domain:pathology").pareto] == [0.0, 0.5]
    overall = [sum(v[i] for v in VALUES.values()) / 3 for i in range(3)]
    for alphas in ((0.0, 0.5), (0.5, 1.0)):  # a range from 0, and one that is not
        half = load_runs(write_store(tmp_path / f"{alphas[0]}.jsonl", alphas=alphas))[0]
        ends = [overall[int(2 * alpha)] for alpha in alphas]
        assert summarise(half, "domain:pathology").auc["all tasks"] == pytest.approx(sum(ends) / 2)


def test_a_point_with_the_same_control_and_a_lower_target_is_off_the_front_listed_by_alpha():
    """Dominance on either axis with a tie on the other (here the control): α 0.5 is off the front.
    The front lists its points by α whatever order they came in."""
    points = [(1.0, 0.9, 0.2), (0.5, 0.5, 0.6), (0.0, 0.3, 0.8), (0.25, 0.6, 0.6)]
    assert pareto_front(points) == [(0.0, 0.3, 0.8), (0.25, 0.6, 0.6), (1.0, 0.9, 0.2)]


def test_base_and_specialist_are_the_lowest_and_highest_alpha_whatever_order_rows_were_written(tmp_path):
    """A sweep resumed from its top, or stores joined with `cat`, hold the highest α first."""
    store = write_store(tmp_path / "r.jsonl")
    store.write_text("".join(reversed(store.read_text().splitlines(keepends=True))))
    summary = summarise(load_runs(store)[0], "domain:pathology")
    assert summary.base["domain:pathology"] == pytest.approx(0.50)
    assert summary.finetuned["domain:pathology"] == pytest.approx(0.90)


def _without_select_rows(store: Path, task: str, alphas: tuple[float, ...]) -> Path:
    rows = [json.loads(line) for line in store.read_text().splitlines()]
    kept = [r for r in rows if not (r["task"] == task and r["split"] == "select" and r["alpha"] in alphas)]
    store.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return store


def test_a_select_half_without_an_image_of_the_target_is_named_not_a_wrong_alpha(tmp_path):
    """Too few images for the select half to hold one of the target's (a small --tasks subset):
    the target-versus-control criterion cannot be computed at any α, and says so in one line."""
    store = _without_select_rows(write_store(tmp_path / "r.jsonl"), "path-a", (0.0, 0.5, 1.0))
    with pytest.raises(
        MicromergeError,
        match=r"the select half has no image for harmonic_target_control \(target domain:pathology\), so alpha",
    ):
        summarise(load_runs(store)[0], "domain:pathology")


def test_a_criterion_missing_at_one_alpha_is_chosen_among_the_others(tmp_path):
    """A sweep missing the target's select rows at α 0.5 (where the harmonic criterion would
    choose) still chooses, among the α that have them."""
    store = _without_select_rows(write_store(tmp_path / "r.jsonl"), "path-a", (0.5,))
    assert summarise(load_runs(store)[0], "domain:pathology").best_alpha["harmonic_target_control"] in (
        0.0,
        1.0,
    )


@pytest.mark.parametrize("side", ["base_reference", "finetuned_reference"])
def test_an_evaluation_of_one_side_alone_leaves_both_references_at_the_alpha_ends(tmp_path, side):
    """Base and specialist are the real models' evaluations only when both are in the store: one
    alone would set one end against the other's α end, so both stay the sweep's ends."""
    run = load_runs(write_store(tmp_path / "r.jsonl"))[0]
    evaluation = run.table[run.table["alpha"] == 0.5].assign(value=0.0)
    summary = summarise(dataclasses.replace(run, **{side: evaluation}), "domain:pathology")
    assert summary.references == "alpha endpoints"
    assert (summary.base["domain:pathology"], summary.finetuned["domain:pathology"]) == pytest.approx(
        (0.5, 0.9)
    )


def test_figures_have_axes_labels_and_series(tmp_path):
    run = load_runs(write_store(tmp_path / "r.jsonl"))[0]
    summary = summarise(run, "domain:pathology")
    figure = figures.accuracy_vs_alpha([run], [summary])
    ax = figure.axes[0]
    assert "α" in ax.get_xlabel() and "(%)" in ax.get_ylabel()
    labels = [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert len(labels) == 3 and any("domain:pathology" in label for label in labels)
    assert len(ax.collections) >= 3, "interval bands"
    pareto = figures.pareto([run], [summary]).axes[0]
    assert (
        "target" in pareto.get_xlabel() and "control" in pareto.get_ylabel() and len(pareto.get_lines()) == 1
    )
    grid = figures.per_task_grid(run)
    assert sorted(a.get_title().split("\n")[0] for a in grid.axes if a.get_title()) == [
        "bio-a",
        "modality",
        "path-a",
    ]
    heat = figures.heatmap(run)
    assert heat.axes[0].get_xlabel() == "α" and "vs base" in heat.axes[1].get_ylabel()
    paths = figures.save(figure, tmp_path / "figs", "acc")
    assert all(p.stat().st_size > 1000 for p in paths) and {p.suffix for p in paths} == {".png", ".svg"}


def test_every_figure_names_the_metric_it_draws_as_the_page_does(tmp_path):
    """`report --metric macro_f1`: titles said "Accuracy versus α" and axes "macro_f1 (%)"."""
    run = load_runs(write_store(tmp_path / "r.jsonl"))[0]
    summary = summarise(run, "domain:pathology", "macro_f1")
    curves = figures.accuracy_vs_alpha([run], [summary], "macro_f1").axes[0]
    assert curves.get_title().startswith("Macro F1 versus α") and curves.get_ylabel() == "mean macro F1 (%)"
    pareto = figures.pareto([run], [summary], "macro_f1").axes[0]
    assert pareto.get_xlabel() == "target (domain:pathology) mean macro F1 (%)"
    grid = figures.per_task_grid(run, "macro_f1")
    assert grid.texts[0].get_text().endswith("per-task macro F1 versus α")
    assert {a.get_ylabel() for a in grid.axes if a.get_ylabel()} == {"macro F1 (%)"}
    heat = figures.heatmap(run, "balanced_accuracy")
    assert heat.axes[1].get_ylabel() == "change in balanced accuracy vs base (points)"


def test_coinciding_curves_are_drawn_once_and_named_for_both(tmp_path):
    """WiSE-FT and task arithmetic with one specialist are one formula: one line per group, both
    names in its legend entry; a third method keeps its own line style and marker."""
    store = write_store(tmp_path / "r.jsonl", label="wise-ft run")
    write_store(store, run_id="r2", method="task-arithmetic", label="task-arithmetic run")
    write_store(store, run_id="r3", method="ties", shift_all=-0.05, label="ties run")
    runs = sorted(load_runs(store), key=lambda r: r.run_id)
    figure = figures.accuracy_vs_alpha(runs, [summarise(r, "domain:pathology") for r in runs])
    lines = [line for line in figure.axes[0].get_lines() if not line.get_label().startswith("_")]
    labels = [line.get_label() for line in lines]
    assert len(lines) == 6, labels
    assert sum(label.startswith("wise-ft = task-arithmetic — ") for label in labels) == 3
    assert sum(label.startswith("ties — ") for label in labels) == 3
    assert "(run)" in figure.axes[0].get_title(), "the labels' shared ending, once"
    styles = {(line.get_linestyle(), line.get_marker()) for line in lines}
    assert len(styles) == 2, "one line style and marker per drawn run"


def test_report_renders_with_embedded_images_and_working_links(tmp_path):
    html_path = build_report(
        write_store(tmp_path / "r.jsonl"), tmp_path / "report", target="domain:pathology"
    )
    html = html_path.read_text()
    assert (
        html.count("data:image/png;base64,") == 4
        and "<script" not in html
        and "http" not in html.split("<pre>")[0]
    )
    markdown = (tmp_path / "report" / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(links) == 4 and all((tmp_path / "report" / link).is_file() for link in links)
    assert "select" in markdown and "report half" in markdown
    for table in ("headline", "alpha_selection", "groups_run0", "tasks_run0", "pareto_run0"):
        assert (tmp_path / "report" / "tables" / f"{table}.csv").is_file()
        assert isinstance(json.loads((tmp_path / "report" / "tables" / f"{table}.json").read_text()), list)
    provenance = json.loads((tmp_path / "report" / "provenance.json").read_text())
    assert len(provenance["results_store_sha256"]) == 64 and provenance["runs"][0]["method"] == "wise-ft"


def test_the_same_results_give_a_report_with_the_same_bytes(tmp_path):
    """Every file of the report (figures, tables, markdown, html, provenance) is a function of its
    inputs; matplotlib would otherwise salt each SVG's ids with a random uuid."""
    store = write_store(tmp_path / "r.jsonl")
    folders = [tmp_path / "first", tmp_path / "second"]
    for folder in folders:
        build_report(store, folder, target="domain:pathology")
    files = [sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file()) for folder in folders]
    assert files[0] == files[1] and any(p.suffix == ".svg" for p in files[0])
    for relative in files[0]:
        assert (folders[0] / relative).read_bytes() == (folders[1] / relative).read_bytes(), relative


def test_bad_input_missing_rows_unknown_group_single_alpha(tmp_path):
    with pytest.warns(UserWarning, match="alpha=0.5 has 2 of 3 tasks"):
        load_runs(write_store(tmp_path / "missing.jsonl", drop=("bio-a", 0.5)))
    with warnings.catch_warnings():  # every task at every alpha: nothing to warn of
        warnings.simplefilter("error")
        load_runs(write_store(tmp_path / "whole.jsonl"))
    with pytest.raises(MicromergeError, match=r"domain:virology.*valid groups.*domain:pathology"):
        build_report(write_store(tmp_path / "r.jsonl"), tmp_path / "rep", target="domain:virology")
    with pytest.warns(UserWarning, match="single alpha"):
        html_path = build_report(
            write_store(tmp_path / "one.jsonl", alphas=(0.5,)), tmp_path / "one", target="domain:pathology"
        )
    html = html_path.read_text()
    assert "no curves, tables only" in html and "<table" in html and "data:image/png" not in html
    with pytest.raises(MicromergeError, match="not found"):
        load_runs(tmp_path / "nothing.jsonl")


def test_shipped_ablation_configs_parse():
    """The paper's grid skips, once each, what its methods cannot take: Model Stock for the three
    one-specialist pairs (every rule set), WiSE-FT and SLERP for the two-specialist pair (their
    sweeps refused it: the grid stopped hours in), a soup under the one rule set with alpha rules;
    and what would repeat another of its merges: the sign-electing and linear variants on the
    one-specialist pairs."""
    import warnings

    shipped = {}
    for name in ("ablation-paper.toml", "ablation-demo.toml"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ablation = shipped[name] = load_ablation(Path("configs") / name)
        assert ablation.pairs and ablation.methods and "vision-only" in ablation.rule_sets
        skipped = [str(w.message).split(": skipped")[0] for w in caught]
        if name == "ablation-demo.toml":
            assert skipped == []
            continue
        single = ("clip-b32+plip", "clip-b32+quiltnet-b32", "clip-b16+quiltnet-b16")
        repeats = ("dare-ties", "breadcrumbs-ties", "della-linear")
        assert sorted(skipped) == sorted(
            [f"{p} / model-stock / {r}" for p in single for r in ablation.rule_sets]
            + [
                f"clip-b32+plip+quiltnet-b32 / {m} / {r}"
                for m in ("wise-ft", "slerp")
                for r in ablation.rule_sets
            ]
            + [f"{p['name']} / greedy-soup / late-blocks-strong" for p in ablation.pairs]
            + [f"{p} / {m} / {r}" for p in single for m in repeats for r in ablation.rule_sets]
        )
    paper = shipped["ablation-paper.toml"]
    assert {p["name"] for p in paper.pairs} == {
        "clip-b32+plip",
        "clip-b32+quiltnet-b32",
        "clip-b32+plip+quiltnet-b32",
        "clip-b16+quiltnet-b16",
    }
    assert set(paper.methods) == {*METHODS, "greedy-soup"} - {"linear"}, "every forgetting-aware method"
    assert len(grid_jobs(paper)) == 194


@pytest.mark.slow
def test_ablation_grid_runs_end_to_end_at_small_size(tmp_path, monkeypatch):
    import torch

    bench = write_fixture(tmp_path / "bench", per_class=4)
    write_checkpoint(tmp_path / "base.safetensors", 0)
    write_checkpoint(tmp_path / "ft.safetensors", 1)
    demo_config = (Path("configs") / "ablation-demo.toml").read_text()
    small = (
        demo_config.replace("demo-out/data/ubench-synthetic", str(bench))
        .replace("demo-out/runs/base/model.safetensors", str(tmp_path / "base.safetensors"))
        .replace("demo-out/runs/pathology-specialist/model.safetensors", str(tmp_path / "ft.safetensors"))
        .replace("demo-out/ablation", str(tmp_path / "ablation"))
        .replace('alphas = "0:1:0.1"', 'alphas = "0,0.5,1"')
        .replace("bootstrap = 200", "bootstrap = 40")
    )
    (tmp_path / "ablation.toml").write_text(small)
    ablation = load_ablation(tmp_path / "ablation.toml")
    # the tiny checkpoints have 2 blocks: the demo's rule for blocks 2-3 is named, not silently empty
    with pytest.warns(
        UserWarning, match=r"rule pattern 'visual.transformer.resblocks.\[23\].\*' matches no key"
    ):
        html = run_ablation(ablation, tmp_path / "cache", torch.device("cpu"), progress=False)
    every = load_runs(ablation.store)
    runs = [r for r in every if r.method != "none"]
    assert len(runs) == len(ablation.methods) * len(ablation.rule_sets)
    assert len(every) - len(runs) == 2, "the base and the specialist are evaluated once per pair"
    assert {r.label.split(" / ")[2] for r in runs} == set(ablation.rule_sets)
    # With per-block rules alpha 0 is not the base: gain and forgetting use the evaluated models.
    by_name = {r.label.split(" / ", 1)[1]: r for r in runs}
    plain = summarise(by_name["wise-ft / all"], "domain:pathology")
    ruled = summarise(by_name["wise-ft / late-blocks-strong"], "domain:pathology")
    assert plain.references == ruled.references == "evaluated models"
    assert ruled.base == plain.base and ruled.finetuned == plain.finetuned
    size = ablation.store.stat().st_size
    # The second run's report (half this test's time) is the first's: report determinism is tested
    # on its own (test_report_scale); here only that it is asked for again, of the same store.
    reports = []
    monkeypatch.setattr(ablate, "build_report", lambda *args, **kwargs: reports.append(args) or html)
    with pytest.warns(UserWarning, match=r"rule pattern 'visual.transformer.resblocks.\[23\].\*'"):
        run_ablation(ablation, tmp_path / "cache", torch.device("cpu"), progress=False)  # checked again
    assert ablation.store.stat().st_size == size, "a second run redoes nothing"
    assert reports == [(ablation.store, ablation.report, "domain:pathology")]
    assert html.is_file() and "vision-only" in html.read_text()


def test_a_new_report_replaces_the_old_one_whole_and_an_interrupted_one_changes_nothing(
    tmp_path, monkeypatch
):
    """A report of two runs, then of one into the same folder: figures/per_task_run1.png and
    tables/tasks_run1.csv of the run no longer in the store were left beside the new report (a
    reader browsing figures/ saw a run the report does not have). And figures were written in
    place: Ctrl-C half-way left new figures beside the old report.md. The report is staged and
    moved in; of the files already there, only an earlier report's are removed (a figure of the
    user's own in figures/ stays)."""
    from micromerge.analysis import figures
    from micromerge.analysis.report import REPORT_FILES

    two = write_store(tmp_path / "two.jsonl")
    write_store(two, run_id="r2", method="ties")
    (tmp_path / "report" / "figures").mkdir(parents=True)
    (tmp_path / "report" / "figures" / "microscope.png").write_bytes(b"the user's own figure")
    build_report(two, tmp_path / "report", target="domain:pathology")
    assert (tmp_path / "report" / "figures" / "per_task_run1.png").is_file()
    written = [
        p.relative_to(tmp_path / "report").as_posix()
        for sub in ("figures", "tables")
        for p in (tmp_path / "report" / sub).iterdir()
    ]
    assert [n for n in written if not REPORT_FILES.fullmatch(n)] == ["figures/microscope.png"], (
        "REPORT_FILES names every file a report writes"
    )
    build_report(write_store(tmp_path / "one.jsonl"), tmp_path / "report", target="domain:pathology")
    names = sorted(p.relative_to(tmp_path / "report").as_posix() for p in (tmp_path / "report").rglob("*"))
    assert not [n for n in names if "run1" in n], names
    assert not [n for n in names if n.startswith(".")], "no staging folder is left"
    assert (tmp_path / "report" / "figures" / "microscope.png").read_bytes() == b"the user's own figure"
    before = {p: p.read_bytes() for p in (tmp_path / "report").rglob("*") if p.is_file()}
    drawn = []

    def interrupted(figure, folder, name):
        drawn.append(name)
        if len(drawn) == 2:
            raise KeyboardInterrupt
        return save(figure, folder, name)

    save = figures.save
    monkeypatch.setattr(figures, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_report(two, tmp_path / "report", target="domain:pathology")
    after = {p: p.read_bytes() for p in (tmp_path / "report").rglob("*") if p.is_file()}
    assert after == before
