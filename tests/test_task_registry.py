"""The task registry (eval/tasks.py) on rows edited one fact at a time: which values count as missing,
which caption entries are scored, how options and answers are read, and how tasks are selected.

Every row starts as the fixture's (tests/ubench_fixture.py, whose facts come from
../shared/ubench/SCHEMA.md): 13 rows, one per class — kather_et_al_2016 rows 0-2, nirschl_et_al_2018
3-4, the Held et al. 2010 rows with a null `dataset` 5-7, eulenberg_et_al_2017_darkfield 8-10,
opencell 11-12 — each caption entry a struct whose `answer_idx` is a string (SCHEMA.md "`captions`":
"stored as a string here ("2")"), with four candidates and "none of the above" as options.
"""

from __future__ import annotations

import datasets
import pytest

from micromerge.core.errors import MicromergeError
from micromerge.eval.tasks import discover_tasks
from tests.ubench_fixture import fixture_features, fixture_rows

HELD_ROWS = (5, 6, 7)


def _tasks(rows: dict) -> dict:
    dataset = datasets.Dataset.from_dict(rows, features=fixture_features())
    return {task.name: task for task in discover_tasks(dataset)}


@pytest.fixture
def rows() -> dict:
    return fixture_rows(per_class=1, corrupt=0)


def test_missing_values_in_any_case_and_padding_are_no_class_and_no_source(rows):
    """'n/a', 'Unknown', ' N/A ' (as a hand-edited table writes them) are missing values: no class of a
    coarse task, and a row whose `dataset` holds one is a null-source row, named by the source table's
    rule like the Held rows' real nulls (SCHEMA.md "Facts that break naive loaders")."""
    rows["submodality"][8] = "Unknown"
    rows["submodality"][11] = " N/A "
    rows["submodality"][12] = "n/a"
    for row, marker in zip(HELD_ROWS, (" None ", "N/A", ""), strict=True):
        rows["dataset"][row] = marker
    tasks = _tasks(rows)
    submodality = tasks["submodality"]
    assert submodality.classes == (
        "brightfield microscopy",
        "darkfield microscopy",
        "epifluorescence microscopy",
    )
    assert 8 not in submodality.rows and 11 not in submodality.rows and 12 not in submodality.rows
    assert len(submodality.rows) == 10
    assert tasks["held_et_al_2010_h2b"].image_rows == HELD_ROWS
    assert not any(name.strip().lower() in ("none", "n/a", "") for name in tasks)


@pytest.mark.parametrize("answer", [None, "", "  "])
def test_a_caption_with_options_but_no_answer_is_not_scored(rows, answer):
    """Nor is it a class's caption under `--prompts captions`: the next row of that class with an
    answer gives it (a blank answer used to stop discovery with int()'s traceback there)."""
    rows["captions"][0]["modality_0"]["answer_idx"] = answer
    rows["captions"][1]["modality_0"]["answer_idx"] = answer
    modality = _tasks(rows)["modality"]
    (question,) = [q for q in modality.questions if q.key == "modality_0"]
    assert question.rows.tolist() == list(range(2, 13))
    third = rows["captions"][2]["modality_0"]
    assert modality.classes[1] == "light microscopy" == rows["modality"][2]
    assert modality.class_captions[1] == third["options"][int(third["answer_idx"])]


@pytest.mark.parametrize("answer", ["5", "-1", "17"])
def test_an_answer_outside_the_rows_options_is_one_line_naming_the_key_and_row(rows, answer):
    """Five options (0-4): '5', one past the last, is as wrong as '-1'."""
    rows["captions"][3]["stain_1"]["answer_idx"] = answer
    with pytest.raises(
        MicromergeError, match=rf"captions.stain_1: answer_idx '{answer}' of row 3 is outside its 5 options"
    ):
        _tasks(rows)


def test_the_last_option_is_an_answer_in_the_row_that_holds_the_first_text(rows):
    """Five options (0-4): '4', the last, is inside them, in the first row too, whose first option
    is the first text of the key (index 0, which a count of options must not leave out)."""
    rows["captions"][0]["modality_0"]["answer_idx"] = "4"
    (question,) = [q for q in _tasks(rows)["modality"].questions if q.key == "modality_0"]
    assert question.rows[0] == 0 and question.options[0, 0] == 0
    assert (
        question.answers[0] == 4
        and question.texts[question.options[0, 4]] == rows["captions"][0]["modality_0"]["options"][4]
    )


