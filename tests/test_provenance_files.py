"""The two file-level promises every artefact's provenance rests on: an input's recorded sha256 is
the sha256 of the bytes it holds now (the digest cache never answers for a file that changed), and
equal JSON payloads are written as equal bytes (so same inputs and seed give byte-identical
manifests and result rows, whatever order the code built the dictionaries in)."""

from __future__ import annotations

import hashlib
import json
import os

from micromerge.core.atomic import write_json_atomic
from micromerge.core.hashing import sha256_file, sha256_json


def _plant(cache_dir, digest: str) -> None:
    """Overwrite the one cached digest, so a later answer shows whether the cache was consulted."""
    (entry,) = (cache_dir / "sha256").iterdir()
    record = json.loads(entry.read_text())
    entry.write_text(json.dumps({**record, "sha256": digest}))


def test_the_digest_cache_answers_for_an_unchanged_file(tmp_path):
    path, cache = tmp_path / "w.bin", tmp_path / "cache"
    path.write_bytes(b"a" * 64)
    assert sha256_file(path, cache) == hashlib.sha256(b"a" * 64).hexdigest()
    _plant(cache, "f" * 64)
    assert sha256_file(path, cache) == "f" * 64, "an unchanged file is answered from the cache"


def _hashed_with_a_planted_digest(tmp_path):
    """A file hashed once, its cached digest then replaced: only a fresh hash gives the true one."""
    path, cache = tmp_path / "w.bin", tmp_path / "cache"
    path.write_bytes(b"a" * 64)
    sha256_file(path, cache)
    _plant(cache, "f" * 64)
    return path, cache, path.stat()


def test_a_file_rewritten_in_place_is_hashed_again(tmp_path):
    """Same size and inode, later modification time: a checkpoint overwritten by a second run."""
    path, cache, before = _hashed_with_a_planted_digest(tmp_path)
    with open(path, "r+b") as handle:
        handle.write(b"b" * 64)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))  # a coarse clock may not tick
    assert path.stat().st_ino == before.st_ino and path.stat().st_size == before.st_size
    assert sha256_file(path, cache) == hashlib.sha256(b"b" * 64).hexdigest()


def test_a_file_replaced_by_rename_with_the_old_time_is_hashed_again(tmp_path):
    """Same size and modification time, another inode: what `cp -p` or an atomic save leaves."""
    path, cache, before = _hashed_with_a_planted_digest(tmp_path)
    replacement = tmp_path / "new.bin"
    replacement.write_bytes(b"b" * 64)
    os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))
    keep_inode_alive = tmp_path / "old.bin"
    os.link(path, keep_inode_alive)  # so the new file cannot reuse the old inode number
    os.replace(replacement, path)
    assert path.stat().st_mtime_ns == before.st_mtime_ns and path.stat().st_ino != before.st_ino
    assert sha256_file(path, cache) == hashlib.sha256(b"b" * 64).hexdigest()


def test_a_file_that_grew_with_its_old_time_and_inode_is_hashed_again(tmp_path):
    """Same inode and modification time, another size: an append whose clock did not tick (or a
    copy tool that restores times), which only the size in the fingerprint can tell."""
    path, cache, before = _hashed_with_a_planted_digest(tmp_path)
    with open(path, "ab") as handle:
        handle.write(b"a")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_ino == before.st_ino and path.stat().st_mtime_ns == before.st_mtime_ns
    assert sha256_file(path, cache) == hashlib.sha256(b"a" * 65).hexdigest()


def test_the_digest_of_a_payload_does_not_depend_on_its_key_order():
    """Config and dataset fingerprints are compared across runs that build dicts in any order."""
    assert sha256_json({"a": 1, "b": {"c": 2, "d": 3}}) == sha256_json({"b": {"d": 3, "c": 2}, "a": 1})
    assert sha256_json({"a": 1}) != sha256_json({"a": 2})


def test_equal_json_payloads_are_equal_bytes_whatever_their_key_order(tmp_path):
    forward = {"method": "ties", "parameters": {"alpha": 0.5, "density": 0.2}, "seed": 0}
    backward = {"seed": 0, "parameters": {"density": 0.2, "alpha": 0.5}, "method": "ties"}
    write_json_atomic(tmp_path / "a.json", forward)
    write_json_atomic(tmp_path / "b.json", backward)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert json.loads((tmp_path / "a.json").read_text()) == forward


def test_hashing_files_the_cache_lacks_shows_a_bar_in_bytes_and_a_cached_run_none(
    tmp_path, monkeypatch, capsys
):
    """μ-Bench's first load hashes 3.6 GB with nothing on screen; now a bar counts the bytes of the
    files not hashed before (here the threshold is lowered to these small files), and says nothing
    once they are cached, nor with progress off."""
    from micromerge.core import hashing

    monkeypatch.setattr(hashing, "BAR_FROM_BYTES", 100)
    files = [tmp_path / f"shard-{i}.arrow" for i in range(3)]
    for index, path in enumerate(files):
        path.write_bytes(bytes([index]) * 64)
    cache = tmp_path / "cache"
    expected = [hashlib.sha256(p.read_bytes()).hexdigest() for p in files]
    assert hashing.sha256_files(files, cache, "sha256 of the shards") == expected
    shown = capsys.readouterr().err
    assert "sha256 of the shards" in shown and "192" in shown, shown
    assert hashing.sha256_files(files, cache, "sha256 of the shards") == expected
    assert capsys.readouterr().err == ""
    files[0].write_bytes(b"x" * 64)  # one file changed: 64 bytes pending, under the threshold
    hashing.sha256_files(files, cache, "sha256 of the shards")
    assert capsys.readouterr().err == ""
    for path in files:
        path.write_bytes(path.read_bytes() + b"y" * 64)
    hashing.sha256_files(files, cache, "sha256 of the shards", progress=False)
    assert capsys.readouterr().err == ""


def test_the_cache_lives_where_xdg_cache_home_says(tmp_path, monkeypatch):
    """Clusters point XDG_CACHE_HOME at scratch space (home folders are small and shared): the
    digest, pixel and statistics caches go there, and under ~/.cache only where it is unset."""
    from micromerge.core.hashing import default_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "scratch"))
    assert default_cache_dir() == tmp_path / "scratch" / "micromerge"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "micromerge"
