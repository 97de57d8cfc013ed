"""Inputs that are not what their name says (issue class 1) and special files in place of input
files (class 4), through the real `polyp-ssl` CLI where a user would run it.

Class 1: a video is decoded only when its bytes are an allowed container (MP4/MOV, Matroska, AVI)
and images only when they are JPEG, PNG or BMP (ingest/media.py): an HLS playlist or ffconcat script
named `.mp4` never makes the decoder open the file it names. The proof is a FIFO outside the root,
named by the playlist: a watcher polls `open(fifo, O_WRONLY | O_NONBLOCK)`, which succeeds only
while somebody has the FIFO open for reading.

Class 4: a FIFO (or /dev/zero) given as any input file is refused by name, at once
(shards/files.py). Every run that could hang has a timeout, so a regression fails instead of
hanging.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from polyp_ssl.ingest.media import (
    image_format,
    looks_like,
    open_video_reader,
    video_container,
)
from polyp_ssl.ingest.sources import FrameProblem, FrameRequest, iter_decord_video, iter_jpeg_folder
from polyp_ssl.shards.files import NotRegularFileError
from tests import ingest_fixtures as fx
from tests.ingest_fixtures import Track, write_mp4

POLYP_SSL = str(Path(sys.executable).with_name("polyp-ssl"))
TIMEOUT = 60  # seconds; every command here takes about one
SYNTH = ["--videos", "2", "--frames-per-video", "16", "--width", "64", "--height", "64", "--workers", "1"]


def cli(*args: object, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """`polyp-ssl ARGS` as a user runs it; TimeoutExpired (a test failure) if it hangs."""
    return subprocess.run(
        [POLYP_SSL, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """stderr without progress bars and log lines: the lines a failure prints."""
    return [
        line
        for line in proc.stderr.splitlines()
        if line.strip() and not line.startswith(("WARNING", "INFO")) and "%|" not in line
    ]


def in_thread(fn, *args, timeout: float = TIMEOUT):
    """fn(*args) in a daemon thread; its result or exception; a hang fails the test."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{getattr(fn, '__name__', fn)} still running after {timeout} s (it hangs)"
    if "error" in box:
        raise box["error"]
    return box["value"]


def fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        path.unlink() if not path.is_dir() else shutil.rmtree(path)
    os.mkfifo(path)
    return path


class FifoWatch:
    """Detects that anyone opened the FIFO `path` for reading while the watch ran.

    Opening a FIFO for writing with O_NONBLOCK succeeds only while a reader has it open (ENXIO
    otherwise); the watcher closes at once, so a reader that got in sees end of file and goes on."""

    def __init__(self, path: Path) -> None:
        self.path = fifo(path)
        self.opened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                time.sleep(0.002)
                continue
            self.opened += 1
            os.close(fd)

    def __enter__(self) -> FifoWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.05)
        self._stop.set()
        self._thread.join(5)


def hls_playlist(target: Path) -> str:
    return (
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:10\n#EXT-X-MEDIA-SEQUENCE:0\n"
        f"#EXTINF:10.0,\n{target}\n#EXT-X-ENDLIST\n"
    )


def frames(n: int, seed: int = 0) -> list[np.ndarray]:
    return [fx.background(seed, t) for t in range(n)]


# ---------------------------------------------------------------------------- fixtures (module)


@pytest.fixture(scope="module")
def mp4(tmp_path_factory) -> Path:
    """A real 8-frame H.264 MP4 (160 x 128)."""
    path = tmp_path_factory.mktemp("media") / "good.mp4"
    write_mp4(str(path), frames(8))
    return path


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> dict[str, Path]:
    """One small synthetic raw download per converter layout (copied before a test changes it)."""
    base = tmp_path_factory.mktemp("raw")
    for layout in ("sun", "polypsset", "ldpolyp", "table"):
        proc = cli("synth", base / layout, "--layout", layout, "--quiet", *SYNTH)
        assert proc.returncode == 0, proc.stderr
    from tests.convert_factory import build_raw

    build_raw(base / "realcolon")
    return {p.name: p for p in base.iterdir()}


@pytest.fixture
def copy_raw(raw, tmp_path):
    def copy(layout: str) -> Path:
        return Path(shutil.copytree(raw[layout], tmp_path / layout))

    return copy


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> Path:
    """A small ingested root (shards + catalog), read-only; tests copy it to change it."""
    from tests.shard_factory import make_root

    return make_root(
        tmp_path_factory.mktemp("ingested") / "root",
        videos={"train": 1, "val": 1},
        polyps_per_video=1,
        tracklets_per_polyp=1,
        frames_per_tracklet=4,
    )


