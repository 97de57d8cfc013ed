"""The data path keeps its results honest: training stops at the first non-finite loss and never
writes non-finite weights over a good checkpoint; random access proves which member each catalog
span is (the tar header read with the data); catalog spans and embeddings Parquet are bounded
before anything is allocated; eval and report name the file of a bad embeddings set and evaluate a
collapsed one."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from polyp_ssl.eval.cli import eval_main
from polyp_ssl.eval.embeddings import (
    META_KEY,
    EmbeddingsError,
    manifest_sha256,
    read_embeddings,
    write_embeddings,
)
from polyp_ssl.eval.projection import is_collapsed, project_2d
from polyp_ssl.eval.report import main as report_main
from polyp_ssl.module import NonFiniteLossError, NTSSLModule, first_non_finite
from polyp_ssl.shards.members import (
    MemberError,
    MemberSpan,
    SpanReader,
    check_member_header,
    crc32,
    max_jpeg_bytes,
    member_header_bytes,
)
from polyp_ssl.shards.sample import MAX_JSON_BYTES, parse_sample
from polyp_ssl.shards.schema import embeddings_schema
from polyp_ssl.shards.writer import ShardWriter
from polyp_ssl.stream import BagStream, DataConfigError, ShardError, StreamLoader, StreamParams, build_index
from tests.bomb_helpers import GIB, run_limited
from tests.embed_factory import make_tiny_root
from tests.shard_factory import make_root
from tests.train_helpers import TINY

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------
# class 5: non-finite losses stop training; no non-finite checkpoint replaces a good last.ckpt
# --------------------------------------------------------------------------------------------

FLAGS = [a for i, a in enumerate(TINY) if a != "--lr" and (i == 0 or TINY[i - 1] != "--lr")]

# `polyp-ssl train` with a fault injected in-process: DP_NAN=WHAT:RANK:CALL makes rank RANK's
# CALL-th loss (WHAT=loss: loss_frag and the sum become NaN) or optimizer step (WHAT=weights: a
# weight becomes NaN after it) non-finite. Lightning's DDP launcher re-runs this same script for
# the other ranks, so they get the hook too.
NAN_SCRIPT = """
import os, sys
import torch
from polyp_ssl import losses
from polyp_ssl.entry import main

what, rank, call = os.environ["DP_NAN"].split(":")
mine = os.environ.get("LOCAL_RANK", "0") == rank
calls = {"loss": 0, "weights": 0}
real_forward = losses.HierarchicalContrastive.forward
real_step = torch.optim.AdamW.step


def forward(self, *args, **kwargs):
    out = real_forward(self, *args, **kwargs)
    calls["loss"] += 1
    if mine and what == "loss" and calls["loss"] == int(call):
        out["loss_frag"] = out["loss_frag"] * float("nan")
        out["loss"] = out["loss"] * float("nan")
    return out


def step(self, *args, **kwargs):
    result = real_step(self, *args, **kwargs)
    calls["weights"] += 1
    if mine and what == "weights" and calls["weights"] == int(call):
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("nan"))
    return result


losses.HierarchicalContrastive.forward = forward
torch.optim.AdamW.step = step
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def train_root(tmp_path_factory) -> Path:
    return make_root(
        tmp_path_factory.mktemp("dp_train"), videos={"train": 2, "val": 1}, tracklets_per_polyp=1
    )


def env(**extra: str) -> dict[str, str]:
    out = {**os.environ, "PYTHONPATH": str(REPO), **extra}
    out.pop("POLYP_SSL_TEST_RAISE_AT_STEP", None)
    out.pop("POLYP_SSL_TEST_CRASH_AT", None)
    return out


def train_cmd(root: Path, runs: Path, exp: str, *extra: str) -> list[str]:
    return [
        "train",
        "--dataset_root",
        str(root),
        "--runs_dir",
        str(runs),
        "--exp_name",
        exp,
        "--limit_val_batches",
        "0",
        *FLAGS,
        *extra,
    ]


