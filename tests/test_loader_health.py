"""Long-run health of the streaming loader: flat memory over many epochs, no file-handle leaks
(also when shards are damaged), and a bounded number of open videos."""

from __future__ import annotations

import gc
import os
import shutil
import weakref
from pathlib import Path

import pytest

import polyp_ssl.pooled_source as pooled_mod
from polyp_ssl.stream import BagStream, StreamLoader, StreamParams, build_index
from tests.shard_factory import make_root

PARAMS = {
    "batch_size": 8,
    "n_views": 2,
    "fragment_length": 2,
    "fragment_stride": 2,
    "min_tracklet_length": 4,
    "im_size": 32,
    "open_videos": 2,
    "max_epochs": 10,
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("health"), videos={"train": 6, "val": 1})


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def run_epochs(ds: BagStream, epochs: range) -> int:
    n = 0
    for epoch in epochs:
        ds.shared.epoch.value = epoch
        for batch in ds:
            assert batch["frames"].shape[0] == ds.params.batch_size
            n += 1
    return n


def test_memory_and_file_handles_stay_flat_over_many_epochs(root):
    params = StreamParams(**PARAMS)
    ds = BagStream(build_index(root, "train", params), params, batches_per_worker=60)
    run_epochs(ds, range(2))  # warm-up: allocator pools, lazy imports
    gc.collect()
    fds, rss = open_fds(), rss_bytes()
    n = run_epochs(ds, range(2, 8))
    gc.collect()
    grown = rss_bytes() - rss
    assert n == 6 * 60
    assert open_fds() == fds
    # one batch is 8 x 2 x 3 x 32 x 32 bytes; a leak of one batch per step would add ~9 MB here
    assert grown < 8 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over {n} batches"


def test_no_file_handle_leak_when_shards_are_damaged(root, tmp_path):
    damaged = tmp_path / "root"
    shutil.copytree(root, damaged)
    shard = damaged / "shards" / "train" / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    params = StreamParams(**{**PARAMS, "on_shard_error": "warn", "shard_access": "sequential"})
    ds = BagStream(build_index(damaged, "train", params), params, batches_per_worker=20)
    run_epochs(ds, range(1))
    fds = open_fds()
    run_epochs(ds, range(1, 4))
    assert open_fds() == fds
    assert ds.shared.skip_counts()["truncated_shard"] >= 4  # read (and closed) once per pass


def test_random_access_keeps_a_bounded_set_of_shard_files_open_across_epochs(root, tmp_path):
    damaged = tmp_path / "root"
    shutil.copytree(root, damaged)
    shard = damaged / "shards" / "train" / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    params = StreamParams(**{**PARAMS, "on_shard_error": "warn"})
    ds = BagStream(build_index(damaged, "train", params), params, batches_per_worker=20)
    assert ds.access == "random"
    before = open_fds()
    run_epochs(ds, range(1))
    fds = open_fds()
    run_epochs(ds, range(1, 4))
    assert open_fds() == fds <= before + ds.source.reader().max_open
    assert ds.shared.skip_counts()["truncated_shard"] >= 1  # each damaged sample counted once


def test_worker_loader_keeps_its_handles_across_epochs(root):
    params = StreamParams(**PARAMS)
    ds = BagStream(build_index(root, "train", params), params, num_workers=2, batches_per_worker=10)
    loader = StreamLoader(ds)
    counts = []
    for epoch in range(4):
        loader.set_epoch(epoch)
        assert sum(1 for _ in loader) == 20
        counts.append(open_fds())
    assert counts[1] == counts[2] == counts[3]  # persistent workers: nothing accumulates
    del loader


@pytest.mark.parametrize("open_videos,batch_size", [(2, 8), (3, 4), (6, 4)])
def test_open_videos_are_bounded_by_the_setting(root, monkeypatch, open_videos, batch_size):
    """Every open video holds at least one bag, and a batch is emitted as soon as open_videos
    videos hold n_bags bags, so at most max(open_videos, n_bags) videos are ever held."""
    alive: list[weakref.ref] = []
    peak = [0]
    real = pooled_mod.open_video

    def counting(*args, **kwargs):
        ov = real(*args, **kwargs)
        alive[:] = [r for r in alive if r() is not None] + [weakref.ref(ov)]
        peak[0] = max(peak[0], sum(1 for r in alive if (o := r()) is not None and o.bags))
        return ov

    monkeypatch.setattr(pooled_mod, "open_video", counting)
    params = StreamParams(
        **{**PARAMS, "open_videos": open_videos, "batch_size": batch_size, "shard_access": "sequential"}
    )
    ds = BagStream(build_index(root, "train", params), params, batches_per_worker=30)
    run_epochs(ds, range(3))
    bound = max(open_videos, params.n_bags)
    assert 1 <= peak[0] <= bound
    if open_videos >= params.n_bags:
        assert peak[0] == open_videos  # the setting is reached, and not exceeded


def test_every_batch_spans_the_open_videos(root):
    params = StreamParams(**{**PARAMS, "open_videos": 3, "batch_size": 6, "shard_access": "sequential"})
    ds = BagStream(build_index(root, "train", params), params, batches_per_worker=12)
    spans = [int(b["videos_per_batch"]) for b in ds]
    assert max(spans) <= 3 and sum(s == 3 for s in spans) >= len(spans) // 2


def test_index_is_small_and_picklable(root):
    import pickle

    params = StreamParams(**PARAMS)
    index = build_index(Path(root), "train", params)
    assert len(pickle.dumps(index)) < 64 * 1024
