"""The numbers `micromerge report` prints, checked against values computed by hand from the store
`tests.test_analysis.write_store` writes (accuracy per task at alpha 0 / 0.5 / 1: modality
0.90/0.85/0.60 coarse; path-a 0.50/0.80/0.90 pathology; bio-a 0.80/0.75/0.40 biology; the
'report' half 1 point lower), and what the report says about the runs it could not summarise
in full: no controls, no domain in the manifest, alpha rules, missing learned coefficients."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import pytest

from micromerge.analysis.report import build_report, paper_headline_table, select_runs
from micromerge.analysis.tables import load_runs
from micromerge.core.errors import MicromergeError
from micromerge.eval.store import ResultStore
from tests.test_analysis import write_store

# select half +0.2 at alpha 1: the mean-accuracy and harmonic criteria choose 1, worst-group 0.5
SELECT_SHIFT = {1.0: 0.2}


def _table(out: Path, name: str) -> list[dict]:
    return json.loads((out / "tables" / f"{name}.json").read_text())


def _rewrite(store: Path, **changes) -> Path:
    """The same rows with some fields replaced (what another command or version would have written)."""
    rows = [{**json.loads(line), **changes} for line in store.read_text().splitlines()]
    store.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return store


def test_the_headline_and_criteria_tables_equal_hand_computed_values(tmp_path):
    """Base/fine-tuned target = path-a at alpha 0/1; forgetting = bio-a 0.80 - 0.40; the select half's
    all-task means are 0.733, 0.800, 0.833 (shifted), so alpha 1 is chosen and reported on the report
    half: (0.60 + 0.90 + 0.40) / 3 - 0.01 = 0.623; worst group picks 0.5 (0.79 there); the AUC of
    the all-task curve 0.733, 0.800, 0.633 over [0, 1] is 0.742."""
    store = write_store(tmp_path / "r.jsonl", select_shift=SELECT_SHIFT)
    out = tmp_path / "rep"
    build_report(store, out, target="domain:pathology")
    assert _table(out, "headline") == [
        {
            "run": "wise-ft: base + ft",
            "target": "domain:pathology",
            "base: target": "50.0",
            "fine-tuned: target": "90.0",
            "gain (pts)": "40.0",
            "forgetting on controls (pts)": "40.0",
            "chosen α (select half)": "1",
            "all-task mean at chosen α (report half)": "62.3",
            "AUC all tasks": "74.2",
        }
    ]
    criteria = {row["criterion"]: row for row in _table(out, "alpha_selection")}
    assert {text: (row["α chosen on select half"], row["all-task mean on report half (%)"]) for text, row in criteria.items()} == {
        "highest mean accuracy over all tasks": ("1", "62.3"),
        "highest accuracy of the worst group (coarse, fine, each domain)": ("0.5", "79.0"),
        "highest harmonic mean of target and control accuracy": ("1", "62.3"),
    }  # fmt: skip
    markdown = (out / "report.md").read_text()
    assert (
        "changed the target (domain:pathology) by 40.0 points and the controls (domain:biology) by "
        "-40.0 points; α=1, chosen on the select half, gives 62.3% mean accuracy on the report half."
    ) in markdown
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["results_store_sha256"] == hashlib.sha256(store.read_bytes()).hexdigest()
    # the settings its numbers depend on: another --target or --metric is another report
    assert (provenance["target"], provenance["metric"], provenance["run_figures"]) == (
        "domain:pathology",
        "accuracy",
        True,
    )
    assert [run["target"] for run in provenance["runs"]] == ["domain:pathology"]
    build_report(store, tmp_path / "by-default", metric="balanced_accuracy", run_figures=False)
    default = json.loads((tmp_path / "by-default" / "provenance.json").read_text())
    assert (
        default["target"].startswith("each run's fine-tuning domain")
        and default["metric"] == "balanced_accuracy"
    )
    # no manifest names a domain here: the run's target is its first fine domain, and says so
    assert default["run_figures"] is False and default["runs"][0]["target"] == "domain:biology"


def test_group_means_are_percent_per_alpha(tmp_path):
    build_report(write_store(tmp_path / "r.jsonl"), tmp_path / "rep", target="domain:pathology")
    by_alpha = {row.pop("alpha"): row for row in _table(tmp_path / "rep", "groups_run0")}
    assert by_alpha[0.0] == pytest.approx(
        {"domain:pathology": 50.0, "domain:biology": 80.0, "level:coarse": 90.0, "level:fine": 65.0, "all tasks": 73.3}
    )  # fmt: skip
    assert by_alpha[1.0]["domain:biology"] == pytest.approx(40.0)


def test_a_target_without_controls_reports_no_forgetting_number(tmp_path):
    """`level:coarse` has no control groups, so forgetting is undefined: 'n/a', never 'nan'."""
    build_report(write_store(tmp_path / "r.jsonl"), tmp_path / "rep", target="level:coarse")
    (row,) = _table(tmp_path / "rep", "headline")
    assert row["forgetting on controls (pts)"] == "n/a" and row["gain (pts)"] == "-30.0"
    assert (
        "by -30.0 points (no control group among its tasks)" in (tmp_path / "rep" / "report.md").read_text()
    )


def test_without_a_recorded_domain_the_target_is_the_first_fine_domain_and_the_report_says_so(tmp_path):
    build_report(write_store(tmp_path / "r.jsonl"), tmp_path / "rep")
    (row,) = _table(tmp_path / "rep", "headline")
    assert row["target"] == "domain:biology"
    note = "no fine-tuning domain recorded in the checkpoint manifest; target defaults to domain:biology (set --target)"
    assert note in (tmp_path / "rep" / "report.md").read_text()
    assert note in (tmp_path / "rep" / "report.html").read_text()


def _store_of_a_specialist_fine_tuned_on(tmp_path: Path, domain: str) -> Path:
    """A store whose specialist's manifest records `domain` (as `finetune --domain` writes it)."""
    (tmp_path / "ft.safetensors").write_bytes(b"the specialist")
    (tmp_path / "ft.safetensors.manifest.json").write_text(
        json.dumps({"domain": domain, "micromerge_version": "0.1"})
    )
    return _rewrite(write_store(tmp_path / "r.jsonl"), model={"base": "b", "finetuned": ["ft.safetensors"]})


