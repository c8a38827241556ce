"""`--tasks` by name, pattern and group (eval/task_selection.py), on the fixture's tasks.

The fixture (tests/ubench_fixture.py, facts from ../shared/ubench/SCHEMA.md) has the five coarse
tasks and five sources; their groups come from the rows (`domain`, `modality`, ...) and from
eval/ubench_sources.toml (taxonomy, scale, whether the source is in the paper's tables):
kather_et_al_2016 and nirschl_et_al_2018 are pathology at tissue scale; eulenberg_et_al_2017_darkfield
and held_et_al_2010_h2b biology at cellular scale; opencell is biology, subcellular, on the Hub but
not in the paper's tables, with the taxonomy `cell, organism or structure identification` (a comma
inside a value).
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from micromerge.cli import cli
from micromerge.core.errors import MicromergeError
from micromerge.eval.task_selection import select_tasks
from tests.helpers import write_checkpoint
from tests.test_task_registry import _tasks
from tests.ubench_fixture import fixture_rows, write_fixture

COARSE = ["modality", "submodality", "domain", "subdomain", "stain"]


@pytest.fixture(scope="module")
def tasks() -> list:
    return list(_tasks(fixture_rows(per_class=1, corrupt=0)).values())


def _names(tasks, wanted) -> list[str]:
    return [t.name for t in select_tasks(tasks, wanted)]


@pytest.mark.parametrize(
    ("wanted", "expected"),
    [
        ("domain:pathology", ["kather_et_al_2016", "nirschl_et_al_2018"]),
        ("domain : pathology", ["kather_et_al_2016", "nirschl_et_al_2018"]),  # spaces as typed
        ("scale:cellular", ["eulenberg_et_al_2017_darkfield", "held_et_al_2010_h2b"]),
        ("modality:fluorescence microscopy", ["held_et_al_2010_h2b", "opencell"]),
        ("paper:no", ["opencell"]),
        (
            "coarse,paper:yes",
            [
                *COARSE,
                "eulenberg_et_al_2017_darkfield",
                "held_et_al_2010_h2b",
                "kather_et_al_2016",
                "nirschl_et_al_2018",
            ],
        ),
        ("level:coarse", COARSE),
        ("held_et_al_2010_*", ["held_et_al_2010_h2b"]),
        ("*_et_al_201[68]", ["kather_et_al_2016", "nirschl_et_al_2018"]),
    ],
)
def test_a_group_or_a_pattern_selects_exactly_its_tasks(tasks, wanted, expected):
    assert _names(tasks, wanted) == expected


def test_items_combine_as_a_union_in_the_benchmarks_order(tasks):
    chosen = _names(tasks, "domain:pathology, eulenberg_*,coarse,kather_et_al_2016")
    assert chosen == [*COARSE, "eulenberg_et_al_2017_darkfield", "kather_et_al_2016", "nirschl_et_al_2018"]
    assert (
        _names(tasks, "level:fine") == _names(tasks, "fine") == [t.name for t in tasks if t.level == "fine"]
    )


def test_a_group_value_holding_a_comma_is_read_whole(tasks):
    assert _names(tasks, "taxonomy:cell, organism or structure identification") == ["opencell"]
    assert _names(tasks, "coarse,taxonomy:cell, organism or structure identification,scale:tissue") == [
        *COARSE,
        "kather_et_al_2016",
        "nirschl_et_al_2018",
        "opencell",
    ]


def test_a_group_value_is_read_as_the_longest_group_its_pieces_spell(tasks):
    """Where one value holding a comma starts another up to a further comma (`cell, organism or
    structure identification` and the same `, in tissue`), the longer is meant: read shorter first,
    the rest of it was taken for an unknown task name."""
    from dataclasses import replace

    longer = "cell, organism or structure identification, in tissue"
    renamed = [
        replace(t, groups={**t.groups, "taxonomy": longer}) if t.name == "kather_et_al_2016" else t
        for t in tasks
    ]
    assert _names(renamed, f"taxonomy:{longer}") == ["kather_et_al_2016"]
    assert _names(renamed, "taxonomy:cell, organism or structure identification") == ["opencell"]


@pytest.mark.parametrize(
    ("wanted", "message"),
    [
        (
            "domain:pathologgy",
            r"^--tasks domain:pathologgy: no task has domain 'pathologgy'; its values: biology, pathology$",
        ),
        ("domain:all", r"no task has domain 'all'"),  # what coarse tasks hold is no group of them
        (
            "colour:red",
            r"^--tasks colour:red: 'colour' is no group kind of these tasks; kinds: domain, .*taxonomy$",
        ),
        ("burgess_*", r"^--tasks burgess_\*: matches no task name; task names: modality, .*opencell$"),
        (
            "coarse,kather",
            r"^--tasks: unknown task\(s\) \['kather'\]; available: .*a group such as domain:pathology\)$",
        ),
        (" , ", r"^--tasks: empty"),
        ("all,kather", r"^--tasks: unknown task\(s\) \['kather'\]"),  # `all` does not hide a typo
        (  # a near miss is answered with the name meant
            "coarse,kather_et_al_2061",
            r"^--tasks: unknown task\(s\) \['kather_et_al_2061'\] \(did you mean kather_et_al_2016 for "
            r"kather_et_al_2061\?\); available:",
        ),
    ],
)
def test_an_item_that_selects_nothing_is_one_line_naming_it_and_what_it_could_be(tasks, wanted, message):
    with pytest.raises(MicromergeError, match=message):
        select_tasks(tasks, wanted)


def test_a_level_the_tasks_lack_is_named_not_an_empty_selection(tasks):
    """`coarse` on a copy without coarse tasks (a sources-only subset) selected nothing, silently:
    the levels are the tasks' own, as every other group's values are."""
    fine_only = [t for t in tasks if t.level == "fine"]
    with pytest.raises(
        MicromergeError, match=r"^--tasks coarse: no task has level 'coarse'; its values: fine$"
    ):
        select_tasks(fine_only, "coarse")
    with pytest.raises(MicromergeError, match=r"^--tasks level:coarse: no task has level 'coarse'"):
        select_tasks(fine_only, "level:coarse,fine")
    assert select_tasks(fine_only, "fine") == select_tasks(fine_only, "all") == fine_only


def _eval(tmp, bench, tasks, store):
    return CliRunner().invoke(
        cli,
        [
            "eval",
            "--model",
            str(tmp / "m.safetensors"),
            "--data",
            str(bench),
            "--tasks",
            tasks,
            "--store",
            str(store),
            "--cache-dir",
            str(tmp / "cache"),
            "--bootstrap",
            "0",
            "--quiet",
        ],
    )


def test_eval_scores_the_tasks_a_group_names_and_refuses_a_misspelt_one_before_writing(tmp_path):
    bench = write_fixture(tmp_path / "bench", per_class=1)
    write_checkpoint(tmp_path / "m.safetensors", 0)
    store = tmp_path / "r.jsonl"
    refused = _eval(tmp_path, bench, "domain:pathologgy", store)
    assert refused.exit_code == 2 and "no task has domain 'pathologgy'" in refused.output
    assert not store.exists()
    result = _eval(tmp_path, bench, "domain:pathology", store)
    assert result.exit_code == 0, result.output
    scored = {json.loads(line)["task"] for line in store.read_text().splitlines()}
    assert scored == {"kather_et_al_2016", "nirschl_et_al_2018"}


def test_the_tasks_listing_shows_what_a_selection_picks_and_refuses_a_misspelt_one_first(tmp_path):
    bench = write_fixture(tmp_path / "bench", per_class=1)
    listed = CliRunner().invoke(cli, ["tasks", "--data", str(bench), "--tasks", "stain,scale:tissue"])
    assert listed.exit_code == 0, listed.output
    rows = [line.split()[0] for line in listed.output.splitlines()[1:] if not line.startswith("  note")]
    assert rows == ["stain", "kather_et_al_2016", "nirschl_et_al_2018"]
    refused = CliRunner().invoke(cli, ["tasks", "--data", str(bench), "--tasks", "scale:tisue"])
    assert refused.exit_code == 2 and refused.output.startswith(
        "error: --tasks scale:tisue: no task has scale"
    )


def test_an_evaluation_returns_its_own_selections_rows_from_a_store_that_holds_more(tmp_path):
    """Selections evaluated into one store add up to one run (it is keyed on the model and data, not
    on --tasks), but what `eval` prints of a second, finished selection is that selection's rows:
    it returned, and printed the means of, every task the store held."""
    from dataclasses import replace

    import torch

    from micromerge.eval.engine import run_eval
    from micromerge.eval.settings import EvalSettings

    bench = write_fixture(tmp_path / "bench", per_class=1)
    write_checkpoint(tmp_path / "m.safetensors", 0)
    settings = EvalSettings(
        data=str(bench), store=tmp_path / "r.jsonl", cache_dir=tmp_path / "c", bootstrap=0, progress=False
    )
    every = run_eval(str(tmp_path / "m.safetensors"), settings, torch.device("cpu"))
    pathology = run_eval(
        str(tmp_path / "m.safetensors"), replace(settings, tasks="domain:pathology"), torch.device("cpu")
    )
    assert {r["run_id"] for r in every} == {r["run_id"] for r in pathology}, "one run, resumed"
    assert {r["task"] for r in pathology} == {"kather_et_al_2016", "nirschl_et_al_2018"}
    assert {r["task"] for r in every} > {r["task"] for r in pathology}
