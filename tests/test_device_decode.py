"""--decode_on device: workers ship JPEG bytes and crop windows, the training process decodes.

The device path runs here on the CPU (the same code as on a GPU, where torchvision hands the JPEGs
to nvJPEG); it must give the workers' own frames within one grey level, with the same bags."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from polyp_ssl.device_decode import (
    FrameDecodeError,
    decode_batch_on,
    decode_jpegs,
    is_encoded,
    pack_jpegs,
)
from polyp_ssl.stream import BagStream, DataConfigError, StreamLoader, StreamParams, build_index, open_video
from tests.shard_factory import make_root
from tests.train_helpers import TINY, P, losses

DEVICE = StreamParams(**{**P.__dict__, "decode_on": "device"})


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("root"), videos={"train": 4, "val": 2})


def jpeg(color: tuple[int, int, int], size: tuple[int, int] = (20, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_pack_jpegs_round_trip():
    jpegs = [b"abc", b"", b"defgh"]
    data, offsets = pack_jpegs(jpegs)
    assert offsets.tolist() == [0, 3, 3, 8]
    assert [
        bytes(data[a:b].tolist()) for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)
    ] == jpegs
    data, offsets = pack_jpegs([])
    assert data.numel() == 0 and offsets.tolist() == [0]


def test_encoded_batch_decodes_to_the_workers_frames(root):
    """Same bags, same draws: the device path's frames equal the workers' within one grey level,
    flips and zoomed, shifted anchor crops (the opt-in augmentations) included; the other keys are
    identical."""
    aug = {"aug_random_scale": True, "aug_jitter": True, "aug_hflip": True, "aug_vflip": True}
    seq = {"shard_access": "sequential"}  # open_video below takes a video's samples in shard order
    cpu_p = StreamParams(**{**P.__dict__, **aug, **seq})
    dev_p = StreamParams(**{**DEVICE.__dict__, **aug, **seq})
    index = build_index(root, "train", cpu_p)
    cpu, dev = BagStream(index, cpu_p), BagStream(index, dev_p)
    v, samples, codes = next(cpu.source.iter_videos([0]))
    ov = open_video(v, 0, samples, codes, cpu_p, np.random.default_rng(0), 1.0, cpu.stats)
    chosen = [(ov, bag) for bag in ov.bags[:4]]
    ref = cpu.assembler(cpu.source.rows_of(chosen), np.random.default_rng(5))
    enc = dev.assembler(dev.source.rows_of(chosen), np.random.default_rng(5))
    assert is_encoded(enc) and not is_encoded(ref) and "frames" not in enc
    # each distinct frame is shipped once
    n_distinct = len(
        {(ov.frags[int(m)].key, i) for _, bag in chosen for m in bag for i in ov.frags[int(m)].frames}
    )
    assert enc["jpeg_offsets"].numel() == n_distinct + 1 == len(enc["jpeg_names"]) + 1
    assert enc["flips"].any(), "the draw should flip some rows (aug_hflip, aug_vflip)"
    out = decode_batch_on(enc, "cpu", P.im_size)
    assert set(out) == set(ref)
    assert out["frames"].shape == ref["frames"].shape and out["frames"].dtype == torch.uint8
    diff = (out["frames"].int() - ref["frames"].int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.25  # fixed-point vs float rounding
    for k in ref:
        if k != "frames":
            assert torch.equal(out[k], ref[k]), k


def test_loader_with_workers_ships_bytes_and_keeps_the_bags(root):
    index = build_index(root, "train", P)
    runs = {}
    for params in (P, DEVICE):
        loader = StreamLoader(BagStream(index, params, 0, 1, 2))
        runs[params.decode_on] = list(loader)
    assert len(runs["workers"]) == len(runs["device"]) > 0
    for ref, enc in zip(runs["workers"], runs["device"], strict=True):
        assert is_encoded(enc)
        out = decode_batch_on(enc, "cpu", P.im_size)
        assert torch.equal(out["tracklet"], ref["tracklet"]) and torch.equal(out["bag"], ref["bag"])
        assert (out["frames"].int() - ref["frames"].int()).abs().max() <= 1


def test_a_corrupt_jpeg_is_named():
    data, offsets = pack_jpegs([jpeg((200, 10, 10)), b"\xff\xd8" + b"\x00" * 40 + b"\xff\xd9"])
    batch = {
        "jpeg_data": data,
        "jpeg_offsets": offsets,
        "jpeg_names": ["s.tar: sample 'a': frame 0", "s.tar: sample 'b': frame 3"],
    }
    with pytest.raises(FrameDecodeError, match="sample 'b': frame 3"):
        decode_jpegs(batch, "cpu")


def test_decoded_colours_and_windows():
    """Two solid JPEGs of different sizes; windows pick regions, rows flip: check values directly."""
    red, blue = jpeg((250, 0, 0), (20, 12)), jpeg((0, 0, 250), (9, 30))
    data, offsets = pack_jpegs([red, blue])
    batch = {
        "jpeg_data": data,
        "jpeg_offsets": offsets,
        "jpeg_names": ["r", "b"],
        "frame_jpeg": torch.tensor([[0, 1], [1, 1]]),
        "frame_window": torch.tensor([[[0, 0, 20, 12], [2, 3, 8, 30]], [[0, 0, 9, 30], [0, 0, 8, 8]]]),
        "flips": torch.tensor([[True, False], [False, True]]),
        "bag": torch.tensor([0, 1]),
    }
    out = decode_batch_on(batch, "cpu", 8)
    f = out["frames"].int()
    assert f.shape == (2, 2, 3, 8, 8) and torch.equal(out["bag"], batch["bag"])
    assert (f[0, 0, 0] > 240).all() and (f[0, 0, 2] < 10).all()  # red
    assert (f[0, 1, 2] > 240).all() and (f[1, :, 0] < 10).all()  # blue
    assert not any(k in out for k in ("jpeg_data", "frame_window", "flips"))


def test_unknown_decode_on_is_refused(root):
    index = build_index(root, "train", P)
    with pytest.raises(DataConfigError, match="decode_on"):
        BagStream(index, StreamParams(**{**P.__dict__, "decode_on": "gpu"}))


def test_training_with_decode_on_device(root, tmp_path):
    """Through Lightning with --decode_on device: the data module decodes each encoded batch before
    the transfer (training_step would fail on a batch without frames) into the frames the workers
    would have made, over whole epochs too. (Losses are not compared: at initialisation the tiny
    model's loss moves by 10% under one-grey-level noise.)"""
    import math

    from polyp_ssl.datamodule import StreamDataModule
    from polyp_ssl.train_cli import main, resolve_config

    runs = tmp_path / "runs"
    base = [
        "--dataset_root",
        str(root),
        "--runs_dir",
        str(runs),
        "--max_steps",
        "2",
        "--limit_val_batches",
        "0",
        *TINY,
    ]
    assert main([*base, "--exp_name", "device", "--decode_on", "device"]) == 0
    steps = losses(runs / "device")
    assert sorted(steps) == [0, 1] and all(math.isfinite(v) for v in steps.values())
    assert (runs / "device" / "checkpoints" / "last.ckpt").exists()
    assert main([*base, "--exp_name", "bad", "--decode_on", "gpu"]) == 2
    # two whole epochs with two persistent workers: a decode thread per epoch, none left after
    workers = [*base[:4], "--limit_val_batches", "0", *TINY]
    workers[workers.index("--num_workers") + 1] = "2"
    assert main([*workers, "--exp_name", "epochs", "--decode_on", "device", "--max_epochs", "2"]) == 0
    steps = losses(runs / "epochs")
    assert len(steps) % 2 == 0 and sorted(steps) == list(range(len(steps))) and len(steps) >= 4
    assert _decode_threads() == 0

    batches = {}
    for mode in ("workers", "device"):
        dm = StreamDataModule(resolve_config(["--dataset_root", str(root), "--decode_on", mode, *TINY]))
        dm.setup("fit")
        batches[mode] = dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    ref, out = batches["workers"], batches["device"]
    assert set(ref) == set(out) and torch.equal(ref["bag"], out["bag"])
    assert (ref["frames"].int() - out["frames"].int()).abs().max() <= 1


def test_batched_resize_equals_interpolate_at_any_scale():
    """The two-matrix-product resize equals F.interpolate(antialias=True) per frame, for windows that
    shrink up to 6x, enlarge up to 3x, touch the image borders or are one pixel wide."""
    import torch.nn.functional as F

    from polyp_ssl.device_decode import crop_resize_all

    gen = torch.Generator().manual_seed(3)
    images = [
        torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in ((97, 130), (40, 33))
    ]
    windows, which = [], []
    for k in range(40):
        m = k % 2
        h, w = images[m].shape[-2:]
        x0, y0 = (
            int(torch.randint(0, w - 1, (1,), generator=gen)),
            int(torch.randint(0, h - 1, (1,), generator=gen)),
        )
        x1 = int(torch.randint(x0 + 1, w + 1, (1,), generator=gen))
        y1 = int(torch.randint(y0 + 1, h + 1, (1,), generator=gen))
        windows.append([x0, y0, x1, y1])
        which.append(m)
    windows += [[0, 0, 130, 97], [5, 5, 6, 6]]
    which += [0, 0]
    out = crop_resize_all(images, torch.tensor(which), torch.tensor(windows), 24, chunk=7)
    for k, (m, (x0, y0, x1, y1)) in enumerate(zip(which, windows, strict=True)):
        crop = images[m][None, :, y0:y1, x0:x1].float()
        ref = F.interpolate(crop, size=(24, 24), mode="bilinear", antialias=True, align_corners=False)
        ref = ref[0].round().clamp(0, 255)
        assert (out[k].float() - ref).abs().max() <= 1, (k, windows[k])


def _decode_threads() -> int:
    import threading

    return sum(t.name == "device-decode" and t.is_alive() for t in threading.enumerate())


def test_prefetching_loader_decodes_ahead_counts_what_it_hands_over_and_resumes(root):
    """StreamLoader with a decode device: batches arrive decoded (thread), equal to the workers'
    frames; batches_seen counts handed-over batches, so a resume from its state continues exactly;
    breaking off stops the thread."""
    index = build_index(root, "train", P)
    ref = list(StreamLoader(BagStream(index, P, 0, 1, 2)))
    loader = StreamLoader(BagStream(index, DEVICE, 0, 1, 2))
    loader.decode_device = torch.device("cpu")
    got = []
    for batch in loader:
        assert not is_encoded(batch)
        got.append(batch)
        if len(got) == 3:
            break
    assert loader.batches_seen == 3
    state = loader.state_dict()
    for b, r in zip(got, ref, strict=False):
        assert torch.equal(b["tracklet"], r["tracklet"])
        assert (b["frames"].int() - r["frames"].int()).abs().max() <= 1
    del batch
    import gc

    gc.collect()
    assert _decode_threads() == 0
    resumed = StreamLoader(BagStream(index, DEVICE, 0, 1, 2))
    resumed.decode_device = torch.device("cpu")
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(ref) - 3
    for b, r in zip(rest, ref[3:], strict=True):
        assert torch.equal(b["tracklet"], r["tracklet"]) and torch.equal(b["bag"], r["bag"])
        assert (b["frames"].int() - r["frames"].int()).abs().max() <= 1
    assert _decode_threads() == 0


def test_prefetcher_raises_the_sources_error_after_its_batches():
    from polyp_ssl.device_decode import DevicePrefetcher
    from polyp_ssl.stream import ShardError

    data, offsets = pack_jpegs([jpeg((10, 200, 10))])
    good = {
        "jpeg_data": data,
        "jpeg_offsets": offsets,
        "jpeg_names": ["g"],
        "frame_jpeg": torch.zeros((1, 1), dtype=torch.int64),
        "frame_window": torch.tensor([[[0, 0, 20, 12]]]),
        "flips": torch.zeros((1, 2), dtype=torch.bool),
    }

    def source():
        yield good
        raise ShardError("s.tar: sample 'x': truncated [truncated_shard]", "truncated_shard")

    it = iter(DevicePrefetcher(source(), "cpu", 8))
    first = next(it)
    assert first["frames"].shape == (1, 1, 3, 8, 8) and (first["frames"][:, :, 1] > 190).all()
    with pytest.raises(ShardError, match="sample 'x'"):
        next(it)
    assert _decode_threads() == 0


def test_prefetcher_reports_a_source_that_fails_at_once():
    """An error before the first batch (a shard that cannot be opened, say) reaches the consumer;
    nothing waits forever."""
    from polyp_ssl.device_decode import DevicePrefetcher

    def source():
        raise OSError("cannot open s.tar")
        yield  # a generator

    with pytest.raises(OSError, match="s.tar"):
        next(iter(DevicePrefetcher(source(), "cpu", 8)))
    assert _decode_threads() == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvjpeg_batches_match_the_workers_and_prefetch_on_a_stream(root):
    """On a GPU: nvJPEG + the batched resize against libjpeg-turbo + torchvision's uint8 resize
    (different IDCTs: a few grey levels at most), through the prefetching loader."""
    index = build_index(root, "train", P)
    ref = list(StreamLoader(BagStream(index, P, 0, 1, 1)))
    loader = StreamLoader(BagStream(index, DEVICE, 0, 1, 1))
    loader.decode_device = torch.device("cuda")
    got = list(loader)
    assert len(got) == len(ref) > 0
    for b, r in zip(got, ref, strict=True):
        assert b["frames"].is_cuda and torch.equal(b["bag"], r["bag"])
        diff = (b["frames"].cpu().int() - r["frames"].int()).abs()
        assert diff.max() <= 6 and diff.float().mean() < 1.0
    assert _decode_threads() == 0
