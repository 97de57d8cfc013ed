"""Check every shard of an ingested root against its catalog: presence, byte size, sha256, sample
count (distinct keys in the tar), and that every tracklet's sample is in its shard."""

from __future__ import annotations

import hashlib
import tarfile
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from polyp_ssl.shards.catalog import read_manifest, read_table
from polyp_ssl.shards.locations import UnsafeLocation, inside, location_problem
from polyp_ssl.shards.reader import read_members
from polyp_ssl.shards.sample import JSON_EXT, JpegSizeError, SampleError, check_jpeg, frame_ext, parse_sample

SHARDS_DIR = "shards"
_CHUNK = 1 << 20


@dataclass
class Problem:
    kind: str  # missing_shard, size_mismatch, checksum_mismatch, count_mismatch, unreadable_shard,
    #            missing_sample, extra_shard, bad_path, catalog_mismatch, bad_member, bad_sample,
    #            duplicate_key
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


@dataclass
class ShardScan:
    """What one pass over a shard's members finds."""

    keys: set[str] = field(default_factory=set)  # distinct sample keys
    bad_members: list[str] = field(default_factory=list)  # names without a key, absolute or climbing
    bad_samples: list[tuple[str, str]] = field(default_factory=list)  # (key, what is wrong)
    duplicates: list[str] = field(default_factory=list)  # keys whose members appear in two places


def _wanted(name: str) -> bool:
    ext = PurePosixPath(name).name.partition(".")[2]
    return (ext == JSON_EXT or ext.endswith(".jpg")) and _safe_relative(name.replace("\\", "/"))


def sample_problem(key: str, members: dict[str, bytes]) -> str | None:
    """What is wrong with one sample (its JSON as data, shards.sample.parse_sample; its key; a JPEG
    per frame whose header gives the JSON's crop_sizes), or None."""
    if JSON_EXT not in members:
        return "no .json member"
    try:
        meta = parse_sample(members[JSON_EXT])
    except SampleError as exc:
        return f"JSON member: {exc}"
    if meta.key != key:
        return f"JSON field 'key' is {meta.key!r}, not the member key"
    for i in range(meta.n_frames):
        data = members.get(frame_ext(i))
        if data is None:
            return f"no member .{frame_ext(i)} for frame {i}"
        try:
            check_jpeg(data, meta.crop_sizes[i])
        except JpegSizeError as exc:
            return f"field 'crop_sizes[{i}]': frame {i} is {exc}"
    return None


def scan_shard(path: Path) -> ShardScan:
    """Keys, bad member names, bad samples and repeated keys of a tar, read with the shard reader
    (shards.reader.read_members: sizes bounded by the file, members never extracted). Raises
    tarfile.TarError or OSError on a damaged tar."""
    scan = ShardScan()
    current: str | None = None
    members: dict[str, bytes] = {}
    reported: set[str] = set()

    def close() -> None:
        if current is not None:
            problem = sample_problem(current, members)
            if problem is not None:
                scan.bad_samples.append((current, problem))

    with open(path, "rb") as f:
        for name, data in read_members(f, _wanted):
            key = member_key(name)
            if key is None or not _safe_relative(name.replace("\\", "/")):
                scan.bad_members.append(name)
                continue
            if key != current:
                close()
                if key in scan.keys and key not in reported:
                    scan.duplicates.append(key)
                    reported.add(key)
                scan.keys.add(key)
                current, members = key, {}
            if data is None:
                continue
            ext = PurePosixPath(name).name.partition(".")[2]
            if ext in members and key not in reported:
                scan.duplicates.append(key)
                reported.add(key)
            members[ext] = data
        close()
    return scan


def tar_keys(path: Path) -> tuple[set[str], list[str]]:
    """Distinct sample keys of a tar, and member names that carry no key. Raises tarfile.TarError
    or OSError on a damaged tar."""
    scan = scan_shard(path)
    return scan.keys, scan.bad_members


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
    key_shard: dict[str, str] = {}  # sample key -> the first shard it was found in
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
        problem = location_problem(rel)
        if problem is not None:
            report.problems.append(
                Problem("bad_path", str(rel), f"shard path {problem}; it must be relative to the root")
            )
            continue
        try:
            path = inside(root, rel)
        except UnsafeLocation as exc:
            report.problems.append(Problem("bad_path", rel, str(exc)))
            continue
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
            scan = scan_shard(path)
        except (tarfile.TarError, OSError, EOFError) as exc:
            report.problems.append(Problem("unreadable_shard", rel, f"cannot read as tar: {exc}"))
            continue
        keys, bad = scan.keys, scan.bad_members
        report.samples_checked += len(keys)
        for name in bad:
            report.problems.append(
                Problem("bad_member", rel, f"member {name!r} is not a relative name with an extension")
            )
        for key, problem in scan.bad_samples:
            report.problems.append(Problem("bad_sample", rel, f"sample {key!r}: {problem}"))
        for key in scan.duplicates:
            report.problems.append(
                Problem("duplicate_key", rel, f"sample {key!r}: its members appear twice in the shard")
            )
        for key in sorted(keys):
            other = key_shard.setdefault(key, rel)
            if other != rel:
                report.problems.append(
                    Problem(
                        "duplicate_key",
                        rel,
                        f"sample {key!r}: also in shard {other} (two samples with one key)",
                    )
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
