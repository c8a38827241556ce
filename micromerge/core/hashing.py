"""sha256 of input files for provenance, cached by (path, size, mtime, inode).

Checkpoints are hundreds of MB and are hashed on every merge and every sweep row; the
cache makes the second look-up free while any change to the file invalidates it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from micromerge.core.atomic import write_json_atomic
from micromerge.core.json_text import parse_json
from micromerge.core.progress import progress_bar

_CHUNK = 8 << 20
BAR_FROM_BYTES = 256 << 20
"""Hashing files that come to less than this (under 0.2 s) shows no progress bar."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "micromerge"


def _cache_entry(path: str | Path, cache_dir: Path | None) -> tuple[Path, str, Path | None]:
    """(resolved path, the fingerprint its digest is cached under, the cache file or None)."""
    file_path = Path(path).resolve()
    stat = file_path.stat()
    fingerprint = f"{file_path}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
    if cache_dir is None:
        return file_path, fingerprint, None
    name = hashlib.sha256(fingerprint.encode()).hexdigest()[:32] + ".json"
    return file_path, fingerprint, cache_dir / "sha256" / name


def _cached(fingerprint: str, cache_file: Path | None) -> str | None:
    if cache_file is None:
        return None
    try:
        cached = parse_json(cache_file.read_text())
        return str(cached["sha256"]) if cached.get("fingerprint") == fingerprint else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def sha256_file(
    path: str | Path, cache_dir: Path | None = None, on_bytes: Callable[[int], object] | None = None
) -> str:
    """Return the hex sha256 of a file, reusing a cached digest when the file is unchanged;
    `on_bytes` is told how many bytes each read hashed (a progress bar's `update`)."""
    entry = _cache_entry(path, cache_dir)
    cached = _cached(*entry[1:])
    return cached if cached is not None else _hash_and_cache(*entry, on_bytes)


def _hash_and_cache(
    file_path: Path, fingerprint: str, cache_file: Path | None, on_bytes: Callable[[int], object] | None
) -> str:
    digest = hashlib.sha256()
    with open(file_path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    hex_digest = digest.hexdigest()
    if cache_file is not None:
        with contextlib.suppress(Exception):  # a read-only cache must never fail a merge
            write_json_atomic(cache_file, {"fingerprint": fingerprint, "sha256": hex_digest})
    return hex_digest


def sha256_files(paths: Sequence[str | Path], cache_dir: Path, desc: str, progress: bool = True) -> list[str]:
    """Digests of several files, with a bar in bytes over those not hashed before when they come
    to BAR_FROM_BYTES or more: μ-Bench's first load hashes 3.6 GB (seconds to a minute, by disk)."""
    entries = [_cache_entry(p, cache_dir) for p in paths]
    digests = [_cached(fingerprint, cache_file) for _, fingerprint, cache_file in entries]
    total = sum(
        entry[0].stat().st_size for entry, digest in zip(entries, digests, strict=True) if digest is None
    )
    show = progress and total >= BAR_FROM_BYTES
    with progress_bar(
        total=total, desc=desc, unit="B", unit_scale=True, disable=not show, leave=False
    ) as bar:
        return [
            digest if digest is not None else _hash_and_cache(*entry, bar.update)
            for entry, digest in zip(entries, digests, strict=True)
        ]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(payload: object) -> str:
    """Digest of a JSON-able value in canonical form (used for config and dataset fingerprints)."""
    return sha256_bytes(json.dumps(payload, sort_keys=True, default=str).encode())
