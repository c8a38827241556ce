import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _share_the_cores_between_workers() -> None:
    """`make test` runs the suite on pytest-xdist workers (two, the CI machines' cores). Each
    worker's torch would start a thread per core, so two workers on two cores would run four
    threads and slow each other down: give each worker (and the CLI processes its tests start) its
    share of the cores."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, threads)


_share_the_cores_between_workers()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first, in their usual order: on two workers the demo (minutes) then starts
    at once and the other worker takes the short ones, instead of the demo starting last and
    running alone while the other worker waits."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    """Keep the sha256 cache and the Hugging Face cache inside the test's temp dir."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache / "xdg"))
    monkeypatch.setenv("HF_HOME", str(cache / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache / "hf" / "hub"))
    import huggingface_hub.constants as hub_constants  # read once at import: patch the live value

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache / "hf" / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(autouse=True)
def _figures_closed():
    """Close the figures a test drew and left open (tests inspect a figure's axes, so they do not
    close it): pyplot keeps every open figure for the life of the worker, and once a worker held more
    than 20 another test's figure raised matplotlib's "More than 20 figures" warning."""
    yield
    import sys

    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close("all")
