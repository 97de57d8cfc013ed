"""Strict, bounded parsers of text inputs (shards.textio) as the user meets them: the real
`polyp-ssl` command on hostile CSV/TXT tables, JSON documents, YAML configs and Parquet tables.

Every case asserts what the user sees: the exit code of the command (convert, split and catalog
report bad input data with 1 and "nothing was written", the other commands with 2), one error
line naming the file (and the line or field), no traceback; the bombs also a memory bound (peak
VM at most 1 GiB above a clean run of the same command) or a time bound.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from polyp_ssl.shards import textio
from polyp_ssl.shards.textio import TextInputError
from tests.bomb_helpers import GIB, run_limited

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "polyp-ssl")
SYNTH = ["--videos", "4", "--frames-per-video", "16", "--width", "96", "--height", "80", "--workers", "1"]
ALIAS_BOMB = (  # 9**9 = 387 M leaves from a few hundred bytes
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
    "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
    "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\ng: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n"
    "h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\ni: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]\n"
    "bbox_scale_factor: *i\n"
)
HUGE = 150 << 20  # a 150 MB line


def cli(*args: str | Path, timeout: float = 120) -> tuple[int, str, str]:
    proc = subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    return proc.returncode, proc.stdout, proc.stderr


def entry(capsys, *args: str | Path) -> tuple[int, str, str]:
    """The same command run by the dispatcher in this process (`polyp_ssl.entry.main`): for the
    parametrised variants of a case whose first variant runs the installed command."""
    from polyp_ssl.entry import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def error_line(err: str, *names: str | Path) -> str:
    """The one error line of a failed command; it names each of `names`; no traceback."""
    assert "Traceback" not in err and "RecursionError" not in err and "MemoryError" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if "error" in ln.lower() or ": " in ln]
    errors = [ln for ln in lines if not ln.startswith(("INFO", "WARNING"))]
    main = [ln for ln in errors if "nothing was written" not in ln]
    assert len(main) == 1, err[-3000:]
    for name in names:
        assert str(name) in main[0], (name, main[0])
    assert len(main[0]) < 1000, main[0][:2000]
    return main[0]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """A synthetic table and SUN download (read-only; tests copy what they change)."""
    base = tmp_path_factory.mktemp("raw")
    out = {}
    for layout in ("table", "sun", "ldpolyp"):
        rc, _, err = cli("synth", base / layout, "--layout", layout, "--quiet", *SYNTH)
        assert rc == 0, err
        out[layout] = base / layout
    return out


def _copy(src: Path, tmp: Path) -> Path:
    dst = tmp / src.name
    shutil.copytree(src, dst)
    return dst


def _table(raw, tmp_path) -> tuple[Path, list[str]]:
    src = _copy(raw["table"], tmp_path)
    return src / "boxes.csv", (src / "boxes.csv").read_text().splitlines()


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def convert_table(table: Path, out: Path) -> tuple[int, str]:
    rc, _, err = cli("convert", "table", table, out, "--no-progress")
    return rc, err


# ---------------------------------------------------------------- class 5: strict CSV


def test_table_csv_with_an_unterminated_quote_is_refused_naming_the_line(raw, tmp_path):
    table, lines = _table(raw, tmp_path)
    assert len(lines) > 20
    fields = lines[3].split(",")
    fields[-1] = '"' + fields[-1]  # the quote swallows every later row into one field
    lines[3] = ",".join(fields)
    rc, err = convert_table(_write(table, lines), tmp_path / "out")
    line = error_line(err, table, "line 4")
    assert rc == 1 and "unterminated quote" in line
    assert not (tmp_path / "out" / "annotations").exists()


@pytest.mark.parametrize("extra", [1, -1, -3])
def test_table_csv_ragged_rows_are_refused_naming_line_and_counts(raw, tmp_path, capsys, extra):
    table, lines = _table(raw, tmp_path)
    n = len(lines[0].split(","))
    fields = lines[5].split(",")
    fields = fields + ["x"] * extra if extra > 0 else fields[:extra]
    lines[5] = ",".join(fields)
    rc, _, err = entry(capsys, "convert", "table", _write(table, lines), tmp_path / "out", "--no-progress")
    line = error_line(err, table, "line 6", f"{n + extra} fields", f"the {n} of the header")
    assert rc == 1 and ("more" if extra > 0 else "fewer") in line
    assert not (tmp_path / "out" / "annotations").exists()


@pytest.mark.parametrize(
    "bad, shown",
    [("\x1b[2J\x1b[31mpwned", "\\x1b"), ("p\u202eevil", "\\u202e"), ("a\x07b", "\\x07"), ("a\x00b", "NUL")],
)
def test_control_characters_in_a_table_identity_are_refused(raw, tmp_path, capsys, bad, shown):
    table, lines = _table(raw, tmp_path)
    header = lines[0].split(",")
    row = next(i for i, ln in enumerate(lines[1:], start=1) if ln.split(",")[header.index("identity")])
    fields = lines[row].split(",")
    fields[header.index("identity")] = bad
    lines[row] = ",".join(fields)
    rc, _, err = entry(capsys, "convert", "table", _write(table, lines), tmp_path / "out", "--no-progress")
    line = error_line(err, table, f"line {row + 1}", shown)
    assert rc == 1 and "\x1b" not in err and "\u202e" not in err
    if shown != "NUL":
        assert "'identity'" in line


def test_parquet_identity_with_a_terminal_escape_is_refused(raw, tmp_path):
    import csv

    src = _copy(raw["table"], tmp_path)
    with open(src / "boxes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    k = next(i for i, r in enumerate(rows) if r["identity"])
    rows[k]["identity"] = "id\x1b]0;title\x07"
    pq.write_table(pa.Table.from_pylist(rows), src / "boxes.parquet")
    rc, err = convert_table(src / "boxes.parquet", tmp_path / "out")
    line = error_line(err, src / "boxes.parquet", f"row {k}", "'identity'")
    assert rc == 1 and "\x1b" not in err and "control character" in line


def test_sun_case_info_with_more_fields_than_the_header_is_one_line(raw, tmp_path):
    src = _copy(raw["sun"], tmp_path)
    info = src / "case_info.csv"
    lines = info.read_text().splitlines()
    lines[1] += ",extra,fields"
    _write(info, lines)
    rc, _, err = cli("convert", "sun", src, tmp_path / "out", "--no-progress")
    line = error_line(err, info, "line 2")
    assert rc == 1 and "more than the 5 of the header" in line and "AttributeError" not in err


def test_sun_case_info_with_fewer_fields_and_unterminated_quote(raw, tmp_path):
    src = _copy(raw["sun"], tmp_path)
    info = src / "case_info.csv"
    lines = info.read_text().splitlines()
    lines[1] = ",".join(lines[1].split(",")[:2])
    _write(info, lines)
    rc, _, err = cli("convert", "sun", src, tmp_path / "out", "--no-progress")
    assert rc == 1 and "fewer than the 5" in error_line(err, info, "line 2")
    lines = (raw["sun"] / "case_info.csv").read_text().splitlines()
    lines[1] = '"' + lines[1]  # the quote would swallow every later case into one field
    _write(info, lines)
    rc, _, err = cli("convert", "sun", src, tmp_path / "out", "--no-progress")
    assert rc == 1 and "unterminated quote" in error_line(err, info, "line 2")


def test_ldpolyp_video_folder_with_a_terminal_escape_is_refused(raw, tmp_path):
    src = _copy(raw["ldpolyp"], tmp_path)
    part = next(p for p in ("TrainValid", "Test") if (src / p / "Images").is_dir())
    video = sorted(os.listdir(src / part / "Images"))[0]
    bad = video + "\x1b[2J"
    for sub in ("Images", "Annotations"):
        os.rename(src / part / sub / video, src / part / sub / bad)
    rc, _, err = cli("convert", "ldpolyp", src, tmp_path / "out", "--no-progress")
    line = error_line(err, "'sequence_id'", "control character")
    assert rc == 1 and "\x1b" not in err and "\\x1b" in line


def test_sun_box_line_with_a_control_character_names_file_and_line(raw, tmp_path):
    src = _copy(raw["sun"], tmp_path)
    txt = src / "annotation_txt" / "case1.txt"
    lines = txt.read_text().splitlines()
    lines[2] = "\x1b]52;c;cHduZWQ=\x07" + lines[2]  # an OSC 52 clipboard write
    _write(txt, lines)
    rc, _, err = cli("convert", "sun", src, tmp_path / "out", "--no-progress")
    assert rc == 1 and "control character" in error_line(err, txt, "line 3") and "\x1b" not in err


def _realcolon(tmp_path: Path) -> Path:
    from tests.bad_corpus import build_realcolon

    return build_realcolon(tmp_path / "rc_raw")


@pytest.mark.parametrize(
    "name, text, want",
    [
        ("lesion_info.csv", None, "more than the 6 of the header"),
        ("video_info.csv", "unique_video_name,fps\n001-001,25,x\n", "more than the 2 of the header"),
        ("video_info.csv", 'unique_video_name,fps\n"001-001,25\n001-002,30\n', "unterminated quote"),
    ],
)
def test_realcolon_csvs_ragged_or_unterminated_are_named(tmp_path, capsys, name, text, want):
    rc_raw = _realcolon(tmp_path)
    path = rc_raw / name
    if text is None:
        lines = path.read_text().splitlines()
        lines[1] += ",surplus"
        text = "\n".join(lines) + "\n"
    path.write_text(text)
    rc, _, err = entry(capsys, "convert", "realcolon", rc_raw, tmp_path / "out", "--no-progress")
    line = error_line(err, path, "line 2")
    assert rc == 1 and want in line


def test_split_refuses_control_characters_in_ids(tmp_path):
    root = _coco_root(tmp_path)
    coco = json.loads(_ann(root).read_text())
    coco["annotations"][1]["identity_id"] = "p\x1b[1m1"
    _ann(root).write_text(json.dumps(coco))
    rc, _, err = cli("split", root, "--fractions", "0.5,0.5", "--names", "a,b")
    line = error_line(err, _ann(root), "annotations[1]", "'identity_id'")
    assert rc == 1 and "control character" in line and "\x1b" not in err


# ---------------------------------------------------------------- class 6: one named line


def _coco_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "annotations").mkdir(parents=True)
    images = [
        {
            "id": i,
            "file_name": f"v{i % 2}/{i}.jpg",
            "width": 64,
            "height": 48,
            "frame_id": i,
            "sequence_id": f"v{i % 2}",
            "dataset_id": "d",
        }
        for i in range(1, 9)
    ]
    anns = [
        {"id": i, "image_id": i, "bbox": [1, 1, 8, 8], "identity_id": f"p{i % 4}", "category_id": 1}
        for i in range(1, 9)
    ]
    _ann(root).write_text(json.dumps({"images": images, "annotations": anns, "categories": []}))
    return root


def _ann(root: Path) -> Path:
    return root / "annotations" / "instances_all.json"


@pytest.mark.parametrize(
    "change, where, field",
    [
        (lambda c: c["images"][2].pop("id"), "images[2]", "'id'"),
        (lambda c: c["images"][3].update(id=[1, 2]), "images[3]", "'id'"),
        (lambda c: c["images"][1].update(sequence_id={"a": 1}), "images[1]", "'sequence_id'"),
        (lambda c: c["annotations"][0].update(image_id=[[1]]), "annotations[0]", "'image_id'"),
        (lambda c: c["annotations"][2].pop("identity_id"), "annotations[2]", "'identity_id'"),
        (lambda c: c["annotations"].__setitem__(4, "x"), "annotations[4]", None),
    ],
)
def test_split_malformed_annotations_name_record_and_field(tmp_path, capsys, change, where, field):
    root = _coco_root(tmp_path)
    coco = json.loads(_ann(root).read_text())
    change(coco)
    _ann(root).write_text(json.dumps(coco))
    rc, _, err = entry(capsys, "split", root, "--fractions", "0.5,0.5", "--names", "a,b")
    line = error_line(err, _ann(root), where, *([field] if field else []))
    assert rc == 1 and "KeyError" not in err and "unhashable" not in err, line
    assert sorted(p.name for p in (root / "annotations").iterdir()) == ["instances_all.json"]


def test_split_deep_json_is_named_not_a_recursion_error(tmp_path):
    root = _coco_root(tmp_path)
    _ann(root).write_text('{"images": [], "annotations": [], "x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    rc, _, err = cli("split", root, "--fractions", "0.5,0.5", "--names", "a,b")
    assert rc == 1 and "nested 200,001 levels deep" in error_line(err, _ann(root))


def _ingested(tmp_path: Path) -> Path:
    from tests.shard_factory import make_root

    return make_root(tmp_path / "ing", videos={"train": 1}, polyps_per_video=1, tracklets_per_polyp=1)


def test_deep_or_broken_manifest_is_one_named_line(tmp_path):
    root = _ingested(tmp_path)
    manifest = root / "catalog" / "manifest.json"
    good = manifest.read_text()
    for text, want in (
        ('{"version": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested 100,001 levels deep"),
        ('{"version": 3,\n "x": }', "line 2: not valid JSON"),
        (b'{"v": "\xff"}', "not UTF-8"),
    ):
        (manifest.write_bytes if isinstance(text, bytes) else manifest.write_text)(text)
        rc, _, err = cli("catalog", root, "SELECT 1")
        assert rc == 1 and want in error_line(err, manifest), err
    manifest.write_text(good)
    rc, out, err = cli("catalog", root, "SELECT 1 AS one")
    assert rc == 0, err


def test_hf_config_json_deep_or_not_json_names_the_file(tmp_path):
    from polyp_ssl.eval.embed import EmbedError, resolve_source

    folder = tmp_path / "snap"
    folder.mkdir()
    cfg = folder / "config.json"
    for text, want in (
        ('{"model_type": ' + "[" * 50_000 + "]" * 50_000 + "}", "nested 50,001 levels deep"),
        ('{"model_type": "dinov2",\n\n "hidden_size": 384,,}', "line 3: not valid JSON"),
        ("[" * 10, "not valid JSON"),
    ):
        cfg.write_text(text)
        with pytest.raises(EmbedError) as info:
            resolve_source(None, "zoo:dinov2-vits14", folder)
        msg = str(info.value)
        assert str(cfg) in msg and want in msg and "\n" not in msg, msg


def _embeddings_file(path: Path, blob: bytes) -> Path:
    from polyp_ssl.shards.schema import embeddings_schema

    schema = embeddings_schema(4).with_metadata({b"polyp_ssl": blob})
    pq.write_table(schema.empty_table(), path)
    return path


@pytest.mark.parametrize(
    "blob, want",
    [
        (b'{"params": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested 100,001 levels deep"),
        (b'{"params": {"split": "x"}', "not valid JSON"),
        (b'["not", "an", "object"]', "not a JSON object"),
    ],
)
def test_embeddings_metadata_deep_or_broken_is_named(tmp_path, capsys, blob, want):
    path = _embeddings_file(tmp_path / "emb.parquet", blob)
    run = cli if blob.startswith(b'{"params": [') else functools.partial(entry, capsys)
    rc, _, err = run("eval", "--task", "retrieval", "--embeddings", path)
    line = error_line(err, path)
    assert rc == 2 and want in line and "metadata" in line


def _train_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, want",
    [
        (
            "a:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 60)) + "  " * 60 + "v: 1\n",
            "nested more than",
        ),
        ("encoder_type: [" * 5000 + "]" * 5000 + "\n", "nested more than"),
        ("exp_name: !!python/object/apply:os.system ['touch PWNED']\n", "python/object/apply:os.system"),
        ("exp_name: &x abc\nencoder_type: *x\n", "alias"),
        ("encoder_type: [resnet, vit]\n", "encoder_type"),
        ("sfe_backbone_arch: {a: " + "x" * 100_000 + "}\n", "sfe_backbone_arch"),
        ("im_size: 32\n  bad: [\n", "not valid YAML"),
    ],
)
def test_train_config_bad_yaml_is_one_named_line(tmp_path, text, want):
    """What `polyp-ssl train --config` reads its file with (resolve_config), in process: a train
    subprocess spends its first 15 s importing torch; the CLI path is run by the tests below."""
    from polyp_ssl.train_cli import resolve_config

    cfg = _train_config(tmp_path, text)
    with pytest.raises(ValueError) as info:
        resolve_config(["--config", str(cfg), "--dataset_root", str(tmp_path / "none")])
    line = str(info.value)
    assert str(cfg) in line and want in line and "\n" not in line and len(line) < 600, line[:2000]
    assert not (REPO / "PWNED").exists() and not (tmp_path / "PWNED").exists()


@pytest.mark.slow  # a train subprocess spends 15-20 s importing torch before it reads the config
def test_train_cli_python_tag_is_one_named_line(tmp_path):
    cfg = _train_config(tmp_path, "exp_name: !!python/object/apply:os.system ['touch PWNED']\n")
    rc, _, err = cli("train", "--config", cfg, "--dataset_root", tmp_path / "none", timeout=180)
    assert rc == 2 and "python/object/apply:os.system" in error_line(err, cfg)
    assert not (REPO / "PWNED").exists() and not (tmp_path / "PWNED").exists()


def test_embed_init_config_refuses_alias_bomb_deep_yaml_and_python_tag(tmp_path):
    from polyp_ssl.eval.embed import EmbedError, init_config

    cases = (
        (ALIAS_BOMB, "alias"),
        ("encoder_type: !!python/name:os.system\n", "python/name"),
        ("a: " + "[" * 10_000 + "]" * 10_000 + "\n", "nest"),  # libyaml's own bound or ours
        ("a:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 40)) + "  " * 40 + "v: 1\n", "nested more"),
    )
    for text, want in cases:
        cfg = tmp_path / "init.yaml"
        cfg.write_text(text)
        t0 = time.monotonic()
        with pytest.raises(EmbedError) as info:
            init_config(str(cfg))
        assert str(cfg) in str(info.value) and want in str(info.value)
        assert time.monotonic() - t0 < 1


@pytest.mark.slow
def test_embed_cli_init_config_alias_bomb_is_one_named_line(tmp_path):
    root = _ingested(tmp_path)
    cfg = tmp_path / "init.yaml"
    cfg.write_text(ALIAS_BOMB)
    rc, _, err = cli(
        "embed", "--dataset_root", root, "--split", "train", "--encoder_ckpt", f"init:{cfg}", timeout=300
    )
    assert rc == 2 and "alias" in error_line(err, cfg), err


def test_curves_non_utf8_huge_field_and_quote_are_named_lines(tmp_path):
    log = tmp_path / "run" / "logs" / "version_0" / "metrics.csv"
    log.parent.mkdir(parents=True)
    cases = (
        (b"step,train/loss_step\n0,1.5\n1,\xff\xfe\n", "line 3", "not UTF-8"),
        (b"step,train/loss_step\n0," + b"9" * 300_000 + b"\n", "line 2", "field larger than field limit"),
        (b'step,train/loss_step\n0,"1.5\n1,2.0\n', "line 2", "unterminated quote"),
        (b"step,train/loss_step\n0," + b"1" * (2 << 20) + b"\n", "line 2", "longer than"),
    )
    for data, where, want in cases:
        log.write_bytes(data)
        rc, _, err = cli("curves", tmp_path / "run", "--out", tmp_path / "out")
        line = error_line(err, log, where)
        assert rc == 2 and want in line, line
        assert "UnicodeDecodeError" not in err and "_csv.Error" not in err


# ---------------------------------------------------------------- class 3: bounded


@pytest.mark.slow
def test_yaml_alias_bomb_in_train_config_is_refused_in_milliseconds_and_bounded(tmp_path):
    cfg = _train_config(tmp_path, ALIAS_BOMB)
    assert len(ALIAS_BOMB) < 600
    clean = tmp_path / "clean.yaml"
    clean.write_text("bbox_scale_factor: 2.0\n")
    t0 = time.perf_counter()
    with pytest.raises(TextInputError, match="alias"):
        textio.load_yaml(cfg)
    assert time.perf_counter() - t0 < 0.5
    code = (
        "from polyp_ssl.entry import main; "
        "sys.exit(main(['train', '--config', {!r}, '--dataset_root', {!r}]))"
    )
    rc, err, base = run_limited(code.format(str(clean), str(tmp_path / "none")), None)
    assert rc == 2 and base > 0, err[-2000:]
    t0 = time.monotonic()
    rc, err, peak = run_limited(code.format(str(cfg), str(tmp_path / "none")), base + GIB, timeout=120)
    print(f"alias bomb: {time.monotonic() - t0:.1f} s, peak VM {peak >> 20} MiB (clean {base >> 20} MiB)")
    assert rc == 2 and "alias" in error_line(err.replace(f"VMPEAK {peak}", ""), cfg)
    assert peak <= base + GIB


def _big_line_file(path: Path, head: bytes, n: int, tail: bytes = b"\n") -> Path:
    with open(path, "wb") as f:
        f.write(head)
        chunk = b"a" * (1 << 20)
        for _ in range(n >> 20):
            f.write(chunk)
        f.write(tail)
    return path


def test_150_mb_line_in_table_csv_and_sun_box_file_is_refused_in_bounded_memory(raw, tmp_path):
    table = _copy(raw["table"], tmp_path)
    sun = _copy(raw["sun"], tmp_path)
    code = "from polyp_ssl.entry import main; sys.exit(main(['convert', {!r}, {!r}, {!r}, '--no-progress']))"
    # the clean runs: the same commands on the synthetic files
    rc, err, base_t = run_limited(code.format("table", str(table / "boxes.csv"), str(tmp_path / "o1")), None)
    assert rc == 0 and base_t > 0, err[-2000:]
    rc, err, base_s = run_limited(code.format("sun", str(sun), str(tmp_path / "o2")), None)
    assert rc == 0 and base_s > 0, err[-2000:]

    lines = (table / "boxes.csv").read_bytes().splitlines(keepends=True)
    big = _big_line_file(
        table / "big.csv",
        b"".join(lines[:3]) + lines[3].rstrip(b"\n") + b"x",
        HUGE,
        b"\n" + b"".join(lines[4:]),
    )
    rc, err, peak = run_limited(code.format("table", str(big), str(tmp_path / "o3")), base_t + GIB)
    print(f"150 MB CSV line: peak VM {peak >> 20} MiB (clean {base_t >> 20} MiB)")
    assert rc == 1 and "line 4" in err and "longer than" in err and str(big) in err, err[-2000:]
    assert "Traceback" not in err and peak <= base_t + GIB

    txt = sun / "annotation_txt" / "case1.txt"
    first = txt.read_bytes().splitlines(keepends=True)
    _big_line_file(txt, first[0] + b"x.jpg ", HUGE, b"".join(first[1:]))
    rc, err, peak = run_limited(code.format("sun", str(sun), str(tmp_path / "o4")), base_s + GIB)
    print(f"150 MB SUN box line: peak VM {peak >> 20} MiB (clean {base_s >> 20} MiB)")
    assert rc == 1 and "line 2" in err and "longer than" in err and str(txt) in err, err[-2000:]
    assert "Traceback" not in err and peak <= base_s + GIB


def test_table_parquet_declaring_millions_of_rows_is_refused_before_reading(raw, tmp_path):
    src = _copy(raw["table"], tmp_path)
    n = 5_000_000
    cols = ("video", "frame", "image_path", "x", "y", "w", "h", "identity", "size_mm", "histology")
    table = pa.table({c: pa.array(["v"]).take(pa.array(np.zeros(n, dtype=np.int32))) for c in cols})
    path = src / "many.parquet"
    pq.write_table(table, path, compression="zstd")
    del table
    assert path.stat().st_size < 2 << 20  # small on disk
    code = (
        "from polyp_ssl.entry import main; sys.exit(main(['convert', 'table', {!r}, {!r}, '--no-progress']))"
    )
    small = src / "small.parquet"
    pq.write_table(pa.table({c: ["v"] for c in cols}), small)
    rc, err, base = run_limited(code.format(str(small), str(tmp_path / "o1")), None)
    assert base > 0 and rc == 1, err[-2000:]  # the one-row table is refused for its content
    t0 = time.monotonic()
    rc, err, peak = run_limited(code.format(str(path), str(tmp_path / "o2")), base + GIB)
    print(
        f"5 M row Parquet: {time.monotonic() - t0:.1f} s, peak VM {peak >> 20} MiB (clean {base >> 20} MiB)"
    )
    assert rc == 1 and "declares 5,000,000 rows, more than the 1,000,000" in err and str(path) in err, err[
        -2000:
    ]
    assert peak <= base + GIB


def test_parquet_of_many_columns_or_bytes_is_refused(raw, tmp_path):
    src = _copy(raw["table"], tmp_path)
    wide = src / "wide.parquet"
    pq.write_table(pa.table({f"c{i}": [1] for i in range(300)}), wide)
    rc, _, err = cli("convert", "table", wide, tmp_path / "o", "--no-progress")
    assert rc == 1 and "declares 300 columns, more than the 256" in error_line(err, wide)


# ---------------------------------------------------------------- the readers themselves


def test_csv_reader_counts_lines_as_they_are_in_the_file(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b'\xef\xbb\xbfa,b\r\n1,"x,y"\r\n\r\n3,4')
    header, rows = textio.read_csv_table(path)
    assert header == ["a", "b"] and rows == [(2, {"a": "1", "b": "x,y"}), (4, {"a": "3", "b": "4"})]
    path.write_text("a,b\n1,2\n1,2\n")
    with pytest.raises(TextInputError, match=r"line 3: more than 2 rows"):
        textio.read_csv_table(path, max_rows=1)
    path.write_text("a,a\n1,2\n")
    with pytest.raises(TextInputError, match=r"column 'a' appears twice"):
        textio.read_csv_table(path)


def test_a_fifo_given_as_csv_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "t.csv"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="FIFO"):
        textio.read_csv_table(fifo)


def test_json_depth_is_counted_without_parsing_and_strings_do_not_count():
    assert textio.json_depth(b'{"a": "[[[[", "b": [1, {"c": "\\"[["}]}') == 3
    assert textio.json_depth(b"[" * 1_000_000) == 1_000_000
    with pytest.raises(TextInputError, match=r"x\.json: JSON nested 65 levels deep"):
        textio.loads_json("[" * 65 + "]" * 65, "x.json")


def test_shown_values_are_bounded_whatever_their_size():
    assert len(textio.shown("x" * 10**7)) <= 80
    assert len(textio.shown([list(range(10**5))] * 10**3)) <= 80
    deep: list = []
    for _ in range(10_000):
        deep = [deep]
    assert len(textio.shown(deep)) <= 80
    assert textio.one_line("a\nb\x1bc") == "a\\nb\\x1bc"


def test_yaml_safe_values_still_load(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1.0e-3\nnames: [a, b]\nnested: {x: {y: 1}}\nflag: true\n")
    assert textio.load_yaml(path) == {
        "lr": 1e-3,
        "names": ["a", "b"],
        "nested": {"x": {"y": 1}},
        "flag": True,
    }
    assert yaml.safe_load(path.read_text()) == textio.load_yaml(path)
