"""Training from a dataset root in an S3 bucket (moto's server on 127.0.0.1): the same batches,
losses and resume as the local copy it was synced from; one line for what cannot be read.

The root is written by the test's shard factory, uploaded object by object as `aws s3 sync` does
(`S3Server.upload_tree`), and trained with the real `polyp-ssl train` in a child process whose
environment points at the server (`S3Server.environ`: AWS_ENDPOINT_URL, throwaway keys)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from polyp_ssl.train_cli import main
from tests.shard_factory import make_root
from tests.train_helpers import TINY, losses

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 240
# something no message, log, config or checkpoint may contain
CANARY = "canary-SECRET-7f3a91"


@pytest.fixture(scope="module")
def local_root(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("root"), videos={"train": 4, "val": 2})


@pytest.fixture(scope="module")
def bucket_root(s3_server, local_root):
    """The local root synced to s3://BUCKET/copy/root (the URL)."""
    bucket = s3_server.bucket()
    assert s3_server.upload_tree(local_root, bucket, "copy/root") > 4
    return f"s3://{bucket}/copy/root"


def child_env(extra: dict[str, str] | None = None, drop: tuple[str, ...] = ()) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k not in drop}
    env.update({"PYTHONPATH": str(REPO), "POLYP_SSL_DEBUG": "0"})
    env.update(extra or {})
    return env


def train(root: str, runs: Path, name: str, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "polyp_ssl", "train", *train_args(root, runs, name, *extra)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)


def train_args(root: str, runs: Path, name: str, *extra: str) -> list[str]:
    return [
        "--dataset_root",
        root,
        "--runs_dir",
        str(runs),
        "--exp_name",
        name,
        "--deterministic",
        "--limit_val_batches",
        "0",
        "--data_log",
        str(runs / f"{name}.data"),
        *TINY,
        *extra,
    ]


def data_lines(runs: Path, name: str) -> list[str]:
    return Path(f"{runs / name}.data.rank0").read_text().splitlines()


@pytest.fixture(scope="module")
def two_runs(s3_server, local_root, bucket_root, tmp_path_factory):
    """The same tiny run from the local root and from its copy in the bucket (defaults: endpoint and
    keys from the environment only). The environment also holds a session token no output may show."""
    runs = tmp_path_factory.mktemp("runs")
    env = child_env({**s3_server.environ(), "AWS_SESSION_TOKEN": CANARY})
    # both as a user runs them, in fresh processes: bit-equal losses need the same torch state (an
    # earlier test in this process may have changed its thread count)
    local = train(str(local_root), runs, "local", child_env(), "--max_steps", "4")
    assert local.returncode == 0, local.stderr[-2000:]
    remote = train(bucket_root, runs, "remote", env, "--max_steps", "4")
    assert remote.returncode == 0, remote.stderr[-2000:]
    return runs, remote, env


def test_s3_root_trains_the_same_batches_and_losses_as_the_local_copy(two_runs, bucket_root):
    runs, remote, _ = two_runs
    assert "random access" in remote.stderr  # not the sequential fallback
    a, b = data_lines(runs, "local"), data_lines(runs, "remote")
    assert len(a) == 4 and a == b
    assert all(int(line.split()[3]) >= 0 for line in b)  # batches of the plan (random access)
    la, lb = losses(runs / "local"), losses(runs / "remote")
    assert sorted(la) == sorted(lb) == [0, 1, 2, 3]
    assert all(la[s] == lb[s] for s in la)  # bit for bit: the same bytes in the same order
    assert f"dataset_root: {bucket_root}" in (runs / "remote" / "config.yaml").read_text()


def test_the_environments_secrets_reach_no_output(two_runs):
    runs, remote, env = two_runs
    secrets = (CANARY, env["AWS_SECRET_ACCESS_KEY"])
    assert not any(s in remote.stdout + remote.stderr for s in secrets)
    written = [p for p in (runs / "remote").rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in written) and any(p.suffix == ".ckpt" for p in written)
    for path in written:
        data = path.read_bytes()
        assert not any(s.encode() in data for s in secrets), path


@pytest.mark.slow
def test_resume_from_the_bucket_continues_as_the_straight_run(s3_server, bucket_root, tmp_path):
    runs = tmp_path / "runs"
    env = child_env(s3_server.environ())
    straight = train(bucket_root, runs, "straight", env, "--max_steps", "4")
    assert straight.returncode == 0, straight.stderr[-2000:]
    first = train(bucket_root, runs, "cut", env, "--max_steps", "2")
    assert first.returncode == 0, first.stderr[-2000:]
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "polyp_ssl",
            "train",
            "--runs_dir",
            str(runs),
            "--exp_name",
            "cut",
            "--resume",
            "--max_steps",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    a, b = losses(runs / "straight"), losses(runs / "cut")
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    assert all(b[s] == pytest.approx(a[s], rel=1e-6, abs=1e-7) for s in a)
    assert data_lines(runs, "cut") == data_lines(runs, "straight")  # resuming read no batch twice


