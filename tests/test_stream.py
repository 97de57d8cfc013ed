import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from polyp_ssl.stream import (
    BagStream,
    DataConfigError,
    StreamLoader,
    StreamParams,
    ValTracklets,
    assign_videos,
    build_index,
    epoch_batches,
)
from tests.shard_factory import make_root
from tests.train_helpers import P

# the sequential reader's own design (each stream owns a disjoint part of the videos): what the
# loader does for pipe: and remote shard bases; the random access default is tested in
# tests/test_random_access.py
P_SEQ = StreamParams(**{**P.__dict__, "shard_access": "sequential"})


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    # 5 train videos of unequal size (2 per shard -> 3 shards), 3 val videos
    return make_root(
        tmp_path_factory.mktemp("root"),
        videos={"train": 5, "val": 3},
        tracklets_per_polyp=[1, 2, 3, 1, 2, 1, 1, 2],
    )


def run_rank(index, params, rank, world, workers, epoch=0, state=None):
    loader = StreamLoader(BagStream(index, params, rank, world, workers))
    loader.set_epoch(epoch)
    if state is not None:
        loader.load_state_dict(state)
    batches = list(loader)
    return loader, batches


def test_epoch_arithmetic():
    # 100 anchors, 4 bags per batch (batch_size 20, n_views 5): 25 global batches
    assert epoch_batches(100, 4, 1, 0) == (25, 25)
    assert epoch_batches(100, 4, 3, 2) == (5, 10)  # 25 global -> 9 per rank -> 5 per worker
    with pytest.raises(DataConfigError, match="batch_size"):
        epoch_batches(3, 4, 1, 0)


def test_one_stream_epoch_anchors_every_fragment_exactly_once(root):
    index = build_index(root, "train", P)
    assert index.total_anchors == index.total_fragments  # temporal sampler: every fragment anchors
    loader, batches = run_rank(index, P, 0, 1, 0)
    assert len(batches) == index.total_fragments // P.n_bags
    anchors = []
    for b in batches:
        first = torch.ones(len(b["bag"]), dtype=torch.bool)
        first[1:] = b["bag"][1:] != b["bag"][:-1]  # a bag's members are contiguous, anchor first
        anchors += list(zip(b["tracklet"][first].tolist(), b["position"][first].tolist(), strict=True))
    assert len(anchors) == len(batches) * P.n_bags
    assert len(set(anchors)) == len(anchors)  # no fragment anchors twice in an epoch
    assert index.total_fragments - len(anchors) < P.n_bags  # and at most a partial batch is left


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (3, 0), (2, 2)])
def test_every_rank_yields_len_batches_of_disjoint_videos(root, world, workers):
    index = build_index(root, "train", P_SEQ)
    seen = []
    lengths = set()
    for rank in range(world):
        loader, batches = run_rank(index, P_SEQ, rank, world, workers)
        assert len(batches) == len(loader)
        lengths.add(len(batches))
        seen.append({int(v) for b in batches for v in b["video"]})
    assert len(lengths) == 1  # equal steps per rank whatever the data per rank
    if world * max(workers, 1) <= len(index.video_ids):
        for a in range(world):
            for b in range(a + 1, world):
                assert not seen[a] & seen[b]
    assert set().union(*seen) <= {int(c) for c in index.video_codes}


@pytest.mark.slow
def test_more_streams_than_videos_and_shards_still_yields(root):
    index = build_index(root, "train", P)
    for rank in range(3):
        loader, batches = run_rank(index, P, rank, 3, 2)  # 6 streams, 5 videos, 3 shards
        assert len(batches) == len(loader) > 0


def test_one_shard_many_streams_disjoint(tmp_path):
    r = make_root(tmp_path, videos={"train": 4}, videos_per_shard=10)
    index = build_index(r, "train", P_SEQ)
    assert len(set(index.video_shard)) == 1
    parts = assign_videos(index, 4, seed=1, epoch=0)
    assert sorted(v for part in parts for v in part) == list(range(4))
    seen = [{int(v) for b in run_rank(index, P_SEQ, rank, 2, 0)[1] for v in b["video"]} for rank in range(2)]
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_assignment_is_balanced_and_epoch_dependent(root):
    index = build_index(root, "train", P)
    a0 = assign_videos(index, 2, seed=0, epoch=0)
    assert sorted(sum(a0, [])) == list(range(len(index.video_ids)))
    loads = [index.video_fragments[p].sum() for p in a0]
    assert max(loads) - min(loads) <= index.video_fragments.max()
    assert assign_videos(index, 2, seed=0, epoch=0) == a0
    assert any(assign_videos(index, 2, seed=0, epoch=e) != a0 for e in range(1, 6))


