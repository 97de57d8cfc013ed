"""A read-only dataset root: every command that only reads a root runs on it, writes nothing under
it, and caches embeddings in the user cache (XDG), keyed by root; `--cache_dir` and
POLYP_SSL_CACHE choose another folder; `catalog` lists both places.

The root is a real read-only bind mount where mounting is permitted (root in a container), else
the root's writability check is monkeypatched to say no (the root itself stays writable, so a
write that slipped through would show in the snapshot)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from polyp_ssl.entry import main as entry_main
from polyp_ssl.eval.embeddings import read_embeddings, read_metadata
from polyp_ssl.shards import embeddings_cache as ec
from tests.embed_factory import make_ckpt, make_tiny_root

CACHE_LINE = "embeddings cache: "


# ----------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, tuple[bool, int, int]]:
    """Every file and folder under `root`: (is a folder, size, mtime_ns)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (p.is_dir(), st.st_size, st.st_mtime_ns)
    return out


def fill_checksums(root: Path) -> None:
    """The factory leaves the shards' sha256 empty; `verify` compares it."""
    path = root / "catalog" / "shards.parquet"
    t = pq.read_table(path)
    sums = [hashlib.sha256((root / p).read_bytes()).hexdigest() for p in t.column("path").to_pylist()]
    t = t.set_column(
        t.schema.get_field_index("sha256"), t.schema.field("sha256"), pa.array(sums, pa.string())
    )
    pq.write_table(t, path)


def bind_read_only(src: Path, dst: Path) -> str | None:
    """Mount `src` read-only at `dst`; None when mounted, else why not."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "a bind mount needs root"
    dst.mkdir()
    steps = (["mount", "--bind", str(src), str(dst)], ["mount", "-o", "remount,bind,ro", str(dst)])
    for i, cmd in enumerate(steps):
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            proc = subprocess.CompletedProcess(cmd, 1, b"", str(exc).encode())
        if proc.returncode != 0:
            if i:
                subprocess.run(["umount", "-l", str(dst)], check=False, timeout=30)
            return f"cannot mount here: {proc.stderr.decode(errors='replace').strip()}"
    return None


def run(argv: list[str]) -> tuple[int, str, str]:
    """One `polyp-ssl` command in this process (through the dispatcher), its output captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = entry_main(argv)
    return rc, out.getvalue(), err.getvalue()


def cache_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(CACHE_LINE)]


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.parquet")}


def patch_read_only(mp: pytest.MonkeyPatch, root: Path) -> None:
    """The writability check says no for `root` and everything under it."""
    real = ec.writable_folder
    top = root.resolve()
    mp.setattr(ec, "writable_folder", lambda p: not Path(p).resolve().is_relative_to(top) and real(p))


# ----------------------------------------------------------------------------- the read-only sweep


@dataclass
class Sweep:
    src: Path  # the root's files (writable)
    root: Path  # the root the commands read (the mount, or src with the check patched)
    mode: str  # "bind mount" or "patched check"
    ckpt: Path
    xdg: Path
    user_dir: Path
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    results: dict[str, tuple[int, str, str]] = field(default_factory=dict)
    reuse_mtimes: tuple[dict, dict] = ({}, {})


