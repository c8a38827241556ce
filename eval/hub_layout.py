"""μ-Bench's folder as the Hub publishes it: `perception/0.1.0/` with `dataset_info.json` and
Arrow *stream* shards `ubench-test-0000{0..6}-of-00007.arrow`, and no `state.json` (so
`datasets.load_from_disk` cannot open it). Facts from ../shared/ubench/SCHEMA.md ("Files on the
Hub"): the folder, the shard names, the pinned revision and the published SHA-256 of each shard.

Reading memory-maps every shard and concatenates them (the real set is 3.6 GB: never copied into
RAM whole); writing produces the same layout the way `datasets`' builder cache does (ArrowWriter
stream files plus a DatasetInfo), for the synthetic benchmark and the test fixtures.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import datasets
from datasets.arrow_writer import ArrowWriter

from micromerge.core.errors import MicromergeError, first_line
from micromerge.core.hashing import sha256_file
from micromerge.core.hub_download import hf_download_command, offline_setting

HUB_ID = "jnirschl/uBench"
HUB_REVISION = "3f2c5b590bc7a208d5b60f3527ce4c76a331aa2b"
HUB_FOLDER = "perception/0.1.0"
BUILDER_NAME = "ubench"
PUBLISHED_SHARDS = {
    "ubench-test-00000-of-00007.arrow": "3d346134e6dffed41f74da64c1c173f5efd3a10200805796a030357297b630f1",
    "ubench-test-00001-of-00007.arrow": "790591636ae679afa1161664d207c2bb2e3d583690d03967e38364ba0f31ccac",
    "ubench-test-00002-of-00007.arrow": "c370cd84e6ed9b00483ef3d20f5c06d5ff2264733ea87f2df98cf9a22820bf74",
    "ubench-test-00003-of-00007.arrow": "832cdd6f73a132028584b4e47ec1afe643e0490dd8ec9686eabbb9de3eb7f814",
    "ubench-test-00004-of-00007.arrow": "e2741415cef1327ba243f21000ac43aab2d36b61a9c2c862a1d0e21f200f4a69",
    "ubench-test-00005-of-00007.arrow": "89deae84ed2dab1bb1fc40be0aefe81b8d94590cec548d1950ff5ff853143d34",
    "ubench-test-00006-of-00007.arrow": "534beca2084a250d4436340c78accc9fe7cc2d6063d4884302e7e7f141edad6c",
}
_SHARD = re.compile(r"^(?P<builder>.+)-(?P<split>[^-]+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.arrow$")


def shard_name(index: int, count: int, split: str = "test") -> str:
    return f"{BUILDER_NAME}-{split}-{index:05d}-of-{count:05d}.arrow"


def is_hub_layout(folder: Path) -> bool:
    return (
        (folder / "dataset_info.json").is_file()
        and not (folder / "state.json").exists()
        and any(_SHARD.match(p.name) for p in folder.glob("*.arrow"))
    )


def find_hub_layout(path: Path) -> Path | None:
    """The Hub-layout folder at `path`, at `path/perception/0.1.0` (a copy of the repository or a
    Hub-cache snapshot), or the one such folder anywhere below `path`."""
    if is_hub_layout(path):
        return path
    if is_hub_layout(path / HUB_FOLDER):
        return path / HUB_FOLDER
    found = sorted({info.parent for info in path.glob("**/dataset_info.json") if is_hub_layout(info.parent)})
    if len(found) > 1:
        raise MicromergeError(
            f"--data {path}: holds {len(found)} μ-Bench shard folders ({', '.join(map(str, found[:3]))}); pass one"
        )
    return found[0] if found else None


def shard_files(folder: Path, split: str = "test") -> list[Path]:
    """The split's shards in order, refusing a set with a shard missing or mixed with another set's
    (a re-sharded copy written over an old one: `-of-00007` beside `-of-00008`)."""
    matches = [
        (p, m) for p in sorted(folder.glob("*.arrow")) if (m := _SHARD.match(p.name)) and m["split"] == split
    ]
    if not matches:
        raise MicromergeError(
            f"--data {folder}: no '*-{split}-NNNNN-of-NNNNN.arrow' shards for split {split!r}"
        )
    counts = sorted({m["count"] for _, m in matches})
    if len(counts) > 1:
        raise MicromergeError(
            f"--data {folder}: shards of {len(counts)} different sets (-of-{', -of-'.join(counts)}); "
            "copy the whole folder again into an empty folder (`micromerge data verify` checks it)"
        )
    count = int(counts[0])
    present = {int(m["index"]) for _, m in matches}
    missing = [shard_name(i, count, split) for i in range(count) if i not in present]
    beyond = [p.name for p, m in matches if int(m["index"]) >= count]
    if missing or beyond:
        problem = (
            f"shard(s) missing: {', '.join(missing)}"
            if missing
            else f"shard(s) past the set: {', '.join(beyond)}"
        )
        raise MicromergeError(
            f"--data {folder}: {problem}; copy the whole folder again (`micromerge data verify` checks it)"
        )
    return [p for p, _ in matches]


def read_hub_layout(folder: Path, split: str = "test") -> datasets.Dataset:
    """Memory-map and concatenate the shards; a truncated or foreign file is a one-line error.

    Every shard must hold the first one's columns and types: `datasets.concatenate_datasets`
    fills a column one shard lacks with nulls and adds the columns it has extra, so a foreign shard
    copied in by mistake would otherwise become rows of nulls."""
    shards = shard_files(folder, split)
    parts = []
    for shard in shards:
        try:
            parts.append(datasets.Dataset.from_file(str(shard)))
        except Exception as exc:  # pyarrow raises several types for a truncated stream
            raise MicromergeError(
                f"--data {shard}: not a readable Arrow stream shard ({type(exc).__name__}: "
                f"{first_line(exc)[:100]}); it may be truncated: copy it again"
            ) from exc
        if parts[-1].features != parts[0].features:
            raise MicromergeError(
                f"--data {shard}: not a shard of the same dataset as {shards[0].name} "
                f"({column_difference(parts[0].features, parts[-1].features)}); copy the whole folder "
                "again (`micromerge data verify` checks it)"
            )
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def column_difference(expected: datasets.Features, found: datasets.Features) -> str:
    """How two files' columns differ, for an error naming the file that is not of the dataset."""
    missing = [name for name in expected if name not in found]
    extra = [name for name in found if name not in expected]
    if missing or extra:
        named = [
            f"columns {what}: {', '.join(names[:5])}"
            for what, names in (("missing", missing), ("extra", extra))
            if names
        ]
        return "; ".join(named)
    changed = next(name for name in expected if expected[name] != found[name])
    return f"column {changed!r} of another type"