def test_batch_contract(root):
    index = build_index(root, "train", P)
    _, batches = run_rank(index, P, 0, 1, 0)
    for b in batches:
        assert b["frames"].dtype == torch.uint8 and b["frames"].shape == (8, 2, 3, 32, 32)
        for key in ("bag", "video", "tracklet", "identity"):
            assert b[key].dtype == torch.int64 and b[key].shape == (8,)
        assert b["position"].dtype == torch.float32
        assert ((b["position"] >= 0) & (b["position"] <= 1)).all()
        assert torch.bincount(b["bag"]).tolist() == [2, 2, 2, 2]
        for g in range(4):
            assert b["video"][b["bag"] == g].unique().numel() == 1  # a bag never leaves its video
        assert int(b["videos_per_batch"]) == b["video"].unique().numel()
        assert (b["identity"] >= 0).all()
    assert np.mean([int(b["videos_per_batch"]) for b in batches]) >= 2.0


def test_same_seed_same_batches_other_seed_differs(root):
    index = build_index(root, "train", P)
    _, a = run_rank(index, P, 0, 1, 0)
    _, b = run_rank(index, P, 0, 1, 0)
    _, c = run_rank(index, StreamParams(**{**P.__dict__, "seed": 7}), 0, 1, 0)
    for x, y in zip(a[:2], b[:2], strict=True):
        assert torch.equal(x["frames"], y["frames"]) and torch.equal(x["tracklet"], y["tracklet"])
    assert any(not torch.equal(x["frames"], y["frames"]) for x, y in zip(a, c, strict=True))


def test_only_used_jpegs_are_decoded(root):
    index = build_index(root, "train", P)
    ds = BagStream(index, P, 0, 1, 0)
    calls = []
    original = ds.assembler.decode
    ds.assembler.decode = lambda data: calls.append(1) or original(data)
    per_batch = []
    for b in ds:
        per_batch.append(len(calls))
        calls.clear()
        assert per_batch[-1] <= b["frames"].shape[0] * b["frames"].shape[1]
    table = pq.read_table(root / "catalog" / "tracklets.parquet", columns=["n_frames", "split"]).to_pydict()
    frames_in_train = sum(n for n, s in zip(table["n_frames"], table["split"], strict=True) if s == "train")
    assert sum(per_batch) < frames_in_train


def test_resume_skips_exactly_the_consumed_batches(root):
    index = build_index(root, "train", P)
    for workers in (0, 2):
        _, full = run_rank(index, P, 0, 1, workers, epoch=1)
        k = 3
        loader, rest = run_rank(
            index, P, 0, 1, workers, epoch=1, state={"epoch": 1, "batches_seen": k, "seed": 42}
        )
        assert len(rest) == len(full) - k
        for x, y in zip(full[k:], rest, strict=True):
            assert torch.equal(x["frames"], y["frames"]) and torch.equal(x["bag"], y["bag"])
        assert loader.state_dict() == {"epoch": 1, "batches_seen": len(full), "seed": 42}


def test_epoch_changes_the_bags(root):
    index = build_index(root, "train", P)
    _, e0 = run_rank(index, P, 0, 1, 0, epoch=0)
    _, e3 = run_rank(index, P, 0, 1, 0, epoch=3)
    assert any(not torch.equal(x["tracklet"], y["tracklet"]) for x, y in zip(e0, e3, strict=True))


def test_configurations_that_cannot_work(root):
    with pytest.raises(DataConfigError, match="min_tracklet_length"):
        build_index(root, "train", StreamParams(**{**P.__dict__, "min_tracklet_length": 1000}))
    with pytest.raises(DataConfigError, match="n_views"):
        build_index(root, "train", StreamParams(**{**P.__dict__, "n_views": 500, "batch_size": 500}))
    with pytest.raises(DataConfigError, match="no tracklets in split"):
        build_index(root, "nosuchsplit", P)
    index = build_index(root, "train", P)
    with pytest.raises(DataConfigError, match="multiple"):
        BagStream(index, StreamParams(**{**P.__dict__, "batch_size": 9}))
    with pytest.raises(DataConfigError, match="batch"):
        BagStream(index, StreamParams(**{**P.__dict__, "batch_size": 1000}))
    with pytest.raises(DataConfigError, match="polyp-ssl ingest"):
        build_index(root / "nothing", "train", P)


def test_pipe_shard_base(root):
    index = build_index(root, "train", P, shard_base=f"pipe:cat {root}")
    assert index.shard_url("shards/train/train-000000.tar").startswith("pipe:cat ")
    _, batches = run_rank(index, P, 0, 1, 0)
    assert len(batches) > 0


def test_val_is_sharded_without_duplicates(root):
    index = build_index(root, "val", P, min_tracklet_length=0, require_bags=False)
    n_items = len(index.samples)
    lengths, valid_tracklets = set(), []
    for rank in range(2):
        ds = ValTracklets(index, P, batch_size=4, max_frames=5, rank=rank, world_size=2)
        batches = list(ds)
        lengths.add(len(batches))
        assert len(batches) == len(ds)
        for b in batches:
            assert b["frames"].shape[1] <= 5 and b["mask"].dtype == torch.bool
            assert (b["mask"].sum(1) >= 1).all()
            assert (b["frames"][~b["mask"]] == 0).all()
            valid_tracklets += b["tracklet"][b["valid"]].tolist()
    assert len(lengths) == 1
    assert sorted(valid_tracklets) == sorted(t for _, t, _ in index.samples.values())
    assert len(valid_tracklets) == n_items


