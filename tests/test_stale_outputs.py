"""Outputs are never stale (issue 20, item 4).

- `convert merge` into a root that already holds a dataset is refused (exit 2, one line naming
  the root and --overwrite, nothing changed); `--overwrite` replaces the whole output (old images,
  instances_*.json, annotations/source/) in one staged swap: the result is byte for byte a merge
  into an empty folder, and a SIGKILL at any point of it leaves the old root or (rolled forward by
  the next writer) the new one;
- `split` says which files it splits and their counts; it re-splits annotations/source/ only while
  the root's instances_*.json are the files its last split wrote: a newer file is refused unless
  --overwrite, which then equals a fresh split of that file;
- a second eval / probe / count / report to the same output is refused unless --overwrite, which
  replaces the old result only once the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from eval_factory import make_eval_root

from polyp_ssl.entry import main as entry_main
from polyp_ssl.eval.cli import count_main, eval_main, probe_main
from polyp_ssl.eval.outputs import OutputExists, replacing_folder
from polyp_ssl.ingest.faults import CRASH_ENV
from polyp_ssl.ingest.staged import MARKER, STAGING_DIR, finish_interrupted
from polyp_ssl.shards.lock import LOCK_NAME

SYNTH = ["--frames-per-video", "20", "--width", "64", "--height", "64", "--workers", "1", "--quiet"]
CLI_TIMEOUT = 180


pytestmark = pytest.mark.usefixtures("debug_off")  # tests/conftest.py


def run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = entry_main([*map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if not x.startswith(("INFO", "WARNING"))]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def tree(path: Path) -> dict[str, bytes | None]:
    """Every entry under `path` (hidden ones too): files with their bytes, folders as None; the
    merge report without its `out_root` (it names its own output folder)."""
    found: dict[str, bytes | None] = {}
    for folder, dirs, names in os.walk(path):
        for d in dirs:
            found[os.path.relpath(os.path.join(folder, d), path)] = None
        for n in names:
            p = Path(folder) / n
            data = b"link" if p.is_symlink() else p.read_bytes()
            if n == "convert_report.json" and folder == str(path):
                report = json.loads(data)
                report.pop("out_root", None)
                data = json.dumps(report, sort_keys=True).encode()
            found[os.path.relpath(p, path)] = data
    return found


def counts(coco_path: Path) -> tuple[int, int, int]:
    c = json.loads(coco_path.read_text())
    return len(c["images"]), len(c["annotations"]), len({a["identity_id"] for a in c["annotations"]})


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, Path]:
    """Two seed-layout roots: `aa` (3 videos) and `bb` (4 videos)."""
    base = tmp_path_factory.mktemp("sources")
    for name, videos in (("aa", 3), ("bb", 4)):
        rc = entry_main(["synth", str(base / name), "--videos", str(videos), "--dataset-id", name, *SYNTH])
        assert rc == 0
    return base / "aa", base / "bb"


def merge(capsys, out: Path, *srcs: Path, overwrite: bool = False) -> tuple[int, str, str]:
    flags = ["--no-progress", *(["--overwrite"] if overwrite else [])]
    return run(capsys, "convert", "merge", *srcs, out, *flags)


def merged_and_split(capsys, src: Path, out: Path) -> Path:
    """`src` merged into `out`, then split 70/30: a root with annotations/source/ and train/val."""
    assert merge(capsys, out, src)[0] == 0
    rc, _, err = run(capsys, "split", out, "--fractions", "0.7,0.3")
    assert rc == 0, err
    return out


# ================================================================ convert merge into an existing root


def test_merge_into_a_root_holding_a_dataset_is_refused_and_changes_nothing(sources, tmp_path, capsys):
    aa, bb = sources
    # a merged root, a merged and split root, and roots holding one part of a dataset only
    merged = tmp_path / "merged"
    assert merge(capsys, merged, aa)[0] == 0
    split = merged_and_split(capsys, aa, tmp_path / "split")
    report_only = tmp_path / "report_only"
    report_only.mkdir()
    (report_only / "convert_report.json").write_text("{}")
    images_only = tmp_path / "images_only"
    (images_only / "images" / "x").mkdir(parents=True)
    (images_only / "images" / "x" / "f.jpg").write_bytes(b"jpg")
    annotations_only = tmp_path / "annotations_only"
    shutil.copytree(aa / "annotations", annotations_only / "annotations")
    for out in (merged, split, report_only, images_only, annotations_only):
        before = tree(out)
        rc, _, err = merge(capsys, out, bb)
        line = one_line(err)
        assert rc == 2 and str(out) in line and "--overwrite" in line and "already holds a dataset" in line
        assert tree(out) == before  # nothing changed (no lock file, no staging folder left either)


def test_merge_into_an_empty_folder_or_one_with_other_files_is_not_refused(sources, tmp_path, capsys):
    aa, _ = sources
    empty = tmp_path / "empty"
    empty.mkdir()
    assert merge(capsys, empty, aa)[0] == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "README.txt").write_text("notes")
    (other / "annotations").mkdir()  # an empty annotations folder holds no dataset
    assert merge(capsys, other, aa)[0] == 0
    assert (other / "README.txt").read_text() == "notes"
    assert tree(other) == {**tree(empty), "README.txt": b"notes"}


def test_merge_overwrite_equals_a_merge_into_an_empty_folder(sources, tmp_path, capsys):
    aa, bb = sources
    fresh = tmp_path / "fresh"
    rc, _, err = merge(capsys, fresh, bb)
    assert rc == 0, err
    out = merged_and_split(capsys, aa, tmp_path / "out")
    assert (out / "annotations" / "source").is_dir() and (out / "images" / "aa").is_dir()
    (out / "notes.txt").write_text("mine")  # not written by merge: left as it is
    rc, _, err = merge(capsys, out, bb, overwrite=True)
    assert rc == 0, err
    got = tree(out)
    assert got.pop("notes.txt") == b"mine"
    assert got == tree(fresh)  # no old instances_*.json, annotations/source/, split record or image
    # the next split splits the new merge, not the old sources
    rc, stdout, err = run(capsys, "split", out, "--fractions", "0.7,0.3")
    assert rc == 0, err
    n_img, n_ann, n_polyps = counts(fresh / "annotations" / "instances_all.json")
    assert stdout.splitlines()[0] == (
        f"splitting {out}/annotations/instances_all.json (kept in annotations/source/): "
        f"{n_img} images, {n_ann} annotations, {n_polyps} polyps"
    )


def merge_cli(out: Path, *srcs: Path, crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **({CRASH_ENV: crash_at} if crash_at else {}))
    cmd = [sys.executable, "-m", "polyp_ssl", "convert", "merge", *map(str, srcs), str(out), "--no-progress"]
    return subprocess.run([*cmd, "--overwrite"], capture_output=True, text=True, env=env, timeout=CLI_TIMEOUT)


def dataset_tree(root: Path) -> dict[str, bytes | None]:
    """The dataset of a root, without the staging folder and the lock file a killed run leaves."""
    return {k: v for k, v in tree(root).items() if not k.startswith((STAGING_DIR, LOCK_NAME))}


# crash points of an --overwrite merge: a frame placed in the staging folder (before the commit
# point), then after the marker: each old entry moved aside (3), each new entry renamed in (3)
@pytest.mark.parametrize("crash_at", ["convert_image_placed:7", "staged_moved:1", "staged_moved:3",
                                      "staged_moved:4", "staged_moved:6"])  # fmt: skip
def test_merge_overwrite_killed_leaves_the_old_root_or_the_new_one(sources, tmp_path, capsys, crash_at):
    aa, bb = sources
    fresh = tmp_path / "fresh"
    assert merge(capsys, fresh, bb)[0] == 0
    out = merged_and_split(capsys, aa, tmp_path / "out")
    old = dataset_tree(out)
    killed = merge_cli(out, bb, crash_at=crash_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if not (out / STAGING_DIR / MARKER).exists():  # killed before the commit point: the old root
        assert crash_at.startswith("convert_image_placed")
        assert dataset_tree(out) == old
        rc, _, err = run(capsys, "split", out, "--fractions", "0.7,0.3")  # the next step: old sources
        assert rc == 0, err
        assert dataset_tree(out) == old
        return
    # after it: readers refuse the root until a writer rolls the swap forward to the new root
    rc, _, err = run(capsys, "ingest", out, "--no-progress")
    assert rc == 2 and MARKER in err
    rc, _, err = run(capsys, "split", out, "--fractions", "0.7,0.3")  # the root's next writer
    assert rc == 0, err
    assert not (out / STAGING_DIR).exists()
    split_fresh = tmp_path / "split_fresh"
    shutil.copytree(fresh, split_fresh)
    assert run(capsys, "split", split_fresh, "--fractions", "0.7,0.3")[0] == 0
    assert dataset_tree(out) == tree(split_fresh)


def test_finishing_an_interrupted_overwrite_twice_is_harmless(sources, tmp_path, capsys):
    aa, bb = sources
    fresh = tmp_path / "fresh"
    assert merge(capsys, fresh, bb)[0] == 0
    out = tmp_path / "out"
    assert merge(capsys, out, aa)[0] == 0
    assert merge_cli(out, bb, crash_at="staged_moved:5").returncode == -signal.SIGKILL
    assert finish_interrupted(out) is True
    assert finish_interrupted(out) is False
    assert dataset_tree(out) == tree(fresh)


# ================================================================ split over an existing split


def test_split_states_its_source_and_counts_and_re_splits_its_own_sources(sources, tmp_path, capsys):
    aa, _ = sources
    out = tmp_path / "out"
    assert merge(capsys, out, aa)[0] == 0
    n_img, n_ann, n_polyps = counts(out / "annotations" / "instances_all.json")
    rc, stdout, err = run(capsys, "split", out, "--fractions", "0.7,0.3")
    assert rc == 0, err
    assert stdout.splitlines()[0] == (
        f"splitting {out}/annotations/instances_all.json (kept in annotations/source/): "
        f"{n_img} images, {n_ann} annotations, {n_polyps} polyps"
    )
    first = tree(out / "annotations")
    # a rerun over its own sources (other fractions, then the same again): no --overwrite needed
    for fractions in ("0.5,0.5", "0.7,0.3"):
        rc, stdout, err = run(capsys, "split", out, "--fractions", fractions)
        assert rc == 0, err
        assert stdout.splitlines()[0] == (
            f"splitting {out}/annotations/source/instances_all.json: "
            f"{n_img} images, {n_ann} annotations, {n_polyps} polyps"
        )
    assert tree(out / "annotations") == first


def stale_merge(src_root: Path, out: Path) -> None:
    """What `convert merge` into an existing root did before it was refused: a new
    instances_all.json and new images, the old split files and annotations/source/ kept."""
    shutil.copy(src_root / "annotations" / "instances_all.json", out / "annotations" / "instances_all.json")
    shutil.copytree(src_root / "images", out / "images", dirs_exist_ok=True)


def test_split_after_a_new_merge_is_refused_and_overwrite_equals_a_fresh_split(sources, tmp_path, capsys):
    aa, bb = sources
    new = tmp_path / "new"
    assert merge(capsys, new, bb)[0] == 0
    fresh = tmp_path / "fresh"
    shutil.copytree(new, fresh)
    rc, _, err = run(capsys, "split", fresh, "--fractions", "0.7,0.3")
    assert rc == 0, err
    out = merged_and_split(capsys, aa, tmp_path / "out")
    stale_merge(new, out)
    before = tree(out)
    rc, _, err = run(capsys, "split", out, "--fractions", "0.7,0.3")
    line = one_line(err)
    assert rc == 2 and str(out / "annotations" / "instances_all.json") in line and "--overwrite" in line
    assert tree(out) == before
    rc, stdout, err = run(capsys, "split", out, "--fractions", "0.7,0.3", "--overwrite")
    assert rc == 0, err
    n_img, n_ann, n_polyps = counts(new / "annotations" / "instances_all.json")
    assert f"{n_img} images, {n_ann} annotations, {n_polyps} polyps" in stdout.splitlines()[0]
    assert tree(out / "annotations") == tree(fresh / "annotations")  # source/ holds the new merge


def test_split_refuses_edited_outputs_and_trusts_older_split_roots(sources, tmp_path, capsys):
    aa, _ = sources
    out = merged_and_split(capsys, aa, tmp_path / "out")
    ann = out / "annotations"
    # an edited split file is not what the last split wrote
    val = ann / "instances_val.json"
    original = val.read_bytes()
    val.write_bytes(original.replace(b'"images"', b'"images" ', 1))
    rc, _, err = run(capsys, "split", out)
    assert rc == 2 and str(val) in one_line(err)
    val.write_bytes(original)
    # a root split before the split record existed: its split files (info says so) are re-split
    (ann / ".polyp-ssl-split").unlink()
    rc, stdout, err = run(capsys, "split", out, "--fractions", "0.7,0.3")
    assert rc == 0, err
    assert stdout.startswith(f"splitting {ann}/source/instances_all.json:")
    # ... but a file of another writer beside them is refused
    (ann / ".polyp-ssl-split").unlink()
    shutil.copy(ann / "source" / "instances_all.json", ann / "instances_extra.json")
    rc, _, err = run(capsys, "split", out)
    assert rc == 2 and str(ann / "instances_extra.json") in one_line(err)


# ================================================================ eval / probe / count / report --out


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory) -> Path:
    return make_eval_root(tmp_path_factory.mktemp("evalroot"), splits={"val": 3, "test": 4}, noise=0.6)


@pytest.fixture(scope="module")
def frag_root(tmp_path_factory) -> Path:
    return make_eval_root(
        tmp_path_factory.mktemp("fragroot"),
        splits={"train": 6, "val": 4},
        polyps_per_video=4,
        fragments_per_tracklet=2,
        tag="frag",
    )


def second_run_refused_then_replaced(capsys, main, argv: list[str], folder: Path, result: str) -> None:
    """`main(argv)` twice into `folder`: the second refused (one line naming the folder and
    --overwrite, the first result untouched); with --overwrite the result is written again."""
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    path = folder / result
    first = path.read_bytes()
    path.write_bytes(first + b"\n")  # marks the earlier result
    assert main(argv) == 2
    line = one_line(capsys.readouterr().err)
    assert str(folder) in line and result in line and "--overwrite" in line
    assert path.read_bytes() == first + b"\n"
    assert main([*argv, "--overwrite"]) == 0
    assert path.read_bytes() == first  # the new result (the same numbers), the marked one gone
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_eval_to_the_same_out_refused_unless_overwrite(eval_root, tmp_path, capsys):
    emb = eval_root / "embeddings" / "test.parquet"
    for task in ("retrieval", "reid"):  # both tasks share one --out: each refuses only its own result
        argv = ["--task", task, "--embeddings", str(emb), "--out", str(tmp_path)]
        second_run_refused_then_replaced(capsys, eval_main, argv, tmp_path, f"metrics_{task}.json")
    assert (tmp_path / "reid_roc.png").stat().st_size > 0 and (tmp_path / "reid_pr.png").stat().st_size > 0


def test_eval_default_output_folder_refused_unless_overwrite(eval_root, capsys):
    emb = eval_root / "embeddings" / "val.parquet"
    argv = ["--task", "retrieval", "--embeddings", str(emb), "--exp_name", "stale"]
    capsys.readouterr()
    assert eval_main(argv) == 0
    folder = Path(capsys.readouterr().out.strip().splitlines()[-1].split("wrote ", 1)[1]).parent
    assert folder.parent.name == "eval" and folder.name.startswith("stale_retrieval_")
    assert folder.is_relative_to(eval_root)
    shutil.rmtree(folder)
    second_run_refused_then_replaced(capsys, eval_main, argv, folder, "metrics_retrieval.json")


def test_probe_to_the_same_out_refused_unless_overwrite(frag_root, tmp_path, capsys):
    train = frag_root / "embeddings" / "train.parquet"
    argv = ["--task", "size", "--train_embeddings", str(train), "--max_epochs", "2", "--out", str(tmp_path)]
    second_run_refused_then_replaced(capsys, probe_main, argv, tmp_path, "probe_size.json")


def test_count_to_the_same_out_refused_unless_overwrite(eval_root, tmp_path, capsys):
    argv = [
        "--val_embeddings", str(eval_root / "embeddings" / "val.parquet"),
        "--test_embeddings", str(eval_root / "embeddings" / "test.parquet"),
        "--out", str(tmp_path),
    ]  # fmt: skip
    second_run_refused_then_replaced(capsys, count_main, argv, tmp_path, "count.json")


def test_replacing_folder_swaps_only_a_complete_output(tmp_path):
    """The report's output folder: refused over an earlier report without --overwrite, replaced
    whole with it; a run that fails leaves the earlier report as it was; a folder holding other
    files is never replaced."""
    names = ("report.md", "results.parquet")
    out = tmp_path / "report"
    with replacing_folder(out, False, names) as tmp:
        assert tmp.parent == tmp_path and tmp != out
        (tmp / "report.md").write_text("first")
        (tmp / "figure.png").write_text("old figure")
    assert sorted(p.name for p in out.iterdir()) == ["figure.png", "report.md"]
    with pytest.raises(OutputExists, match="--overwrite"), replacing_folder(out, False, names):
        raise AssertionError("not reached")
    with pytest.raises(RuntimeError), replacing_folder(out, True, names) as tmp:
        (tmp / "report.md").write_text("half")
        raise RuntimeError("killed half-way")
    assert (out / "report.md").read_text() == "first"
    with replacing_folder(out, True, names) as tmp:
        (tmp / "report.md").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]  # the old figure went with it
    assert (out / "report.md").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no temporary folder left
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("x")
    with pytest.raises(OutputExists, match="no earlier output"), replacing_folder(other, True, names):
        raise AssertionError("not reached")
    assert (other / "mine.txt").read_text() == "x"
