"""Check every shard of an ingested root against its catalog: presence, byte size, sha256, sample
count (distinct keys in the tar), that every tracklet's sample is in its shard, and that every
member span the catalog records (offset, size and CRC-32 of a member's data, for reads at
offsets) is where that member's data lies in the tar."""

from __future__ import annotations

import tarfile
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc

from polyp_ssl.shards.files import NotRegularFileError, open_regular
from polyp_ssl.shards.hashing import file_sha256_size
from polyp_ssl.shards.locations import UnsafeLocation, inside, location_problem
from polyp_ssl.shards.members import MemberSpan, crc32
from polyp_ssl.shards.reader import BLOCK, COMPRESSED_MAGIC, read_members
from polyp_ssl.shards.sample import JSON_EXT
from polyp_ssl.shards.samples import SampleDamage, check_stored_sample
from polyp_ssl.shards.tables import read_catalog_table as read_table
from polyp_ssl.shards.tables import read_manifest

SHARDS_DIR = "shards"
_CHUNK = 1 << 20
# span_mismatch problems reported per shard; the rest of that shard's are counted in one more
MAX_SPAN_PROBLEMS = 20


@dataclass
class Problem:
    kind: str  # missing_shard, size_mismatch, checksum_mismatch, count_mismatch, unreadable_shard,
    #            missing_sample, extra_shard, bad_path, catalog_mismatch, bad_member, bad_sample,
    #            duplicate_key, span_mismatch
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
    # (key, suffix) -> where the member's data lies (first occurrence); empty for a compressed tar
    spans: dict[tuple[str, str], MemberSpan] = field(default_factory=dict)
    compressed: bool = False