def test_null_source_rows_are_named_by_their_caption_template_alone(rows):
    """SCHEMA.md: the Held rows' `classification` caption template is source-specific, enough to
    tell the sources apart: rows whose polygons are gone are still named by it, not unassigned."""
    for r in HELD_ROWS:
        rows["polygon"][r] = []
    assert _tasks(rows)["held_et_al_2010_h2b"].image_rows == HELD_ROWS


def test_a_coarse_kind_of_two_classes_and_no_captions_is_a_closed_set_task(rows):
    """`subdomain` has no caption key (SCHEMA.md): with two classes it is still a task, scored
    closed-set; with one it is none (a single class cannot be told apart from anything)."""
    for count, present in ((2, True), (1, False)):
        edited = {**rows, "subdomain": [f"sub{i % count}" for i in range(len(rows["subdomain"]))]}
        tasks = _tasks(edited)
        assert ("subdomain" in tasks) is present, count
        if present:
            assert tasks["subdomain"].classes == ("sub0", "sub1") and tasks["subdomain"].questions == ()


def test_a_source_of_two_classes_without_classification_captions_is_a_closed_set_task(rows):
    """nirschl_et_al_2018 (rows 3-4) has two classes: without its classification captions it is
    still a fine-grained task, scored closed-set."""
    for row in (3, 4):
        rows["captions"][row] = {**rows["captions"][row], "classification_0": None, "classification_1": None}
    task = _tasks(rows)["nirschl_et_al_2018"]
    assert len(task.classes) == 2 and task.questions == ()


def test_a_question_asked_of_a_row_without_a_class_labels_it_unknown(rows):
    """Coarse questions are scored on every row that holds them, class or not; per-class metrics need
    the row's class, and a row whose column value is missing has none (-1), not the first class."""
    rows["submodality"][8] = "unknown"
    submodality = _tasks(rows)["submodality"]
    (question,) = [q for q in submodality.questions if q.key == "submodality_0"]
    labels = dict(zip(question.rows.tolist(), question.labels.tolist(), strict=True))
    assert labels[8] == -1 and 8 in submodality.image_rows
    assert labels[0] == submodality.classes.index("brightfield microscopy") == 0
    assert labels[11] == submodality.classes.index("epifluorescence microscopy")


def test_a_class_caption_is_the_first_rows_correct_option(rows):
    """`--prompts captions` under closed-set: one caption per class, from the first row of that class
    that has the question (rows 0, 1, 2 and 8-10 are all light microscopy)."""
    first = rows["captions"][0]["modality_0"]
    first["options"][int(first["answer_idx"])] = "A light micrograph, as the first row words it."
    modality = _tasks(rows)["modality"]
    assert modality.class_captions[modality.classes.index("light microscopy")] == (
        "A light micrograph, as the first row words it."
    )


def test_null_source_rows_are_named_by_their_annotations_class_names_in_any_case(rows):
    """The Held rules ('h2b|chromatin', eval/ubench_sources.toml) read the classification template
    and the annotations' class names, polygon or bbox ('H2B-mCherry' polygons: SCHEMA.md "Rows")."""
    for row in HELD_ROWS:
        rows["captions"][row]["classification_0"]["question"] = "A fluorescence micrograph of a HeLa cell."
    rows["bbox"][7], rows["polygon"][7] = rows["polygon"][7], []
    assert _tasks(rows)["held_et_al_2010_h2b"].image_rows == HELD_ROWS


def test_unmatched_null_source_rows_are_grouped_by_their_template(rows):
    """Rows no rule names stay apart when their templates differ: one `unassigned_<digest>` task per
    template, the digest the template's (eval/tasks.py), so the same rows get the same name in every run."""
    from micromerge.core.hashing import sha256_json

    templates = ("A HeLa cell in {class}.", "A HeLa cell in {class}.", "A nucleus imaged live in {class}.")
    for row, template in zip(HELD_ROWS, templates, strict=True):
        rows["captions"][row]["classification_0"]["question"] = template
        rows["polygon"][row] = []
    tasks = _tasks(rows)
    assert tasks[f"unassigned_{sha256_json(templates[0])[:8]}"].image_rows == (5, 6)
    assert tasks[f"unassigned_{sha256_json(templates[2])[:8]}"].image_rows == (7,)
    assert "held_et_al_2010_h2b" not in tasks


