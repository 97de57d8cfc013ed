"""The training loader's random access path: batches from the epoch's global plan, frames read at
their catalog byte spans; pixels, diversity across ranks and workers, resume, damage."""

from __future__ import annotations

import shutil
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from polyp_ssl.diversity import bag_videos, global_shuffle_pair_rate, same_video_pair_rate
from polyp_ssl.shards.members import SpanReader
from polyp_ssl.shards.sample import parse_sample
from polyp_ssl.stream import (
    BagStream,
    DataConfigError,
    ShardError,
    StreamLoader,
    StreamParams,
    build_index,
)
from polyp_ssl.transforms import CropParams, anchor_crop, decode_jpeg_bytes
from tests.shard_factory import make_root

P = StreamParams(
    batch_size=12,
    n_views=2,
    fragment_length=2,
    fragment_stride=4,
    min_tracklet_length=4,
    im_size=16,
    aug_anchorcrop=True,
    max_epochs=4,
)


@pytest.fixture(scope="module")
def root27(tmp_path_factory) -> Path:
    """27 training videos of unequal length (the paper's training split), one shard each."""
    return make_root(
        tmp_path_factory.mktemp("ra") / "root",
        videos={"train": 27, "val": 1},
        polyps_per_video=2,
        tracklets_per_polyp=[1 + v % 3 for v in range(27)],
        frames_per_tracklet=[16, 40, 24, 64],
        videos_per_shard=1,
        store_size=24,
        jpeg_pool=4,
    )


@pytest.fixture()
def small(tmp_path) -> Path:
    return make_root(
        tmp_path / "root", videos={"train": 4, "val": 1}, frames_per_tracklet=24, videos_per_shard=2
    )


def rate(batches) -> float:
    return float(
        np.mean([same_video_pair_rate(bag_videos(b["bag"].numpy(), b["video"].numpy())) for b in batches])
    )


def test_auto_reads_local_tar_shards_at_their_spans(small):
    ds = BagStream(build_index(small, "train", P), P)
    assert ds.access == "random"
    batches = list(ds.iter_stream(0, 0))
    assert len(batches) == ds.per_worker
    assert all(b["frames"].shape == (12, 2, 3, 16, 16) for b in batches)
    assert ds.source.reader().reads > 0


def test_another_member_reader_plugs_into_the_planned_source(small):
    """The planned source reads through shards.members.MemberReader: a reader of another store
    (here one that wraps SpanReader and counts) gives the same batches, the source untouched."""

    class CountingReader:
        def __init__(self) -> None:
            self.inner, self.calls = SpanReader(), 0

        def read(self, location, span, expected_size=-1, member=None) -> bytes:
            self.calls += 1
            return self.inner.read(location, span, expected_size, member)

        def close(self) -> None:
            self.inner.close()

    index = build_index(small, "train", P)
    plain = list(BagStream(index, P).iter_stream(0, 0))
    ds = BagStream(index, P)
    readers: list[CountingReader] = []
    ds.source.open_reader = lambda: readers.append(CountingReader()) or readers[-1]
    other = list(ds.iter_stream(0, 0))
    assert len(readers) == 1 and readers[0].calls > 0
    assert all(torch.equal(a["frames"], b["frames"]) for a, b in zip(plain, other, strict=True))