@pytest.mark.slow
def test_no_secret_of_storage_options_reaches_the_run_folder_or_stderr(s3_server, bucket_root, tmp_path):
    """Keys and a token in --storage_options are used, never written or printed."""
    runs = tmp_path / "runs"
    keys = s3_server.environ()
    env = child_env(
        {k: v for k, v in keys.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    )
    options = json.dumps(
        {"key": keys["AWS_ACCESS_KEY_ID"], "secret": keys["AWS_SECRET_ACCESS_KEY"], "token": CANARY}
    )
    proc = train(bucket_root, runs, "secret", env, "--max_steps", "1", "--storage_options", options)
    assert proc.returncode == 0, proc.stderr[-2000:]
    secrets = (CANARY, keys["AWS_SECRET_ACCESS_KEY"])
    for text in (proc.stdout, proc.stderr):
        assert not any(s in text for s in secrets)
    written = [p for p in (runs / "secret").rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in written) and any(p.suffix == ".ckpt" for p in written)
    for path in written:
        data = path.read_bytes()
        assert not any(s.encode() in data for s in secrets), path
    assert '"token": "***"' in (runs / "secret" / "config.yaml").read_text()
    # --resume without the options: config.yaml kept no secret to continue with, said in one line
    again = subprocess.run(
        [sys.executable, "-m", "polyp_ssl", "train", "--runs_dir", str(runs), "--exp_name", "secret"]
        + ["--resume", "--max_steps", "2"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
    )
    assert again.returncode == 2
    assert "pass --storage_options again" in again.stderr and len(again.stderr.strip().splitlines()) == 1


def test_missing_credentials_are_one_line(s3_env, bucket_root, tmp_path, capsys, monkeypatch, request):
    import s3fs

    from polyp_ssl.shards.remote import use_storage_options

    request.addfinalizer(lambda: use_storage_options(None))  # main() sets this process's options
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    s3fs.S3FileSystem.clear_instance_cache()  # a filesystem made with the keys would be reused
    request.addfinalizer(s3fs.S3FileSystem.clear_instance_cache)
    runs = tmp_path / "runs"
    assert main(train_args(bucket_root, runs, "nokeys", "--max_steps", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no credentials" in err[0] and "AWS_ACCESS_KEY_ID" in err[0], err
    assert bucket_root in err[0] and not (runs / "nokeys").exists()


@pytest.mark.parametrize(
    ("where", "extra", "words"),
    [
        ("s3://no-such-bucket-here/root", (), ("s3://no-such-bucket-here/root", "no such bucket")),
        ("{root}-not-there", (), ("{root}-not-there has no catalog: no such directory",)),
        ("{root}", ("--storage_options", "{not json"), ("--storage_options: not JSON",)),
    ],
)
def test_a_root_that_cannot_be_read_is_one_line(
    s3_env, bucket_root, tmp_path, capsys, request, where, extra, words
):
    """In this process (the same `main` as the command): exit 2 and one line naming the root."""
    from polyp_ssl.shards.remote import use_storage_options

    where = where.format(root=bucket_root)
    runs = tmp_path / "runs"
    request.addfinalizer(lambda: use_storage_options(None))  # main() sets this process's options
    assert main(train_args(where, runs, "x", "--max_steps", "1", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for w in words:
        assert w.format(root=bucket_root) in err[0], err[0]
    assert not (runs / "x").exists()


def test_eval_on_the_bucket_gives_the_local_numbers(
    two_runs, local_root, bucket_root, s3_server, s3_env, tmp_path, capsys
):
    """`polyp-ssl eval --task retrieval` embeds the split from the bucket (caching locally, writing
    nothing into the bucket) and reports the numbers of the local copy; without --out it refuses
    in one line before embedding (the default output folder would be inside the bucket)."""
    from polyp_ssl.eval.cli import eval_main

    runs, _, _ = two_runs
    ckpt = runs / "local" / "checkpoints" / "last.ckpt"
    bucket, prefix = bucket_root.removeprefix("s3://").split("/", 1)

    def objects() -> list[str]:
        listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for o in listed["Contents"])

    before = objects()
    results = {}
    for name, root in (("local", str(local_root)), ("remote", bucket_root)):
        args = ["--task", "retrieval", "--dataset_root", root, "--encoder_ckpt", str(ckpt), "--split", "val"]
        args += ["--data_aug_anchorcrop", "--min_tracklet_frames", "4", "--cache_dir", str(tmp_path / name)]
        assert eval_main([*args, "--out", str(tmp_path / f"out-{name}")]) == 0
        (result,) = (tmp_path / f"out-{name}").glob("metrics_retrieval.json")
        results[name] = json.loads(result.read_text())
    local, remote = results["local"], results["remote"]
    assert remote["dataset_root"] == bucket_root and local["n_tracklets"] == remote["n_tracklets"] == 8
    for key in ("mAP", "mAP_ci", "HR@1", "HR@5", "n_queries", "n_identities"):
        assert remote[key] == local[key], key
    assert remote["embedding_meta"]["manifest_sha256"] == local["embedding_meta"]["manifest_sha256"]
    from polyp_ssl.eval.embeddings import read_embeddings

    (va,), (vb,) = ([read_embeddings(p).vectors for p in (tmp_path / n).rglob("*.parquet")] for n in results)
    assert va.shape[0] == 8 and (va == vb).all()  # the same frames, bit for bit
    assert objects() == before  # nothing was written into the bucket
    refused = ["--task", "retrieval", "--dataset_root", bucket_root, "--encoder_ckpt", str(ckpt)]
    refused += ["--split", "val", "--data_aug_anchorcrop", "--cache_dir", str(tmp_path / "never")]
    assert eval_main(refused) == 2
    assert "object store, where outputs are never written" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()  # refused before embedding


def test_remote_roots_locations_and_options():
    """shards.remote and shards.locations: what is remote, the URL of a shard under a remote root
    (same validation of the catalog's value), options parsed in bounds and recorded without secrets."""
    from polyp_ssl.shards.locations import UnsafeLocation, shard_location
    from polyp_ssl.shards.remote import (
        StorageOptionsError,
        display_url,
        is_remote,
        parse_storage_options,
        public_options,
        redact,
        remote_root,
    )

    assert [
        is_remote(x) for x in ("s3://b/r", "gs://b/r", "https://h/r", "/data/r", "file:/r", "pipe:cat x")
    ] == [
        True,
        True,
        True,
        False,
        False,
        False,
    ]
    assert not is_remote("memory://x") and not is_remote("C:\\data") and not is_remote("simplecache::s3://b")
    assert remote_root(Path("s3://b/r")) == "s3://b/r"  # a Path lost a slash; the URL comes back whole
    assert remote_root("s3://b/r/") == "s3://b/r" and remote_root("/data/r") is None
    rel = "shards/train/train-000000.tar"
    assert shard_location(rel, "s3://b/r") == f"s3://b/r/{rel}"
    assert shard_location("shards/a b#1.tar", "https://h/r") == "https://h/r/shards/a%20b%231.tar"
    for bad in ("../x.tar", "s3://other/x.tar", "/abs.tar", "pipe:rm -rf x"):
        with pytest.raises(UnsafeLocation):
            shard_location(bad, "s3://b/r")
    assert parse_storage_options(None) == {} and parse_storage_options(' {"anon": true} ') == {"anon": True}
    for bad in ("[1]", "{nope", "x" * (1 << 17)):
        with pytest.raises(StorageOptionsError) as err:
            parse_storage_options(bad)
        assert bad[:20] not in str(err.value)  # the text itself is never repeated
    options = {
        "key": "AKIA-key-id",
        "secret": CANARY,
        "client_kwargs": {"region_name": "eu-west-1"},
        "anon": False,
    }
    assert public_options(options) == {
        "key": "***",
        "secret": "***",
        "client_kwargs": {"region_name": "eu-west-1"},
        "anon": False,
    }
    assert CANARY not in redact(f"failed with secret={CANARY}", options)
    assert display_url("https://user:pw@host:8443/r") == "https://host:8443/r"


@pytest.mark.slow
def test_report_on_the_bucket_gives_the_local_values(two_runs, s3_server, s3_env, tmp_path):
    """`polyp-ssl report` (retrieval, re-id, counting, probes, the page's pictures) from a bucket:
    every value of results.parquet is the local copy's; the table names the bucket's URL."""
    import pyarrow.parquet as pq

    from polyp_ssl.eval.cli import report_main

    runs, _, _ = two_runs
    ckpt = str(runs / "local" / "checkpoints" / "last.ckpt")
    root = make_root(tmp_path / "root", videos={"train": 4, "val": 2, "test": 2})
    bucket = s3_server.bucket()
    s3_server.upload_tree(root, bucket, "r")
    tables = {}
    for name, where in (("local", str(root)), ("remote", f"s3://{bucket}/r")):
        args = [
            ckpt,
            "--dataset_root",
            where,
            "--min_tracklet_frames",
            "4",
            "--cache_dir",
            str(tmp_path / name),
        ]
        assert report_main([*args, "--out", str(tmp_path / f"report-{name}")]) == 0
        tables[name] = pq.read_table(tmp_path / f"report-{name}" / "results.parquet").to_pydict()
    assert len(tables["local"]["value"]) > 5 and tables["local"]["value"] == tables["remote"]["value"]
    assert set(tables["remote"]["dataset_root"]) == {f"s3://{bucket}/r"}