def test_decoded_batch_equals_per_frame_anchor_crops(root):
    """The preallocated batch path gives the frames of transforms.load_frames (the one crop rule),
    and its per-fragment flips equal flipping every frame."""
    from polyp_ssl.shards.sample import frame_jpeg
    from polyp_ssl.stream import open_video
    from polyp_ssl.transforms import CropParams, apply_flips, crop_resize, decode_jpeg_bytes, load_frames

    params = StreamParams(**{**P_SEQ.__dict__, "aug_anchorcrop": False})
    index = build_index(root, "train", params)
    ds = BagStream(index, params, 0, 1, 0)
    v, samples, codes = next(ds.source.iter_videos([0]))
    ov = open_video(v, 0, samples, codes, params, np.random.default_rng(0), 1.0, ds.stats)
    chosen = [(ov, ov.bags[0]), (ov, ov.bags[1])]
    batch = ds.assembler(ds.source.rows_of(chosen), np.random.default_rng(0))
    rows = [int(m) for _, bag in chosen for m in bag]
    for r, m in enumerate(rows):
        fr = ov.frags[m]
        meta = ov.metas[fr.key]
        jpegs = [frame_jpeg(ov.samples[fr.key], i) for i in fr.frames]
        boxes = [meta.boxes_in_crop[i] for i in fr.frames]
        expected = load_frames(jpegs, boxes, params.im_size, params.bbox_scale_factor)
        assert torch.equal(batch["frames"][r], expected)
    img = decode_jpeg_bytes(jpegs[0])
    flip = CropParams(params.bbox_scale_factor, hflip=True, vflip=True)
    plain = crop_resize(img, boxes[0], flip, params.im_size)
    flipped = torch.from_numpy(plain.numpy()[:, ::-1, ::-1].copy())
    assert torch.equal(apply_flips(plain[None], flip)[0], flipped)


class _SharedFlag(torch.utils.data.IterableDataset):
    def __iter__(self):
        from polyp_ssl.stream import batch_buffer

        t = batch_buffer((2, 3, 4))
        t.fill_(7)
        yield {"shared_at_birth": torch.tensor(t.is_shared()), "t": t}


def test_worker_batches_are_made_in_shared_memory():
    """A worker's batch buffer is in shared memory from the start, so the hand-over to the main
    process does not copy every frame a second time; in the main process it is ordinary memory."""
    from polyp_ssl.stream import batch_buffer

    (got,) = list(torch.utils.data.DataLoader(_SharedFlag(), batch_size=None, num_workers=1))
    assert bool(got["shared_at_birth"]) and got["t"].shape == (2, 3, 4) and (got["t"] == 7).all()
    assert not batch_buffer((2, 3)).is_shared()


def test_shards_through_fsspec_urls(root):
    """A shard base with a scheme webdataset does not open (s3://, gcs://, ... here fsspec's
    in-memory filesystem) is read through fsspec, in loader workers too, with the same batches; an
    unknown protocol is a ShardError naming the shard."""
    import fsspec

    from polyp_ssl.stream import ShardError

    fs = fsspec.filesystem("memory")
    for path in (root / "shards").rglob("*.tar"):
        fs.pipe(f"/polyp/root/{path.relative_to(root).as_posix()}", path.read_bytes())
    local = build_index(root, "train", P)
    remote = build_index(root, "train", P, shard_base="memory://polyp/root")
    assert remote.shard_url(remote.video_shard[0]).startswith("memory://polyp/root/shards/")
    _, a = run_rank(local, P_SEQ, 0, 1, 1)  # remote bases are read sequentially
    _, b = run_rank(remote, P, 0, 1, 1)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["frames"], y["frames"]) and torch.equal(x["tracklet"], y["tracklet"])
    bad = build_index(root, "train", P, shard_base="nosuchprotocol://bucket")
    with pytest.raises(ShardError, match="nosuchprotocol://bucket/shards/.*cannot open"):
        run_rank(bad, P, 0, 1, 0)


def test_the_damage_policy_raises_under_fail_and_counts_each_skip_once_under_warn():
    import logging
    from collections import Counter

    from polyp_ssl.damage import DamagePolicy
    from polyp_ssl.stream import ShardError, SharedState

    err = ShardError.at("s.tar", "k", "corrupt_jpeg", "frame 0 does not decode")
    fail = DamagePolicy("fail", Counter(), SharedState(), logging.getLogger("t"))
    with pytest.raises(ShardError) as exc:
        fail(err)
    assert exc.value is err and not fail.stats
    shared, stats = SharedState(), Counter()
    warn = DamagePolicy("warn", stats, shared, logging.getLogger("t"))
    warn(err)
    warn.count("span_mismatch", 2)
    assert stats == {"skipped_corrupt_jpeg": 1, "skipped_span_mismatch": 2}
    assert shared.skip_counts() == {"corrupt_jpeg": 1, "span_mismatch": 2}