def run_train(args: list[str], script: Path | None = None, **extra_env: str) -> subprocess.CompletedProcess:
    head = [sys.executable, str(script)] if script else [sys.executable, "-m", "polyp_ssl"]
    return subprocess.run(
        [*head, *args], env=env(**extra_env), capture_output=True, text=True, timeout=300, cwd=REPO
    )


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one error line: the last line of stderr, and no traceback anywhere."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def finite_state(path: Path) -> tuple[int, bool]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ok = (
        first_non_finite(ckpt["state_dict"]) is None
        and first_non_finite(ckpt.get("optimizer_states", [])) is None
    )
    return int(ckpt.get("global_step", -1)), ok


def nan_script(tmp_path: Path) -> Path:
    path = tmp_path / "train_with_nan.py"
    path.write_text(NAN_SCRIPT)
    return path


def test_lr_inf_in_a_config_never_trains_to_a_nan_model(train_root, tmp_path):
    """The issue's case: `lr: .inf` in a config file. Refused before training (the setting's range)
    or stopped at the first non-finite loss: either way one line, exit non-zero, and no last.ckpt
    with non-finite weights."""
    cfg = tmp_path / "inf.yaml"
    cfg.write_text("lr: .inf\n")
    runs = tmp_path / "runs"
    proc = run_train(train_cmd(train_root, runs, "inf", "--config", str(cfg), "--max_steps", "3"))
    assert proc.returncode != 0
    line = error_line(proc)
    assert line.startswith("polyp-ssl train: error:")
    assert ("'lr'" in line and "inf" in line) or ("non-finite" in line and "step" in line), line
    last = runs / "inf" / "checkpoints" / "last.ckpt"
    assert not last.exists() or finite_state(last)[1]


def test_a_diverging_run_stops_at_the_first_nan_loss_and_keeps_its_good_last_ckpt(train_root, tmp_path):
    """lr 100 with weight decay 100 (both in range) overflows the forward pass within a few steps:
    the run stops there naming the step and the terms, exit 1, and last.ckpt (written every step)
    is the finite one of the step before."""
    runs = tmp_path / "runs"
    args = ["--lr", "100", "--weight_decay", "100", "--max_steps", "10", "--ckpt_every_n_steps", "1"]
    proc = run_train(train_cmd(train_root, runs, "div", *args))
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = error_line(proc)
    assert line.startswith("polyp-ssl train: error: non-finite loss at step "), line
    step = int(line.split("at step ")[1].split()[0])
    assert "loss_frag" in line and "rank 0" in line and "last good checkpoint" in line
    ckpt = runs / "div" / "checkpoints"
    saved_step, finite = finite_state(ckpt / "last.ckpt")
    assert finite and saved_step == step  # the checkpoint after step - 1 (global_step = step)
    assert finite_state(ckpt / "last.prev.ckpt")[1]
    assert not list(ckpt.glob("*.tmp*"))


@pytest.mark.slow
def test_nan_weights_after_an_optimizer_step_are_never_checkpointed(train_root, tmp_path):
    """A weight becomes NaN in the 3rd optimizer step (the loss of that step was finite): the
    interval checkpoint after it is refused (exit 1, one line naming the step and the weight), and
    last.ckpt stays the one of step 2."""
    runs = tmp_path / "runs"
    args = train_cmd(train_root, runs, "w", "--max_steps", "6", "--ckpt_every_n_steps", "1")
    proc = run_train(args, nan_script(tmp_path), DP_NAN="weights:0:3")
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = error_line(proc)
    assert "non-finite state dict at step 3" in line and "encoder." in line, line
    assert "previous one is kept" in line
    assert finite_state(runs / "w" / "checkpoints" / "last.ckpt") == (2, True)


