"""Hostile shards and checkpoints are refused in bounded memory: sample JSON validated as data,
tar sizes bounded by the file, JPEG sizes checked before decoding, compressed shards bounded in
expansion, checkpoints checked before torch.load and before the encoder is built.

Memory is measured in child processes run under `RLIMIT_AS` = (the same command's peak virtual
memory on a clean input) + 1 GiB: a bomb that allocates more dies with MemoryError instead of
passing (torch reserves much address space, hence the clean baseline of the same command)."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from polyp_ssl.checkpoint import CheckpointError, load_encoder
from polyp_ssl.shards.reader import DecompressionBomb, iter_tar_members, read_members
from polyp_ssl.shards.sample import (
    MAX_FRAME_PIXELS,
    JpegSizeError,
    SampleError,
    TrackletSample,
    check_jpeg,
    jpeg_size,
    parse_sample,
)
from polyp_ssl.shards.verify import verify_root
from polyp_ssl.stream import SampleDamage, ShardError, check_sample, iter_tar_samples
from tests.bomb_helpers import GIB, bounded, patch_record_sizes, rewrite_config
from tests.damage_helpers import SHARD, first_key, make_stream, record_spans, write_members
from tests.damage_helpers import read_members as tar_members
from tests.embed_factory import make_ckpt
from tests.shard_factory import make_root

# ---------------------------------------------------------------- a hostile corpus


def good_sample(n: int = 3) -> dict:
    meta = TrackletSample(
        key="v_1-0",
        tracklet_id="v_1#0",
        split="train",
        dataset_id=None,
        video_id="v",
        sequence_id="v",
        identity_id="v_1",
        size_mm=4.0,
        histology="AD",
        position_in_video=0.5,
        video_first_frame=0,
        video_last_frame=99,
        frame_ids=list(range(10, 10 + n)),
        image_ids=list(range(n)),
        annotation_ids=list(range(n)),
        file_names=[f"f{i}.jpg" for i in range(n)],
        boxes=[[30.0, 40.0, 20.0, 16.0]] * n,
        crops=[[0, 0, 100, 80]] * n,
        crop_sizes=[[48, 38]] * n,
        boxes_in_crop=[[14.4, 19.0, 9.6, 7.6]] * n,
        params={"crop_scale": 5.0, "store_size": 48},
    )
    return json.loads(meta.to_json())


def jpeg_header(w: int, h: int, progressive: bool = False) -> bytes:
    """SOI, a frame header declaring w x h, EOI: a few bytes that a decoder would expand to w*h*3."""
    sof = b"\xff\xc2" if progressive else b"\xff\xc0"
    body = (
        bytes([8]) + h.to_bytes(2, "big") + w.to_bytes(2, "big") + b"\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    )
    return b"\xff\xd8" + sof + (len(body) + 2).to_bytes(2, "big") + body + b"\x00" * 200 + b"\xff\xd9"


def edit(change) -> bytes:
    obj = good_sample()
    change(obj)
    return json.dumps(obj).encode()


def set_at(path: list, value):
    def change(obj):
        target = obj
        for p in path[:-1]:
            target = target[p]
        target[path[-1]] = value

    return change


JSON_CASES = {
    # name: (JSON bytes, field named in the error)
    "nan_size": (edit(set_at(["size_mm"], float("nan"))), "json"),
    "infinite_box": (json.dumps(good_sample()).replace("30.0", "1e999", 1).encode(), "boxes[0][0]"),
    "box_1e308": (edit(set_at(["boxes", 1, 2], 1e308)), "boxes[1][2]"),
    "string_frame_id": (edit(set_at(["frame_ids", 0], "10")), "frame_ids[0]"),
    "float_frame_id": (edit(set_at(["frame_ids", 2], 12.0)), "frame_ids[2]"),
    "bool_image_id": (edit(set_at(["image_ids", 1], True)), "image_ids[1]"),
    "negative_frame_id": (edit(set_at(["frame_ids", 1], -1)), "frame_ids[1]"),
    "negative_video_first_frame": (edit(set_at(["video_first_frame"], -5)), "video_first_frame"),
    "three_number_box": (edit(set_at(["boxes", 0], [1.0, 2.0, 3.0])), "boxes[0]"),
    "three_number_crop": (edit(set_at(["crops", 2], [0, 0, 9])), "crops[2]"),
    "crop_sizes_of_three": (edit(set_at(["crop_sizes", 0], [48, 38, 3])), "crop_sizes[0]"),
    "crop_side_zero": (edit(set_at(["crop_sizes", 0], [0, 38])), "crop_sizes[0][0]"),
    "crop_side_65536": (edit(set_at(["crop_sizes", 0], [65536, 1])), "crop_sizes[0][0]"),
    "crop_pixel_bomb": (edit(set_at(["crop_sizes", 0], [65500, 65500])), "crop_sizes[0]"),
    "box_outside_its_crop": (edit(set_at(["boxes_in_crop", 1], [60.0, 1.0, 5.0, 5.0])), "boxes_in_crop[1]"),
    "list_where_object_belongs": (edit(set_at(["params"], [1, 2])), "params"),
    "object_where_list_belongs": (edit(set_at(["boxes"], {"a": 1})), "boxes"),
    "string_where_number_belongs": (edit(set_at(["position_in_video"], "0.5")), "position_in_video"),
    "position_above_one": (edit(set_at(["position_in_video"], 3.0)), "position_in_video"),
    "negative_size_mm": (edit(set_at(["size_mm"], -1.0)), "size_mm"),
    "number_key": (edit(set_at(["key"], 5)), "key"),
    "crop_scale_string": (edit(set_at(["params", "crop_scale"], "big")), "params.crop_scale"),
    "frame_lists_of_other_lengths": (edit(lambda o: o["annotation_ids"].pop()), "annotation_ids"),
    "no_frames": (edit(lambda o: [o.__setitem__(k, []) for k in ("frame_ids",)]), "frame_ids"),
    "bool_version": (edit(set_at(["version"], True)), "version"),
    "missing_field": (edit(lambda o: o.pop("boxes_in_crop")), "boxes_in_crop"),
    "top_level_list": (b"[1, 2, 3]", "json"),
    "duplicate_json_key": (json.dumps(good_sample())[:-1].encode() + b', "split": "val"}', "split"),
    "nested_200000_deep": (b'{"extra": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", "json"),
    "deeply_nested_extra": (edit(set_at(["extra"], json.loads("[" * 40 + "]" * 40))), "json"),
    "over_the_size_cap": (
        json.dumps({**good_sample(), "extra": {f"k{i:07d}": 0 for i in range(1_500_000)}}).encode(),
        "json",
    ),
    "huge_integer": (
        json.dumps(good_sample()).replace('"image_ids": [0', '"image_ids": [' + "9" * 5000, 1).encode(),
        "json",
    ),
    "not_utf8": (b'{"key": "\xff\xfe"}', "json"),
}


@pytest.mark.parametrize("case", sorted(JSON_CASES))
def test_hostile_sample_json_is_refused_naming_the_field(case):
    data, field = JSON_CASES[case]
    with pytest.raises(SampleError) as info:
        parse_sample(data)
    assert info.value.field == field, str(info.value)
    assert f"field {field!r}" in str(info.value)


def test_a_valid_sample_parses_and_round_trips():
    meta = parse_sample(json.dumps(good_sample()).encode())
    assert meta.n_frames == 3 and meta.crop_sizes[0] == [48, 38]
    assert parse_sample(meta.to_json()) == meta
    # an object with 10^5 keys in `extra` is data kept as given, parsed in bounded time and memory
    big = {**good_sample(), "extra": {f"k{i}": [i] for i in range(100_000)}}
    assert len(parse_sample(json.dumps(big)).extra) == 100_000


def test_check_sample_maps_validation_to_bad_json_and_lengths_to_json_mismatch():
    jpeg = jpeg_header(48, 38)
    base = {"__key__": "v_1-0", **{f"{i:04d}.jpg": jpeg for i in range(3)}}
    assert check_sample({**base, "json": json.dumps(good_sample()).encode()}, 3).n_frames == 3
    for case in ("nan_size", "nested_200000_deep", "bool_image_id", "duplicate_json_key"):
        with pytest.raises(SampleDamage) as info:
            check_sample({**base, "json": JSON_CASES[case][0]}, 3)
        assert info.value.reason == "bad_json" and JSON_CASES[case][1] in str(info.value)
    with pytest.raises(SampleDamage) as info:
        check_sample({**base, "json": JSON_CASES["frame_lists_of_other_lengths"][0]}, 3)
    assert info.value.reason == "json_mismatch"
    # a JPEG whose header declares another size than crop_sizes: refused before any decoding
    with pytest.raises(SampleDamage, match="20000x20000 JPEG") as info:
        check_sample({**base, "0001.jpg": jpeg_header(20000, 20000), "json": json.dumps(good_sample())}, 3)
    assert info.value.reason == "json_mismatch"


# ---------------------------------------------------------------- JPEG headers


def test_jpeg_sizes_are_read_from_the_header_and_bounded():
    assert jpeg_size(jpeg_header(48, 38)) == (48, 38)
    assert jpeg_size(jpeg_header(65500, 65500, progressive=True)) == (65500, 65500)
    assert len(jpeg_header(65500, 65500)) < 300
    for bomb in (
        jpeg_header(65500, 65500),
        jpeg_header(65500, 65500, progressive=True),
        jpeg_header(20000, 20000),
    ):
        with pytest.raises(JpegSizeError) as info:
            check_jpeg(bomb)
        assert info.value.kind == "too_large" and str(MAX_FRAME_PIXELS) in str(info.value)
    with pytest.raises(JpegSizeError) as info:
        check_jpeg(jpeg_header(48, 38), [48, 39])
    assert info.value.kind == "mismatch"
    for bad in (jpeg_header(0, 38), b"\xff\xd8\xff\xd9", b"GIF89a"):
        with pytest.raises(JpegSizeError):
            check_jpeg(bad)
    # a restart marker (no length field) before the SOF is stepped over as libjpeg does: the size
    # found is the decoder's, not a small one hidden behind bytes read as a segment length
    hidden = b"\xff\xd8\xff\xd0" + jpeg_header(30000, 30000)[2:]
    assert jpeg_size(hidden) == (30000, 30000)
    # bytes that are no marker before the SOF: refused (libjpeg would skip them and go on)
    with pytest.raises(ValueError):
        jpeg_size(b"\xff\xd8\x00\x10garbage" + jpeg_header(30000, 30000)[2:])


def test_every_decode_site_checks_the_header_first():
    from polyp_ssl.device_decode import FrameDecodeError, decode_jpegs, pack_jpegs
    from polyp_ssl.eval.embed import decode_rgb
    from polyp_ssl.eval.gallery import anchor_crop as gallery_crop
    from polyp_ssl.transforms import decode_jpeg_bytes, load_frames

    bomb = jpeg_header(20000, 20000)
    with pytest.raises(JpegSizeError):
        decode_jpeg_bytes(bomb)
    with pytest.raises(JpegSizeError):
        load_frames([bomb], [[1.0, 1.0, 4.0, 4.0]], 32, 2.0)
    with pytest.raises(JpegSizeError):
        load_frames([jpeg_header(48, 38)], [[1.0, 1.0, 4.0, 4.0]], 32, 2.0, sizes=[[40, 38]])
    with pytest.raises(JpegSizeError):
        decode_rgb(bomb)
    meta = parse_sample(json.dumps(good_sample()))
    with pytest.raises(JpegSizeError):
        gallery_crop(meta, bomb, 0, 2.0, 32)
    data, offsets = pack_jpegs([jpeg_header(48, 38), bomb])
    batch = {
        "jpeg_data": data,
        "jpeg_offsets": offsets,
        "jpeg_names": ["s: sample 'a': frame 0", "s: sample 'a': frame 1"],
    }
    with pytest.raises(FrameDecodeError, match=r"frame 1 does not decode .*\[corrupt_jpeg\]"):
        decode_jpegs(batch, "cpu")


# ---------------------------------------------------------------- tar headers


def tar_header(name: bytes, size_field: bytes, kind: bytes = b"0") -> bytes:
    h = bytearray(512)
    h[: len(name)] = name
    h[100:108] = b"0000644\0"
    h[124:136] = size_field
    h[136:148] = b"00000000000\0"
    h[156:157] = kind
    h[257:263] = b"ustar\0"
    h[148:156] = b" " * 8
    h[148:156] = f"{sum(h):06o}\0 ".encode()
    return bytes(h)


def pax(records: dict[str, str]) -> bytes:
    body = b""
    for k, v in records.items():
        rest = f" {k}={v}\n".encode()
        n = len(rest) + len(str(len(rest)))
        n = len(rest) + len(str(n))
        body += str(n).encode() + rest
    padded = body + bytes(-len(body) % 512)
    return tar_header(b"././@PaxHeader", f"{len(body):011o}\0".encode(), b"x") + padded


SMALL = b"x" * 10
TAR_CASES = {
    "pax_size_minus_one": pax({"size": "-1"}) + tar_header(b"a.json", b"00000000012\0") + SMALL + bytes(502),
    "pax_size_1e9_float": pax({"size": "1e9"}) + tar_header(b"a.json", b"00000000012\0") + SMALL + bytes(502),
    "pax_size_garbage": pax({"size": "12abc"}) + tar_header(b"a.json", b"00000000012\0") + SMALL + bytes(502),
    "pax_size_beyond_the_file": pax({"size": str(10**12)}) + tar_header(b"a.json", b"00000000012\0") + SMALL,
    "member_of_10_gb_declared": tar_header(b"a.0000.jpg", b"\x80" + (10 * GIB).to_bytes(11, "big")) + SMALL,
    "negative_base256_size": tar_header(b"a.json", b"\xff" * 12) + SMALL,
    "gnu_long_name_of_100_mb": tar_header(b"././@LongLink", f"{100 << 20:011o}\0".encode(), b"L")
    + b"n" * 512,
    "pax_header_of_100_mb": tar_header(b"././@PaxHeader", f"{100 << 20:011o}\0".encode(), b"x") + b"9" * 512,
    "pax_record_longer_than_its_header": tar_header(b"././@PaxHeader", b"00000000020\0", b"x")
    + b"99999 path=a\n".ljust(512, b"\0")
    + tar_header(b"a.json", b"00000000012\0")
    + SMALL,
}


@pytest.mark.parametrize("case", sorted(TAR_CASES))
def test_hostile_tar_headers_are_read_errors_without_allocating(case, tmp_path):
    path = tmp_path / "bomb.tar"
    path.write_bytes(TAR_CASES[case] + bytes(1024))
    with open(path, "rb") as f, pytest.raises(tarfile.ReadError) as info:
        list(read_members(f))
    assert "Traceback" not in str(info.value) and str(info.value)
    with pytest.raises(ShardError) as err:  # the loader: named, reason truncated_shard
        list(iter_tar_samples(str(path)))
    assert err.value.reason == "truncated_shard" and str(path) in str(err.value)


def test_declared_sizes_beyond_a_pipe_are_read_in_chunks():
    """Without a known size (a pipe), a member claiming 10 GB is read 1 MiB at a time: the
    stream ends long before, a ReadError, and memory followed the bytes that were there."""
    data = TAR_CASES["member_of_10_gb_declared"] + b"y" * (3 << 20)
    with pytest.raises(tarfile.ReadError, match="more than the"):
        list(iter_tar_members(io.BytesIO(data)))
    reads = []

    class Pipe(io.BytesIO):
        def read(self, n=-1):
            reads.append(n)
            return super().read(n)

    name = b"a.0000.jpg"
    good = tar_header(name, f"{3 << 20:011o}\0".encode()) + b"y" * (3 << 20) + bytes(1024)
    assert [n for n, _ in iter_tar_members(Pipe(good))] == ["a.0000.jpg"]
    assert max(reads) <= 1 << 20


def compressed_bomb(kind: str, expanded: int) -> bytes:
    """A tar of one member of `expanded` zero bytes, compressed, built in chunks."""
    comp = {
        "gz": lambda: gzip_compressor(),
        "bz2": bz2.BZ2Compressor,
        "xz": lambda: lzma.LZMACompressor(preset=0),
    }[kind]()
    out = [comp.compress(tar_header(b"a.0000.jpg", f"{expanded:011o}\0".encode()))]
    chunk = bytes(4 << 20)
    for _ in range(expanded // len(chunk)):
        out.append(comp.compress(chunk))
    out.append(comp.flush())
    return b"".join(out)


def gzip_compressor():
    import zlib

    return zlib.compressobj(9, zlib.DEFLATED, 31)


@pytest.mark.parametrize("kind", ["gz", "bz2", "xz"])
def test_compressed_shard_bombs_stop_at_the_expansion_bound(kind, tmp_path):
    path = tmp_path / f"bomb.tar.{kind}"
    path.write_bytes(compressed_bomb(kind, 96 << 20))
    assert path.stat().st_size < 1 << 20  # under 1 MB on disk, 96 MiB expanded
    with open(path, "rb") as f, pytest.raises(DecompressionBomb, match="decompression_bomb"):
        for _ in read_members(f, lambda name: False):  # skipped members are expanded too
            pass
    with pytest.raises(ShardError) as info:
        list(iter_tar_samples(str(path)))
    assert info.value.reason == "decompression_bomb" and str(path) in str(info.value)


def test_a_compressed_shard_of_real_samples_still_reads(tmp_path):
    root = make_root(tmp_path / "r", videos={"train": 2})
    plain = sorted((root / "shards" / "train").glob("*.tar"))[0]
    gz = tmp_path / "s.tar.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    with open(plain, "rb") as a, open(gz, "rb") as b:
        assert list(read_members(a)) == list(read_members(b))
    damaged = tmp_path / "d.tar.gz"
    damaged.write_bytes(gz.read_bytes()[:-200] + b"\x00" * 200)
    with open(damaged, "rb") as f, pytest.raises(tarfile.ReadError):
        list(read_members(f))


# ---------------------------------------------------------------- verify: samples and keys


@pytest.fixture
def root(tmp_path):
    return make_root(tmp_path / "root", videos={"train": 4, "val": 2})


def edit_shard_json(root: Path, shard: str, key: str, change) -> None:
    members = []
    for name, data in tar_members(root / shard):
        if name == f"{key}.json":
            obj = json.loads(data)
            change(obj)
            data = json.dumps(obj).encode()
        members.append((name, data))
    write_members(root / shard, members)


def test_the_loader_refuses_a_key_that_appears_twice_in_a_shard(root):
    key = first_key(root)
    members = tar_members(root / SHARD)
    write_members(root / SHARD, members + [(n, d) for n, d in members if n.startswith(key + ".")])
    with pytest.raises(ShardError) as info:
        list(make_stream(root, "fail"))
    assert info.value.reason == "duplicate_sample" and repr(key) in str(info.value)
    ds = make_stream(root, "warn")
    assert len(list(ds)) == len(ds) and ds.shared.skip_counts().get("duplicate_sample", 0) >= 1


def test_verify_names_bad_samples_and_duplicate_keys(root):
    # make_root records no sha256; the clean root has no sample or key problem
    assert not [p for p in verify_root(root).problems if p.kind in ("bad_sample", "duplicate_key")]
    key = first_key(root)
    edit_shard_json(root, SHARD, key, lambda o: o["boxes"][0].pop())
    other = "shards/train/train-000001.tar"
    key2 = first_key(root, other)
    members = tar_members(root / other)
    # the second shard: its first sample's JPEG a bomb, and a copy of a sample of the first shard
    members = [(n, jpeg_header(20000, 20000) if n == f"{key2}.0001.jpg" else d) for n, d in members]
    members += [(n, d) for n, d in tar_members(root / SHARD) if n.startswith(first_key(root) + ".")]
    # and one key twice within the same shard
    members += [(n, d) for n, d in tar_members(root / other) if n.startswith(key2 + ".")]
    write_members(root / other, members)
    report = verify_root(root)
    details = [(p.kind, p.shard, p.detail) for p in report.problems]
    assert ("bad_sample", SHARD) in [(k, s) for k, s, _ in details]
    assert any(k == "bad_sample" and repr(key) in d and "'boxes[0]'" in d for k, _, d in details), details
    assert any(k == "bad_sample" and repr(key2) in d and "20000x20000" in d for k, _, d in details), details
    dup = [d for k, s, d in details if k == "duplicate_key"]
    assert any(repr(key2) in d and "twice in the shard" in d for d in dup), dup
    assert any(repr(key) in d and "also in shard" in d for d in dup), dup
    assert not report.ok


# ---------------------------------------------------------------- memory-bounded runs of the commands


def test_verify_on_tar_and_gzip_bombs_stays_within_1_gib_of_a_clean_run(root, tmp_path):
    clean = tmp_path / "clean"
    import shutil

    shutil.copytree(root, clean)
    shard = root / SHARD
    shard.write_bytes(shard.read_bytes()[:-1024] + TAR_CASES["member_of_10_gb_declared"] + bytes(2048))
    gz = root / "shards" / "train" / "train-000001.tar"
    gz.write_bytes(compressed_bomb("gz", 80 << 20))  # a gzip tar under a .tar name
    code = "from polyp_ssl.shards.cli import verify_main; sys.exit(verify_main([{!r}, '--no-progress']))"
    # make_root records no sha256, so verify exits 1 on the clean copy too (checksum_mismatch)
    rc, err, base, peak = bounded(code.format(str(clean)), code.format(str(root)), clean_rc=1)
    assert rc == 1 and "MemoryError" not in err and "Traceback" not in err, err[-3000:]
    assert peak < base + GIB


@pytest.mark.slow
def test_train_on_jpeg_bombs_stays_within_1_gib_of_a_clean_run(root, tmp_path):
    """Two samples of every train shard have 20000 x 20000 JPEGs of a few hundred bytes (1.2 GB
    decoded) as frames: `train --on_shard_error warn` skips them (json_mismatch, before decoding)
    and finishes; a clean run of the same command sets the memory baseline."""
    import shutil

    from tests.train_helpers import TINY

    clean = tmp_path / "clean"
    shutil.copytree(root, clean)
    for shard in sorted((root / "shards" / "train").glob("*.tar")):
        members = tar_members(shard)
        keys = sorted({n.split(".", 1)[0] for n, _ in members})[:2]
        bomb = {n for n, _ in members if n.split(".", 1)[0] in keys and n.endswith(".jpg")}
        write_members(shard, [(n, jpeg_header(20000, 20000) if n in bomb else d) for n, d in members])
    record_spans(root)  # the catalog describes the bombs: random access reads them as ingest's bytes
    args = [
        "--max_steps",
        "2",
        "--limit_val_batches",
        "0",
        "--on_shard_error",
        "warn",
        "--exp_name",
        "e",
        *TINY,
    ]
    code = (
        "from polyp_ssl.train_cli import main\n"
        "sys.exit(main(['--dataset_root', {root!r}, '--runs_dir', {runs!r}] + {args!r}))"
    )
    rc, err, base, peak = bounded(
        code.format(root=str(clean), runs=str(tmp_path / "r1"), args=args),
        code.format(root=str(root), runs=str(tmp_path / "r2"), args=args),
    )
    assert rc == 0, err[-3000:]
    skips = json.loads((tmp_path / "r2" / "e" / "checkpoints" / "data_skips.rank0.json").read_text())
    assert skips["skipped"].get("json_mismatch", 0) >= 1, skips
    assert peak < base + GIB


# ---------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_ckpt(tmp_path_factory.mktemp("ckpt") / "enc.pt")


def test_the_tiny_checkpoint_loads(ckpt):
    encoder, config = load_encoder(ckpt)
    assert config["hmve_n_layers"] == 1 and encoder.out_dim == 32


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c, s: c.update(hmve_n_layers=100_000), "cannot hold them"),
        (lambda c, s: c.update(hmve_d_model=1 << 16, hmve_n_heads=1), "cannot hold them"),
        (lambda c, s: c.update(hmve_d_feedforward=10**9), "'hmve_d_feedforward'"),
        (lambda c, s: c.update(hmve_n_layers="3"), "'hmve_n_layers'"),
        (lambda c, s: c.update(sfe_backbone_arch="vit_h_14"), "'sfe_backbone_arch'"),
        (lambda c, s: c.update(encoder_type="rnn"), "'encoder_type'"),
    ],
    ids=["100000_layers", "d_model_65536", "ff_1e9", "layers_as_string", "unlisted_backbone", "unknown_type"],
)
def test_a_config_asking_for_a_huge_or_unknown_model_is_refused_before_building(
    ckpt, tmp_path, change, message
):
    bad = rewrite_config(ckpt, tmp_path / "bad.pt", change)
    with pytest.raises(CheckpointError, match=message) as info:
        load_encoder(bad)
    assert str(bad) in str(info.value)


def test_a_state_dict_with_a_wrong_shape_names_the_first_key(ckpt, tmp_path):
    def change(config, state):
        state["adapter.weight"] = torch.zeros(33, 512)

    bad = rewrite_config(ckpt, tmp_path / "shape.pt", change)
    with pytest.raises(CheckpointError, match=r"'adapter.weight' has shape \[33, 512\].*\[32, 512\]"):
        load_encoder(bad)

    def extra(config, state):
        state["rogue.weight"] = torch.zeros(1)

    with pytest.raises(CheckpointError, match="rogue.weight"):
        load_encoder(rewrite_config(ckpt, tmp_path / "extra.pt", extra))

    def missing(config, state):
        state.pop("cls_token")

    with pytest.raises(CheckpointError, match="lacks 'cls_token'"):
        load_encoder(rewrite_config(ckpt, tmp_path / "missing.pt", missing))


def test_zip_records_claiming_more_than_the_file_are_refused_before_torch_load(ckpt, tmp_path):
    assert zipfile.is_zipfile(ckpt)
    names = zipfile.ZipFile(ckpt).namelist()
    big = names.index(next(n for n in names if "/data/" in n))
    for field, what in ((24, "uncompressed"), (20, "compressed")):
        bad = patch_record_sizes(ckpt, tmp_path / f"claims_{what}.pt", 0xFFFFFFF0, big, field)
        with pytest.raises(CheckpointError, match=r"record .* declares \d+ bytes, more than the whole"):
            load_encoder(bad)
    # records that together claim more than the file (overlapping data)
    data = bytearray(ckpt.read_bytes())
    size = len(data)
    entries, at = [], -1
    while (at := data.find(b"PK\x01\x02", at + 1)) >= 0:
        entries.append(at)
    for e in entries:
        data[e + 24 : e + 28] = (size // 2).to_bytes(4, "little")
    (tmp_path / "overlap.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="records declare"):
        load_encoder(tmp_path / "overlap.pt")


@pytest.mark.slow
def test_embed_on_a_checkpoint_bomb_stays_within_1_gib_of_a_clean_load(ckpt, tmp_path):
    """A 4 GB record claimed in a small file, and a config asking for 100000 layers: refused by
    `load_encoder` in a child process limited to a clean load's peak + 1 GiB."""
    names = zipfile.ZipFile(ckpt).namelist()
    big = names.index(next(n for n in names if "/data/" in n))
    claims = patch_record_sizes(ckpt, tmp_path / "claims.pt", 0xFFFFFFF0, big)
    layers = rewrite_config(ckpt, tmp_path / "layers.pt", lambda c, s: c.update(hmve_n_layers=100_000))
    code = (
        "from polyp_ssl.checkpoint import CheckpointError, load_encoder\n"
        "try:\n    load_encoder({!r})\nexcept CheckpointError as e:\n    print(e); sys.exit(2)\n"
    )
    for bad in (claims, layers):
        rc, err, base, peak = bounded(code.format(str(ckpt)), code.format(str(bad)))
        assert rc == 2 and "MemoryError" not in err, err[-2000:]
        assert peak < base + GIB