def _commands(s: Sweep, out: Path) -> dict[str, list[str]]:
    enc = ["--dataset_root", str(s.root), "--encoder_ckpt", str(s.ckpt)]
    ev = [*enc, "--data_aug_anchorcrop", "--ci_resamples", "0"]
    return {
        "embed": ["embed", *enc, "--split", "test"],
        "embed_root_entry": ["embed", *enc, "--split", "val"],
        "eval": ["eval", "--task", "retrieval", *ev, "--out", str(out / "eval")],
        "probe": [
            "probe",
            "--task",
            "size",
            *ev,
            "--train_split",
            "val",
            "--data_fragment_length",
            "2",
            "--max_epochs",
            "2",
            "--out",
            str(out / "probe"),
        ],
        "count": ["count", *ev, "--out", str(out / "count")],
        "report": [
            "report",
            str(s.ckpt),
            "--dataset_root",
            str(s.root),
            "--out",
            str(out / "report"),
            "--baselines",
            "descriptor",
            "--tasks",
            "retrieval",
            "--ci_resamples",
            "0",
            "--projection",
            "pca",
        ],
        "catalog": ["catalog", str(s.root), "--tables", "--format", "json"],
        "verify": ["verify", str(s.root), "--no-progress"],
        "eval_default_out": ["eval", "--task", "reid", *ev],
    }


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    base = tmp_path_factory.mktemp("readonly")
    src = make_tiny_root(base / "src")
    fill_checksums(src)
    ckpt = make_ckpt(base / "tiny.ckpt")
    xdg = base / "xdg"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(xdg))
        mp.delenv(ec.CACHE_ENV, raising=False)
        # cached while the root was writable: must still be found once it is read-only
        rc, out, err = run(
            ["embed", "--dataset_root", str(src), "--encoder_ckpt", str(ckpt), "--split", "val"]
        )
        assert rc == 0 and f"{CACHE_LINE}{src / 'embeddings'}" in out, out + err
        mount = base / "ro"
        why = bind_read_only(src, mount)
        if why is None:
            root, mode = mount, "bind mount"
        else:
            root, mode = src, "patched check"
            patch_read_only(mp, src)
        try:
            s = Sweep(src, root, mode, ckpt, xdg, ec.user_embeddings_dir(root, xdg / "polyp-ssl"))
            s.before = snapshot(src)
            for name, argv in _commands(s, base / "outputs").items():
                s.results[name] = run(argv)
            first = mtimes(s.user_dir)
            s.results["embed_again"] = run(_commands(s, base / "outputs")["embed"])
            s.results["eval_again"] = run(
                ["eval", "--task", "retrieval", "--dataset_root", str(root), "--encoder_ckpt", str(ckpt)]
                + ["--data_aug_anchorcrop", "--ci_resamples", "0", "--out", str(base / "outputs" / "again")]
            )
            s.reuse_mtimes = (first, mtimes(s.user_dir))
            s.after = snapshot(src)
            yield s
        finally:
            if why is None:
                subprocess.run(["umount", "-l", str(mount)], check=False, timeout=30)


def test_every_read_command_exits_0_and_writes_nothing_under_the_root(sweep):
    for name in ("embed", "embed_root_entry", "eval", "probe", "count", "report", "catalog", "verify"):
        rc, out, err = sweep.results[name]
        assert rc == 0, f"{name} on a read-only root ({sweep.mode}): {out}\n{err}"
        assert "Traceback" not in err and "Read-only file system" not in err, err
    assert sweep.after == sweep.before, f"the root changed ({sweep.mode})"
    assert not (sweep.src / "eval").exists()


def test_the_cache_goes_to_the_user_cache_and_says_so_in_one_line(sweep):
    for name in ("embed", "eval", "probe", "count", "report"):
        _, out, _ = sweep.results[name]
        lines = cache_lines(out)
        assert lines == [
            f"{CACHE_LINE}{sweep.user_dir} ({sweep.root} is not writable; --cache_dir DIR or "
            f"{ec.CACHE_ENV} choose another)"
        ], (name, out)
    assert sweep.user_dir.is_relative_to(sweep.xdg / "polyp-ssl" / "embeddings")
    files = sorted(sweep.user_dir.glob("*.parquet"))
    assert files, "nothing cached in the user cache"
    for f in files:
        meta = read_metadata(f)
        assert meta["dataset_root"] == str(sweep.root.resolve())
        read_embeddings(f, root=sweep.root)  # made from this root's catalog


def test_an_entry_cached_in_the_root_is_found_read_only(sweep):
    rc, out, _ = sweep.results["embed_root_entry"]
    (entry,) = (sweep.src / "embeddings").glob("*.parquet")
    assert rc == 0 and f"reusing {sweep.root / 'embeddings' / entry.name}" in out, out
    assert not list(sweep.user_dir.glob("*_val_trk_*.parquet")), "the root's val entry was recomputed"


def test_a_second_run_reuses_the_user_cache(sweep):
    first, again = sweep.reuse_mtimes
    assert first and again == first  # nothing rewritten
    for name in ("embed_again", "eval_again"):
        rc, out, _ = sweep.results[name]
        assert rc == 0 and f"reusing {sweep.user_dir}" in out and "wrote 18 x" not in out, out


