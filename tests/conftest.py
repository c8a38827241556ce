import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


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


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test`: two workers, a whole module at a time, in this order) the
    demo's module goes first, then the other modules with slow tests, then the rest. The demo's
    module alone takes about 8 minutes; where xdist's default order (most tests first) put it, it ran
    on one worker for 6 minutes after the other had finished everything else. Each worker collects
    the same list and sorts it the same way, as xdist requires; a run without workers keeps the
    usual order."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (item.module.__name__ != "tests.test_demo", item.module.__name__ not in slow))
