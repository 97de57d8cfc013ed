"""What a media file is, decided by its first bytes, never by its name; and the one way videos are opened.

A video decoder (FFmpeg, under decord) picks its demuxer by probing the content, not the name:
a `clip.mp4` that is really an HLS playlist (`#EXTM3U` naming `/etc/...` or a device), an
ffconcat script or an SDP file is followed, and the decoder reads files (or URLs) outside the
dataset root while every path check only saw `clip.mp4`. So a video is decoded only when its
head is one of the allowed containers (`video_container`: MP4/MOV/3GP, Matroska/WebM, AVI),
none of which names another input: a playlist, a concat script or an SDP file cannot start
with those bytes.

Inside an allowed container the one indirection FFmpeg knows is the QuickTime data reference
(`dref` alias of a track's media in another file). FFmpeg's mov demuxer follows it only with its
private option `enable_drefs`, off by default (`mov_options` in libavformat/mov.c; the build
decord ships, libavformat 58.20 / FFmpeg 4.1, logs "Skipped opening external track ... Set
enable_drefs to allow this" instead), and decord never sets it. Matroska and AVI have no
reference to another file that FFmpeg opens.

`open_video_reader` opens the file itself (a regular file only, never blocking:
`shards.files.open_regular_fd`), checks the head on that descriptor, and hands decord
`/proc/self/fd/N` (`fd_path`), so the decoder opens exactly the checked file even if the name is
replaced in between. Images read by the converters and by ingest pass `image_format` (JPEG, PNG, BMP)
where they are decoded.
"""

from __future__ import annotations

import os
from typing import Any, BinaryIO

from polyp_ssl.shards.files import fd_path, open_regular_fd

HEAD_BYTES = 64  # enough for every signature below

# QuickTime files written before `ftyp` existed start with one of these top-level boxes.
_QUICKTIME_BOXES = (b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot")
_JPEG = b"\xff\xd8"  # SOI; a damaged JPEG after it is PIL's to report (unreadable, not mislabelled)
_PNG = b"\x89PNG\r\n\x1a\n"
_EBML = b"\x1a\x45\xdf\xa3"
_BMP_DIB = (12, 40, 52, 56, 64, 108, 124)  # the sizes a BMP's DIB header can have (at byte 14)

# Known heads of what is not an allowed media file, for the message (first match wins).
_LOOKS_LIKE: tuple[tuple[bytes, str], ...] = (
    (b"#EXTM3U", "an HLS playlist (#EXTM3U)"),
    (b"ffconcat", "an ffconcat script"),
    (b"v=0", "an SDP session description"),
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP signature without a valid header"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a zip archive"),
    (b"\x1f\x8b", "a gzip file"),
    (b"\x00\x00\x01\xba", "an MPEG program stream"),
    (b"FLV", "an FLV stream"),
    (b"OggS", "an Ogg stream"),
    (b"ID3", "an MP3 file"),
    (b"<?xml", "XML text"),
)


class MediaTypeError(ValueError):
    """A media file whose content is not an allowed container/format. A ValueError naming the
    file and what it looks like; `bad_input` tells a dispatcher it is bad input (exit 2)."""

    bad_input = True

    def __init__(self, path: str | os.PathLike[str], message: str) -> None:
        self.filename = os.fspath(path)
        super().__init__(f"{self.filename}: {message}")


def video_container(head: bytes) -> str | None:
    """The allowed video container whose signature `head` starts with ("MP4/MOV", "Matroska/WebM",
    "AVI"), or None."""
    if len(head) >= 8 and (head[4:8] == b"ftyp" or head[4:8] in _QUICKTIME_BOXES):
        return "MP4/MOV"
    if head.startswith(_EBML):
        return "Matroska/WebM"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "AVI"
    return None


def image_format(head: bytes) -> str | None:
    """The image format `head` starts with: "JPEG" (SOI marker FFD8), "PNG" or "BMP" (the
    PolypsSet and LDPolypVideo converters accept .bmp frames); None otherwise."""
    if head.startswith(_JPEG):
        return "JPEG"
    if head.startswith(_PNG):
        return "PNG"
    if head.startswith(b"BM") and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_DIB:
        return "BMP"
    return None


def looks_like(head: bytes) -> str:
    """What a head that is neither an allowed video nor an allowed image looks like, in words
    (for the message): a playlist, a script, another format, text, or unknown bytes."""
    if not head:
        return "an empty file"
    if (fmt := image_format(head)) is not None:
        return f"a {fmt} image"
    if (container := video_container(head)) is not None:
        return f"a video ({container})"
    stripped = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    for signature, name in _LOOKS_LIKE:
        if stripped.startswith(signature):
            return name
    if head.startswith(b"RIFF"):
        return "a RIFF file that is not AVI"
    lower = stripped[:16].lower()
    if lower.startswith((b"<!doctype html", b"<html")):
        return "an HTML page"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text):
        return "text"
    return f"unrecognised bytes ({head[:8].hex()})"


def check_video_head(path: str | os.PathLike[str], head: bytes) -> str:
    """The container of a video file's `head`; MediaTypeError naming `path` and what it looks like
    when it is not an allowed container."""
    container = video_container(head)
    if container is None:
        raise MediaTypeError(
            path, f"{looks_like(head)}, not a video container (allowed: MP4/MOV, Matroska/WebM, AVI)"
        )
    return container


def check_image_head(path: str | os.PathLike[str], head: bytes) -> str:
    """The format of an image file's `head`; MediaTypeError naming `path` and what it looks like
    when it is not JPEG, PNG or BMP."""
    fmt = image_format(head)
    if fmt is None:
        raise MediaTypeError(path, f"{looks_like(head)}, not a JPEG, PNG or BMP image")
    return fmt


def check_image_file(f: BinaryIO, path: str | os.PathLike[str]) -> str:
    """Check the head of an opened image file `f` (read from its start, position restored)."""
    pos = f.tell()
    head = f.read(HEAD_BYTES)
    f.seek(pos)
    return check_image_head(path, head)


def open_video_reader(path: str | os.PathLike[str], what: str = "video file", **kwargs: Any) -> Any:
    """A `decord.VideoReader` of the video file `path` (kwargs passed on), decoded only when `path`
    is a regular file whose head is an allowed container: NotRegularFileError (an OSError) or
    MediaTypeError (a ValueError) naming the path otherwise, before the decoder sees anything.

    The decoder opens `/proc/self/fd/N` of the descriptor that was checked and keeps its own
    open file, so the descriptor is closed once the reader exists."""
    fd = open_regular_fd(path, what)
    try:
        check_video_head(path, os.pread(fd, HEAD_BYTES, 0))
        import decord

        return decord.VideoReader(fd_path(fd), **kwargs)
    finally:
        os.close(fd)