def test_catalog_lists_the_embeddings_of_both_places(sweep):
    _, out, _ = sweep.results["catalog"]
    rows = {r["view"]: r for r in json.loads(out)}
    in_root = {f"embeddings_{p.stem}" for p in (sweep.src / "embeddings").glob("*.parquet")}
    in_user = {f"embeddings_{p.stem}" for p in sweep.user_dir.glob("*.parquet")}
    assert in_root and in_user
    assert {v for v, r in rows.items() if r["source"] == "ROOT/embeddings"} == in_root
    assert {v for v, r in rows.items() if r["source"] == "user cache"} == in_user
    assert rows["tracklets"]["source"] == "catalog"
    # and the views are queryable: the user-cache test embeddings have one row per test tracklet
    (test_view,) = [v for v in in_user if v.startswith("embeddings_tiny_test_trk_")]
    rc, out, err = run(
        ["catalog", str(sweep.root), f"SELECT count(*) AS n FROM {test_view}", "--format", "json"]
    )
    assert rc == 0 and json.loads(out) == [{"n": 18}], err


def test_default_output_folder_in_a_read_only_root_is_one_line(sweep):
    rc, _, err = sweep.results["eval_default_out"]
    lines = [line for line in err.splitlines() if "error" in line]
    assert rc == 2 and len(lines) == 1 and "--out" in lines[0] and str(sweep.root) in lines[0], err


def polyp_ssl(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "polyp-ssl"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=300)


def test_real_cli_catalog_and_verify_on_the_mount(sweep):
    """The installed `polyp-ssl` in a subprocess (nothing patched: needs the real mount)."""
    if sweep.mode != "bind mount":
        pytest.skip("needs a real read-only mount (mounting is not permitted here)")
    env = {**os.environ, "XDG_CACHE_HOME": str(sweep.xdg)}
    env.pop(ec.CACHE_ENV, None)
    proc = polyp_ssl(["catalog", str(sweep.root), "--tables"], env)
    assert proc.returncode == 0, proc.stderr
    assert "ROOT/embeddings" in proc.stdout and f"user cache: {sweep.user_dir}" in proc.stdout, proc.stdout
    proc = polyp_ssl(["verify", str(sweep.root), "--no-progress"], env)
    assert proc.returncode == 0 and ": OK" in proc.stdout, proc.stdout + proc.stderr
    assert snapshot(sweep.src) == sweep.before


@pytest.mark.slow
def test_real_cli_eval_on_the_mount(sweep):
    """`polyp-ssl eval` in a subprocess reuses the user cache of the mounted root."""
    if sweep.mode != "bind mount":
        pytest.skip("needs a real read-only mount (mounting is not permitted here)")
    env = {**os.environ, "XDG_CACHE_HOME": str(sweep.xdg)}
    env.pop(ec.CACHE_ENV, None)
    out_dir = sweep.xdg.parent / "outputs" / "subprocess"
    enc = ["--dataset_root", str(sweep.root), "--encoder_ckpt", str(sweep.ckpt), "--data_aug_anchorcrop"]
    proc = polyp_ssl(["eval", "--task", "reid", *enc, "--ci_resamples", "0", "--out", str(out_dir)], env)
    assert proc.returncode == 0, proc.stderr
    assert cache_lines(proc.stdout) and f"reusing {sweep.user_dir}" in proc.stdout, proc.stdout
    assert (out_dir / "metrics_reid.json").is_file()
    assert snapshot(sweep.src) == sweep.before


@pytest.mark.slow
def test_train_reads_a_read_only_root(sweep, tmp_path):
    """`train` only reads its --dataset_root; it writes to --runs_dir."""
    if sweep.mode != "bind mount":
        pytest.skip("needs a real read-only mount (mounting is not permitted here)")
    from tests.train_helpers import TINY

    runs = tmp_path / "runs"
    argv = ["train", "--dataset_root", str(sweep.root), "--runs_dir", str(runs), "--exp_name", "ro"]
    rc, out, err = run([*argv, "--max_steps", "1", *TINY])
    assert rc == 0, out + err
    assert (runs / "ro" / "checkpoints" / "last.ckpt").is_file()
    assert snapshot(sweep.src) == sweep.before


# ----------------------------------------------------------------------------- keys and overrides


@pytest.fixture(scope="module")
def other_root(tmp_path_factory):
    """Another tiny root: other frames, but the factory's catalog manifest is byte-identical."""
    return make_tiny_root(tmp_path_factory.mktemp("other") / "root", seed=1)


