"""The command that makes a local copy of something on the Hugging Face Hub, and whether the
user has told the hub libraries to stay offline.

Every offline error names it, so it must be one a user can paste: huggingface_hub's `hf` CLI
(added in 0.34, the only one since 1.0 removed `huggingface-cli`; pyproject requires >= 0.34).
One function, so the three places that say it (checkpoints, μ-Bench, hub corpora) cannot drift.
"""

from __future__ import annotations

import os

TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # huggingface_hub.constants.ENV_VARS_TRUE_VALUES


def hf_download_command(
    repo: str, *, dataset: bool = False, revision: str | None = None, include: str | None = None
) -> str:
    """`hf download REPO ... --local-dir DIR`: the copy lands in DIR, which the user then passes."""
    words = ["hf", "download", repo]
    if dataset:
        words += ["--repo-type", "dataset"]
    if revision:
        words += ["--revision", revision]
    if include:
        words += ["--include", f"'{include}'"]
    return " ".join([*words, "--local-dir", "DIR"])


def offline_setting(*, dataset: bool = False) -> str | None:
    """The setting that keeps the hub library offline, as the user wrote it (`HF_HUB_OFFLINE=1`), or
    None: HF_HUB_OFFLINE read the way huggingface_hub reads it (1/on/yes/true, any case); for
    datasets, HF_DATASETS_OFFLINE when set decides instead (datasets/config.py). Read as the
    libraries read it, so an error never blames an offline setting they ignore (`=false`), nor
    misses one they obey (`=true`), nor names HF_HUB_OFFLINE when HF_DATASETS_OFFLINE was set."""
    name = (
        "HF_DATASETS_OFFLINE"
        if dataset and os.environ.get("HF_DATASETS_OFFLINE") is not None
        else "HF_HUB_OFFLINE"
    )
    value = os.environ.get(name) or ""
    return f"{name}={value}" if value.upper() in TRUE_VALUES else None


def hub_offline(*, dataset: bool = False) -> bool:
    """Whether `offline_setting` finds the hub library told to stay offline."""
    return offline_setting(dataset=dataset) is not None
