"""Figures draw the numbers of the results store, not just axes with the right labels: every line,
band, marker and cell is checked against the store's values (test_analysis checks labels and
series counts; a curve drawn in fractions instead of percent, a band from the mean instead of the
lower bound, or a Pareto plot with its axes swapped passed those checks: mutation audit round 12).

Data: tests.test_analysis.write_store (three tasks at alpha 0, 0.5, 1; intervals value ± 0.05)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection, PolyCollection, QuadMesh
from matplotlib.colors import to_rgb

from micromerge.analysis import figures
from micromerge.analysis.metrics import curve, summarise, task_changes
from micromerge.analysis.sets import label_parts
from micromerge.analysis.tables import load_runs
from tests.test_analysis import write_store

TARGET = "domain:pathology"


def _run(tmp_path, **kwargs):
    run = load_runs(write_store(tmp_path / "r.jsonl", **kwargs))[0]
    return run, summarise(run, TARGET)


def _band(collection: PolyCollection) -> tuple[float, float]:
    vertices = np.concatenate([path.vertices for path in collection.get_paths()])
    return float(vertices[:, 1].min()), float(vertices[:, 1].max())


def test_accuracy_vs_alpha_draws_each_groups_curve_band_and_end_points_in_percent(tmp_path):
    run, summary = _run(tmp_path, label="wise-ft: base + specialist", select_shift={1.0: 0.3})
    assert summary.best_alpha["all_task_mean"] == 1.0, (
        "not the middle of the axis, nor the report half's best"
    )
    ax = figures.accuracy_vs_alpha([run], [summary]).axes[0]
    lines = {line.get_label().split(" — ")[1]: line for line in ax.get_lines() if " — " in line.get_label()}
    assert set(lines) == {TARGET, "domain:biology", "all tasks"}
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    ends = [c for c in ax.collections if isinstance(c, PathCollection)]
    for index, group in enumerate([TARGET, "domain:biology", None]):
        frame = curve(run, group)
        line = lines[group or "all tasks"]
        np.testing.assert_allclose(line.get_xdata(), frame["alpha"])
        np.testing.assert_allclose(line.get_ydata(), frame["value"] * 100)
        assert _band(bands[index]) == pytest.approx(
            (frame["ci_low"].min() * 100, frame["ci_high"].max() * 100)
        )
        np.testing.assert_allclose(
            ends[index].get_offsets(),
            [[0.0, frame["value"].iloc[0] * 100], [1.0, frame["value"].iloc[-1] * 100]],
        )
    colours = [tuple(lines[g].get_color()) for g in (TARGET, "domain:biology", "all tasks")]
    assert len(set(colours)) == 3, "colour = group"
    best = summary.best_alpha["all_task_mean"]
    marked = [line for line in ax.get_lines() if line.get_label().startswith("_")]
    assert [tuple(line.get_xdata()) for line in marked] == [(best, best)]
    assert [text.get_text() for text in ax.texts] == [f"α={best:g}"]


def test_several_runs_share_colours_by_group_and_name_their_shared_ending_once(tmp_path):
    store = write_store(tmp_path / "r.jsonl", label="wise-ft: base + specialist")
    write_store(store, run_id="r2", method="ties", shift_all=-0.05, label="ties: base + specialist")
    runs = sorted(load_runs(store), key=lambda r: r.run_id)
    ax = figures.accuracy_vs_alpha(runs, [summarise(r, TARGET) for r in runs]).axes[0]
    named = [line for line in ax.get_lines() if " — " in line.get_label()]
    by_group: dict[str, set] = {}
    for line in named:
        by_group.setdefault(line.get_label().split(" — ")[1], set()).add(tuple(line.get_color()))
    assert all(len(colours) == 1 for colours in by_group.values()), by_group
    assert {line.get_label().split(" — ")[0] for line in named} == {"wise-ft", "ties"}
    assert "(base + specialist)" in ax.get_title()


@pytest.mark.parametrize(
    "labels, short, shared",
    [
        (["wise-ft: base + path", "ties: base + path"], ["wise-ft", "ties"], "base + path"),
        # the shared ending starts inside a word: cut at the next word boundary, never mid-name
        (["alpha-x run", "beta-x run"], ["alpha-x", "beta-x"], "run"),
        # one label is the whole shared ending, which has no word boundary to cut at: nothing is cut
        (["base", "wise-ft base"], ["base", "wise-ft base"], ""),
        (["same", "same"], ["same (run r0aaaa)", "same (run r1aaaa)"], ""),
        (["only one"], ["only one"], ""),
        # ablate's labels "pair / method / rules": the shared start goes too, and an ending that
        # starts at a word boundary is cut whole (it was kept whole: the old cut wanted a space after
        # its first character)
        (["p0 / wise-ft / all", "p0 / ties / all"], ["wise-ft", "ties"], "p0 / … / all"),
        (["p0 / wise-ft", "p0 / ties"], ["wise-ft", "ties"], "p0"),
        # the start is cut at a word's end, never mid-name; a label of shared words alone keeps all
        (["wise one", "wisp one"], ["wise", "wisp"], "one"),
        (["a b", "a c b"], ["a b", "a c b"], ""),
    ],
)
def test_label_parts_drop_what_every_label_shares_and_tell_equal_labels_apart(labels, short, shared):
    class Named:
        def __init__(self, label: str, index: int) -> None:
            self.label, self.run_id = label, f"r{index}aaaaaaaa"

    assert label_parts([Named(label, i) for i, label in enumerate(labels)]) == (short, shared)


def test_per_task_grid_draws_every_task_in_percent_coloured_by_domain(tmp_path):
    run, _ = _run(tmp_path)
    figure = figures.per_task_grid(run)
    changes = task_changes(run)
    used = [ax for ax in figure.axes if ax.get_title()]
    titles = [ax.get_title() for ax in used]
    assert titles == ["modality\n(coarse, all)", "bio-a\n(fine, biology)", "path-a\n(fine, pathology)"]
    for ax in used:
        frame = changes[changes["task"] == ax.get_title().split("\n")[0]]
        (line,) = ax.get_lines()
        np.testing.assert_allclose(line.get_ydata(), frame["value"] * 100)
        assert _band(ax.collections[0]) == pytest.approx(
            (frame["ci_low"].min() * 100, frame["ci_high"].max() * 100)
        )
    # one colour per domain, dealt in the domains' sorted order: the same figure bytes in every
    # process (dealt in set order, they changed with PYTHONHASHSEED)
    colours = [to_rgb(ax.get_lines()[0].get_color()) for ax in used]
    assert colours == [to_rgb(figures.PALETTE[i]) for i in range(3)], "all, biology, pathology"
    assert [ax.axison for ax in figure.axes] == [True, True, True, False], "the empty fourth panel is hidden"


def test_pareto_plots_target_against_control_with_the_front_and_ends_marked(tmp_path):
    run, summary = _run(tmp_path)
    ax = figures.pareto([run], [summary]).axes[0]
    (line,) = ax.get_lines()
    target, control = curve(run, TARGET), curve(run, "domain:biology")
    np.testing.assert_allclose(line.get_xdata(), target["value"] * 100)
    np.testing.assert_allclose(line.get_ydata(), control["value"] * 100)
    (front,) = ax.collections
    np.testing.assert_allclose(front.get_offsets(), [[t * 100, c * 100] for _, t, c in summary.pareto])
    marks = {text.get_text(): text.xy for text in ax.texts}
    assert marks["α=0 (base)"] == pytest.approx(
        (target["value"].iloc[0] * 100, control["value"].iloc[0] * 100)
    )
    assert marks["α=1 (fine-tuned)"] == pytest.approx(
        (target["value"].iloc[-1] * 100, control["value"].iloc[-1] * 100)
    )


def test_pareto_without_controls_plots_the_target_on_both_axes(tmp_path):
    run, _ = _run(tmp_path)
    summary = summarise(run, "level:coarse")
    assert summary.controls == ()
    (line,) = figures.pareto([run], [summary]).axes[0].get_lines()
    np.testing.assert_allclose(line.get_xdata(), line.get_ydata())


def test_heatmap_cells_are_changes_against_the_base_in_points_on_a_symmetric_scale(tmp_path):
    run, _ = _run(tmp_path)
    ax = figures.heatmap(run).axes[0]
    changes = task_changes(run)
    tasks = list(dict.fromkeys(changes["task"]))
    assert [label.get_text() for label in ax.get_yticklabels()] == tasks, "tasks in the analysis order"
    expected = np.array([changes[changes["task"] == task]["vs_base"].to_numpy() * 100 for task in tasks])
    (mesh,) = [c for c in ax.collections if isinstance(c, QuadMesh)]
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(expected.shape), expected)
    limit = np.abs(expected).max()
    assert (mesh.norm.vmin, mesh.norm.vmax) == pytest.approx((-limit, limit))
    assert sorted(text.get_text() for text in ax.texts) == sorted(f"{v:.0f}" for v in expected.ravel())


def test_learned_coefficients_draws_each_specialists_column_and_the_start(tmp_path):
    saved = {
        "table": {
            "groups": ["visual.a", "visual.b", "text.a"],
            "values": [[0.1, 0.7], [0.2, 0.8], [0.3, 0.9]],
        },
        "described": {"init": 0.4, "kind": "adamerging", "granularity": "layer"},
    }
    ax = figures.learned_coefficients(saved, "run").axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_allclose(lines["specialist 1"].get_ydata(), [0.1, 0.2, 0.3])
    np.testing.assert_allclose(lines["specialist 2"].get_ydata(), [0.7, 0.8, 0.9])
    assert tuple(lines["start"].get_ydata()) == (0.4, 0.4)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["visual.a", "visual.b", "text.a"]
    assert ax.get_title() == "run: adamerging coefficients per layer"


def test_saved_figures_carry_no_software_version(tmp_path):
    """Same results, same bytes, across matplotlib upgrades too: no version in the PNG or SVG."""
    run, summary = _run(tmp_path)
    png, svg = figures.save(figures.accuracy_vs_alpha([run], [summary]), tmp_path, "acc")
    assert b"Software" not in png.read_bytes() and b"matplotlib" not in png.read_bytes().lower()
    assert "Matplotlib v" not in svg.read_text() and "<dc:date>" not in svg.read_text()


def test_pareto_names_each_runs_front_and_an_end_point_runs_share_once(tmp_path):
    """The demo's Pareto plot: four runs ending within a point of each other printed four
    overlapping "α=1 (fine-tuned)" labels, and its legend had two "Pareto front (wise-ft)" (the
    ubench and closed-set runs). A run 5 points away keeps its own label; all share the base."""
    store = write_store(tmp_path / "r.jsonl", label="wise-ft [ubench]: base + specialist")
    write_store(store, run_id="r2", shift_all=-0.005, label="wise-ft [closed-set]: base + specialist")
    write_store(store, run_id="r3", method="ties", shift_all=-0.05, label="ties [ubench]: base + specialist")
    runs = sorted(load_runs(store), key=lambda r: r.run_id)
    ax = figures.pareto(runs, [summarise(r, TARGET) for r in runs]).axes[0]
    texts = [text.get_text() for text in ax.texts]
    assert texts.count("α=0 (base)") == 1 and texts.count("α=1 (fine-tuned)") == 2, texts  # one base
    fronts = [c.get_label() for c in ax.collections]
    assert fronts == [
        f"Pareto front ({name})" for name in ("wise-ft [ubench]", "wise-ft [closed-set]", "ties [ubench]")
    ]


def test_panels_keep_their_size_as_rows_are_added():
    """Each panel is width x height inches whatever the count (a grid of 23 tasks is six rows of
    readable panels, not one page of squeezed ones), plus room for a legend below when asked.
    (Which panels are hidden and which label their α axis: test_report_scale.)"""
    one_row, one_row_axes = figures._panels(2, 4, 3.2, 2.4, legend=False)
    two_rows, two_rows_axes = figures._panels(5, 4, 3.2, 2.4, legend=False)
    with_legend, _ = figures._panels(5, 4, 3.2, 2.4, legend=True)
    assert tuple(one_row.get_size_inches()) == pytest.approx((12.8, 2.4))
    assert tuple(two_rows.get_size_inches()) == pytest.approx((12.8, 4.8))
    assert tuple(with_legend.get_size_inches()) == pytest.approx((12.8, 5.7))
    assert one_row_axes.shape == (1, 4) and two_rows_axes.shape == (2, 4)


@pytest.mark.parametrize("count", [figures.NAMED_FRONTS, figures.NAMED_FRONTS + 1])
def test_up_to_four_runs_name_each_front_and_more_share_one_legend_entry(tmp_path, count):
    """Up to NAMED_FRONTS runs, each line carries its run's label and each front its own legend
    entry; beyond, the lines carry the short names and one entry stands for every front."""
    store = tmp_path / "r.jsonl"
    for index in range(count):
        write_store(
            store, run_id=f"r{index}", shift_all=-0.05 * index, label=f"m{index} [ubench]: base + specialist"
        )
    runs = sorted(load_runs(store), key=lambda r: r.run_id)
    ax = figures.pareto(runs, [summarise(r, TARGET) for r in runs]).axes[0]
    lines = [line.get_label() for line in ax.get_lines()]
    fronts = [collection.get_label() for collection in ax.collections]
    if count <= figures.NAMED_FRONTS:
        assert lines == [run.label for run in runs]
        assert fronts == [f"Pareto front (m{i})" for i in range(count)], (
            "named by what their labels do not share"
        )
    else:
        assert lines == [f"m{i}" for i in range(count)]
        assert fronts == ["Pareto front of each run (hollow circles)"] + ["_front"] * (count - 1)


def test_models_by_group_draws_each_models_level_and_domain_means_side_by_side():
    """One bar per model for each level and domain group (other groups stay in the table), its
    height the table's value in percent, the models' bars side by side around the group's tick;
    a model not evaluated on a group has no bar there (NaN), not a bar at zero."""
    groups = pd.DataFrame(
        {
            "group": ["level:coarse", "level:fine", "domain:biology", "domain:pathology", "scale:tissue"],
            "base": [50.0, 60.0, 70.0, 40.0, 55.0],
            "specialist": [45.0, 80.0, np.nan, 80.0, 65.0],
        }
    )
    ax = figures.models_by_group(groups).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(groups["group"][:4])
    assert [c.get_label() for c in ax.containers] == ["base", "specialist"]
    for container, column, offset in zip(ax.containers, ("base", "specialist"), (-0.2, 0.2), strict=True):
        heights = [patch.get_height() for patch in container.patches]
        np.testing.assert_array_equal(heights, groups[column][:4].to_numpy())
        centres = [patch.get_x() + patch.get_width() / 2 for patch in container.patches]
        np.testing.assert_allclose(centres, np.arange(4) + offset)
        assert all(patch.get_width() == pytest.approx(0.4) for patch in container.patches)
    assert ax.get_ylim() == (0, 100)


def test_every_model_of_a_bar_chart_of_many_has_its_own_look():
    """Past ten models the colours came back, so model 11's bars looked like model 1's; a colour
    that comes back now has a hatch."""
    models = {f"m{i}": [50.0 + i, 40.0] for i in range(14)}
    groups = pd.DataFrame({"group": ["level:coarse", "domain:pathology"], **models})
    ax = figures.models_by_group(groups).axes[0]
    looks = [(tuple(c.patches[0].get_facecolor()), c.patches[0].get_hatch()) for c in ax.containers]
    assert len(set(looks)) == 14
    assert looks[10][0] == looks[0][0] and looks[10][1] != looks[0][1]


def test_a_heatmap_cell_that_rounds_to_zero_reads_0_not_minus_0(tmp_path):
    """-0.4 points is drawn as "0" (its colour still shows the sign): "-0" in a grid of whole points
    read as a defect on the demo's heat maps, next to 0 at alpha 0."""
    values = {
        ("modality", "coarse", "all"): (0.900, 0.896, 0.880),  # -0.4 and -2 points against the base
        ("path-a", "fine", "pathology"): (0.50, 0.80, 0.90),
        ("bio-a", "fine", "biology"): (0.80, 0.75, 0.40),
    }
    run, _ = _run(tmp_path, values_by_task=values)
    texts = [text.get_text() for text in figures.heatmap(run).axes[0].texts]
    assert "-0" not in texts and texts[:3] == ["0", "0", "-2"]