def write_hub_layout(dataset: datasets.Dataset, folder: Path, num_shards: int, split: str = "test") -> Path:
    """Write `dataset` as `datasets`' builder cache writes it and the Hub serves it: stream shards
    with the features in their schema metadata, and a `dataset_info.json` with the split's shard
    lengths. No `state.json`."""
    folder.mkdir(parents=True, exist_ok=True)
    bounds = [round(i * len(dataset) / num_shards) for i in range(num_shards + 1)]
    lengths, total_bytes = [], 0
    for index in range(num_shards):
        part = dataset.select(range(bounds[index], bounds[index + 1]))
        writer = ArrowWriter(
            features=dataset.features, path=str(folder / shard_name(index, num_shards, split))
        )
        writer.write_table(part.with_format("arrow")[:])
        examples, written = writer.finalize()
        lengths.append(examples)
        total_bytes += written
    info = datasets.DatasetInfo(
        features=dataset.features,
        builder_name=BUILDER_NAME,
        dataset_name=BUILDER_NAME,
        config_name="default",
        version="0.1.0",
        splits=datasets.SplitDict(
            {
                split: datasets.SplitInfo(
                    name=split,
                    num_bytes=total_bytes,
                    num_examples=len(dataset),
                    shard_lengths=lengths,
                    dataset_name=BUILDER_NAME,
                )
            }
        ),
    )
    info.write_to_directory(str(folder))
    return folder