@pytest.fixture
def root_copy(ingested, tmp_path) -> Path:
    return Path(shutil.copytree(ingested, tmp_path / "root"))


# ---------------------------------------------------------------------------- class 1: pure checks


QUICKTIME = b"\x00\x00\x00\x08wide\x00\x00\x00\x10mdat"


@pytest.mark.parametrize(
    ("head", "container"),
    [
        (b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00", "MP4/MOV"),
        (b"\x00\x00\x00\x14ftyp3gp4\x00\x00\x00\x00", "MP4/MOV"),
        (b"\x00\x00\x00\x14ftypqt  \x00\x00\x00\x00", "MP4/MOV"),
        (QUICKTIME, "MP4/MOV"),
        (b"\x00\x00\x01\x00moov", "MP4/MOV"),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01webm", "Matroska/WebM"),
        (b"RIFF\x10\x00\x00\x00AVI LIST", "AVI"),
        (b"RIFF\x10\x00\x00\x00WAVEfmt ", None),
        (b"#EXTM3U\n#EXTINF:1,\n/etc/passwd\n", None),
        (b"ffconcat version 1.0\nfile /etc/passwd\n", None),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", None),
        (b"", None),
        (b"ftyp", None),  # too short for a box
    ],
)
def test_video_container_by_bytes(head, container):
    assert video_container(head) == container


@pytest.mark.parametrize(
    ("head", "fmt", "words"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "JPEG", "a JPEG image"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "PNG", "a PNG image"),
        (b"#EXTM3U\n", None, "an HLS playlist (#EXTM3U)"),
        (b"\xef\xbb\xbf  #EXTM3U\n", None, "an HLS playlist (#EXTM3U)"),
        (b"ffconcat version 1.0\n", None, "an ffconcat script"),
        (b"v=0\no=- 0 0 IN IP4 127.0.0.1\n", None, "an SDP session description"),
        (b"<!DOCTYPE html><html>", None, "an HTML page"),
        (b"GIF89a\x01\x00", None, "a GIF image"),
        (b"BM" + bytes(12) + (40).to_bytes(4, "little"), "BMP", "a BMP image"),
        (b"BMW is a car\n", None, "a BMP signature without a valid header"),
        (b"just some words\n", None, "text"),
        (b"", None, "an empty file"),
        (b"\x00\x00\x00\x20ftypisom", None, "a video (MP4/MOV)"),
        (b"\x01\x02\x03\x04\x05", None, "unrecognised bytes (0102030405)"),
    ],
)
def test_image_format_and_what_a_file_looks_like(head, fmt, words):
    assert image_format(head) == fmt
    assert looks_like(head) == words


# ---------------------------------------------------------------------------- class 1: decoding


def test_a_real_mp4_and_mkv_still_decode(mp4, tmp_path):
    mkv = tmp_path / "clip.mkv"
    write_mp4(str(mkv), frames(8))
    for path in (mp4, mkv):
        reader = open_video_reader(path, num_threads=1)
        assert len(reader) == 8
        batch = reader.get_batch([0, 7]).asnumpy()
        assert batch.shape == (2, fx.H, fx.W, 3)
        assert np.abs(batch[0].astype(int) - frames(1)[0]).mean() < 12  # the first frame, lossy


def test_the_decoder_reads_the_checked_descriptor_not_the_name(mp4, tmp_path, monkeypatch):
    """The name is replaced by a playlist between the check and the decoder's open: the decoder
    still reads the checked file (it opens /proc/self/fd/N), and never the FIFO."""
    import decord

    path = tmp_path / "clip.mp4"
    shutil.copy(mp4, path)
    seen = []
    real = decord.VideoReader

    def swap_then_open(uri, **kw):
        seen.append(uri)
        path.unlink()
        path.write_text(hls_playlist(tmp_path / "outside.ts"))
        return real(uri, **kw)

    monkeypatch.setattr(decord, "VideoReader", swap_then_open)
    with FifoWatch(tmp_path / "outside.ts") as watch:
        reader = open_video_reader(path, num_threads=1)
        assert len(reader) == 8
    assert seen and seen[0].startswith("/proc/self/fd/")
    assert watch.opened == 0


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("ffconcat", "an ffconcat script"),
        ("html", "an HTML page"),
        ("jpeg", "a JPEG image"),
        ("empty", "an empty file"),
    ],
)
def test_ingest_video_source_refuses_what_is_not_a_container(tmp_path, content, words):
    secret = tmp_path / "outside" / "secret.mp4"
    video = tmp_path / "videos" / "seq.mp4"
    video.parent.mkdir()
    with FifoWatch(secret) as watch:
        if content == "ffconcat":
            video.write_text(f"ffconcat version 1.0\nfile {secret}\n")
        elif content == "html":
            video.write_text(f'<html><body><video src="file://{secret}"></video></body></html>\n')
        elif content == "jpeg":
            Image.fromarray(frames(1)[0]).save(video, format="JPEG")
        else:
            video.write_bytes(b"")
        got = in_thread(
            lambda: list(iter_decord_video(str(video), [FrameRequest(0, "f0"), FrameRequest(1, "f1")]))
        )
    assert watch.opened == 0
    assert [type(f) for _, f in got] == [FrameProblem, FrameProblem]
    problem = got[0][1]
    assert problem.reason == "wrong_media_type" and problem.source == str(video)
    assert words in problem.detail and "not a video container" in problem.detail


