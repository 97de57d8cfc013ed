"""Catalog API, `polyp-ssl catalog` (query, formats, --tables, merge), `polyp-ssl verify`,
lock-down of the DuckDB connection, and a start-up that does not import torch."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shard_factory import SPAN_COLUMNS, fill_spans

from polyp_ssl.shards import catalog
from polyp_ssl.shards.catalog import CatalogError, connect, query, read_manifest, read_table
from polyp_ssl.shards.catalog_merge import part_dir_name
from polyp_ssl.shards.cli import format_table, main, verify_main
from polyp_ssl.shards.sample import SAMPLE_VERSION
from polyp_ssl.shards.schema import CATALOG_VERSION, TABLES, embeddings_schema

REPO = Path(__file__).resolve().parents[1]

# (tracklet_id, split, video, identity, start, n_frames, size, histology)
TRACKLETS = [
    ("001-001_1#0", "train", "001-001", "001-001_1", 0, 40, 4.0, "AD"),
    ("001-001_1#1", "train", "001-001", "001-001_1", 100, 10, 4.0, "AD"),
    ("001-001_2#0", "train", "001-001", "001-001_2", 50, 31, 12.0, "HP"),
    ("002-001_1#0", "val", "002-001", "002-001_1", 5, 30, None, None),
]


def _write_tar(path: Path, keys: list[str], frames: dict[str, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        # verify checks each sample's JSON as data and each JPEG's header (never decoded): a valid
        # JSON and an 8x8 frame header in front of the fake JPEG bytes
        sof = b"\xff\xc0\x00\x0b\x08\x00\x08\x00\x08\x01\x01\x11\x00"
        for key in keys:
            n = frames[key]
            meta = {
                "key": key, "tracklet_id": key, "split": "train", "dataset_id": None, "video_id": "v",
                "sequence_id": "v", "identity_id": "i", "size_mm": None, "histology": None,
                "position_in_video": 0.0, "video_first_frame": 0, "video_last_frame": n,
                "frame_ids": list(range(n)), "image_ids": list(range(n)), "annotation_ids": list(range(n)),
                "file_names": ["f.jpg"] * n, "boxes": [[1.0, 1.0, 2.0, 2.0]] * n, "crops": [[0, 0, 8, 8]] * n,
                "crop_sizes": [[8, 8]] * n, "boxes_in_crop": [[1.0, 1.0, 2.0, 2.0]] * n, "params": {},
                "extra": {}, "version": SAMPLE_VERSION,
            }  # fmt: skip
            members = [(f"{key}.json", json.dumps(meta).encode())]
            jpeg = b"\xff\xd8" + sof + b"fakejpeg"
            members += [(f"{key}.{i:04d}.jpg", jpeg + bytes([i])) for i in range(n)]
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_catalog(
    root: Path, tracklets=TRACKLETS, catalog_sub: str = "catalog", manifest_extra=None, shard_prefix: str = ""
) -> dict[str, pa.Table]:
    """A tiny ingested root: shards (tar) and catalog tables with the pinned schemas."""
    cdir = root / catalog_sub
    cdir.mkdir(parents=True, exist_ok=True)
    by_split: dict[str, list] = {}
    for t in tracklets:
        by_split.setdefault(t[1], []).append(t)
    trows, frows, srows = [], [], []
    for split, ts in sorted(by_split.items()):
        shard = f"shards/{split}/{shard_prefix}{split}-000000.tar"
        keys = [t[0].replace("#", "-") for t in ts]
        nframes = {k: min(t[5], 3) for k, t in zip(keys, ts, strict=True)}
        _write_tar(root / shard, keys, nframes)
        srows.append(
            {
                "path": shard,
                "split": split,
                "n_samples": len(ts),
                "n_bytes": (root / shard).stat().st_size,
                "sha256": _sha(root / shard),
                "first_video": ts[0][2],
                "last_video": ts[-1][2],
            }
        )
        for t, key in zip(ts, keys, strict=True):
            tid, _, video, ident, start, n, size, hist = t
            trows.append(
                {
                    "tracklet_id": tid,
                    "split": split,
                    "dataset_id": None,
                    "video_id": video,
                    "identity_id": ident,
                    "start_frame": start,
                    "end_frame": start + n - 1,
                    "n_frames": n,
                    "position_in_video": start / 200,
                    "size_mm": size,
                    "histology": hist,
                    "shard": shard,
                    "sample_key": key,
                }
            )
            for i in range(nframes[key]):
                frows.append(
                    {
                        "tracklet_id": tid,
                        "frame_index": i,
                        "frame_id": start + i,
                        "image_id": start + i,
                        "annotation_id": 1000 + start + i,
                        "file_name": f"{video}_{start + i}.jpg",
                        "bbox_x": 10.0,
                        "bbox_y": 12.5,
                        "bbox_w": 20.0,
                        "bbox_h": 22.0,
                        "crop_x0": 0,
                        "crop_y0": 0,
                        "crop_x1": 64,
                        "crop_y1": 64,
                        "stored_w": 64,
                        "stored_h": 64,
                    }
                )
    videos = sorted({(t[2], t[1]) for t in tracklets})
    vrows = [
        {
            "video_id": v,
            "dataset_id": None,
            "sequence_id": v,
            "split": s,
            "first_frame": 0,
            "last_frame": 200,
            "n_images": 201,
            "n_polyps": len({t[3] for t in tracklets if t[2] == v}),
            "n_tracklets": sum(t[2] == v for t in tracklets),
        }
        for v, s in videos
    ]
    idents = sorted({(t[3], t[2], t[1], t[6], t[7]) for t in tracklets}, key=lambda x: x[0])
    prows = [
        {
            "identity_id": i,
            "video_id": v,
            "dataset_id": None,
            "split": s,
            "size_mm": sz,
            "histology": h,
            "n_tracklets": sum(t[3] == i for t in tracklets),
            "n_frames": sum(t[5] for t in tracklets if t[3] == i),
        }
        for i, v, s, sz, h in idents
    ]
    erows = [
        {
            "source": "annotations/instances_train.json",
            "id": "7",
            "field": "bbox",
            "reason": "zero_area_box",
            "detail": "annotation 7: bbox has zero area",
            "action": "skipped",
        }
    ]
    rows = {
        "videos": vrows,
        "polyps": prows,
        "tracklets": trows,
        "frames": frows,
        "shards": srows,
        "errors": erows,
    }
    fill_spans(root, trows, frows)
    tables = {}
    for name, schema in TABLES.items():
        tables[name] = pa.Table.from_pylist(rows[name], schema=schema)
        pq.write_table(tables[name], cdir / f"{name}.parquet")
    manifest = {
        "version": CATALOG_VERSION,
        "parameters": {"crop_scale": 5.0, "store_size": 256},
        "counts": {"tracklets": len(trows), "frames": len(frows)},
    }
    manifest.update(manifest_extra or {})
    (cdir / "manifest.json").write_text(json.dumps(manifest))
    return tables


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    build_catalog(r)
    return r


def run_cli(capsys, argv, fn=main):
    code = fn(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- API


def test_query_counts_per_split(root):
    t = query(root, "SELECT split, count(*) AS n FROM tracklets GROUP BY 1 ORDER BY 1")
    assert t.to_pylist() == [{"split": "train", "n": 3}, {"split": "val", "n": 1}]


def test_views_and_joins_match_direct_computation(root):
    con = connect(root)
    try:
        assert set(catalog.view_names(con)) == set(TABLES)
        got = con.execute(
            "SELECT t.tracklet_id, count(*) FROM tracklets t JOIN frames f USING (tracklet_id) "
            "GROUP BY 1 ORDER BY 1"
        ).fetchall()
        long = con.execute("SELECT tracklet_id FROM tracklets WHERE n_frames >= 30 ORDER BY 1").fetchall()
    finally:
        con.close()
    assert got == sorted((t[0], min(t[5], 3)) for t in TRACKLETS)
    assert [r[0] for r in long] == sorted(t[0] for t in TRACKLETS if t[5] >= 30)


def test_read_table_pinned_schema_and_manifest(root):
    t = read_table(root, "frames")
    assert t.schema == TABLES["frames"]
    assert t.num_rows == sum(min(x[5], 3) for x in TRACKLETS)
    assert read_manifest(root)["version"] == CATALOG_VERSION


def test_never_ingested_root_says_run_ingest(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(CatalogError, match="polyp-ssl ingest"):
        connect(tmp_path / "raw")


def test_older_version_is_a_clear_error(tmp_path):
    r = tmp_path / "old"
    build_catalog(r, manifest_extra={"version": CATALOG_VERSION - 1})
    with pytest.raises(CatalogError, match=r"manifest.json.*'version'"):
        query(r, "SELECT 1")


def test_schema_mismatch_names_file_and_column(root):
    path = root / "catalog" / "tracklets.parquet"
    t = pq.read_table(path)
    t = t.set_column(t.schema.get_field_index("n_frames"), "n_frames", t["n_frames"].cast(pa.string()))
    pq.write_table(t, path)
    with pytest.raises(CatalogError, match=r"tracklets\.parquet: column 'n_frames' has type string"):
        read_table(root, "tracklets")
    pq.write_table(t.drop_columns(["n_frames"]), path)
    with pytest.raises(CatalogError, match=r"tracklets\.parquet: column 'n_frames' is missing"):
        connect(root)


def test_missing_table_file(root):
    (root / "catalog" / "errors.parquet").unlink()
    with pytest.raises(CatalogError, match="errors"):
        connect(root)


def test_read_catalog_table_reads_a_column_subset_and_a_row_filter(root):
    import pyarrow.compute as pc

    from polyp_ssl.shards.tables import read_catalog_table

    t = read_catalog_table(root, "tracklets", ["tracklet_id", "split"], filter=pc.field("split") == "train")
    assert t.column_names == ["tracklet_id", "split"]
    assert t["tracklet_id"].to_pylist() == [x[0] for x in TRACKLETS if x[1] == "train"]
    assert read_catalog_table(root, "frames").equals(read_table(root, "frames"))
    loose = read_catalog_table(root, "tracklets", ["n_frames"], checked=False)
    assert loose["n_frames"].to_pylist() == [x[5] for x in TRACKLETS]
    with pytest.raises(CatalogError, match="unknown catalog table 'nope'"):
        read_catalog_table(root, "nope")


def test_a_checked_read_keeps_the_catalog_checks(root, tmp_path):
    from polyp_ssl.shards.tables import NoCatalogError, read_catalog_table

    path = root / "catalog" / "tracklets.parquet"
    t = pq.read_table(path)
    pq.write_table(t.append_column("extra", pa.array([0] * t.num_rows)), path)
    with pytest.raises(CatalogError, match=r"tracklets\.parquet: unexpected column 'extra'"):
        read_catalog_table(root, "tracklets", ["tracklet_id"])
    assert read_catalog_table(root, "tracklets", ["tracklet_id"], checked=False).num_rows == len(TRACKLETS)
    with pytest.raises(NoCatalogError, match="has no catalog"):
        read_catalog_table(tmp_path, "tracklets")


def test_reading_a_table_imports_no_duckdb(root):
    code = (
        "import sys; from polyp_ssl.shards.tables import read_catalog_table\n"
        "import polyp_ssl.shards.verify, polyp_ssl.stream_index, polyp_ssl.span_index\n"
        "n = read_catalog_table(sys.argv[1], 'tracklets', ['tracklet_id']).num_rows\n"
        "print('DUCKDB', 'duckdb' in sys.modules, n)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(root)], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert f"DUCKDB False {len(TRACKLETS)}" in out.stdout


def test_embeddings_view_cosine_similarity(root):
    rng = np.random.default_rng(0)
    dim = 8
    vecs = rng.normal(size=(4, dim)).astype(np.float32)
    schema = embeddings_schema(dim)
    rows = [
        {
            "tracklet_id": t[0],
            "sample_key": t[0].replace("#", "-"),
            "split": t[1],
            "video_id": t[2],
            "identity_id": t[3],
            "fragment_index": -1,
            "start_frame": t[4],
            "vector": vecs[i].tolist(),
        }
        for i, t in enumerate(TRACKLETS)
    ]
    (root / "embeddings").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / "embeddings" / "hmve-v1.parquet")
    sql = """
        SELECT b.tracklet_id, array_cosine_similarity(a.vector, b.vector) AS sim
        FROM "embeddings_hmve_v1" a, "embeddings_hmve_v1" b
        WHERE a.tracklet_id = '001-001_1#0' AND b.tracklet_id <> a.tracklet_id
        ORDER BY sim DESC"""
    got = query(root, sql).to_pylist()
    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    expected = sorted(((TRACKLETS[j][0], float(unit[0] @ unit[j])) for j in range(1, 4)), key=lambda x: -x[1])
    assert [g["tracklet_id"] for g in got] == [e[0] for e in expected]
    for g, e in zip(got, expected, strict=True):
        assert math.isclose(g["sim"], e[1], rel_tol=1e-5, abs_tol=1e-6)


# ---------------------------------------------------------------- lock-down


@pytest.mark.parametrize(
    "sql",
    [
        "COPY tracklets TO '{out}/leak.csv'",
        "COPY (SELECT 1) TO '{out}/leak.parquet' (FORMAT parquet)",
        "INSTALL httpfs",
        "LOAD httpfs",
        "ATTACH '{out}/other.duckdb' AS other",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT * FROM glob('/etc/*')",
        "SET enable_external_access = true",
        "SET autoinstall_known_extensions = true",
        "EXPORT DATABASE '{out}/dump'",
    ],
)
def test_lockdown_refuses_file_and_extension_access(root, tmp_path, sql):
    import duckdb

    con = connect(root)
    try:
        with pytest.raises(duckdb.Error):
            con.execute(sql.format(out=tmp_path))
        assert con.execute("SELECT count(*) FROM tracklets").fetchone()[0] == len(TRACKLETS)
    finally:
        con.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]


def test_python_variables_are_not_queryable(root):
    import duckdb

    secret_table = pa.table({"x": [1]})  # noqa: F841 - what a replacement scan would find
    con = connect(root)
    try:
        with pytest.raises(duckdb.Error):
            con.execute("SELECT * FROM secret_table")
    finally:
        con.close()


def test_two_processes_query_concurrently(root):
    code = (
        "import sys; from polyp_ssl.shards.catalog import query\n"
        "for _ in range(20):\n"
        "    sql = 'SELECT count(*) AS n FROM frames JOIN tracklets USING (tracklet_id)'\n"
        "    n = query(sys.argv[1], sql)['n'][0]\n"
        "print(n.as_py())\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(root)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    expected = str(sum(min(t[5], 3) for t in TRACKLETS))
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert out.strip() == expected


# ---------------------------------------------------------------- CLI


def test_cli_table_format(root, capsys):
    code, out, _ = run_cli(
        capsys, [str(root), "SELECT split, count(*) AS n FROM tracklets GROUP BY 1 ORDER BY 1"]
    )
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["split", "n"]
    assert lines[2].split() == ["train", "3"] and lines[3].split() == ["val", "1"]
    assert lines[-1] == "(2 rows)"


def test_cli_max_rows_note_and_truncation(root, capsys):
    code, out, _ = run_cli(
        capsys,
        [
            str(root),
            "SELECT * FROM frames ORDER BY tracklet_id, frame_index",
            "--max-rows",
            "2",
            "--max-width",
            "8",
        ],
    )
    assert code == 0
    n = sum(min(t[5], 3) for t in TRACKLETS)
    assert out.splitlines()[-1] == f"({n} rows, {n - 2} not shown: --max-rows to see more)"
    body = out.splitlines()[2:4]
    assert all("001-001…" in line for line in body)  # tracklet ids cut to 8 characters


def test_format_table_alignment():
    t = pa.table({"name": ["a", "long"], "value": [1.5, 10.0], "missing": pa.array([None, "x"], pa.string())})
    lines = format_table(t, None).splitlines()
    assert lines[2] == "a       1.5  NULL"
    assert lines[3] == "long     10  x"


def test_cli_csv_and_json(root, capsys):
    sql = "SELECT tracklet_id, size_mm, histology FROM tracklets ORDER BY tracklet_id"
    code, out, _ = run_cli(capsys, [str(root), sql, "--format", "csv"])
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["tracklet_id"] for r in rows] == sorted(t[0] for t in TRACKLETS)
    assert rows[-1]["size_mm"] == "" and rows[0]["size_mm"] == "4.0"
    code, out, _ = run_cli(capsys, [str(root), sql, "--format", "json"])
    assert code == 0
    objs = json.loads(out)
    assert objs == [{"tracklet_id": t[0], "size_mm": t[6], "histology": t[7]} for t in sorted(TRACKLETS)]


def test_cli_tables_lists_row_counts(root, capsys):
    code, out, _ = run_cli(capsys, [str(root), "--tables", "--format", "json"])
    assert code == 0
    counts = {r["view"]: r["rows"] for r in json.loads(out)}
    assert counts == {
        name: pq.read_metadata(root / "catalog" / f"{name}.parquet").num_rows for name in TABLES
    }


def test_cli_sql_error_and_missing_root(root, tmp_path, capsys):
    code, _, err = run_cli(capsys, [str(root), "SELECT nope FROM tracklets"])
    assert code == 1 and "nope" in err
    code, _, err = run_cli(capsys, [str(tmp_path / "never"), "SELECT 1"])
    assert code == 2 and "no such directory" in err  # bad input: exit 2


def test_catalog_command_does_not_import_torch(root):
    code = (
        "import sys; from polyp_ssl.entry import main\n"
        "rc = main(['catalog', sys.argv[1], 'SELECT count(*) FROM tracklets'])\n"
        "heavy = ('torch', 'webdataset', 'torchvision', 'lightning', 'pandas')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "print('HEAVY', heavy, rc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(root)], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "HEAVY [] 0" in out.stdout


# ---------------------------------------------------------------- merge


def _split_tracklets(n_parts: int) -> list[list]:
    videos = sorted({t[2] for t in TRACKLETS})
    return [[t for t in TRACKLETS if videos.index(t[2]) % n_parts == i] for i in range(n_parts)]


def _build_parts(out: Path, n: int = 2, parameters=None) -> None:
    for i, ts in enumerate(_split_tracklets(n)):
        extra = {"part": [i, n], "created": f"t{i}"}
        if parameters and i in parameters:
            extra["parameters"] = parameters[i]
        build_catalog(
            out,
            ts,
            catalog_sub=f"catalog/parts/{part_dir_name(i, n)}",
            manifest_extra=extra,
            shard_prefix=f"part{i:03d}-",
        )


def test_merge_two_parts(tmp_path, capsys):
    out = tmp_path / "out"
    _build_parts(out)
    code, stdout, err = run_cli(capsys, ["merge", str(out)])
    assert code == 0, err
    assert "merged 2 parts" in stdout
    tr = read_table(out, "tracklets").to_pylist()
    assert sorted(r["tracklet_id"] for r in tr) == sorted(t[0] for t in TRACKLETS)
    keys = [(r["split"], r["video_id"], r["start_frame"], r["tracklet_id"]) for r in tr]
    assert keys == sorted(keys)
    assert read_table(out, "frames").num_rows == sum(min(t[5], 3) for t in TRACKLETS)
    assert read_table(out, "errors").num_rows == 2
    manifest = read_manifest(out)
    assert manifest["counts"]["tracklets"] == len(TRACKLETS)
    assert manifest["rows"]["shards"] == 2 and manifest["part"] is None
    assert manifest["per_part"]["created"] == ["t0", "t1"]
    assert [m["part"] for m in manifest["merged_from"]] == [[0, 2], [1, 2]]
    # the merged catalog verifies against the parts' shards
    assert verify_main([str(out), "--no-progress"]) == 0
    assert not list((out / "catalog").glob(".*tmp*"))


def test_merge_missing_part(tmp_path, capsys):
    out = tmp_path / "out"
    _build_parts(out, n=3)
    import shutil

    shutil.rmtree(out / "catalog" / "parts" / part_dir_name(1, 3))
    code, _, err = run_cli(capsys, ["merge", str(out)])
    assert code == 1
    assert "3 parts expected" in err and "001-of-003" in err
    assert not (out / "catalog" / "manifest.json").exists()


def test_merge_incomplete_or_inconsistent_part(tmp_path, capsys):
    out = tmp_path / "out"
    _build_parts(out, parameters={1: {"crop_scale": 4.0, "store_size": 256}})
    code, _, err = run_cli(capsys, ["merge", str(out)])
    assert code == 1 and "'crop_scale'" in err and "000-of-002" in err and "001-of-002" in err
    out2 = tmp_path / "out2"
    _build_parts(out2)
    (out2 / "catalog" / "parts" / part_dir_name(0, 2) / "manifest.json").unlink()
    code, _, err = run_cli(capsys, ["merge", str(out2)])
    assert code == 1 and "incomplete" in err
    assert not (out2 / "catalog" / "tracklets.parquet").exists()


def test_merge_duplicate_rows_across_parts(tmp_path, capsys):
    out = tmp_path / "out"
    for i in range(2):  # both parts claim every video
        build_catalog(
            out,
            TRACKLETS,
            catalog_sub=f"catalog/parts/{part_dir_name(i, 2)}",
            manifest_extra={"part": [i, 2]},
            shard_prefix=f"p{i}-",
        )
    code, _, err = run_cli(capsys, ["merge", str(out)])
    assert code == 1 and "more than one part" in err


# ---------------------------------------------------------------- verify


def test_verify_clean(root, capsys):
    code, out, _ = run_cli(capsys, [str(root), "--format", "json"], fn=verify_main)
    assert code == 0
    summary = json.loads(out)
    assert summary["ok"] and summary["shards_checked"] == 2 and summary["samples_checked"] == len(TRACKLETS)


def _verify_kinds(capsys, root) -> dict:
    code, out, _ = run_cli(capsys, [str(root), "--format", "json"], fn=verify_main)
    summary = json.loads(out)
    assert code == (0 if summary["ok"] else 1)
    return summary["problem_counts"]


def test_verify_modified_shard(root, capsys):
    path = root / "shards" / "train" / "train-000000.tar"
    data = bytearray(path.read_bytes())
    i = data.index(b"fakejpeg")
    data[i] ^= 0xFF  # same size, same members, other bytes
    path.write_bytes(bytes(data))
    # the member whose byte changed no longer has the CRC-32 its catalog span records
    assert _verify_kinds(capsys, root) == {"checksum_mismatch": 1, "span_mismatch": 1}


def test_verify_missing_and_extra_shard(root, capsys):
    src = root / "shards" / "val" / "val-000000.tar"
    src.rename(root / "shards" / "val" / "val-000099.tar")
    assert _verify_kinds(capsys, root) == {"missing_shard": 1, "extra_shard": 1}


def test_verify_truncated_shard(root, capsys):
    path = root / "shards" / "train" / "train-000000.tar"
    data = path.read_bytes()
    path.write_bytes(data[: data.rfind(b"fakejpeg") + 4])  # cut inside the last member's data
    kinds = _verify_kinds(capsys, root)
    assert kinds["size_mismatch"] == 1 and kinds["checksum_mismatch"] == 1
    assert kinds["unreadable_shard"] == 1


def test_verify_missing_sample(root, capsys):
    path = root / "catalog" / "tracklets.parquet"
    t = pq.read_table(path)
    keys = t["sample_key"].to_pylist()
    keys[0] = "not-there"
    t = t.set_column(t.schema.get_field_index("sample_key"), "sample_key", pa.array(keys, pa.string()))
    pq.write_table(t, path)
    code, out, _ = run_cli(capsys, [str(root), "--no-progress"], fn=verify_main)
    assert code == 1
    assert "missing_sample" in out and "not-there" in out


def test_query_df_needs_pandas(root):
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pandas"):
            catalog.query_df(root, "SELECT 1")
    else:
        df = catalog.query_df(root, "SELECT split, count(*) AS n FROM tracklets GROUP BY 1 ORDER BY 1")
        assert df["n"].tolist() == [3, 1]


def test_documented_queries_run(root):
    """Every ```sql block of docs/catalog.md runs on a tiny catalog with an embeddings file."""
    import re

    ids = query(
        root, "SELECT tracklet_id, sample_key, split, video_id, identity_id, start_frame FROM tracklets"
    )
    rows = [dict(r, fragment_index=-1, vector=[float(i), 1.0, 0.5]) for i, r in enumerate(ids.to_pylist())]
    (root / "embeddings").mkdir()
    pq.write_table(
        pa.Table.from_pylist(rows, schema=embeddings_schema(3)), root / "embeddings" / "hmve-v1.parquet"
    )
    blocks = re.findall(r"```sql\n(.*?)```", (REPO / "docs" / "catalog.md").read_text(), re.S)
    assert len(blocks) >= 5
    first = ids["tracklet_id"][0].as_py()
    for sql in blocks:
        # the docs name a tracklet of the demo's data; ask the same of this catalog's first one
        sql = re.sub(r"'\d{3}-\d{3}_\d+#\d+'", f"'{first}'", sql)
        assert query(root, sql).num_rows > 0, sql


@pytest.mark.slow
def test_ingest_parts_merge_equals_single_run(tmp_path):
    """End to end with the real synth and ingest: 2 parts merged = one run (shard columns aside)."""
    pytest.importorskip("polyp_ssl.ingest.cli")
    from polyp_ssl.shards.catalog_merge import SORT_KEYS

    def cli(*args: str) -> None:
        out = subprocess.run(
            [sys.executable, "-m", "polyp_ssl", *args], capture_output=True, text=True, cwd=REPO, timeout=600
        )
        assert out.returncode == 0, out.stderr[-2000:]

    syn, full, parts = tmp_path / "syn", tmp_path / "full", tmp_path / "parts"
    cli(
        "synth",
        str(syn),
        "--videos",
        "4",
        "--frames-per-video",
        "60",
        "--width",
        "160",
        "--height",
        "128",
        "--workers",
        "1",
        "--quiet",
    )
    common = ["--workers", "1", "--store-size", "64"]
    cli("ingest", str(syn), "--out", str(full), *common)
    for i in range(2):
        cli("ingest", str(syn), "--out", str(parts), "--part", f"{i}/2", *common)
    cli("catalog", "merge", str(parts))
    cli("verify", str(parts), "--no-progress")
    # where things are in the shards differs (other shards), not what they are
    shard_columns = {"shard", "path", "first_video", "last_video", "sha256", "n_bytes", "n_samples"}
    shard_columns |= set(SPAN_COLUMNS)
    for name in TABLES:
        a, b = read_table(full, name), read_table(parts, name)
        keys = [(k, "ascending") for k in SORT_KEYS[name]]
        cols = [c for c in a.column_names if c not in shard_columns]
        if name != "shards":
            assert a.sort_by(keys).select(cols).equals(b.sort_by(keys).select(cols)), name
    assert read_manifest(parts)["counts"]["frames"] == read_manifest(full)["counts"]["frames"]
