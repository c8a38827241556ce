"""OpenAI's released CLIP files, known by their sha256.

OpenAI published CLIP as TorchScript archives at
`https://openaipublic.azureedge.net/clip/models/<sha256>/<Name>.pt`: the folder is the file's
sha256, which openai/CLIP's `_download` and open_clip's `download_pretrained_from_url` check after
a download. open_clip's pretrained table still lists those URLs (tag `openai`) beside the Hugging
Face copies it now fetches instead, and says the models use QuickGELU. So a file whose sha256 is
one of them is that release, whatever it is called on disk: its architecture is the
`<Name>-quickgelu` config, and reading its weights needs no `--allow-pickle` (the restricted
reader runs nothing from any file; a known digest also rules out a crafted one).

Researchers have these files from the `clip` package and from open_clip releases before it moved
to the Hub, both of which cached them in `~/.cache/clip`. A zoo entry of tag `openai` uses one
found there when the Hub copy is not in the cache (`cached_release`).
"""

from __future__ import annotations

from pathlib import Path

from micromerge.core.hashing import default_cache_dir, sha256_file

CLIP_CACHE = Path("~/.cache/clip")
"""Where the `clip` package and open_clip's URL downloads keep OpenAI's files."""

_RELEASE_HOST = "openaipublic"


def release_digest(url: str) -> str | None:
    """The sha256 an OpenAI release URL names (its folder), or None for another URL."""
    if _RELEASE_HOST not in url:
        return None
    digest = url.rstrip("/").split("/")[-2]
    return digest if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest) else None


def openai_releases() -> dict[str, str]:
    """{sha256 of an OpenAI release file: the open_clip model config it is} (read from open_clip's
    table each time: it is small, and the installed open_clip is the authority)."""
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_models_by_tag

    releases = {}
    for name in list_pretrained_models_by_tag("openai"):
        if name.endswith("-quickgelu"):
            digest = release_digest(get_pretrained_cfg(name, "openai").get("url", ""))
            if digest:
                releases[digest] = name
    return releases


def identify_release(path: Path) -> str | None:
    """The open_clip architecture of OpenAI's release `path` is, by its sha256; None if it is none."""
    return openai_releases().get(sha256_file(path, default_cache_dir()))


def cached_release(url: str, clip_cache: Path = CLIP_CACHE) -> Path | None:
    """OpenAI's file for `url` in the `clip` cache, if it is there and its sha256 is the one the
    URL names (a partial download or another file of that name is not used)."""
    digest = release_digest(url)
    if digest is None:
        return None
    candidate = clip_cache.expanduser() / url.rstrip("/").rsplit("/", 1)[-1]
    if not candidate.is_file():
        return None
    return candidate if sha256_file(candidate, default_cache_dir()) == digest else None