def test_a_recorded_domain_that_is_no_domain_of_the_benchmark_is_a_note_not_a_target_error(tmp_path):
    """`finetune --domain histopathology` (μ-Bench says pathology): the report refused with
    "--target domain:histopathology: not a group", naming a flag the user never typed."""
    store = _store_of_a_specialist_fine_tuned_on(tmp_path, "histopathology")
    build_report(store, tmp_path / "rep")
    (row,) = _table(tmp_path / "rep", "headline")
    assert row["target"] == "domain:biology"
    note = (
        "the recorded fine-tuning domain 'histopathology' is no domain of this benchmark; target "
        "defaults to domain:biology (set --target)"
    )
    assert note in (tmp_path / "rep" / "report.md").read_text()
    with pytest.raises(MicromergeError, match=r"^--target domain:histopathology: not a group"):
        build_report(store, tmp_path / "typed", target="domain:histopathology")


def test_alpha_endpoints_under_rules_are_said_not_to_be_the_real_models(tmp_path):
    """With per-block alpha rules, alpha 0 and 1 are not the base and the specialist."""
    store = _rewrite(write_store(tmp_path / "r.jsonl"), parameters={"alpha_rules": [["visual.*", 0.3]]})
    build_report(store, tmp_path / "rep", target="domain:pathology")
    assert (
        "which under its include/exclude/alpha rules are NOT the real models"
        in (tmp_path / "rep" / "report.md").read_text()
    )
    plain = tmp_path / "plain"
    build_report(write_store(tmp_path / "p.jsonl"), plain, target="domain:pathology")
    markdown = (plain / "report.md").read_text()
    assert "lowest and highest α" in markdown and "NOT the real models" not in markdown


def test_missing_learned_coefficients_are_a_note_not_a_failure(tmp_path):
    described = {"coefficients_sha256": "ab" * 32, "method": "adamerging"}
    store = _rewrite(write_store(tmp_path / "r.jsonl"), parameters={"statistics": [described]})
    build_report(store, tmp_path / "rep", target="domain:pathology")
    expected = tmp_path / "r.jsonl.coefficients" / ("ab" * 8 + ".json")
    assert f"learned coefficients not found at {expected}" in (tmp_path / "rep" / "report.md").read_text()
    # a file there of another table (overwritten, edited), or of bytes that are not text: no figure of
    # a table the run never used, and no UnicodeDecodeError traceback
    expected.parent.mkdir()
    for content in (
        json.dumps({"table": {"groups": ["g"], "values": [[1.0]]}, "described": {}}).encode(),
        b"\xff\xfe",
    ):
        expected.write_bytes(content)
        build_report(store, tmp_path / "rep", target="domain:pathology")
        markdown = (tmp_path / "rep" / "report.md").read_text()
        assert "is not the table this run used" in markdown or "learned coefficients not found" in markdown
        assert not (tmp_path / "rep" / "figures" / "coefficients_run0.png").exists()


def test_a_store_of_neither_sweeps_nor_evaluations_is_one_line_that_says_what_to_run(tmp_path):
    """A store of evaluations only is reported (tests/test_evaluated_models.py); one whose runs have
    no alpha and are no evaluation has nothing to report."""
    store = _rewrite(write_store(tmp_path / "r.jsonl", alphas=(0.0,)), alpha=None, method="greedy-soup")
    with pytest.raises(
        MicromergeError, match="no sweep and no evaluation runs; run `micromerge sweep` or `eval`"
    ):
        build_report(store, tmp_path / "rep")


