"""The command that makes a local copy of something on the Hugging Face Hub.

Every offline error names it, so it must be one a user can paste: huggingface_hub's `hf` CLI
(added in 0.34, the only one since 1.0 removed `huggingface-cli`; pyproject requires >= 0.34).
One function, so the three places that say it (checkpoints, μ-Bench, hub corpora) cannot drift.
"""

from __future__ import annotations


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