def test_two_roots_with_the_same_checkpoint_do_not_share_entries(sweep, other_root, tmp_path, monkeypatch):
    assert ec.root_identity(other_root) != ec.root_identity(sweep.src)
    assert (other_root / "catalog" / "manifest.json").read_bytes() == (
        sweep.src / "catalog" / "manifest.json"
    ).read_bytes()
    monkeypatch.setenv("XDG_CACHE_HOME", str(sweep.xdg))  # the sweep's cache: its entries exist
    monkeypatch.delenv(ec.CACHE_ENV, raising=False)
    patch_read_only(monkeypatch, other_root)
    before = snapshot(other_root)
    rc, out, err = run(["embed", "--dataset_root", str(other_root), "--encoder_ckpt", str(sweep.ckpt)])
    assert rc == 0, err
    assert "reusing" not in out and "wrote 18 x 32 embeddings" in out, out
    mine = ec.user_embeddings_dir(other_root, sweep.xdg / "polyp-ssl")
    assert mine != sweep.user_dir and cache_lines(out)[0].startswith(f"{CACHE_LINE}{mine} (")
    (path,) = mine.glob("*_test_trk_*.parquet")
    (theirs,) = sweep.user_dir.glob(path.name)  # same inputs' name and key: only the folder differs
    assert read_metadata(path)["cache_key"] == read_metadata(theirs)["cache_key"]
    assert not np.allclose(read_embeddings(path).vectors, read_embeddings(theirs).vectors)
    assert snapshot(other_root) == before


def test_cache_dir_and_the_environment_variable_choose_the_folder(other_root, tmp_path, monkeypatch):
    """Even on a writable root: --cache_dir beats POLYP_SSL_CACHE, which beats ROOT/embeddings."""
    flag_dir, env_dir, xdg = tmp_path / "flag", tmp_path / "env", tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    monkeypatch.setenv(ec.CACHE_ENV, str(env_dir))
    before = snapshot(other_root)
    embed = ["embed", "--dataset_root", str(other_root), "--encoder", "descriptor"]
    rc, out, err = run([*embed, "--cache_dir", str(flag_dir)])
    flag_user = ec.user_embeddings_dir(other_root, flag_dir)
    assert rc == 0 and cache_lines(out) == [f"{CACHE_LINE}{flag_user} (--cache_dir)"], out + err
    assert len(list(flag_user.glob("descriptor_test_*.parquet"))) == 1
    rc, out, err = run([*embed, "--split", "val"])
    env_user = ec.user_embeddings_dir(other_root, env_dir)
    assert rc == 0 and cache_lines(out) == [f"{CACHE_LINE}{env_user} ({ec.CACHE_ENV})"], out + err
    assert len(list(env_user.glob("descriptor_val_*.parquet"))) == 1
    assert snapshot(other_root) == before  # the root stays untouched although writable
    assert not xdg.exists()
    # catalog: the folder of --cache_dir, else of POLYP_SSL_CACHE
    for extra, want in (([], "descriptor_val_"), (["--cache_dir", str(flag_dir)], "descriptor_test_")):
        rc, out, err = run(["catalog", str(other_root), "--tables", "--format", "json", *extra])
        views = [r["view"] for r in json.loads(out) if r["source"] == "user cache"]
        assert rc == 0 and len(views) == 1 and views[0].startswith(f"embeddings_{want}"), (extra, out, err)
    # without either, a writable root caches in ROOT/embeddings as before
    monkeypatch.delenv(ec.CACHE_ENV)
    rc, out, _ = run([*embed, "--split", "train"])
    assert rc == 0 and cache_lines(out) == [f"{CACHE_LINE}{other_root / 'embeddings'}"], out
    assert len(list((other_root / "embeddings").glob("descriptor_train_*.parquet"))) == 1


def test_one_name_in_both_places_is_left_out_of_the_catalog_by_name(other_root, tmp_path, caplog):
    """`--name dup` cached in ROOT/embeddings and in a --cache_dir folder: one view name, two files."""
    embed = ["embed", "--dataset_root", str(other_root), "--encoder", "descriptor", "--name", "dup"]
    assert run([*embed, "--split=val"])[0] == 0
    assert run([*embed, "--split=test", "--cache_dir", str(tmp_path / "c")])[0] == 0
    tables = ["catalog", str(other_root), "--tables", "--format", "json", "--cache_dir"]
    try:
        rc, out, err = run([*tables, str(tmp_path)])  # another cache folder: only the root's file
        views = {r["view"]: r["source"] for r in json.loads(out)}
        assert rc == 0 and views["embeddings_dup"] == "ROOT/embeddings", out
        rc, out, err = run([*tables, str(tmp_path / "c")])
        assert rc == 0 and "embeddings_dup" not in out, out
        assert "dup.parquet" in caplog.text and "rename all but one" in caplog.text, caplog.text
        rc, _, err = run(
            ["catalog", str(other_root), "SELECT * FROM embeddings_dup", "--cache_dir", str(tmp_path / "c")]
        )
        assert rc == 1 and "left out" in err and str(other_root / "embeddings" / "dup.parquet") in err, err
    finally:
        (other_root / "embeddings" / "dup.parquet").unlink()


