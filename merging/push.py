"""`micromerge push`: upload an exported folder (weights, configs, model card) to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

from micromerge.core.errors import MicromergeError
from micromerge.core.hub_download import hub_offline
from micromerge.merging.export import FILES

# what an export or atomic write still running (or killed) has in the folder: never uploaded
IN_PROGRESS = [".staging.*", ".*.tmp"]


def push_folder(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create the model repo if needed and upload the folder as one commit; returns the commit URL."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MicromergeError(
            f"{folder}: not a folder; `micromerge export CHECKPOINT --out FOLDER` makes one"
        )
    complete = [fmt for fmt, names in FILES.items() if all((folder / name).is_file() for name in names)]
    if not complete or not (folder / "README.md").is_file():
        layouts = " or ".join(" + ".join(names) for names in FILES.values())
        raise MicromergeError(
            f"{folder}: not an export ({layouts}, and a model card README.md); "
            "`micromerge export CHECKPOINT --out FOLDER` makes one"
        )
    if hub_offline():
        raise MicromergeError("HF_HUB_OFFLINE is set: the hub cannot be reached; unset it to push")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message=f"micromerge: upload {folder.name}",
            ignore_patterns=IN_PROGRESS,
        )
    except Exception as exc:  # huggingface_hub's HTTP errors, httpx's connection errors, a bad repo id
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise MicromergeError(
            f"--repo {repo_id}: the upload failed ({type(exc).__name__}: {first}); check the network, the "
            "repo id (owner/name) and the token (--token or HF_TOKEN, with write access)"
        ) from exc
    return str(getattr(commit, "commit_url", commit))