def test_a_folder_given_as_the_store_names_the_stores_in_it(tmp_path):
    """`report demo-out/results` said "results store not found (run sweep first)" of a folder
    holding the store."""
    write_store(tmp_path / "results" / "results.jsonl")
    with pytest.raises(MicromergeError, match=r"results: is a folder; pass .* in it: results.jsonl$"):
        build_report(tmp_path / "results", tmp_path / "rep")
    for name in ("d", "b", "c", "a"):  # several: the first three by name, whatever the folder's order
        (tmp_path / "results" / f"{name}.jsonl").write_text("")
    with pytest.raises(MicromergeError, match=r"in it: a.jsonl, b.jsonl, c.jsonl$"):
        build_report(tmp_path / "results", tmp_path / "rep")


def test_a_ubench_run_without_headline_rows_is_not_called_no_ubench_run(tmp_path):
    """Tasks holding no image of the paper's sources give a ubench run no headline rows; the report
    said "(no ubench-protocol run)" beside that very run."""
    build_report(_rewrite(write_store(tmp_path / "r.jsonl"), protocol="ubench"), tmp_path / "rep")
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "[ubench]" in text and "no ubench-protocol run)" not in text
    assert "(no headline rows: no run here is of the ubench protocol, or its tasks hold no images" in text


def test_run_labels_are_escaped_in_the_html(tmp_path):
    store = write_store(tmp_path / "r.jsonl", label="ties <k=0.2> & dare")
    page = build_report(store, tmp_path / "rep", target="domain:pathology").read_text()
    assert "<li><b>ties &lt;k=0.2&gt; &amp; dare</b>" in page and "<k=0.2>" not in page


def test_the_html_page_draws_the_markdown_pages_code_and_emphasis_instead_of_showing_the_marks(tmp_path):
    """The sentences both pages share are written in Markdown; the HTML page showed their backticks
    and asterisks as typed (seen in a browser on the demo's report). A run label's own `<`, `&`
    and spaced asterisks stay text."""
    store = write_store(tmp_path / "r.jsonl", label="a * b <c> visual.*=1, text.*")
    page = build_report(store, tmp_path / "rep", target="domain:pathology").read_text()
    prose = page.split("<pre>")[0]
    assert "<code>classification_1</code>" in prose and "(<em>select</em>," in prose
    assert "; <code>micromerge eval</code> of the base" in prose, "a note's code span"
    assert "`" not in prose and "*select*" not in prose
    assert "<li><b>a * b &lt;c&gt; visual.*=1, text.*</b>" in prose
    assert "<li>a * b &lt;c&gt; visual.*=1, text.*: " in prose, "the label in a note, as typed"
    assert prose.count("<em>") == 2, "select and report, nothing of the label"
    assert "(*select*," in (tmp_path / "rep" / "report.md").read_text(), "the Markdown page keeps its marks"
    assert page.count("<details>") == 1 and "</pre></details>" in page, "the provenance, folded"


def _add_paper_headline(store: Path) -> Path:
    """ubench headline rows as `eval`/`sweep` write them (level 'headline', one per split): coarse
    0.70/0.60 and fine 0.40/0.55 at alpha 0/1 on the whole benchmark, other numbers on the halves."""
    rows = []
    for alpha, coarse, fine in ((0.0, 0.70, 0.40), (1.0, 0.60, 0.55)):
        for split, shift in (("all", 0.0), ("select", 0.2), ("report", -0.2)):
            for task, key, value in (
                ("ubench:coarse", "coarse keys pooled", coarse),
                ("ubench:fine", "classification_1", fine),
            ):
                v = value + shift
                rows.append(
                    {"run_id": "r1", "alpha": alpha, "task": task, "level": "headline", "split": split,
                     "metric": "accuracy", "caption_key": key, "groups": {"level": "headline"}, "value": v,
                     "ci_low": v - 0.03, "ci_high": v + 0.04, "n_images": 100, "n_corrupt": 0, "n_classes": 0,
                     "method": "wise-ft", "parameters": {}, "protocol": "ubench",
                     "model": {"base": "base.safetensors", "finetuned": ["ft.safetensors"]},
                     "dataset": {"source": "fixture", "fingerprint": "abc"}}
                )  # fmt: skip
    ResultStore(store).append(rows)
    return store


def test_the_paper_headline_is_the_whole_benchmark_coarse_and_fine_with_their_intervals(tmp_path):
    store = _add_paper_headline(
        _rewrite(write_store(tmp_path / "r.jsonl", alphas=(0.0, 1.0)), protocol="ubench")
    )
    page = build_report(store, tmp_path / "rep", target="domain:pathology").read_text()
    assert "<td>[67.0, 74.0]</td>" in page and not re.search(r"<tr>\s*<th>\d+</th>", page)
    assert _table(tmp_path / "rep", "paper_headline") == [
        {"run": "wise-ft [ubench]: base + ft", "protocol": "ubench", "alpha": 0.0, "coarse %": 70.0,
         "coarse 95% CI": "[67.0, 74.0]", "fine %": 40.0, "fine 95% CI": "[37.0, 44.0]"},
        {"run": "wise-ft [ubench]: base + ft", "protocol": "ubench", "alpha": 1.0, "coarse %": 60.0,
         "coarse 95% CI": "[57.0, 64.0]", "fine %": 55.0, "fine 95% CI": "[52.0, 59.0]"},
    ]  # fmt: skip