@pytest.mark.slow
def test_a_nan_loss_with_epoch_end_checkpoints_keeps_the_last_epochs(train_root, tmp_path):
    """The loss of the 4th step is NaN, with checkpoints at epoch ends only (a few steps an epoch
    here): the run stops at step 3 naming loss_frag, the weights being finite (this batch's loss),
    and last.ckpt is the finite one of the last epoch end before it."""
    runs = tmp_path / "runs"
    proc = run_train(
        train_cmd(train_root, runs, "e", "--max_steps", "6"), nan_script(tmp_path), DP_NAN="loss:0:4"
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = error_line(proc)
    assert "non-finite loss at step 3" in line and "loss_frag = nan" in line and "loss = nan" in line, line
    assert "the weights were" not in line
    saved_step, finite = finite_state(runs / "e" / "checkpoints" / "last.ckpt")
    assert finite and 0 < saved_step <= 3


@pytest.mark.slow
@pytest.mark.ddp
def test_a_nan_loss_on_one_ddp_rank_stops_every_rank_at_the_same_step(train_root, tmp_path):
    """Rank 1's 3rd loss is NaN (rank 0's is finite): the check is collective, so both ranks stop
    at step 2, naming rank 1 and the term, within a bounded time (no rank waits in a collective)."""
    runs = tmp_path / "runs"
    args = train_cmd(train_root, runs, "ddp", "--max_steps", "6", "--strategy", "ddp")
    args[args.index("--devices") + 1] = "2"
    started = time.monotonic()
    proc = run_train(args, nan_script(tmp_path), DP_NAN="loss:1:3")
    assert proc.returncode != 0
    assert time.monotonic() - started < 240
    line = error_line(proc)
    assert "non-finite loss at step 2" in line and "on rank 1" in line and "loss_frag" in line, line


def test_the_module_refuses_to_save_non_finite_weights_or_optimizer_state():
    module = NTSSLModule({"encoder_type": "sfe", "sfe_backbone_arch": "resnet18", "d_proj": 8})
    good = {
        "state_dict": module.state_dict(),
        "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(3)}}}],
    }
    module.on_save_checkpoint(good)  # finite: nothing happens
    bad_weights = dict(good, state_dict={**good["state_dict"]})
    name = next(k for k, v in bad_weights["state_dict"].items() if v.is_floating_point())
    bad_weights["state_dict"][name] = torch.full_like(bad_weights["state_dict"][name], float("inf"))
    with pytest.raises(NonFiniteLossError, match=f"state dict at step 0: {name} holds"):
        module.on_save_checkpoint(bad_weights)
    bad_opt = dict(good, optimizer_states=[{"state": {0: {"exp_avg": torch.tensor([1.0, float("nan")])}}}])
    with pytest.raises(NonFiniteLossError, match="optimizer states .*0.state.0.exp_avg"):
        module.on_save_checkpoint(bad_opt)


def test_the_loss_check_names_the_first_non_finite_term():
    module = NTSSLModule({"encoder_type": "sfe", "sfe_backbone_arch": "resnet18", "d_proj": 8})
    finite = {
        "loss_frag": torch.tensor(1.0),
        "loss_cross_frame": torch.tensor(2.0),
        "loss": torch.tensor(3.0),
    }
    module.check_finite_loss(finite, 0)
    bad = {**finite, "loss_cross_frame": torch.tensor(float("inf")), "loss": torch.tensor(float("inf"))}
    with pytest.raises(NonFiniteLossError) as exc:
        module.check_finite_loss(bad, 5)
    assert exc.value.term == "loss_cross_frame" and exc.value.step == 0
    assert "loss_cross_frame = inf, loss = inf" in str(exc.value) and "batch 5" in str(exc.value)
    assert "loss_frag" not in str(exc.value)


# --------------------------------------------------------------------------------------------
# class 5: random access proves which member a span is (the tar header, same read)
# --------------------------------------------------------------------------------------------

P = StreamParams(
    batch_size=8,
    n_views=2,
    fragment_length=2,
    fragment_stride=2,
    min_tracklet_length=4,
    im_size=16,
    aug_anchorcrop=True,
    max_epochs=2,
)


@pytest.fixture()
def ra_root(tmp_path) -> Path:
    return make_root(
        tmp_path / "root", videos={"train": 4, "val": 1}, frames_per_tracklet=12, videos_per_shard=2
    )


def tar_members(root: Path) -> dict[str, bytes]:
    out = {}
    for tar_path in sorted((root / "shards").rglob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                out[m.name] = tar.extractfile(m).read()
    return out


def set_rows(path: Path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path)


def rotate_equal_crop_frames(root: Path) -> str:
    """Rotate the frame spans (offset, size and CRC together) of one training tracklet among its
    frames of equal crop size: every span still holds bytes ingest wrote, with their CRC, and
    decodes to the right size, but frame i now reads frame i + 1. Returns the sample key."""
    trk = pq.read_table(root / "catalog" / "tracklets.parquet").to_pylist()
    members = tar_members(root)
    path = root / "catalog" / "frames.parquet"
    frames = pq.read_table(path).to_pylist()
    for t in (t for t in trk if t["split"] == "train"):
        sizes = parse_sample(members[f"{t['sample_key']}.json"]).crop_sizes
        rows = sorted(
            (f for f in frames if f["tracklet_id"] == t["tracklet_id"]), key=lambda f: f["frame_index"]
        )
        same = [f for f in rows if sizes[f["frame_index"]] == sizes[rows[0]["frame_index"]]]
        if len(same) >= 3:
            spans = [(f["jpeg_offset"], f["jpeg_size"], f["jpeg_crc32"]) for f in same]
            for f, span in zip(same, spans[1:] + spans[:1], strict=True):
                f["jpeg_offset"], f["jpeg_size"], f["jpeg_crc32"] = span
            set_rows(path, frames)
            return t["sample_key"]
    raise AssertionError("no tracklet with 3 frames of one crop size")


def read_all(root: Path, params: StreamParams) -> tuple[StreamLoader, list[dict]]:
    loader = StreamLoader(BagStream(build_index(root, "train", params), params, 0, 1, 0))
    batches = []
    for epoch in range(params.max_epochs):
        loader.set_epoch(epoch)
        batches += list(loader)
    return loader, batches


def test_rotated_frame_spans_are_refused_under_fail(ra_root):
    key = rotate_equal_crop_frames(ra_root)
    with pytest.raises(ShardError) as exc:
        read_all(ra_root, P)
    assert exc.value.reason == "span_mismatch" and exc.value.key == key
    message = str(exc.value)
    assert f"sample {key!r}" in message and "names member" in message and "[span_mismatch]" in message


def test_rotated_frame_spans_are_skipped_and_counted_under_warn(ra_root):
    key = rotate_equal_crop_frames(ra_root)
    loader, batches = read_all(ra_root, replace(P, on_shard_error="warn"))
    assert loader.dataset.shared.skip_counts() == {"span_mismatch": 1}  # found once, then avoided
    assert loader.dataset.stats["bags_replaced_after_damage"] >= 1
    assert len(batches) == 2 * len(loader) and all(b["frames"].shape[0] == P.batch_size for b in batches)
    code = loader.dataset.index.samples[key][1]
    # the rotated tracklet's fragments never reach a batch of the second epoch
    assert not any(code in b["tracklet"].tolist() for b in batches[len(loader) :])


def test_a_json_span_pointing_at_another_tracklets_json_is_refused(ra_root):
    """Two tracklets' JSON spans swapped (CRCs along): the JSON key check would also see it; the
    header check names the member first, under fail and under warn (both left out)."""
    path = ra_root / "catalog" / "tracklets.parquet"
    rows = pq.read_table(path).to_pylist()
    a, b = [r for r in rows if r["split"] == "train"][:2]
    cols = ("json_offset", "json_size", "json_crc32")
    swapped = {c: a[c] for c in cols}
    for c in cols:
        a[c] = b[c]
        b[c] = swapped[c]
    set_rows(path, rows)
    with pytest.raises(ShardError) as exc:
        BagStream(build_index(ra_root, "train", P), P)
    assert exc.value.reason == "span_mismatch"
    assert f"names member '{b['sample_key']}.json', not '{a['sample_key']}.json'" in str(exc.value)
    warn = replace(P, on_shard_error="warn")
    ds = BagStream(build_index(ra_root, "train", warn), warn)
    assert ds.build_skips["span_mismatch"] == 2
    # counted once, where they were found: the loader keeps the dataset's counters
    assert ds.stats["skipped_span_mismatch"] == 2 and ds.shared.skip_counts() == {"span_mismatch": 2}
    assert StreamLoader(ds).dataset.shared.skip_counts() == {"span_mismatch": 2}


def test_frame_spans_swapped_between_tracklets_are_refused(ra_root):
    """Frame 0 of two tracklets swapped (offsets, sizes and CRCs): no overlap, every CRC right,
    but the header before each span names the other tracklet's member."""
    path = ra_root / "catalog" / "frames.parquet"
    frames = pq.read_table(path).to_pylist()
    trk = pq.read_table(ra_root / "catalog" / "tracklets.parquet").to_pylist()
    t0, t1 = [t for t in trk if t["split"] == "train"][:2]
    f0 = next(f for f in frames if f["tracklet_id"] == t0["tracklet_id"] and f["frame_index"] == 0)
    f1 = next(f for f in frames if f["tracklet_id"] == t1["tracklet_id"] and f["frame_index"] == 0)
    cols = ("jpeg_offset", "jpeg_size", "jpeg_crc32")
    for c in cols:
        f0[c], f1[c] = f1[c], f0[c]
    set_rows(path, frames)
    with pytest.raises(ShardError) as exc:
        read_all(ra_root, P)
    assert exc.value.reason == "span_mismatch" and "frame 0" in str(exc.value)
    keys = {t0["sample_key"], t1["sample_key"]}
    assert exc.value.key in keys and f"names member '{(keys - {exc.value.key}).pop()}.0000.jpg'" in str(
        exc.value
    )


def shard_with(tmp_path: Path, names: list[str], fmt: int = tarfile.GNU_FORMAT) -> tuple[Path, dict]:
    """A tar of members `names` (4 KiB each, distinct bytes) in format `fmt`; spans by name."""
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = 4096
            tar.addfile(info, io.BytesIO(bytes([i + 1]) * 4096))
    spans = {}
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            spans[m.name] = MemberSpan(
                m.offset_data, m.size, crc32(data[m.offset_data : m.offset_data + m.size])
            )
    return path, spans


def test_the_reader_checks_the_header_of_the_members_the_writer_writes(tmp_path):
    """ShardWriter's members, a long (GNU long-name) one included, read back with their header
    checked; the header of another member, and a span moved into a data block, are refused."""
    long_key = "k" * 140
    shard = tmp_path / "w.tar"
    with ShardWriter(shard) as w:
        short = w.write({"__key__": "a", "json": b"{}", "0000.jpg": b"x" * 700})
        long = w.write({"__key__": long_key, "json": b"{}", "0000.jpg": b"y" * 700})
    assert member_header_bytes(f"{long_key}.0000.jpg") == 512 + 512 + 512  # long-name header, name, own
    reader = SpanReader()
    try:
        assert reader.read(str(shard), short["0000.jpg"], -1, "a.0000.jpg") == b"x" * 700
        assert reader.read(str(shard), long["0000.jpg"], -1, f"{long_key}.0000.jpg") == b"y" * 700
        with pytest.raises(MemberError, match="names member 'a.0000.jpg', not 'a.json'") as exc:
            reader.read(str(shard), short["0000.jpg"], -1, "a.json")
        assert exc.value.reason == "span_mismatch"
        with pytest.raises(MemberError, match="GNU long-name header") as exc:
            reader.read(str(shard), long["0000.jpg"], -1, f"{long_key[:-1]}x.0000.jpg")
        moved = MemberSpan(short["0000.jpg"].offset + 512, 100, 0)  # inside the data: no header there
        with pytest.raises(MemberError, match="no valid tar header|names member") as exc:
            reader.read(str(shard), moved, -1, "a.0000.jpg")
        assert exc.value.reason == "span_mismatch"
    finally:
        reader.close()


def test_a_long_name_in_a_pax_header_cannot_be_verified_and_is_refused(tmp_path):
    name = "p" * 120 + ".0000.jpg"
    path, spans = shard_with(tmp_path, [name], tarfile.PAX_FORMAT)
    reader = SpanReader()
    try:
        with pytest.raises(MemberError, match="cannot verify") as exc:
            reader.read(str(path), spans[name], -1, name)
        assert exc.value.reason == "span_mismatch"
    finally:
        reader.close()


def test_a_header_of_another_size_or_type_is_refused():
    info = tarfile.TarInfo("k.0001.jpg")
    info.size = 10
    header = info.tobuf(tarfile.GNU_FORMAT)
    check_member_header(header, "k.0001.jpg", 10)
    with pytest.raises(MemberError, match="10 bytes; the catalog's span is 11"):
        check_member_header(header, "k.0001.jpg", 11)
    info.type = tarfile.SYMTYPE
    info.size = 0
    with pytest.raises(MemberError, match="of type b'2'"):
        check_member_header(info.tobuf(tarfile.GNU_FORMAT), "k.0001.jpg", 0)


# --------------------------------------------------------------------------------------------
# class 3: catalog spans and embeddings bounded before allocation
# --------------------------------------------------------------------------------------------


def last_frame_row(root: Path) -> tuple[Path, list[dict], dict, int]:
    """The frames table, its rows, and the row of the training frame with the highest offset of
    its shard (a longer span there overlaps nothing) with its index in the table."""
    path = root / "catalog" / "frames.parquet"
    frames = pq.read_table(path).to_pylist()
    trk = {t["tracklet_id"]: t for t in pq.read_table(root / "catalog" / "tracklets.parquet").to_pylist()}
    train = [i for i, f in enumerate(frames) if trk[f["tracklet_id"]]["split"] == "train"]
    shard = trk[frames[train[0]]["tracklet_id"]]["shard"]
    same = [i for i in train if trk[frames[i]["tracklet_id"]]["shard"] == shard]
    i = max(same, key=lambda i: frames[i]["jpeg_offset"])
    return path, frames, frames[i], i


@pytest.mark.parametrize("size", [63 << 20, max_jpeg_bytes(48, 48) + 1])
def test_an_oversized_frame_span_is_refused_when_the_index_is_built(ra_root, size):
    """63 MiB for a 48-px crop (the issue's case), and one byte over the bound: refused before
    any batch, naming the table, the row and the field, whatever --on_shard_error."""
    path, frames, row, i = last_frame_row(ra_root)
    row["jpeg_size"] = size
    set_rows(path, frames)
    for mode in ("fail", "warn"):
        p = replace(P, on_shard_error=mode)
        with pytest.raises(DataConfigError) as exc:
            BagStream(build_index(ra_root, "train", p), p)
        msg = str(exc.value)
        assert f"frames.parquet: row {i} " in msg and "field 'jpeg_size'" in msg and f"{size} bytes" in msg


def test_a_json_span_over_the_sample_cap_is_refused_naming_table_row_and_field(ra_root):
    path = ra_root / "catalog" / "tracklets.parquet"
    rows = pq.read_table(path).to_pylist()
    i = max((j for j, r in enumerate(rows) if r["split"] == "train"), key=lambda j: rows[j]["json_offset"])
    rows[i]["json_size"] = MAX_JSON_BYTES + 1
    set_rows(path, rows)
    with pytest.raises(DataConfigError) as exc:
        BagStream(build_index(ra_root, "train", P), P)
    assert f"tracklets.parquet: row {i} " in str(exc.value) and "field 'json_size'" in str(exc.value)


def test_the_jpeg_bound_holds_for_the_worst_jpegs_ingest_can_write():
    """Noise at quality 100 without chroma subsampling: the largest JPEG of a crop stays under
    max_jpeg_bytes (so no ingested frame is refused), and the bound stays a few bytes per pixel."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for w, h in [(1, 1), (17, 9), (48, 48), (256, 200)]:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            buf, format="JPEG", quality=100, subsampling=0
        )
        assert len(buf.getvalue()) <= max_jpeg_bytes(w, h)
    assert max_jpeg_bytes(64, 64) < 100 << 10


# --- embeddings Parquet ---


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory) -> Path:
    return make_tiny_root(tmp_path_factory.mktemp("dp_eval") / "root")


def write_emb(root: Path, path: Path, split: str, vectors=None, meta: dict | None = None) -> Path:
    rows = [
        r for r in pq.read_table(root / "catalog" / "tracklets.parquet").to_pylist() if r["split"] == split
    ]
    cols = {
        c: [r[c] for r in rows] for c in ("tracklet_id", "sample_key", "split", "video_id", "identity_id")
    }
    cols["start_frame"] = [r["start_frame"] for r in rows]
    cols["fragment_index"] = [-1] * len(rows)
    vec = np.ones((len(rows), 8), np.float32) if vectors is None else vectors(len(rows))
    info = {"manifest_sha256": manifest_sha256(root), "dataset_root": str(root), "params": {"split": split}}
    return write_embeddings(path, cols, vec, {**info, **(meta or {})})


def declaring_bomb(path: Path, rows: int, dim: int) -> Path:
    """A small Parquet with the embeddings schema declaring `rows` x `dim` vectors (all null: the
    file holds only their definition levels, a reader allocates every value)."""
    schema = embeddings_schema(dim).with_metadata({META_KEY: json.dumps({"manifest_sha256": "0" * 64})})

    def column(f: pa.Field) -> pa.Array:
        if f.name != "vector":
            return pa.nulls(rows, type=f.type)
        child = pa.array(np.zeros(rows * dim, np.float32))  # zero pages, never touched
        return pa.Array.from_buffers(
            f.type, rows, [pa.py_buffer(bytes((rows + 7) // 8))], rows, children=[child]
        )

    pq.write_table(pa.Table.from_arrays([column(f) for f in schema], schema=schema), path, compression="zstd")
    return path


def test_an_embeddings_file_declaring_millions_of_vectors_is_refused_within_1_gib(eval_root, tmp_path):
    """A ~54 KiB Parquet declaring 3 M x 512 vectors (6 GiB): `polyp-ssl eval` refuses it from the
    footer, naming the file, with memory (RLIMIT_AS) under 1 GiB above the clean run of the same
    command on a valid file."""
    bomb = declaring_bomb(tmp_path / "bomb.parquet", 3_000_000, 512)
    assert bomb.stat().st_size < 151 << 10
    clean = write_emb(
        eval_root, tmp_path / "clean.parquet", "val", lambda n: np.eye(n, 8, dtype=np.float32) + 1
    )
    code = (
        "from polyp_ssl.entry import main; "
        "sys.exit(main(['eval', '--task', 'retrieval', '--embeddings', {!r}, '--dataset_root', {!r}, "
        "'--split', 'val', '--out', {!r}]))"
    )
    rc, err, base = run_limited(code.format(str(clean), str(eval_root), str(tmp_path / "o1")), None)
    assert rc == 0 and base > 0, err[-2000:]
    rc, err, peak = run_limited(code.format(str(bomb), str(eval_root), str(tmp_path / "o2")), base + GIB)
    print(f"peak VM: clean {base / 2**20:.0f} MiB, hostile {peak / 2**20:.0f} MiB (limit clean + 1024 MiB)")
    assert rc == 2, err[-3000:]
    line = [x for x in err.splitlines() if x.startswith("polyp-ssl eval:")][-1]
    assert str(bomb) in line and "declares 3000000 rows x 512 dimensions" in line and "MemoryError" not in err
    assert peak < base + GIB


def test_huge_dimensions_or_rows_are_refused_from_the_footer(tmp_path):
    wide = declaring_bomb(tmp_path / "wide.parquet", 4, 50_000_000)
    with pytest.raises(
        EmbeddingsError, match=r"wide.parquet: field 'vector': the file declares 4 rows x 50000000"
    ):
        read_embeddings(wide)
    tall = declaring_bomb(tmp_path / "tall.parquet", 8_000_000, 1)
    with pytest.raises(EmbeddingsError, match=r"tall.parquet: .*declares 8000000 rows x 1 dim"):
        read_embeddings(tall)


def test_long_repeated_strings_are_read_once(tmp_path):
    """String columns are read dictionary-encoded: rows sharing one long id share one str object
    (a file's repeated strings cost a pointer a row, whatever their length)."""
    n, dim = 2000, 2
    long_id = "t" * (10 << 10)
    cols = {c: [long_id] * n for c in ("tracklet_id", "sample_key", "split", "video_id", "identity_id")}
    cols.update(fragment_index=[-1] * n, start_frame=[0] * n)
    path = write_embeddings(tmp_path / "s.parquet", cols, np.ones((n, dim), np.float32), {"x": 1})
    assert path.stat().st_size < n * len(long_id) // 100
    emb = read_embeddings(path)
    assert len(emb) == n and emb.tracklet_id[0] == long_id
    assert emb.tracklet_id[0] is emb.tracklet_id[-1] and emb.video_id[1] is emb.video_id[n - 1]


# --------------------------------------------------------------------------------------------
# class 6: eval/report messages name the file; collapsed embeddings are evaluated
# --------------------------------------------------------------------------------------------


def last_error(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [x for x in err.strip().splitlines() if x.startswith(prog)]
    assert lines, err[-2000:]
    return lines[-1]


def test_collapsed_embeddings_are_evaluated_by_eval(eval_root, tmp_path, capsys):
    path = write_emb(eval_root, tmp_path / "coll.parquet", "test")
    for task in ("retrieval", "reid"):
        args = [
            "--task",
            task,
            "--embeddings",
            str(path),
            "--dataset_root",
            str(eval_root),
            "--split",
            "test",
        ]
        assert eval_main([*args, "--out", str(tmp_path / task)]) == 0
    assert is_collapsed(read_embeddings(path).vectors)
    assert not project_2d(np.ones((5, 3)), "tsne").any() and not project_2d(np.ones((5, 3)), "pca").any()


@pytest.mark.parametrize("projection", ["tsne", pytest.param("pca", marks=pytest.mark.slow)])
def test_collapsed_embeddings_are_reported_not_crashed(eval_root, tmp_path, projection):
    """The issue's case: identical vectors made report fail in t-SNE (`array must not contain infs
    or NaNs`); now every task is evaluated and the projection is one point."""
    path = write_emb(eval_root, tmp_path / "coll.parquet", "test")
    out = tmp_path / "out"
    argv = ["--embeddings", str(path), "--baselines", "none", "--dataset_root", str(eval_root)]
    assert report_main([*argv, "--out", str(out), "--projection", projection]) == 0
    assert (out / "report.md").is_file() and (out / "results.parquet").is_file()


def test_a_non_finite_vector_is_named_with_file_row_and_field(eval_root, tmp_path, capsys):
    path = write_emb(eval_root, tmp_path / "ok.parquet", "val", lambda n: np.eye(n, 8, dtype=np.float32))
    t = pq.read_table(path)
    vec = t.column("vector").combine_chunks().flatten().to_numpy().copy().reshape(t.num_rows, 8)
    vec[3, 5] = np.nan
    fsl = pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), 8)
    bad = tmp_path / "nan.parquet"
    pq.write_table(t.set_column(t.schema.get_field_index("vector"), t.schema.field("vector"), fsl), bad)
    tid = t.column("tracklet_id")[3].as_py()
    with pytest.raises(EmbeddingsError, match=rf"nan.parquet: row 3 \(tracklet '{tid}'\): field 'vector'"):
        read_embeddings(bad)
    args = [
        "--task",
        "retrieval",
        "--embeddings",
        str(bad),
        "--dataset_root",
        str(eval_root),
        "--split",
        "val",
    ]
    assert eval_main(args) == 2
    line = last_error(capsys, "polyp-ssl eval:")
    assert str(bad) in line and "non-finite value" in line
    assert (
        report_main(
            [
                "--embeddings",
                str(bad),
                "--baselines",
                "none",
                "--dataset_root",
                str(eval_root),
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 2
    )
    line = last_error(capsys, "polyp-ssl report:")
    assert str(bad) in line and "non-finite value" in line


def with_metadata(src: Path, dst: Path, blob: bytes) -> Path:
    t = pq.read_table(src)
    pq.write_table(t.replace_schema_metadata({META_KEY: blob}), dst)
    return dst


@pytest.mark.parametrize(
    "blob, why",
    [
        (b'{"manifest_sha256": ', "JSON"),
        (b"[" * 5000 + b"]" * 5000, ""),
        (b'["a list"]', "not a JSON object"),
    ],
)
def test_bad_metadata_json_is_named_by_eval_and_report(eval_root, tmp_path, capsys, blob, why):
    ok = write_emb(eval_root, tmp_path / "ok.parquet", "val")
    bad = with_metadata(ok, tmp_path / "bad.parquet", blob)
    args = [
        "--task",
        "retrieval",
        "--embeddings",
        str(bad),
        "--dataset_root",
        str(eval_root),
        "--split",
        "val",
    ]
    assert eval_main(args) == 2
    line = last_error(capsys, "polyp-ssl eval:")
    assert str(bad) in line and "metadata" in line and why in line
    argv = ["--embeddings", str(bad), "--baselines", "none", "--dataset_root", str(eval_root)]
    assert report_main([*argv, "--out", str(tmp_path / "r")]) == 2
    line = last_error(capsys, "polyp-ssl report:")
    assert str(bad) in line and "metadata" in line