@pytest.mark.parametrize(
    ("content", "ok"),
    [("png", True), ("jpeg", True), ("html", False), ("text", False), ("hls", False)],
)
def test_ingest_frames_are_decoded_by_their_bytes(tmp_path, content, ok):
    """A PNG named .jpg is a PNG (decoded, same pixels); HTML/text/playlists named .jpg are refused."""
    images = tmp_path / "root" / "images"
    images.mkdir(parents=True)
    pixels = frames(1)[0]
    path = images / "f.jpg"
    if content in ("png", "jpeg"):
        Image.fromarray(pixels).save(path, format=content.upper())
    else:
        path.write_text(
            {"html": "<html></html>", "text": "hello", "hls": hls_playlist(Path("/x.ts"))}[content]
        )
    ((_, got),) = list(iter_jpeg_folder(str(images), [FrameRequest(0, "f.jpg")]))
    if ok:
        assert isinstance(got, Image.Image) and got.size == (fx.W, fx.H)
        if content == "png":
            assert np.array_equal(np.asarray(got), pixels)
    else:
        assert isinstance(got, FrameProblem) and got.reason == "wrong_media_type"
        assert str(path) in got.detail and "not a JPEG, PNG or BMP image" in got.detail


# ---------------------------------------------------------------------------- class 1: the cases


def table_with_videos(base: Path, good: Path, bad_content: str) -> Path:
    """A table root: video v1 from a real MP4, video v2 from `clip.mp4` holding `bad_content`."""
    (base / "videos").mkdir(parents=True)
    shutil.copy(good, base / "videos" / "v1.mp4")
    (base / "videos" / "clip.mp4").write_text(bad_content)
    rows = ["video,frame,video_path,x,y,w,h,identity,size_mm,histology"]
    rows += [f"v1,{t},videos/v1.mp4,10,10,20,20,v1_p1,5,AD" for t in range(4)]
    rows += [f"v2,{t},videos/clip.mp4,10,10,20,20,v2_p1,5,AD" for t in range(4)]
    (base / "boxes.csv").write_text("\n".join(rows) + "\n")
    return base / "boxes.csv"


def test_table_converter_never_follows_a_playlist_named_mp4(mp4, tmp_path):
    secret = tmp_path / "outside" / "secret.ts"
    with FifoWatch(secret) as watch:
        table = table_with_videos(tmp_path / "site", mp4, hls_playlist(secret))
        failed = cli("convert", "table", table, tmp_path / "out", "--no-progress")
        skipped = cli("convert", "table", table, tmp_path / "out2", "--no-progress", "--on-error", "skip")
    assert watch.opened == 0, "the decoder opened the FIFO the playlist names"
    assert failed.returncode == 1, failed.stderr
    first = error_lines(failed)[0]
    assert str(tmp_path / "site" / "videos" / "clip.mp4") in first and "video_path" in first
    assert "an HLS playlist (#EXTM3U), not a video container" in first
    assert not (tmp_path / "out" / "annotations").exists()
    # skip: the playlist's frames are counted as skipped, only v1's frames are in the dataset
    assert skipped.returncode == 0, skipped.stderr
    coco = json.loads((tmp_path / "out2" / "annotations" / "instances_all.json").read_text())
    assert {i["sequence_id"] for i in coco["images"]} == {"v1"}
    assert sorted(p.parent.name for p in (tmp_path / "out2" / "images").rglob("*.jpg")) == ["v1"] * 4
    report = json.loads((tmp_path / "out2" / "convert_report.json").read_text())
    assert report["skipped"] == {"unreadable_file": 4}
    assert all("HLS playlist" in p["detail"] for p in report["problems"])