class _Counting:
    """A read-only file that counts the bytes read through it: the position in the file."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.pos += len(data)
        return data

    def tell(self) -> int:
        return self.pos

    def fileno(self) -> int:
        return self.raw.fileno()


def _wanted(name: str) -> bool:
    ext = PurePosixPath(name).name.partition(".")[2]
    return (ext == JSON_EXT or ext.endswith(".jpg")) and _safe_relative(name.replace("\\", "/"))


def sample_problem(key: str, members: dict[str, bytes]) -> str | None:
    """What is wrong with one sample (shards.samples.check_stored_sample: its JSON as data, its key,
    a JPEG per frame whose header gives the JSON's crop_sizes), or None."""
    try:
        check_stored_sample(members, key)
    except SampleDamage as damage:
        return str(damage)
    return None


def scan_shard(path: Path) -> ShardScan:
    """Keys, bad member names, bad samples, repeated keys and member spans of a tar, read with the
    shard reader (shards.reader.read_members: sizes bounded by the file, members never extracted).
    Raises tarfile.TarError or OSError on a damaged tar."""
    scan = ShardScan()
    current: str | None = None
    members: dict[str, bytes] = {}
    reported: set[str] = set()

    def close() -> None:
        if current is not None:
            problem = sample_problem(current, members)
            if problem is not None:
                scan.bad_samples.append((current, problem))

    with open_regular(path, "shard") as raw:
        scan.compressed = raw.read(BLOCK).startswith(COMPRESSED_MAGIC)
        raw.seek(0)
        f: Any = _Counting(raw)
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
            if not scan.compressed:
                # the member's data starts on a block boundary and has just been read (its padding
                # to the next boundary perhaps too): round down to the boundary
                offset = (f.pos - len(data)) // BLOCK * BLOCK
                scan.spans.setdefault((key, ext), MemberSpan(offset, len(data), crc32(data)))
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


_SPAN_TABLE = ["shard", "sample_key", "member", "offset", "size", "crc32"]


def catalog_spans(tracklets: pa.Table, frames: pa.Table) -> dict[str, pa.Table]:
    """The member spans the catalog records, by shard: rows (shard, sample_key, member = the member
    suffix, offset, size, crc32) of every tracklet's JSON and every frame's JPEG. Kept as Arrow
    tables (a frame row each): verify turns only one shard's rows into Python objects at a time."""
    t = tracklets.select(["tracklet_id", "shard", "sample_key", "json_offset", "json_size", "json_crc32"])
    json_rows = pa.table(
        [
            t["shard"],
            t["sample_key"],
            pa.array([JSON_EXT] * t.num_rows, pa.string()),
            t["json_offset"],
            t["json_size"],
            t["json_crc32"],
        ],
        names=_SPAN_TABLE,
    )
    f = frames.select(["tracklet_id", "frame_index", "jpeg_offset", "jpeg_size", "jpeg_crc32"]).join(
        t.select(["tracklet_id", "shard", "sample_key"]), "tracklet_id", join_type="inner"
    )
    # frame_ext(i): the index with at least 4 digits, then ".jpg"
    suffix = pc.binary_join_element_wise(
        pc.utf8_lpad(pc.cast(f["frame_index"], pa.string()), 4, "0"), pa.scalar(".jpg"), ""
    )
    frame_rows = pa.table(
        [f["shard"], f["sample_key"], suffix, f["jpeg_offset"], f["jpeg_size"], f["jpeg_crc32"]],
        names=_SPAN_TABLE,
    )
    rows = pa.concat_tables([json_rows, frame_rows]).sort_by(
        [("shard", "ascending"), ("sample_key", "ascending"), ("member", "ascending")]
    )
    out: dict[str, pa.Table] = {}
    start = 0
    for run in pc.value_counts(rows["shard"]).to_pylist():  # in the sorted order
        if run["values"] is not None:
            out[run["values"]] = rows.slice(start, run["counts"])
        start += run["counts"]
    return out


def span_problems(rel: str, scan: ShardScan, expected: pa.Table | None) -> list[Problem]:
    """span_mismatch for every catalog span of shard `rel` that is not its member's data in the
    tar (offset, size, CRC-32), names the sample and the member; a sample missing from the tar is
    missing_sample already. At most MAX_SPAN_PROBLEMS, then one that counts the rest."""
    if expected is None or expected.num_rows == 0:
        return []
    if scan.compressed:
        return [
            Problem(
                "span_mismatch",
                rel,
                f"the shard is compressed: the catalog's {expected.num_rows} member spans cannot be "
                "read at their offsets",
            )
        ]
    problems: list[Problem] = []
    n_more = 0
    for row in expected.to_pylist():
        detail = _span_difference(row, scan)
        if detail is None:
            continue
        if len(problems) < MAX_SPAN_PROBLEMS:
            problems.append(Problem("span_mismatch", rel, detail))
        else:
            n_more += 1
    if n_more:
        problems.append(
            Problem("span_mismatch", rel, f"{n_more} more members whose catalog spans differ (not listed)")
        )
    return problems


def _span_difference(row: dict[str, Any], scan: ShardScan) -> str | None:
    key, member = row["sample_key"], row["member"]
    if key not in scan.keys:
        return None  # missing_sample
    what = f"sample {key!r} member {f'{key}.{member}'!r}"
    recorded = (row["offset"], row["size"], row["crc32"])
    if any(v is None for v in recorded):
        return f"{what}: the catalog records no span (offset, size, crc32: {recorded})"
    actual = scan.spans.get((key, member))
    if actual is None:
        return f"{what}: no such member in the shard"
    diffs = [
        f"{name} {want} in the catalog, {got} in the shard"
        for name, want, got in zip(
            ("offset", "size", "crc32"), recorded, (actual.offset, actual.size, actual.crc32), strict=True
        )
        if want != got
    ]
    return f"{what}: {'; '.join(diffs)}" if diffs else None


def verify_root(root: str | Path, progress: bool = False) -> VerifyReport:
    root = Path(root)
    read_manifest(root)
    shards = read_table(root, "shards").to_pylist()
    tracklets_table = read_table(root, "tracklets")
    tracklets = tracklets_table.select(["tracklet_id", "shard", "sample_key"]).to_pylist()
    spans_by_shard = catalog_spans(tracklets_table, read_table(root, "frames"))
    report = VerifyReport(root=str(root), shards_in_catalog=len(shards))
    expected_keys: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for t in tracklets:
        expected_keys[t["shard"]].append((t["tracklet_id"], t["sample_key"]))
    catalog_paths = {s["path"] for s in shards}
    key_shard: dict[str, str] = {}  # sample key -> the first shard it was found in
    for named in sorted(set(expected_keys) - catalog_paths, key=str):
        report.problems.append(
            Problem(
                "catalog_mismatch",
                str(named),
                f"{len(expected_keys[named])} tracklets name this shard, which is not in the shards table",
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
        if not path.exists():
            report.problems.append(Problem("missing_shard", rel, f"{path} does not exist"))
            continue
        try:
            digest, size = file_sha256_size(path, _CHUNK, "shard")
        except NotRegularFileError as exc:  # a FIFO or device in place of the shard: never read
            report.problems.append(Problem("not_regular_file", rel, str(exc)))
            continue
        report.shards_checked += 1
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
        report.problems += span_problems(rel, scan, spans_by_shard.get(rel))

    sdir = root / SHARDS_DIR
    if sdir.is_dir():
        for tar_path in sorted(sdir.rglob("*.tar")):
            rel = tar_path.relative_to(root).as_posix()
            if rel not in catalog_paths:
                report.problems.append(Problem("extra_shard", rel, "shard file not listed in the catalog"))
    return report