def test_runs_matching_nothing_lists_five_labels_and_counts_only_those_beyond(tmp_path):
    store = tmp_path / "r.jsonl"
    for n in range(6):
        write_store(store, run_id=f"r{n}", label=f"run {n}")
        runs = load_runs(store)
        with pytest.raises(MicromergeError) as refused:
            select_runs(runs, ("nothing*",), store)
        listed = str(refused.value).split("its labels: ")[1]
        assert listed.startswith("; ".join(f"run {i}" for i in range(min(n + 1, 5))))
        assert listed.endswith(" (and 1 more)") if n == 5 else "more" not in listed, listed


def test_each_tables_csv_holds_the_columns_of_its_json_and_sets_are_explained_only_with_sets(tmp_path):
    """tables/NAME.csv and NAME.json are one table (no index column in the CSV); a report of one run
    has no comparison sets, so it does not explain them."""
    from micromerge.analysis.report_page import NO_HEADLINE, SETS_TEXT

    page = build_report(
        write_store(tmp_path / "r.jsonl"), tmp_path / "rep", target="domain:pathology"
    ).read_text()
    assert "<table" in page and not re.search(r"<tr>\s*<th>\d+</th>", page), "no index column in the page"
    assert f"<p>({NO_HEADLINE})</p>" in page, "no paper headline rows: said, not an empty table"
    names = sorted(p.stem for p in (tmp_path / "rep" / "tables").glob("*.json"))
    assert "headline" in names and names == sorted(
        p.stem for p in (tmp_path / "rep" / "tables").glob("*.csv")
    )
    for name in filter(lambda name: _table(tmp_path / "rep", name), names):  # tables with rows
        records = _table(tmp_path / "rep", name)
        with open(tmp_path / "rep" / "tables" / f"{name}.csv", newline="") as handle:
            header = next(csv.reader(handle))
        assert sorted(header) == sorted(records[0]), name  # the JSON's keys are written sorted
    assert SETS_TEXT not in (tmp_path / "rep" / "report.md").read_text()


def test_every_markdown_table_row_has_as_many_cells_as_its_header(tmp_path):
    """report.md's tables are GitHub markdown: a row with a cell more than its header (the frame's
    index written as a cell) would shift every value under the wrong column."""
    build_report(write_store(tmp_path / "r.jsonl"), tmp_path / "rep", target="domain:pathology")
    tables = re.findall(r"(?:^\|.*\|\n)+", (tmp_path / "rep" / "report.md").read_text(), flags=re.M)
    assert len(tables) >= 3
    for table in tables:
        header, rule, *rows = table.splitlines()
        assert rule == "|" + "---|" * header.count(" | ") + "---|" and rows
        assert all(row.count(" | ") == header.count(" | ") for row in rows), table


def test_a_run_without_headline_rows_before_one_with_them_leaves_the_paper_headline_whole(tmp_path):
    """A report of several runs (an ablation: a synthetic-benchmark run beside a ubench one) lists
    every headline row of the runs that have them, whatever comes before."""
    without = load_runs(write_store(tmp_path / "a.jsonl", alphas=(0.0, 1.0)))
    with_rows = load_runs(
        _add_paper_headline(_rewrite(write_store(tmp_path / "b.jsonl", alphas=(0.0, 1.0)), protocol="ubench"))
    )
    table = paper_headline_table(without + with_rows)
    assert table["alpha"].tolist() == [0.0, 1.0] and table["fine %"].tolist() == [40.0, 55.0]


def test_the_paper_headline_is_a_percentage_to_one_decimal_and_explained(tmp_path):
    store = _add_paper_headline(
        _rewrite(write_store(tmp_path / "r.jsonl", alphas=(0.0, 1.0)), protocol="ubench")
    )
    rows = [json.loads(line) for line in store.read_text().splitlines()]
    for row in rows:
        row["value"] += 0.00346 if row["level"] == "headline" else 0.0
    store.write_text("".join(json.dumps(row) + "\n" for row in rows))
    build_report(store, tmp_path / "rep", target="domain:pathology")
    first = _table(tmp_path / "rep", "paper_headline")[0]
    assert (first["coarse %"], first["fine %"]) == (70.3, 40.3)
    markdown = (tmp_path / "rep" / "report.md").read_text()
    assert (
        "Coarse: every coarse caption key pooled over all images; fine: `classification_1` pooled" in markdown
    )


