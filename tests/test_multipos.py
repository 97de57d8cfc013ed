"""multipos batches: no identity fills two bags of one batch (a second bag of the same polyp would be
a false negative with a label), with equal steps per rank and exact resume."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from polyp_ssl.stream import BagStream, DataConfigError, StreamLoader, StreamParams, build_index
from polyp_ssl.video_pool import _FragRef, _OpenVideo, can_fill, take_batch
from tests.shard_factory import make_root

# 4 bags per batch from a pool of 2 open videos: a batch needs a second bag of some videos, and
# each video has 3 identities, so without the rule two bags of one polyp would often meet
MP = StreamParams(
    batch_size=8,
    n_views=2,
    fragment_length=2,
    fragment_stride=2,
    min_tracklet_length=4,
    im_size=16,
    open_videos=2,
    aug_anchorcrop=True,
    max_epochs=4,
    sampler="multipos",
    shard_access="sequential",  # the pool of open videos (random access: tests/test_random_access.py)
)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    # 12 train videos x 3 polyps, 2 videos per shard (6 shards: every stream of 3 ranks x 2
    # workers gets whole shards, so at least 6 identities)
    return make_root(
        tmp_path_factory.mktemp("mp"),
        videos={"train": 12},
        polyps_per_video=3,
        tracklets_per_polyp=2,
        frames_per_tracklet=8,
        store_size=24,
    )


def bag_identities(batch: dict[str, torch.Tensor]) -> list[int]:
    """The identity of each bag of a batch (members of a bag are contiguous, anchor first)."""
    out = []
    for b in torch.unique(batch["bag"]).tolist():
        ids = set(batch["identity"][batch["bag"] == b].tolist())
        assert len(ids) == 1  # a multipos bag is one identity
        out.append(ids.pop())
    return out


def run_rank(index, params, rank, world, workers, epoch=0, state=None):
    loader = StreamLoader(BagStream(index, params, rank, world, workers))
    loader.set_epoch(epoch)
    if state is not None:
        loader.load_state_dict(state)
    return loader, list(loader)


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (3, 0), (1, 2), (3, 2)])
def test_every_multipos_batch_has_distinct_identities(root, world, workers):
    index = build_index(root, "train", MP)
    lengths = set()
    n_batches = 0
    for rank in range(world):
        loader, batches = run_rank(index, MP, rank, world, workers, epoch=1)
        assert len(batches) == len(loader) > 0
        lengths.add(len(batches))
        for batch in batches:
            ids = bag_identities(batch)
            assert len(ids) == MP.n_bags  # full batches
            assert len(set(ids)) == len(ids), ids
            assert all(i >= 0 for i in ids)
            assert batch["frames"].shape[0] == MP.batch_size
        n_batches += len(batches)
    assert len(lengths) == 1  # equal steps per rank
    assert n_batches >= index.total_anchors // MP.n_bags  # the epoch's length is kept


def test_multipos_resume_replays_exactly(root):
    index = build_index(root, "train", MP)
    for workers in (0, 2):
        _, full = run_rank(index, MP, 0, 1, workers, epoch=2)
        k = 5
        loader, rest = run_rank(
            index, MP, 0, 1, workers, epoch=2, state={"epoch": 2, "batches_seen": k, "seed": 42}
        )
        assert len(rest) == len(full) - k
        for x, y in zip(full[k:], rest, strict=True):
            assert torch.equal(x["frames"], y["frames"]) and torch.equal(x["identity"], y["identity"])


def test_too_few_identities_per_stream_is_refused_up_front(root):
    index = build_index(root, "train", MP)
    assert len({i for ids in index.video_identities for i in ids}) == 36
    # 6 identities per stream at 6 streams (3 ranks x 2 workers); 8 bags per batch cannot be distinct
    wide = StreamParams(**{**MP.__dict__, "batch_size": 16})
    BagStream(index, wide, 0, 1, 0)  # one stream: 36 identities, fine
    with pytest.raises(DataConfigError, match=r"stream \d+ of 6 .* fewer than the 8 bags"):
        BagStream(index, wide, 0, 3, 2)
    # the whole split has 36 identities: a batch of 40 bags is refused whatever the streams
    huge = StreamParams(**{**MP.__dict__, "batch_size": 80})
    with pytest.raises(DataConfigError, match=r"the split 'train' has 36 distinct identities"):
        BagStream(index, huge, 0, 1, 0)


def _video(index: int, identities: list[int]) -> _OpenVideo:
    """An open video with one bag per entry of `identities` (bag = [anchor], anchor of that identity)."""
    frags = [_FragRef(f"k{index}", (j,), float(j), index, ident) for j, ident in enumerate(identities)]
    bags = [np.array([j], dtype=np.int64) for j in range(len(identities))]
    return _OpenVideo(index, index, {}, {}, frags, bags)


def test_take_batch_distinct_identities_and_short_batches():
    rng = np.random.default_rng(0)
    # one video with many bags of identity 7, one of identity 8; another with identities 1, 2
    pool = [_video(0, [7, 7, 7, 7, 8]), _video(1, [1, 2, 2])]
    assert can_fill(pool, 4, True) and not can_fill(pool, 5, True)
    chosen = take_batch(pool, 4, rng, distinct_identities=True)
    ids = [ov.frags[int(b[0])].identity for ov, b in chosen]
    assert sorted(ids) == [1, 2, 7, 8]
    # what is left: identity 7 (x3) and 2 (x1): a batch of 3 cannot be distinct, so it is short
    left = Counter(ov.frags[int(b[0])].identity for ov in pool for b in ov.bags)
    assert left == Counter({7: 3, 2: 1})
    assert not can_fill(pool, 3, True)
    short = take_batch(pool, 3, rng, distinct_identities=True)
    assert sorted(ov.frags[int(b[0])].identity for ov, b in short) == [2, 7]
    # without the rule the same pool gives repeated identities (what multipos used to do)
    pool = [_video(0, [7, 7, 7, 7, 8]), _video(1, [1, 2, 2])]
    plain = take_batch(pool, 6, np.random.default_rng(0))
    ids = [ov.frags[int(b[0])].identity for ov, b in plain]
    assert len(ids) == 6 and len(set(ids)) < 6


def test_stream_short_of_identities_at_read_time_stops_with_a_message(tmp_path):
    r = make_root(
        tmp_path, videos={"train": 1}, polyps_per_video=3, tracklets_per_polyp=2, frames_per_tracklet=8
    )
    index = build_index(r, "train", MP)
    assert index.video_identities == [(0, 1, 2)]
    with pytest.raises(DataConfigError, match="3 distinct identities"):
        BagStream(index, MP)  # 4 bags per batch: refused up front
    # the catalog claims a fourth identity the shard does not give (as when samples are skipped as
    # damaged): the stream stops after one fruitless pass instead of re-reading forever
    index.video_identities = [(0, 1, 2, 99)]
    stream = BagStream(index, MP)
    with pytest.raises(DataConfigError, match="bags of only 3 distinct identities"):
        list(stream.iter_stream(0, 0))
