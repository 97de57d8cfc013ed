"""Evaluation inputs: embeddings are Parquet only (never unpickled), a damaged file or one made
from another dataset is refused with a message naming the file, and writing one is atomic."""

from __future__ import annotations

import errno
import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import polyp_ssl.eval.embeddings as emb_mod
from polyp_ssl.eval.cli import eval_main
from polyp_ssl.eval.embeddings import EmbeddingsError, manifest_sha256, read_embeddings, write_embeddings
from tests.shard_factory import make_root

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("emb_root"), videos={"train": 1, "val": 2})


def write_valid(root: Path, path: Path) -> Path:
    rows = pq.read_table(root / "catalog" / "tracklets.parquet").to_pylist()
    rows = [r for r in rows if r["split"] == "val"]
    columns = {
        "tracklet_id": [r["tracklet_id"] for r in rows],
        "sample_key": [r["sample_key"] for r in rows],
        "split": [r["split"] for r in rows],
        "video_id": [r["video_id"] for r in rows],
        "identity_id": [r["identity_id"] for r in rows],
        "fragment_index": [-1] * len(rows),
        "start_frame": [r["start_frame"] for r in rows],
    }
    vectors = np.random.default_rng(0).normal(size=(len(rows), 8)).astype(np.float32)
    meta = {"manifest_sha256": manifest_sha256(root), "dataset_root": str(root), "params": {"split": "val"}}
    return write_embeddings(path, columns, vectors, meta)


def run_eval(path: Path, root: Path) -> int:
    args = ["--task", "retrieval", "--embeddings", str(path), "--dataset_root", str(root), "--split", "val"]
    return eval_main(args)


class CreatesFile:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_valid_file_reads_back(root, tmp_path):
    path = write_valid(root, tmp_path / "e.parquet")
    emb = read_embeddings(path, split="val", root=root)
    assert len(emb) == 8 and emb.dim == 8 and np.isfinite(emb.vectors).all()


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.0])
def test_a_truncated_file_is_named(root, tmp_path, capsys, keep):
    path = write_valid(root, tmp_path / "e.parquet")
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    with pytest.raises(EmbeddingsError, match=re.escape(str(path))):
        read_embeddings(path, split="val", root=root)
    assert run_eval(path, root) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("polyp-ssl eval: error:") and str(path) in err


def test_embeddings_of_another_dataset_are_refused(root, tmp_path, capsys):
    path = write_valid(root, tmp_path / "e.parquet")
    other = tmp_path / "other"
    shutil.copytree(root, other)
    manifest = other / "catalog" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "source": "another hospital"}))
    with pytest.raises(EmbeddingsError, match="another dataset"):
        read_embeddings(path, split="val", root=other)
    assert run_eval(path, other) == 2
    assert "another dataset" in capsys.readouterr().err


def test_a_pickle_named_parquet_is_never_unpickled(root, tmp_path, capsys):
    target = tmp_path / "pwned"
    pickle.loads(pickle.dumps(CreatesFile(str(target)))).close()  # the payload works ...
    target.unlink()
    path = tmp_path / "e.parquet"
    path.write_bytes(pickle.dumps({"vectors": CreatesFile(str(target))}))
    with pytest.raises(EmbeddingsError, match="not a Parquet file"):
        read_embeddings(path, root=root)
    assert run_eval(path, root) == 2
    assert not target.exists()  # ... and was never run


def test_disk_full_while_writing_leaves_no_file(root, tmp_path, monkeypatch):
    real = pq.write_table

    def full(table, where, **kwargs):
        real(table.slice(0, 1), where, **kwargs)  # a partial file under the temporary name
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(emb_mod.pq, "write_table", full)
    with pytest.raises(OSError, match="No space left"):
        write_valid(root, tmp_path / "e.parquet")
    assert list(tmp_path.iterdir()) == []


UNSAFE = [
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"\bnp\.load\([^)]*allow_pickle\s*=\s*True"), "np.load(allow_pickle=True)"),
    (
        re.compile(r"\btorch\.load\((?![^)]*weights_only\s*=\s*True)[^)]*\)"),
        "torch.load without weights_only=True",
    ),
    (re.compile(r"\bread_pickle\("), "pandas.read_pickle"),
]


def test_no_loader_in_the_package_can_unpickle():
    """Every load of a checkpoint, embeddings or shard member in shards/, ingest/, polyp_ssl/ and
    eval/ goes through weights_only torch.load, Parquet or JSON."""
    found = []
    for pkg in ("shards", "ingest", "polyp_ssl", "eval"):
        for path in sorted((REPO / pkg).rglob("*.py")):
            text = path.read_text()
            for pattern, what in UNSAFE:
                for m in pattern.finditer(text):
                    found.append(f"{path.relative_to(REPO)}:{text[: m.start()].count(chr(10)) + 1}: {what}")
    assert found == []
    assert UNSAFE[2][0].search("torch.load(p, map_location='cpu')")  # the scan does catch one
    assert not UNSAFE[2][0].search("torch.load(p, map_location='cpu', weights_only=True)")