def test_the_per_task_table_is_of_the_metric_asked_for(tmp_path):
    """`--metric macro_f1`: the tasks table holds macro F1 (here half of each accuracy), not accuracy."""
    store = write_store(tmp_path / "r.jsonl")
    rows = [json.loads(line) for line in store.read_text().splitlines()]
    for row in rows:
        row["value"] *= 0.5 if row["metric"] == "macro_f1" else 1.0
    store.write_text("".join(json.dumps(row) + "\n" for row in rows))
    build_report(store, tmp_path / "acc", target="domain:pathology")
    build_report(store, tmp_path / "f1", target="domain:pathology", metric="macro_f1")
    accuracy, f1 = _table(tmp_path / "acc", "tasks_run0"), _table(tmp_path / "f1", "tasks_run0")
    assert [r["value"] * 0.5 for r in accuracy] == pytest.approx([r["value"] for r in f1])
    provenance = json.loads((tmp_path / "f1" / "provenance.json").read_text())
    assert (provenance["metric"], provenance["runs_selected"], provenance["baseline"]) == (
        "macro_f1",
        "all",
        None,
    )


def test_a_coefficients_file_without_its_record_draws_no_figure(tmp_path):
    """The run's table, but not the file a learned merge writes (its `described` is missing): the
    figure's title and axes come from that record, so a note, not a figure or a KeyError."""
    table = {"groups": ["g"], "values": [[1.0]]}
    described = {"coefficients_sha256": hashlib.sha256(b"x").hexdigest(), "method": "adamerging"}
    from micromerge.core.hashing import sha256_json

    described["coefficients_sha256"] = sha256_json(table)
    store = _rewrite(write_store(tmp_path / "r.jsonl"), parameters={"statistics": [described]})
    path = tmp_path / "r.jsonl.coefficients" / (described["coefficients_sha256"][:16] + ".json")
    path.parent.mkdir()
    path.write_text(json.dumps({"table": table}))
    build_report(store, tmp_path / "rep", target="domain:pathology")
    assert "is not the table this run used" in (tmp_path / "rep" / "report.md").read_text()
    assert not (tmp_path / "rep" / "figures" / "coefficients_run0.png").exists()


def test_an_unknown_target_names_the_flag_and_the_valid_groups(tmp_path):
    """The error a user of `report --target` reads names the flag, not an internal 'group'."""
    with pytest.raises(
        MicromergeError, match=r"^--target domain:virology: not a group of run .*'domain:biology'"
    ):
        build_report(write_store(tmp_path / "r.jsonl"), tmp_path / "rep", target="domain:virology")
    for typed in ("pathology", "domain:Pathology", "domian:pathology"):  # the group meant is named
        with pytest.raises(MicromergeError, match=r"\(did you mean domain:pathology\?\); valid groups"):
            build_report(tmp_path / "r.jsonl", tmp_path / "rep", target=typed)


def test_the_recorded_fine_tuning_domain_is_the_target_unless_target_is_given(tmp_path):
    """The specialist's manifest names its domain; `--target` still wins over it."""
    store = _store_of_a_specialist_fine_tuned_on(tmp_path, "pathology")
    build_report(store, tmp_path / "rep")
    (row,) = _table(tmp_path / "rep", "headline")
    assert row["target"] == "domain:pathology" and row["gain (pts)"] == "40.0"
    assert "no fine-tuning domain recorded" not in (tmp_path / "rep" / "report.md").read_text()
    build_report(store, tmp_path / "given", target="domain:biology")
    (row,) = _table(tmp_path / "given", "headline")
    assert row["target"] == "domain:biology" and row["gain (pts)"] == "-40.0"


@pytest.mark.parametrize("rule", ["alpha_rules", "include", "exclude"])
def test_each_kind_of_rule_makes_the_endpoints_not_the_real_models(tmp_path, rule):
    store = _rewrite(
        write_store(tmp_path / "r.jsonl"),
        parameters={rule: [["visual.*", 0.3]] if rule == "alpha_rules" else ["visual.*"]},
    )
    build_report(store, tmp_path / "rep", target="domain:pathology")
    assert "NOT the real models" in (tmp_path / "rep" / "report.md").read_text()


def test_the_pareto_table_is_each_alpha_s_target_and_control_accuracy(tmp_path):
    """Pathology (path-a) 0.50/0.80/0.90 and biology (bio-a) 0.80/0.75/0.40 at alpha 0/0.5/1: no
    point dominates another, so all three are on the front."""
    build_report(write_store(tmp_path / "r.jsonl"), tmp_path / "rep", target="domain:pathology")
    assert _table(tmp_path / "rep", "pareto_run0") == [
        {"alpha": 0.0, "target": 0.5, "control": 0.8},
        {"alpha": 0.5, "target": 0.8, "control": 0.75},
        {"alpha": 1.0, "target": 0.9, "control": 0.4},
    ]


def test_a_run_without_bootstrap_reports_no_interval(tmp_path):
    """With --bootstrap 0 a row's ci_low and ci_high are its point value: no interval to print."""
    store = _rewrite(
        _add_paper_headline(
            _rewrite(write_store(tmp_path / "r.jsonl", alphas=(0.0, 1.0)), protocol="ubench")
        ),
        bootstrap=0,
    )
    build_report(store, tmp_path / "rep", target="domain:pathology")
    rows = _table(tmp_path / "rep", "paper_headline")
    assert (
        {row["coarse 95% CI"] for row in rows}
        == {row["fine 95% CI"] for row in rows}
        == {"n/a (--bootstrap 0)"}
    )


