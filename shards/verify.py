"""Check every shard of an ingested root against its catalog: presence, byte size, sha256, sample
count (distinct keys in the tar), and that every tracklet's sample is in its shard."""

from __future__ import annotations

import hashlib
import tarfile
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from shards.catalog import read_manifest, read_table

SHARDS_DIR = "shards"
_CHUNK = 1 << 20


@dataclass
class Problem:
    kind: str  # missing_shard, size_mismatch, checksum_mismatch, count_mismatch, unreadable_shard,
    #            missing_sample, extra_shard, bad_path, catalog_mismatch, bad_member
    shard: str
    detail: str


@dataclass
class VerifyReport:
    root: str
    shards_in_catalog: int = 0
    shards_checked: int = 0
    samples_checked: int = 0
    bytes_hashed: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(p.kind for p in self.problems).items()))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        d["problem_counts"] = self.counts()
        return d


def file_sha256(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def member_key(name: str) -> str | None:
    """The webdataset key of a tar member: the path up to the first dot of its base name."""
    p = PurePosixPath(name)
    if "." not in p.name:
        return None
    stem = p.name.split(".", 1)[0]
    return str(p.parent / stem) if str(p.parent) != "." else stem


def tar_keys(path: Path) -> tuple[set[str], list[str]]:
    """Distinct sample keys of a tar, and member names that carry no key. Raises tarfile.TarError
    or OSError on a damaged tar."""
    keys: set[str] = set()
    bad: list[str] = []
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key = member_key(member.name)
            if key is None or not _safe_relative(member.name.replace("\\", "/")):
                bad.append(member.name)
            else:
                keys.add(key)
    return keys, bad


def _safe_relative(path: str) -> bool:
    p = PurePosixPath(path)
    return bool(path) and not p.is_absolute() and ".." not in p.parts


def verify_root(root: str | Path, progress: bool = False) -> VerifyReport:
    root = Path(root)
    read_manifest(root)
    shards = read_table(root, "shards").to_pylist()
    tracklets = read_table(root, "tracklets").select(["tracklet_id", "shard", "sample_key"]).to_pylist()
    report = VerifyReport(root=str(root), shards_in_catalog=len(shards))
    expected_keys: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for t in tracklets:
        expected_keys[t["shard"]].append((t["tracklet_id"], t["sample_key"]))
    catalog_paths = {s["path"] for s in shards}
    for path in sorted(set(expected_keys) - catalog_paths, key=str):
        report.problems.append(
            Problem(
                "catalog_mismatch",
                str(path),
                f"{len(expected_keys[path])} tracklets name this shard, which is not in the shards table",
            )
        )

    iterator = shards
    if progress:
        from tqdm import tqdm

        iterator = tqdm(shards, desc="verify", unit="shard")
    for row in iterator:
        rel = row["path"]
        if not _safe_relative(rel or ""):
            report.problems.append(Problem("bad_path", str(rel), "shard path is not relative to the root"))
            continue
        path = root / rel
        if not path.is_file():
            report.problems.append(Problem("missing_shard", rel, f"{path} does not exist"))
            continue
        report.shards_checked += 1
        digest, size = file_sha256(path)
        report.bytes_hashed += size
        if size != row["n_bytes"]:
            report.problems.append(
                Problem("size_mismatch", rel, f"{size} bytes, catalog says {row['n_bytes']}")
            )
        if digest != row["sha256"]:
            report.problems.append(
                Problem("checksum_mismatch", rel, f"sha256 {digest}, catalog says {row['sha256']}")
            )
        try:
            keys, bad = tar_keys(path)
        except (tarfile.TarError, OSError, EOFError) as exc:
            report.problems.append(Problem("unreadable_shard", rel, f"cannot read as tar: {exc}"))
            continue
        report.samples_checked += len(keys)
        for name in bad:
            report.problems.append(
                Problem("bad_member", rel, f"member {name!r} is not a relative name with an extension")
            )
        if len(keys) != row["n_samples"]:
            report.problems.append(
                Problem("count_mismatch", rel, f"{len(keys)} samples, catalog says {row['n_samples']}")
            )
        listed = expected_keys.get(rel, [])
        if len(listed) != row["n_samples"]:
            report.problems.append(
                Problem(
                    "catalog_mismatch",
                    rel,
                    f"{len(listed)} tracklets name this shard, shards table says {row['n_samples']} samples",
                )
            )
        for tracklet_id, key in listed:
            if key not in keys:
                report.problems.append(
                    Problem(
                        "missing_sample", rel, f"tracklet {tracklet_id!r}: sample {key!r} not in the shard"
                    )
                )

    sdir = root / SHARDS_DIR
    if sdir.is_dir():
        for path in sorted(sdir.rglob("*.tar")):
            rel = path.relative_to(root).as_posix()
            if rel not in catalog_paths:
                report.problems.append(Problem("extra_shard", rel, "shard file not listed in the catalog"))
    return report
