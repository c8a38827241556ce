"""The wheel and sdist as users get them (issue 15): built, checked by twine, installed (not editable)
into a fresh environment outside the checkout, where only `micromerge` is importable and the CLI
merges, lists its zoo and evaluates with the package data that came along.

The fresh environment borrows the dependencies (torch & co.) from this one through a path file,
without its site hooks, so the project's editable install is not visible there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.helpers import absolute_imports, write_checkpoint
from tests.ubench_fixture import write_fixture

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(command: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=environment, **kwargs)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """Built from a copy of the files git knows (setuptools keeps a build/ folder in the tree it
    builds, whose stale files could otherwise end up in the wheel)."""
    out, source = tmp_path_factory.mktemp("dist"), tmp_path_factory.mktemp("source")
    for name in _run(["git", "ls-files", "-co", "--exclude-standard"], ROOT).stdout.splitlines():
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    build = [
        sys.executable,
        "-m",
        "build",
        "--no-isolation",
        "--wheel",
        "--sdist",
        "--outdir",
        str(out),
        str(source),
    ]
    _run(build, source)
    _run([sys.executable, "-m", "twine", "check", "--strict", *map(str, sorted(out.iterdir()))], out)
    return out


def test_the_wheel_holds_one_top_level_package_and_its_data(dist):
    (wheel,) = dist.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"micromerge"}, tops
    for data in (
        "micromerge/merging/model_configs/micro-clip.json",
        "micromerge/checkpoints/zoo.toml",
        "micromerge/checkpoints/configs/biomedclip.json",
        "micromerge/checkpoints/configs/biomedbert-base-uncased-abstract/config.json",
        "micromerge/eval/ubench_sources.toml",
    ):
        assert data in names, data
    (sdist,) = dist.glob("*.tar.gz")
    assert sdist.stat().st_size > 10_000


def _module_distributions() -> dict[str, set[str]]:
    """{top-level module: the installed distributions that provide it}. Python 3.10's
    `packages_distributions` reads only top_level.txt, which open_clip_torch's wheel lacks (3.11
    also infers the modules from each distribution's file list, as this does)."""
    from importlib.metadata import distributions, packages_distributions

    owners: dict[str, set[str]] = {m: set(d) for m, d in packages_distributions().items()}
    for installed in distributions():
        if installed.read_text("top_level.txt") is not None:  # read by packages_distributions
            continue
        name = installed.metadata["Name"]  # parsed anew on each read: once per distribution
        for file in installed.files or ():
            top = file.parts[0]  # metadata folders, .pth files and ../bin entries are no identifiers
            module = top.removesuffix(".py") if len(file.parts) == 1 else top
            if module.isidentifier() and module != "__pycache__":
                owners.setdefault(module, set()).add(name or module)
    return owners


def _requirements(dist: Path) -> list[str]:
    """The wheel's `Requires-Dist` entries, as written (`torch>=2.6`, `pytest>=8; extra == "dev"`)."""
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    return [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]


def test_every_module_the_package_imports_is_a_declared_dependency(dist):
    """A module the package imports but does not declare works here, where something else brought
    it, and fails for a user whose other packages don't: tomli (imported where tomllib is missing,
    before Python 3.11) came only as a dependency of pytest, build and recent huggingface_hub
    releases, pyarrow only through datasets, braceexpand only through webdataset."""
    import re

    requires = {
        re.split(r"[\s;<>=!~\[(]", requirement)[0].lower().replace("_", "-")
        for requirement in _requirements(dist)
        if "extra ==" not in requirement
    }
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        imported = {
            module.split(".")[0]
            for name in archive.namelist()
            if name.endswith(".py")
            for module, _ in absolute_imports(archive.read(name))
        }
    distributions = _module_distributions()
    stdlib = set(sys.stdlib_module_names) | {"tomllib"}  # from 3.11; before, the package imports tomli
    undeclared = {
        module
        for module in imported - stdlib - {"micromerge"}
        # a module not installed here (tomli on Python 3.11+) is its own distribution's name
        if not any(d.lower().replace("_", "-") in requires for d in distributions.get(module, [module]))
    }
    assert not undeclared, f"imported but not in pyproject's dependencies: {sorted(undeclared)}"


def test_every_requirement_has_the_floor_make_test_floors_installs(dist):
    """`make test-floors` installs each requirement at its floor (`NAME>=V` as `NAME==V`) and runs
    the suite there: a requirement with no floor, or another kind of bound, would be left to the
    resolver's newest, never tried at its oldest (how np.trapezoid, numpy 2's, and click 8.2's
    NoArgsIsHelpError once slipped past floors of numpy 1.26 and click 8.1)."""
    import re

    requirements = _requirements(dist)
    assert len(requirements) > 20
    for requirement in requirements:
        assert re.fullmatch(r"[A-Za-z0-9_.-]+>=[0-9][0-9.]*(\s*;.*)?", requirement), requirement


def test_the_installed_wheel_runs_outside_the_checkout(dist, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    python = venv / "bin" / "python"
    site = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path
        ).stdout.strip()
    )
    (site / "borrowed-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    (wheel,) = dist.glob("*.whl")
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        tmp_path,
    )
    where = _run(
        [str(python), "-c", "import micromerge, micromerge.merging; print(micromerge.__file__)"], tmp_path
    )
    assert where.stdout.strip().startswith(str(venv)), where.stdout
    for stage in ("merging", "eval", "analysis", "finetune", "checkpoints"):
        missing = subprocess.run([str(python), "-c", f"import {stage}"], cwd=tmp_path, capture_output=True)
        assert missing.returncode != 0, f"{stage} is importable at top level"
    cli = venv / "bin" / "micromerge"
    assert "merge" in _run([str(cli), "--help"], tmp_path).stdout
    assert "biomedclip" in _run([str(cli), "zoo"], tmp_path).stdout
    write_checkpoint(tmp_path / "base.safetensors", 0)
    write_checkpoint(tmp_path / "ft.safetensors", 1)
    _run([str(venv / "bin" / "merge"), "--base", "base.safetensors", "--ft", "ft.safetensors", "--alpha", "0.5",
          "--out", "merged.safetensors", "--quiet"], tmp_path)  # fmt: skip
    manifest = json.loads((tmp_path / "merged.safetensors.manifest.json").read_text())
    assert manifest["method"] == "wise-ft"
    bench = write_fixture(tmp_path / "bench", fmt="save_to_disk", per_class=2)
    _run([str(cli), "eval", "--model", "merged.safetensors", "--data", str(bench), "--store", "r.jsonl",
          "--bootstrap", "0", "--cache-dir", "cache", "--device", "cpu", "--quiet"], tmp_path)  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert rows and {r["method"] for r in rows} == {"none"}