def test_a_summary_filters_each_split_once_and_computes_each_curve_once(tmp_path, monkeypatch):
    """A summary asks for about forty curves, half of them twice; each is now computed once from one
    filtered table per split (13.5 s -> 6.6 s for 198 summaries of the 192-run grid store, the same
    numbers: BENCHMARKS.md "Reports at the paper grid's size"). The numbers themselves are the
    hand-computed ones of the tests above."""
    from micromerge.analysis import metrics

    run = load_runs(write_store(tmp_path / "r.jsonl", select_shift=SELECT_SHIFT))[0]
    expected = metrics.summarise(run, "domain:pathology")
    calls: list[tuple[int, str | None]] = []
    group_curve = metrics._group_curve
    monkeypatch.setattr(
        metrics,
        "_group_curve",
        lambda table, group: calls.append((id(table), group)) or group_curve(table, group),
    )
    assert metrics.summarise(run, "domain:pathology") == expected
    assert len(calls) == len(set(calls)), "a curve computed twice"
    assert len({table for table, _ in calls}) == 3, "one filtered table per split (all, select, report)"


def _evaluation(
    path: Path, name: str, digest: str, alpha: float, tasks: dict | None = None, **fields
) -> list[dict]:
    """`micromerge eval` rows of one model: write_store's rows at `alpha` on its tasks (or `tasks`),
    alpha null, macro F1 half the accuracy (so a reference tells itself from the sweep's own end)."""
    model = {"base": f"{name}.safetensors", "finetuned": [], "base_sha256": [digest]}
    written = write_store(path, alphas=(alpha,), run_id=f"eval-{name}-{fields.get('protocol')}",
                          method="none", values_by_task=tasks, fields={"model": model, **fields})  # fmt: skip
    rows = [{**json.loads(line), "alpha": None} for line in written.read_text().splitlines()]
    return [{**r, "value": r["value"] / 2} if r["metric"] == "macro_f1" else r for r in rows]


def _ubench_and_closed_set_store(path: Path) -> Path:
    """The demo's store in small: a sweep and the evaluations of its two models under each protocol,
    matched by sha256. The ubench protocol writes no macro_f1 (eval.metrics.correctness_metrics: each
    image answers its own options, so there is no confusion matrix); the closed-set one does."""
    model = {"base": "base.safetensors", "finetuned": ["ft.safetensors"], "base_sha256": ["aa"],
             "finetuned_sha256": ["bb"]}  # fmt: skip
    for protocol in ("ubench", "closed-set"):
        sweep = write_store(path.with_suffix(f".{protocol}"), run_id=f"sweep-{protocol}",
                            fields={"protocol": protocol, "model": model})  # fmt: skip
        rows = [json.loads(line) for line in sweep.read_text().splitlines()]
        for name, digest, alpha in (("base", "aa", 0.0), ("specialist", "bb", 1.0)):
            rows += _evaluation(
                path.with_suffix(f".{name}.{protocol}"), name, digest, alpha, protocol=protocol
            )
        ResultStore(path).append([r for r in rows if protocol == "closed-set" or r["metric"] != "macro_f1"])
    return path


def test_macro_f1_reports_the_runs_that_have_it_and_names_the_ubench_runs_left_out(tmp_path):
    """`report --metric macro_f1` of the demo's store stopped on a pandas IndexError (the ubench
    sweep's reference evaluations have no macro_f1). Now the closed-set sweep and models are
    reported, the ubench ones named as left out, and every sentence, criterion and table heading
    says macro F1 where it said accuracy beside macro-F1 numbers."""
    store = _ubench_and_closed_set_store(tmp_path / "r.jsonl")
    build_report(store, tmp_path / "rep", target="domain:pathology", metric="macro_f1")
    assert [row["run"] for row in _table(tmp_path / "rep", "headline")] == ["wise-ft [closed-set]: base + ft"]
    assert [row["model"] for row in _table(tmp_path / "rep", "models")] == [
        "base [closed-set]",
        "specialist [closed-set]",
    ]
    markdown = (tmp_path / "rep" / "report.md").read_text()
    assert (
        "left out, as they have no macro_f1: 1 sweep(s) (wise-ft [ubench]: base + ft) and 2 evaluated "
        "model(s) (base [ubench]; specialist [ubench]) (the ubench protocol has none" in markdown
    )
    # the base's own evaluation, in macro F1: path-a 0.50 at alpha 0, halved in the evaluation
    assert _table(tmp_path / "rep", "headline")[0]["base: target"] == "25.0"
    assert "% mean macro F1 on the report half" in markdown and "Group means (macro F1 %)" in markdown
    assert [row["criterion"] for row in _table(tmp_path / "rep", "alpha_selection")][0] == (
        "highest mean macro F1 over all tasks"
    )
    assert "all tasks (macro F1 %)" in markdown and "mean accuracy" not in markdown

    build_report(store, tmp_path / "acc", target="domain:pathology")
    assert "left out" not in (tmp_path / "acc" / "report.md").read_text(), "accuracy: every run has it"
    with pytest.raises(
        MicromergeError, match=r"matches no evaluated model of .* with macro_f1; its evaluated"
    ):
        build_report(store, tmp_path / "f1", metric="macro_f1", baseline="base [[]ubench]")