@pytest.fixture(scope="module")
def video_root(tmp_path_factory) -> Path:
    """A seed root of two 12-frame videos with their MP4s under videos/ (read-only)."""
    root = tmp_path_factory.mktemp("vroot") / "root"
    videos = {
        ("seqA", None): (
            12,
            [Track("seqA_1", list(range(12)), fx.moving(20, 20, 24, 20, list(range(12))), 4.0)],
        ),
        ("seqB", None): (
            12,
            [Track("seqB_1", list(range(12)), fx.moving(40, 30, 24, 20, list(range(12))), 6.0)],
        ),
    }
    fx.make_root(str(root), videos=videos, mp4=True)
    return root


def test_ingest_videos_dir_never_follows_a_playlist_named_mp4(video_root, tmp_path):
    root = Path(shutil.copytree(video_root, tmp_path / "root"))
    secret = tmp_path / "outside" / "secret.ts"
    with FifoWatch(secret) as watch:
        (root / "videos" / "seqB.mp4").write_text(hls_playlist(secret))
        base = ["ingest", root, "--videos-dir", root / "videos", "--no-progress", "--store-size", "48"]
        failed = cli(*base, "--out", tmp_path / "out")
        skipped = cli(*base, "--out", tmp_path / "out2", "--on-error", "skip")
    assert watch.opened == 0, "the decoder opened the FIFO the playlist names"
    assert failed.returncode == 1, failed.stderr
    (line,) = error_lines(failed)
    assert str(root / "videos" / "seqB.mp4") in line and "[wrong_media_type]" in line
    assert "an HLS playlist (#EXTM3U), not a video container" in line
    assert not (tmp_path / "out" / "catalog" / "manifest.json").exists()
    assert skipped.returncode == 0, skipped.stderr
    tracklets = pq.read_table(tmp_path / "out2" / "catalog" / "tracklets.parquet").to_pylist()
    assert tracklets and {t["video_id"] for t in tracklets} == {"seqA"}
    errors = pq.read_table(tmp_path / "out2" / "catalog" / "errors.parquet").to_pylist()
    refused = [e for e in errors if e["reason"] == "wrong_media_type"]
    assert len(refused) == 12 and all(e["action"] == "skipped" for e in refused)


# ---------------------------------------------------------------------------- class 4: converters


@pytest.mark.parametrize(
    ("layout", "rel", "rc", "words"),
    [
        ("sun", "case_info.csv", 2, "CSV file is a FIFO"),
        ("sun", "annotation_txt/case1.txt", 1, "is a FIFO"),
        ("sun", "case1/case_M_1_image3.jpg", 1, "image is a FIFO"),
        ("polypsset", "test2019/Image/5/3.jpg", 1, "image is a FIFO"),
        ("polypsset", "test2019/Annotation/5/3.xml", 1, "is a FIFO"),
        ("ldpolyp", "Test/Annotations/*/*.txt", 1, "is a FIFO"),
        ("ldpolyp", "TrainValid/Images/*/*.jpg", 1, "image is a FIFO"),
        ("realcolon", "lesion_info.csv", 2, "CSV file is a FIFO"),
        ("realcolon", "video_info.csv", 2, "CSV file is a FIFO"),
        ("realcolon", "001-001_annotations/001-001_2.xml", 1, "is a FIFO"),
        ("realcolon", "001-001_frames/001-001_2.jpg", 1, "frame is a FIFO"),
        ("table", "frames/001-001/0003.jpg", 1, "image is a FIFO"),
    ],
)
def test_a_fifo_among_the_raw_files_of_a_converter_is_refused_by_name(
    copy_raw, tmp_path, layout, rel, rc, words
):
    src = copy_raw(layout)
    path = sorted(src.glob(rel))[0] if "*" in rel else src / rel
    fifo(path)
    args = [
        "convert",
        layout,
        src if layout != "table" else next(src.glob("*.csv")),
        tmp_path / "out",
        "--no-progress",
    ]
    proc = cli(*args)
    assert proc.returncode == rc, proc.stderr
    first = error_lines(proc)[0]
    assert first.startswith("polyp-ssl convert: error: ") and str(path) in first and words in first
    assert not (tmp_path / "out" / "annotations").exists()
    if rc == 1:  # a per-item file: skipped and counted with --on-error skip
        proc = cli(*args[:-1], "--no-progress", "--on-error", "skip")
        assert proc.returncode == 0, proc.stderr
        report = json.loads((tmp_path / "out" / "convert_report.json").read_text())
        assert report["n_skipped"] >= 1
        assert any(str(path) in (p["source"] + p["detail"]) for p in report["problems"])


