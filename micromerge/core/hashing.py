"""sha256 of input files for provenance, cached by (path, size, mtime, inode).

Checkpoints are hundreds of MB and are hashed on every merge and every sweep row; the
cache makes the second look-up free while any change to the file invalidates it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from micromerge.core.atomic import write_json_atomic

_CHUNK = 8 << 20


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "micromerge"


def sha256_file(path: str | Path, cache_dir: Path | None = None) -> str:
    """Return the hex sha256 of a file, reusing a cached digest when the file is unchanged."""
    file_path = Path(path).resolve()
    stat = file_path.stat()
    fingerprint = f"{file_path}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
    cache_file = None
    if cache_dir is not None:
        cache_file = cache_dir / "sha256" / (hashlib.sha256(fingerprint.encode()).hexdigest()[:32] + ".json")
        try:
            cached = json.loads(cache_file.read_text())
            if cached.get("fingerprint") == fingerprint:
                return str(cached["sha256"])
        except (OSError, ValueError, KeyError):
            pass
    digest = hashlib.sha256()
    with open(file_path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    hex_digest = digest.hexdigest()
    if cache_file is not None:
        with contextlib.suppress(Exception):  # a read-only cache must never fail a merge
            write_json_atomic(cache_file, {"fingerprint": fingerprint, "sha256": hex_digest})
    return hex_digest


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(payload: object) -> str:
    """Digest of a JSON-able value in canonical form (used for config and dataset fingerprints)."""
    return sha256_bytes(json.dumps(payload, sort_keys=True, default=str).encode())