def test_pixels_equal_an_independent_decode_of_the_tar_member(small):
    """Every frame of a batch equals decoding that member as tarfile reads it and anchor-cropping
    it with the sample JSON's box (deterministic anchor crop: no augmentation)."""
    index = build_index(small, "train", P)
    ds = BagStream(index, P)
    batch = next(iter(ds.iter_stream(0, 0)))
    members: dict[str, bytes] = {}
    for tar_path in sorted((small / "shards").rglob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                members[m.name] = tar.extractfile(m).read()
    code_to_key = {code: k for k, (_, code, _) in index.samples.items()}
    checked = 0
    for row in range(batch["frames"].shape[0]):
        key = code_to_key[int(batch["tracklet"][row])]
        meta = parse_sample(members[f"{key}.json"])
        # which frames: the fragment whose position matches the row's (positions identify fragments)
        from polyp_ssl.fragments import cut_tracklet

        frags = cut_tracklet(meta.frame_ids, meta.video_first_frame, meta.video_last_frame, 2, 4, False)
        frag = next(f for f in frags if abs(f.position - float(batch["position"][row])) < 1e-6)
        for j, i in enumerate(frag.frame_indices):
            img = decode_jpeg_bytes(members[f"{key}.{i:04d}.jpg"])
            want = anchor_crop(img, meta.boxes_in_crop[i], CropParams(P.bbox_scale_factor), P.im_size)
            assert torch.equal(batch["frames"][row, j], want)
            checked += 1
    assert checked == 24


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_same_video_pair_rate_matches_a_global_shuffle_for_any_ranks_and_workers(
    root27, world_size, num_workers
):
    index = build_index(root27, "train", P)
    expected = global_shuffle_pair_rate(index.video_eligible)
    batches = []
    lengths = set()
    for rank in range(world_size):
        loader = StreamLoader(BagStream(index, P, rank, world_size, num_workers))
        lengths.add(len(loader))
        for epoch in range(2):
            loader.set_epoch(epoch)
            got = list(loader)
            assert len(got) == len(loader)
            batches += got
    assert len(lengths) == 1  # every rank runs the same number of steps
    measured = rate(batches)
    assert measured <= 1.25 * expected, (measured, expected)
    assert measured >= 0.75 * expected, (measured, expected)


def test_sequential_streams_are_less_diverse_on_the_same_index(root27):
    """The yardstick is not trivially met: sequential streams with 14 streams hold ~2 videos each."""
    index = build_index(root27, "train", P)
    expected = global_shuffle_pair_rate(index.video_eligible)
    seq = BagStream(index, replace(P, shard_access="sequential"), 0, 1, 14)
    batches = [b for s in range(14) for b in seq.iter_stream(0, s)]
    assert rate(batches) > 3 * expected


def test_batches_do_not_depend_on_the_number_of_ranks(root27):
    """The same global batches whatever the split into streams: batch g is the plan's batch g."""
    index = build_index(root27, "train", P)
    one = list(BagStream(index, P, 0, 1, 0).iter_stream(1, 0))
    two = [list(BagStream(index, P, r, 2, 0).iter_stream(1, r)) for r in range(2)]
    interleaved = [b for pair in zip(*two, strict=False) for b in pair]
    for a, b in zip(one, interleaved, strict=False):
        assert torch.equal(a["tracklet"], b["tracklet"]) and torch.equal(a["frames"], b["frames"])


def test_multipos_streamed_batches_have_distinct_identities(root27):
    p = replace(P, sampler="multipos", batch_size=8)
    index = build_index(root27, "train", p)
    for rank in range(2):
        ds = BagStream(index, p, rank, 2, 2)
        for s in range(2):
            for b in ds.iter_stream(0, rank * 2 + s):
                bag_ids = [int(b["identity"][b["bag"] == k][0]) for k in range(4)]
                assert len(set(bag_ids)) == 4


def test_resume_skips_without_reading_and_continues_identically(small):
    index = build_index(small, "train", P)
    full = list(StreamLoader(BagStream(index, P, 0, 1, 2)))
    loader = StreamLoader(BagStream(index, P, 0, 1, 2))
    loader.load_state_dict({"epoch": 0, "batches_seen": 3, "seed": P.seed})
    rest = list(loader)
    assert len(rest) == len(full) - 3
    for a, b in zip(full[3:], rest, strict=True):
        assert torch.equal(a["frames"], b["frames"]) and torch.equal(a["tracklet"], b["tracklet"])


def flip_member_byte(tar_path: Path, member_suffix: str) -> str:
    """Flip one byte inside the first member ending in `member_suffix`; returns its sample key."""
    with tarfile.open(tar_path) as tar:
        m = next(m for m in tar.getmembers() if m.name.endswith(member_suffix))
        off = m.offset_data + m.size // 2
    data = bytearray(tar_path.read_bytes())
    data[off] ^= 0xFF
    tar_path.write_bytes(bytes(data))
    return m.name.split(".", 1)[0]


def test_a_changed_frame_fails_naming_shard_sample_and_frame(small):
    tar = sorted((small / "shards" / "train").glob("*.tar"))[0]
    key = flip_member_byte(tar, ".0004.jpg")
    ds = BagStream(build_index(small, "train", P), P)
    with pytest.raises(ShardError) as exc:
        for _ in range(3):
            list(ds.iter_stream(0, 0))
    assert exc.value.reason == "shard_changed"
    assert tar.name in str(exc.value) and key in str(exc.value) and "frame 4" in str(exc.value)


def test_warn_replaces_bags_of_a_changed_shard_and_keeps_batches_full(small, tmp_path):
    clean = tmp_path / "clean"
    shutil.copytree(small, clean)
    tar = sorted((small / "shards" / "train").glob("*.tar"))[0]
    flip_member_byte(tar, ".0004.jpg")
    p = replace(P, on_shard_error="warn")
    index = build_index(small, "train", p)
    loader = StreamLoader(BagStream(index, p, 0, 1, 0))
    batches = list(loader)
    assert len(batches) == len(loader)
    assert all(b["frames"].shape[0] == 12 for b in batches)
    assert loader.dataset.shared.skip_counts() == {"shard_changed": 1}
    assert loader.dataset.stats["bags_replaced_after_damage"] >= 1
    # the batches equal the undamaged root's up to the one where the change was found; from there
    # on nothing of the changed shard is used
    reference = list(StreamLoader(BagStream(build_index(clean, "train", p), p, 0, 1, 0)))
    found = next(
        i
        for i, (a, b) in enumerate(zip(batches, reference, strict=True))
        if not torch.equal(a["tracklet"], b["tracklet"])
    )
    bad = {c for _, (v, c, _) in index.samples.items() if index.video_shard[v].endswith(tar.name)}
    assert not any(set(b["tracklet"].tolist()) & bad for b in batches[found:])
    assert any(set(b["tracklet"].tolist()) & bad for b in reference[found:])


def test_a_truncated_shard_still_gives_the_frames_before_the_cut(small):
    tar = sorted((small / "shards" / "train").glob("*.tar"))[0]
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) * 2 // 3])
    p = replace(P, on_shard_error="warn")
    index = build_index(small, "train", p)
    loader = StreamLoader(BagStream(index, p, 0, 1, 0))
    batches = list(loader)
    counts = loader.dataset.shared.skip_counts()
    assert counts.get("truncated_shard", 0) >= 1 and "shard_changed" not in counts
    used = {int(t) for b in batches for t in b["tracklet"]}
    first_shard = {c for k, (v, c, _) in index.samples.items() if index.video_shard[v].endswith(tar.name)}
    assert used & first_shard  # the samples before the cut are still trained on