def test_a_fifo_as_the_table_itself_or_its_video_is_refused(copy_raw, mp4, tmp_path):
    src = copy_raw("table")
    table = fifo(src / "boxes.csv")
    proc = cli("convert", "table", table, tmp_path / "out", "--no-progress")
    assert proc.returncode == 2 and error_lines(proc) == [
        f"polyp-ssl convert: error: {table}: table is a FIFO (named pipe), not a regular file"
    ]
    table = table_with_videos(tmp_path / "site", mp4, "")
    fifo(tmp_path / "site" / "videos" / "clip.mp4")
    proc = cli("convert", "table", table, tmp_path / "out", "--no-progress")
    assert proc.returncode == 1, proc.stderr
    assert "clip.mp4: video_path file is a FIFO (named pipe)" in error_lines(proc)[0]


def test_a_fifo_as_the_annotation_file_of_split_and_ingest(video_root, tmp_path):
    root = Path(shutil.copytree(video_root, tmp_path / "root", ignore=shutil.ignore_patterns("videos")))
    ann = fifo(root / "annotations" / "instances_train.json")
    proc = cli("split", root, "--fractions", "0.5,0.5")
    assert proc.returncode == 2, proc.stderr
    assert error_lines(proc) == [
        f"polyp-ssl split: error: {ann}: annotation file is a FIFO (named pipe), not a regular file"
    ]
    proc = cli("ingest", root, "--out", tmp_path / "out", "--no-progress")
    assert proc.returncode == 1, proc.stderr
    (line,) = error_lines(proc)
    assert str(ann) in line and "is a FIFO" in line and "[not_regular_file]" in line


def test_a_fifo_frame_in_ingest_is_named_and_skipped(video_root, tmp_path):
    root = Path(shutil.copytree(video_root, tmp_path / "root", ignore=shutil.ignore_patterns("videos")))
    frame = fifo(root / "images" / "seqB_0003.jpg")
    proc = cli("ingest", root, "--out", tmp_path / "out", "--no-progress", "--store-size", "48")
    assert proc.returncode == 1, proc.stderr
    (line,) = error_lines(proc)
    assert str(frame) in line and "is a FIFO" in line and "[not_regular_file]" in line
    proc = cli(
        "ingest", root, "--out", tmp_path / "out", "--no-progress", "--store-size", "48", "--on-error", "skip"
    )
    assert proc.returncode == 0, proc.stderr
    errors = pq.read_table(tmp_path / "out" / "catalog" / "errors.parquet").to_pylist()
    assert [e["source"] for e in errors if e["reason"] == "not_regular_file"] == [str(frame)]


# ---------------------------------------------------------------------------- class 4: shards, catalog, eval


def test_a_fifo_in_place_of_a_shard(root_copy):
    from polyp_ssl.shards.members import MemberSpan, SpanReader
    from polyp_ssl.shards.reader import iter_samples, open_shard

    shard = fifo(root_copy / "shards" / "val" / "val-000000.tar")
    with pytest.raises(NotRegularFileError, match="shard is a FIFO"):
        in_thread(open_shard, str(shard))
    with pytest.raises(NotRegularFileError, match="shard is a FIFO"):
        in_thread(lambda: list(iter_samples([shard])))
    with pytest.raises(NotRegularFileError, match="shard is a FIFO"):
        in_thread(SpanReader().read, str(shard), MemberSpan(512, 10, 0))
    proc = cli("verify", "--no-progress", root_copy)
    assert proc.returncode == 1
    assert (
        f"not_regular_file: shards/val/val-000000.tar: {shard}: shard is a FIFO" in proc.stdout + proc.stderr
    )
    proc = cli("embed", "--dataset_root", root_copy, "--split", "val", "--encoder_ckpt", "descriptor")
    assert proc.returncode == 2
    assert error_lines(proc) == [
        f"polyp-ssl embed: {shard}: shard is a FIFO (named pipe), not a regular file"
    ]


