"""One direction of imports (issue 15): ground -> merging -> eval -> finetune -> analysis -> CLI/demo.

Every import in the package's source folders is parsed (module level and inside functions alike);
an import of a higher layer, or of a stage outside the `micromerge` namespace, fails the test with
the file, the line and the edge.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import absolute_imports

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("ground", "merging", "eval", "finetune", "analysis", "top")
FOLDERS = {
    "micromerge/core": "ground",
    "checkpoints": "ground",
    "merging": "merging",
    "eval": "eval",
    "finetune": "finetune",
    "analysis": "analysis",
}
STAGES = ("merging", "eval", "finetune", "analysis", "checkpoints")


def layer_of_file(path: Path) -> str:
    relative = path.relative_to(ROOT).as_posix()
    for folder, layer in FOLDERS.items():
        if relative.startswith(folder + "/"):
            return layer
    return "ground" if relative == "micromerge/__init__.py" else "top"  # micromerge/cli/, demo.py


def layer_of_module(name: str) -> str | None:
    """The layer a module belongs to; None outside the project (torch, numpy ...)."""
    parts = name.split(".")
    if parts[0] in STAGES:
        raise ValueError(f"{name}: a stage outside the micromerge namespace")
    if parts[0] != "micromerge":
        return None
    if len(parts) == 1 or parts[1] in ("core", "checkpoints"):
        return "ground"
    if parts[1] in FOLDERS.values():
        return parts[1]
    return "top"


def wrong_edges(path: Path, source: str) -> list[str]:
    mine = layer_of_file(path)
    found = []
    for name, line in absolute_imports(source):
        try:
            theirs = layer_of_module(name)
        except ValueError as exc:
            found.append(f"{path.relative_to(ROOT)}:{line}: {exc}")
            continue
        if theirs is not None and LAYERS.index(theirs) > LAYERS.index(mine):
            found.append(f"{path.relative_to(ROOT)}:{line}: {mine} imports {name} ({theirs})")
    return found


def package_files() -> list[Path]:
    folders = ["micromerge", *[f for f in FOLDERS if "/" not in f]]
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def test_every_import_runs_down_the_layers():
    files = package_files()
    assert len(files) > 50
    problems = [edge for path in files for edge in wrong_edges(path, path.read_text())]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "where, source, expected",
    [
        (
            "merging/x.py",
            "from micromerge.eval.engine import Evaluator",
            "merging imports micromerge.eval.engine",
        ),
        ("micromerge/core/x.py", "def f():\n    import micromerge.cli\n", "ground imports micromerge.cli"),
        ("eval/x.py", "from merging.models import load_model", "outside the micromerge namespace"),
    ],
)
def test_a_wrong_edge_is_found(where, source, expected):
    (edge,) = wrong_edges(ROOT / where, source)
    assert expected in edge


def test_ground_and_stages_below_are_allowed():
    assert not wrong_edges(
        ROOT / "analysis/x.py", "from micromerge.eval.store import ResultStore\nimport torch"
    )
    assert not wrong_edges(
        ROOT / "micromerge/cli/eval_commands.py", "from micromerge.analysis.report import build_report"
    )