def test_a_bad_json_is_named_before_training_starts(small):
    tar = sorted((small / "shards" / "train").glob("*.tar"))[0]
    key = flip_member_byte(tar, ".json")
    with pytest.raises(ShardError) as exc:
        BagStream(build_index(small, "train", P), P)
    assert key in str(exc.value) and exc.value.reason in ("shard_changed", "bad_json")


def test_pipe_base_reads_sequentially_under_auto_and_is_refused_under_random(small):
    index = build_index(small, "train", P, shard_base=f"pipe:cat {small}")
    assert BagStream(index, P).access == "sequential"
    with pytest.raises(DataConfigError, match="--shard_access sequential"):
        BagStream(index, replace(P, shard_access="random"))


def test_a_catalog_without_spans_names_the_reingest_command(small):
    path = small / "catalog" / "frames.parquet"
    t = pq.read_table(path)
    pq.write_table(t.drop_columns(["jpeg_offset"]), path)
    with pytest.raises(DataConfigError, match="re-ingest"):
        BagStream(build_index(small, "train", P), P)


def test_a_copied_root_reads_the_same_batches(small, tmp_path):
    """Spans are offsets within each shard: a root moved or copied elsewhere still works."""
    copy = tmp_path / "copy"
    shutil.copytree(small, copy)
    a = next(iter(BagStream(build_index(small, "train", P), P).iter_stream(0, 0)))
    b = next(iter(BagStream(build_index(copy, "train", P), P).iter_stream(0, 0)))
    assert torch.equal(a["frames"], b["frames"])


def test_decode_on_device_ships_the_same_jpegs(small):
    from polyp_ssl.device_decode import decode_batch_on

    index = build_index(small, "train", P)
    a = next(iter(BagStream(index, P).iter_stream(0, 0)))
    enc = next(iter(BagStream(index, replace(P, decode_on="device")).iter_stream(0, 0)))
    dec = decode_batch_on(enc, "cpu", P.im_size)
    assert torch.equal(a["tracklet"], enc["tracklet"])
    assert (a["frames"].float() - dec["frames"].float()).abs().mean() < 2.0


def test_a_catalog_whose_spans_overlap_is_refused_before_any_read(small):
    """Spans are data: every frame pointed at one region would make a batch read that region once
    per frame; tar members never overlap, so overlapping spans are refused naming table and field."""
    path = small / "catalog" / "frames.parquet"
    rows = pq.read_table(path).to_pylist()
    first = rows[0]
    for r in rows[1:4]:
        r["jpeg_offset"], r["jpeg_size"], r["jpeg_crc32"] = (
            first["jpeg_offset"],
            first["jpeg_size"],
            first["jpeg_crc32"],
        )
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path)
    with pytest.raises(DataConfigError, match=r"frames\.parquet: tracklet .*field 'jpeg_offset'.*overlaps"):
        BagStream(build_index(small, "train", P), P)


def test_overlapping_spans_against_a_hand_count():
    from polyp_ssl.shards.members import overlapping_spans

    assert overlapping_spans(np.array([0, 10, 20]), np.array([10, 10, 5])) is None  # touching is fine
    assert overlapping_spans(np.array([20, 0, 5]), np.array([5, 10, 3])) == (1, 2)
    assert overlapping_spans(np.array([-1, -1]), np.array([-1, -1])) is None  # nulls: refused on read