def test_macro_f1_of_ubench_runs_only_is_one_line_naming_the_metrics_they_have(tmp_path):
    """A store of ubench runs, or `--runs` picking the ubench sweep of a store of both protocols
    (that one said "matches no run label", as if the sweep were not there; showing the closed-set
    evaluations of its models alone would have been a report of models nobody asked for)."""
    from click.testing import CliRunner

    from micromerge.cli import cli

    both = _ubench_and_closed_set_store(tmp_path / "both.jsonl")
    store = tmp_path / "r.jsonl"
    rows = [json.loads(line) for line in both.read_text().splitlines()]
    store.write_text("".join(json.dumps(r) + "\n" for r in rows if r["protocol"] == "ubench"))
    models = tmp_path / "models.jsonl"  # `eval` runs only: the report of the models side by side
    models.write_text(
        "".join(json.dumps(r) + "\n" for r in rows if r["protocol"] == "ubench" and r["method"] == "none")
    )
    for source, flags, kind in (
        (store, [], "sweep"),
        (both, ["--runs", "wise-ft [[]ubench]*"], "sweep"),
        (models, [], "evaluation"),
    ):
        with pytest.raises(
            MicromergeError, match=rf"--metric macro_f1: no {kind} reported from .* has it \(the ubench"
        ):
            build_report(source, tmp_path / "rep", metric="macro_f1", selected=tuple(flags[1:]))
        result = CliRunner().invoke(
            cli, ["report", str(source), "--out", str(tmp_path / "rep"), "--metric", "macro_f1", *flags]
        )
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        assert result.output.endswith("they have accuracy, balanced_accuracy\n")
        assert not (tmp_path / "rep").exists()


def _sweep_with_evaluations(
    path: Path, base_tasks: dict | None = None, specialist_tasks: dict | None = None
) -> Path:
    """A sweep of base `aa` and specialist `bb` on VALUES' three tasks, and an `eval` of each: the
    sweep's α end on the sweep's tasks, or on the tasks given."""
    model = {"base": "base.safetensors", "finetuned": ["ft.safetensors"], "base_sha256": ["aa"],
             "finetuned_sha256": ["bb"]}  # fmt: skip
    write_store(path, fields={"model": model})
    for name, digest, alpha, tasks in (
        ("base", "aa", 0.0, base_tasks),
        ("specialist", "bb", 1.0, specialist_tasks),
    ):
        ResultStore(path).append(_evaluation(path.with_suffix(f".{name}"), name, digest, alpha, tasks))
    return path


def test_an_evaluation_of_fewer_tasks_than_the_sweep_is_not_its_reference_and_the_report_says_why(tmp_path):
    """`eval --tasks domain:pathology` of the specialist, then a sweep of every task: the report
    stopped on a pandas IndexError (the controls' mean of that evaluation has no value). Now the
    sweep's α ends stand in for both models, and the note names the evaluation and the tasks it lacks."""
    from tests.test_analysis import VALUES

    pathology = {key: values for key, values in VALUES.items() if key[2] == "pathology"}
    store = _sweep_with_evaluations(tmp_path / "r.jsonl", specialist_tasks=pathology)
    build_report(store, tmp_path / "rep", target="domain:pathology", metric="macro_f1")
    headline = _table(tmp_path / "rep", "headline")[0]
    assert (headline["base: target"], headline["fine-tuned: target"]) == ("50.0", "90.0"), "α 0 and α 1"
    markdown = (tmp_path / "rep" / "report.md").read_text()
    assert (
        "makes them the real ones (on every task the sweep scored: the evaluation of specialist (run "
        "eval-specialist-None) scored 1 of the sweep's 3 tasks, not bio-a, modality)" in markdown
    )
    tasks = _table(tmp_path / "rep", "tasks_run0")
    # the base's evaluation alone (macro F1 halved there) is not taken either: α 0, as in the headline
    assert all(row["vs_base"] == 0.0 for row in tasks if row["alpha"] == 0.0)


def test_an_evaluation_of_more_tasks_than_the_sweep_is_its_reference_on_the_sweeps_tasks_only(tmp_path):
    """The base evaluated on every task, then a sweep of a few: the reference's group means took
    the tasks the sweep never scored (here a pathology task at 0.0 halved the base's target)."""
    from tests.test_analysis import VALUES

    more = {**VALUES, ("path-b", "fine", "pathology"): (0.0, 0.0, 0.0)}
    store = _sweep_with_evaluations(tmp_path / "r.jsonl", base_tasks=more)
    build_report(store, tmp_path / "rep", target="domain:pathology", metric="macro_f1")
    headline = _table(tmp_path / "rep", "headline")[0]
    # path-a's macro F1 in the evaluations (halved): 0.50 / 2 for the base, 0.90 / 2 for the specialist
    assert (headline["base: target"], headline["fine-tuned: target"]) == ("25.0", "45.0")
    assert "path-b" not in {row["task"] for row in _table(tmp_path / "rep", "tasks_run0")}