def checked_checksums(checksums: object, source: str) -> dict[str, str]:
    """`checksums` as {shard file name: sha256}, refusing what would verify nothing or look outside
    the folder: an empty object, a name that is not a shard file name, a digest that is not 64 hex."""
    if not isinstance(checksums, dict) or not checksums:
        raise MicromergeError(f"{source}: must be a non-empty JSON object {{shard name: sha256}}")
    for name, digest in checksums.items():
        if not _SHARD.match(name) or Path(name).name != name:
            raise MicromergeError(
                f"{source}: {name!r} is not a shard file name (NAME-SPLIT-NNNNN-of-NNNNN.arrow, no folder)"
            )
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest.lower()):
            raise MicromergeError(
                f"{source}: the checksum of {name} is not a sha256 (64 hex digits): {digest!r}"
            )
    return {name: digest.lower() for name, digest in checksums.items()}


def first_batch_values(folder: Path, column: str) -> set[object] | None:
    """The values of `column` in the first record batch of the folder's first shard (a glance,
    not a read of the copy), or None when that cannot be read."""
    import pyarrow as pa

    shards = sorted(folder.glob("*.arrow"))
    try:
        with pa.memory_map(str(shards[0])) as source:
            batch = pa.ipc.open_stream(source).read_next_batch()
        return set(batch.column(column).to_pylist())
    except (IndexError, OSError, KeyError, StopIteration, pa.ArrowException):
        return None


def verify_shards(folder: Path, expected: dict[str, str]) -> Iterator[tuple[str, str]]:
    """(shard, status) for every expected shard (ok, differs (sha256 ...) or missing), then for every
    shard file the folder holds beyond them (unexpected): the loader reads every shard file, so a
    folder with one more (say `-of-00008` copied over a `-of-00007` set) is not the published copy.

    Each shard's status is given as soon as it is hashed: the real copy is 3.6 GB, read in seconds
    from the page cache but in a minute or more from a cold disk or a network share."""
    for name, digest in sorted(expected.items()):
        path = folder / name
        if not path.is_file():
            yield name, "missing"
            continue
        actual = sha256_file(path)
        yield name, "ok" if actual == digest else f"differs (sha256 {actual[:16]}…, published {digest[:16]}…)"
    extra = sorted(p.name for p in folder.glob("*.arrow") if _SHARD.match(p.name) and p.name not in expected)
    for name in extra:
        yield name, "unexpected (not one of the expected shards)"


def fetch_from_hub(revision: str) -> Path:
    """`perception/0.1.0` of `jnirschl/uBench` at `revision` through the Hugging Face cache: a
    download when online, the cached snapshot when offline or when the hub cannot be reached.

    Offline is said to huggingface_hub explicitly (`local_files_only`), and a failed download is
    retried from the cache: given a commit hash, huggingface_hub 1.x lists the repository's files
    before it looks in the cache, even under HF_HUB_OFFLINE=1, so a cached snapshot whose file list
    it did not record (one written by an earlier version) failed as if it were absent (2.x looks)."""
    from huggingface_hub import snapshot_download

    def fetch(local_files_only: bool) -> str:
        return snapshot_download(
            HUB_ID,
            repo_type="dataset",
            revision=revision,
            allow_patterns=[f"{HUB_FOLDER}/*"],
            local_files_only=local_files_only,
        )

    offline = offline_setting()
    try:
        try:
            root = fetch(local_files_only=offline is not None)
        except Exception:
            if offline:
                raise
            root = fetch(local_files_only=True)
    except Exception as exc:
        why = (
            f"({offline})"
            if offline
            else f"and the hub is unreachable ({type(exc).__name__}; HF_HUB_OFFLINE=1 fails fast)"
        )
        raise MicromergeError(
            f"--data {HUB_ID}@{revision[:12]}: not in the Hugging Face cache {why}; copy it where there is a network "
            f"(`{hf_download_command(HUB_ID, dataset=True, revision=revision, include=HUB_FOLDER + '/*')}`) "
            "and pass --data DIR"
        ) from exc
    folder = Path(root) / HUB_FOLDER
    if not is_hub_layout(folder):
        raise MicromergeError(
            f"--data {HUB_ID}@{revision[:12]}: the snapshot at {root} has no {HUB_FOLDER} shards"
        )
    return folder