def _clear_of_the_title(figure) -> float:
    """Pixels between the suptitle's lowest point and the highest panel title or frame (negative:
    they overlap)."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    title = figure._suptitle.get_window_extent(renderer)
    panels = [ax for ax in figure.axes if ax.axison]
    tops = [ax.title.get_window_extent(renderer).y1 for ax in panels] + [ax.bbox.y1 for ax in panels]
    return title.y0 - max(tops)


def test_the_title_of_a_figure_of_many_panels_stays_above_them(tmp_path):
    """27 tasks (the real μ-Bench's coarse and fine) are seven rows of panels: tight_layout kept no
    room for the suptitle, which lay on the first row's titles (seen on a report; here 3.6 and 5.4
    pixels into them for the two grids). The set's accuracy figure, one row under a two-line title,
    was clear before and must stay so."""
    from micromerge.analysis.sets import comparison_sets

    values = {("modality", "coarse", "all"): (0.9, 0.85, 0.6)}
    for index in range(26):
        domain = "pathology" if index % 2 else "biology"
        values[(f"source_et_al_20{index:02d}_epifluorescence", "fine", domain)] = (0.5, 0.6, 0.7)
    store = write_store(tmp_path / "r.jsonl", values_by_task=values, label="wise-ft: a base + a specialist")
    write_store(store, run_id="r2", method="ties", values_by_task=values, label="ties: a base + a specialist")
    runs = load_runs(store)
    (comparison,) = comparison_sets(runs, [summarise(run, TARGET) for run in runs])
    drawn = {
        "per-task grid": figures.per_task_grid(runs[0]),
        "a set's per-task grid": figures.set_per_task(comparison),
        "a set's accuracy (two title lines)": figures.set_accuracy_vs_alpha(comparison),
    }
    for name, figure in drawn.items():
        assert _clear_of_the_title(figure) > 0, name
    assert sum(ax.axison for ax in drawn["per-task grid"].axes) == 27