@pytest.mark.parametrize("name", ["manifest.json", "tracklets.parquet"])
def test_a_fifo_in_the_catalog(root_copy, name):
    path = fifo(root_copy / "catalog" / name)
    proc = cli("catalog", root_copy, "SELECT count(*) FROM tracklets")
    assert proc.returncode != 0
    assert str(path) in proc.stderr and "is a FIFO" in proc.stderr


@pytest.mark.parametrize(
    ("weights", "kind"), [("fifo", "a FIFO (named pipe)"), ("/dev/zero", "a character device")]
)
def test_zoo_weights_that_are_a_fifo_or_a_device(root_copy, tmp_path, weights, kind):
    path = fifo(tmp_path / "w.pth") if weights == "fifo" else Path(weights)
    proc = cli("embed", "--dataset_root", root_copy, "--split", "val", "--encoder", "zoo:gastronet-resnet50",
               "--weights", path)  # fmt: skip
    assert proc.returncode == 2
    assert error_lines(proc) == [f"polyp-ssl embed: {path}: weights file is {kind}, not a regular file"]


@pytest.mark.parametrize("weights", ["fifo", "/dev/zero"])
def test_backbone_weights_that_are_a_fifo_or_a_device(tmp_path, weights):
    from polyp_ssl.weights import resolve_backbone_state_dict

    path = fifo(tmp_path / "backbone.pth") if weights == "fifo" else Path(weights)
    with pytest.raises(NotRegularFileError, match=f"{path}: backbone weights file is a"):
        in_thread(resolve_backbone_state_dict, "resnet18", str(path))


def test_a_fifo_as_encoder_ckpt_or_config(root_copy, tmp_path, capsys):
    """In-process (the dispatcher's own main, in a thread with a timeout): these commands import
    torch before they read the file, which a subprocess pays again each time (the CLI runs are
    in the slow test below)."""
    from polyp_ssl.entry import main as entry_main
    from polyp_ssl.train_cli import resolve_config

    ckpt = fifo(tmp_path / "enc.ckpt")
    capsys.readouterr()
    rc = in_thread(
        entry_main,
        ["embed", "--dataset_root", str(root_copy), "--split", "train", "--encoder_ckpt", str(ckpt)],
    )
    assert rc == 2
    assert capsys.readouterr().err.splitlines() == [
        f"polyp-ssl embed: {ckpt}: checkpoint is a FIFO (named pipe), not a regular file"
    ]
    config = fifo(tmp_path / "run.yaml")
    with pytest.raises(ValueError, match=f"--config {config}: {config}: config file is a FIFO"):
        in_thread(resolve_config, ["--config", str(config)])
    for dev in ("/dev/zero", "/dev/null"):
        with pytest.raises(ValueError, match=f"{dev}: config file is a character device"):
            in_thread(resolve_config, ["--config", dev])


@pytest.mark.slow
def test_a_fifo_as_encoder_ckpt_or_config_through_the_cli(root_copy, tmp_path):
    ckpt = fifo(tmp_path / "enc.ckpt")
    proc = cli("embed", "--dataset_root", root_copy, "--split", "train", "--encoder_ckpt", ckpt, timeout=240)
    assert proc.returncode == 2
    assert error_lines(proc) == [
        f"polyp-ssl embed: {ckpt}: checkpoint is a FIFO (named pipe), not a regular file"
    ]
    config = fifo(tmp_path / "run.yaml")
    proc = cli("train", "--config", config, timeout=240)
    assert proc.returncode == 2
    assert error_lines(proc) == [
        f"polyp-ssl train: error: --config {config}: {config}: config file is a FIFO (named pipe), "
        "not a regular file"
    ]


def test_a_fifo_as_metrics_csv_or_embeddings_file(root_copy, tmp_path):
    metrics = fifo(tmp_path / "run" / "logs" / "version_0" / "metrics.csv")
    proc = cli("curves", tmp_path / "run")
    assert proc.returncode == 2
    assert error_lines(proc) == [
        f"polyp-ssl curves: error: {metrics}: metrics CSV is a FIFO (named pipe), not a regular file"
    ]
    emb = fifo(root_copy / "embeddings" / "e.parquet")
    proc = cli("eval", "--task", "reid", "--embeddings", emb)
    assert proc.returncode == 2, proc.stderr
    assert error_lines(proc) == [
        f"polyp-ssl eval: error: {emb}: embeddings file is a FIFO (named pipe), not a regular file"
    ]
    from polyp_ssl.eval.embeddings import EmbeddingsError, read_embeddings

    with pytest.raises(EmbeddingsError, match="embeddings file is a FIFO"):
        in_thread(read_embeddings, emb)