@pytest.mark.slow
def test_embed_on_jpeg_and_tar_bombs_stays_within_1_gib_of_a_clean_run(ckpt, tmp_path):
    """`polyp-ssl embed` over a split whose shards hold a 20000 x 20000 JPEG of a few hundred
    bytes (1.2 GB decoded) and a member declaring 10 GB: refused with exit 2 and one line naming
    the shard and the sample, in a child limited to the clean run's peak + 1 GiB."""
    import shutil

    base = make_root(tmp_path / "root", videos={"train": 2, "val": 4}, frames_per_tracklet=32)
    clean = tmp_path / "clean"
    shutil.copytree(base, clean)
    shards = sorted((base / "shards" / "val").glob("*.tar"))
    members = tar_members(shards[0])
    key = sorted({n.split(".", 1)[0] for n, _ in members})[0]
    write_members(
        shards[0], [(n, jpeg_header(20000, 20000) if n == f"{key}.0001.jpg" else d) for n, d in members]
    )
    code = (
        "from polyp_ssl.eval.embed import main\n"
        "sys.exit(main(['--encoder_ckpt', {ckpt!r}, '--dataset_root', {root!r}, '--split', 'val',"
        " '--name', 'bomb', '--device', 'cpu']))"
    )
    rc, err, base_vm, peak = bounded(
        code.format(ckpt=str(ckpt), root=str(clean)), code.format(ckpt=str(ckpt), root=str(base))
    )
    assert rc == 2 and "Traceback" not in err and "MemoryError" not in err, err[-3000:]
    assert shards[0].name in err and repr(key) in err and "20000x20000" in err, err[-2000:]
    assert peak < base_vm + GIB
    assert not (base / "embeddings" / "bomb.parquet").exists()
    # a member declaring 10 GB at the end of the next shard: a read error, still bounded
    shard = shards[1]
    shard.write_bytes(shard.read_bytes()[:-1024] + TAR_CASES["member_of_10_gb_declared"] + bytes(2048))
    shards[0].write_bytes((clean / "shards" / "val" / shards[0].name).read_bytes())
    rc, err, _, peak = bounded(
        code.format(ckpt=str(ckpt), root=str(clean)), code.format(ckpt=str(ckpt), root=str(base))
    )
    assert rc == 2 and "Traceback" not in err and "MemoryError" not in err, err[-3000:]
    assert shard.name in err, err[-2000:]
    assert peak < base_vm + GIB