def test_an_unwritable_user_cache_is_one_line(other_root, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "xdg"))
    monkeypatch.delenv(ec.CACHE_ENV, raising=False)
    patch_read_only(monkeypatch, other_root)
    before = snapshot(other_root)
    rc, out, err = run(
        ["embed", "--dataset_root", str(other_root), "--encoder", "descriptor", "--split", "val"]
    )
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert str(blocker / "xdg") in err and "--cache_dir" in err and "Traceback" not in err, err
    assert snapshot(other_root) == before


# ----------------------------------------------------------------------------- the writability test


def test_writable_folder_probes_and_leaves_nothing(tmp_path, monkeypatch):
    (tmp_path / "a").write_text("x")
    listing = sorted(os.listdir(tmp_path))
    assert ec.writable_folder(tmp_path)
    assert sorted(os.listdir(tmp_path)) == listing
    assert not ec.writable_folder(tmp_path / "missing")
    assert not ec.writable_folder(tmp_path / "a")  # a file, not a folder

    # a file system without O_TMPFILE: a named probe, removed
    real_open = os.open

    def no_tmpfile(path, flags, *args):
        if flags & getattr(os, "O_TMPFILE", 0) == getattr(os, "O_TMPFILE", -1):
            raise OSError(errno.EOPNOTSUPP, "not supported")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_tmpfile)
    assert ec.writable_folder(tmp_path)
    assert sorted(os.listdir(tmp_path)) == listing
    # ... and where creating it is refused (what os.access does not know, as root): not writable
    monkeypatch.setattr(ec.tempfile, "mkstemp", lambda **kw: (_ for _ in ()).throw(PermissionError(13, "no")))
    assert not ec.writable_folder(tmp_path)


def test_a_read_only_file_system_is_no_without_writing(tmp_path, monkeypatch):
    class RO:
        f_flag = os.ST_RDONLY

    def refuse(*a, **k):
        raise AssertionError("probed a read-only file system")

    monkeypatch.setattr(os, "statvfs", lambda p: RO())
    monkeypatch.setattr(os, "open", refuse)
    assert not ec.writable_folder(tmp_path)


def test_a_real_read_only_mount_is_not_writable(sweep):
    if sweep.mode != "bind mount":
        pytest.skip("needs a real read-only mount (mounting is not permitted here)")
    assert os.statvfs(sweep.root).f_flag & os.ST_RDONLY
    assert not ec.writable_folder(sweep.root) and not ec.writable_folder(sweep.root / "embeddings")
    assert ec.writable_folder(sweep.src)


def test_xdg_rule(tmp_path):
    home = Path.home()
    assert ec.user_cache_base({}) == home / ".cache" / "polyp-ssl"
    assert ec.user_cache_base({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "polyp-ssl"
    assert ec.user_cache_base({"XDG_CACHE_HOME": "relative/x"}) == home / ".cache" / "polyp-ssl"
    assert ec.cache_base(None, {ec.CACHE_ENV: str(tmp_path / "e")}) == (tmp_path / "e", ec.CACHE_ENV)
    assert ec.cache_base(tmp_path / "f", {ec.CACHE_ENV: "x"}) == (tmp_path / "f", "--cache_dir")


@pytest.mark.parametrize(
    "module,builder",
    [
        ("polyp_ssl.eval.embed", "build_parser"),
        ("polyp_ssl.eval.cli", "eval_parser"),
        ("polyp_ssl.eval.cli", "probe_parser"),
        ("polyp_ssl.eval.cli", "count_parser"),
        ("polyp_ssl.eval.report", "build_parser"),
        ("polyp_ssl.shards.cli", "_query_parser"),
    ],
)
def test_cache_dir_is_in_every_help(module, builder):
    import importlib

    text = getattr(importlib.import_module(module), builder)().format_help()
    assert "--cache_dir" in text and "polyp-ssl" in text