def test_a_fine_tasks_groups_and_scale_note_ignore_missing_and_outlying_values(rows):
    """A source's group is the most common value its rows hold, a missing value being none; its
    scale cross-check uses the median microns/pixel, which one mislabelled row does not move."""
    rows["subdomain"][0] = None
    rows["subdomain"][1] = "n/a"
    rows["microns_per_pixel"][1] = 40.0
    kather = _tasks(rows)["kather_et_al_2016"]
    assert kather.groups["subdomain"] == "gastrointestinal pathology"
    assert kather.notes == (), "median 0.5 µm/px lies in tissue's 0.2-5; the mean (13.7) would not"
    rows["microns_per_pixel"][0] = 40.0
    assert _tasks(rows)["kather_et_al_2016"].notes == (
        "median 40 µm/px is outside tissue's 0.2–5 (tissue because: H&E tissue tiles: the class is the tissue type)",
    )


def test_a_coarse_task_of_one_class_is_scored_by_its_questions_only(rows):
    """The fixture's only stain is H&E: closed-set cannot score one class, the stain captions can."""
    stain = _tasks(rows)["stain"]
    assert stain.classes == ("H&E",) and stain.rows == () and stain.labels == ()
    assert [q.key for q in stain.questions] == ["stain_0", "stain_1"]
    assert stain.image_rows == (0, 1, 2, 3, 4)


def test_tasks_come_coarse_first_then_fine_by_name_whatever_the_row_order(rows):
    names = list(_tasks(rows))
    assert names == [
        "modality",
        "submodality",
        "domain",
        "subdomain",
        "stain",
        "eulenberg_et_al_2017_darkfield",
        "held_et_al_2010_h2b",
        "kather_et_al_2016",
        "nirschl_et_al_2018",
        "opencell",
    ]
    reversed_rows = {column: values[::-1] for column, values in rows.items()}
    assert list(_tasks(reversed_rows)) == names


def test_a_fine_task_of_one_class_is_scored_by_its_questions_only(rows):
    """opencell's two rows relabelled to one class: nothing to tell apart under closed-set."""
    rows["label_name"][12] = rows["label_name"][11]
    opencell = _tasks(rows)["opencell"]
    assert opencell.classes == ("mitochondria",) and opencell.rows == () and opencell.labels == ()
    assert opencell.image_rows == (11, 12)


def test_the_fine_headline_holds_only_sources_of_the_papers_tables():
    """opencell is on the Hub but not in the paper (paper_tables = false, eval/ubench_sources.toml)
    and does not set fine_headline: it stays out of the fine headline all the same."""
    from micromerge.eval.source_metadata import load_source_table

    assert load_source_table().info("opencell").fine_headline
    tasks = _tasks(fixture_rows(per_class=1, corrupt=0))
    assert tasks["opencell"].groups["paper"] == "no" and tasks["opencell"].groups["fine_headline"] == "no"
    assert tasks["kather_et_al_2016"].groups["fine_headline"] == "yes"


def test_a_task_selection_reads_names_and_levels_with_spaces_after_commas(rows):
    from micromerge.eval.task_selection import select_tasks

    tasks = list(_tasks(rows).values())
    chosen = select_tasks(tasks, "stain, fine")
    assert [t.name for t in chosen] == ["stain", *[t.name for t in tasks if t.level == "fine"]]
    assert [t.name for t in select_tasks(tasks, ("modality ", " opencell"))] == ["modality", "opencell"]


@pytest.mark.parametrize("mpp", [0.2, 5.0])
def test_a_median_on_the_edge_of_its_scales_range_is_inside_it(rows, mpp):
    """tissue is 0.2-5 µm/px, both ends included (eval/ubench_sources.toml [scales])."""
    for row in (0, 1, 2):
        rows["microns_per_pixel"][row] = mpp
    assert _tasks(rows)["kather_et_al_2016"].notes == ()