def test_a_soup_and_a_one_alpha_sweep_are_one_point_each_not_a_gain_of_zero(tmp_path):
    """A greedy soup (one chosen model) and `sweep --alphas 0.5` have one α: both of a run's ends
    were that point, so the report said fine-tuning changed the target by 0.0 points, listed three
    criteria each choosing the only α, and the tasks table a change of 0.0 everywhere."""
    store = write_store(tmp_path / "r.jsonl", alphas=(0.0,), run_id="soup", method="greedy-soup",
                        fields={"parameters": {"weights": [0.5, 0.5]}, "alpha": 1.0})  # fmt: skip
    write_store(store, alphas=(0.5,), run_id="one")
    headline = _add_paper_headline(tmp_path / "headline.jsonl")  # the soup's, at its candidate's α 1
    ResultStore(store).append(
        [{**row, "run_id": "soup", "method": "greedy-soup", "parameters": {"weights": [0.5, 0.5]}}
         for row in map(json.loads, headline.read_text().splitlines()) if row["alpha"] == 1.0]
    )  # fmt: skip
    with pytest.warns(UserWarning, match="a single alpha, so no curve"):
        build_report(store, tmp_path / "rep", target="domain:pathology")
    soup, one = _table(tmp_path / "rep", "headline")
    assert [
        soup[k] for k in ("base: target", "fine-tuned: target", "gain (pts)", "forgetting on controls (pts)")
    ] == ["n/a"] * 4
    assert (soup["chosen α (select half)"], one["chosen α (select half)"]) == (
        "soup (weights 0.5, 0.5)",
        "0.5 (its only α)",
    )
    assert soup["all-task mean at chosen α (report half)"] == "72.3"  # (0.90 + 0.50 + 0.80) / 3 - 0.01
    markdown = (tmp_path / "rep" / "report.md").read_text()
    assert (
        "no base or specialist numbers to compare it with (see the notes); the soup (weights 0.5, 0.5), chosen on the select half, gives 72.3% mean accuracy"
        in markdown
    )
    assert "its one α (0.5) gives" in markdown
    assert (
        "(every run here is one point: no α to choose)" in markdown
        and _table(tmp_path / "rep", "alpha_selection") == []
    )
    assert "one point, so no 'base' and 'fine-tuned' numbers" in markdown
    assert all(row["vs_base"] is None for row in _table(tmp_path / "rep", "tasks_run0")), "NaN, not 0.0"
    (paper,) = _table(tmp_path / "rep", "paper_headline")
    assert (paper["alpha"], paper["coarse %"]) == (None, 60.0), "a soup's row has no α (it said 1.0)"
    assert "alpha" not in _table(tmp_path / "rep", "groups_run0")[0], "nor its group table"
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "<td>None</td>" not in page and "<td></td>" in page, "an empty cell, where the page said None"
    assert not re.search(r"\bnan\b", markdown, re.IGNORECASE)


def test_a_group_the_sweep_scored_no_task_of_has_no_column_and_no_table_shows_nan(tmp_path):
    """A sweep of the fine tasks only: its group table had a level:coarse column of NaN, and the
    pages printed "nan" (Markdown) and "NaN" (HTML) in every table cell without a value."""
    from tests.test_analysis import VALUES

    fine = {key: values for key, values in VALUES.items() if key[1] == "fine"}
    store = write_store(tmp_path / "r.jsonl", values_by_task=fine)
    page = build_report(store, tmp_path / "rep", target="domain:pathology").read_text()
    assert [row for row in _table(tmp_path / "rep", "groups_run0")][0].keys() == {
        "alpha", "domain:pathology", "domain:biology", "level:fine", "all tasks"
    }  # fmt: skip
    markdown = (tmp_path / "rep" / "report.md").read_text()
    assert not re.search(r"\bnan\b", page + markdown, re.IGNORECASE)


def test_a_target_one_sweep_of_fewer_tasks_lacks_says_so_and_how_to_leave_it_out(tmp_path):
    """A sweep of the pathology tasks beside one of every task, `--target domain:biology`: the error
    said "not a group of run … (did you mean domain:pathology?)", as if biology were a misspelling."""
    from tests.test_analysis import VALUES

    pathology = {key: values for key, values in VALUES.items() if key[2] != "biology"}
    store = write_store(tmp_path / "r.jsonl", label="every task")
    write_store(store, run_id="r2", label="pathology tasks", values_by_task=pathology)
    with pytest.raises(
        MicromergeError,
        match=r"^--target domain:biology: run pathology tasks scored no task of it \(other runs here did\); "
        r"leave it out with --runs",
    ):
        build_report(store, tmp_path / "rep", target="domain:biology")
    build_report(store, tmp_path / "rep", target="domain:biology", selected=("every task",))
    assert [row["run"] for row in _table(tmp_path / "rep", "headline")] == ["every task"]
