"""The loader's own tar header parser agrees with tarfile on every format tarfile writes, and
refuses damaged tars the way tarfile does (tarfile.ReadError)."""

import gzip
import io
import tarfile

import pytest

from polyp_ssl.shards.reader import _number, iter_tar_members, read_members

NAMES = [
    "a.json",
    "a.0000.jpg",
    "empty.txt",
    "exact512.bin",
    "d" * 30 + "/sub/" + "k" * 80 + ".0001.jpg",  # over 100 characters: prefix, GNU long name or pax path
    "x" * 150 + ".json",  # a long name without a '/' to split on
    "ünïcode-κλειδί.json",
]


def payload(i: int, name: str) -> bytes:
    if name == "empty.txt":
        return b""
    if name == "exact512.bin":
        return bytes(range(256)) * 2
    return (f"{i}:{name}".encode() * (37 * i + 1))[: 1000 * i + 7]


def make_tar(fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for i, name in enumerate(NAMES):
            if fmt == tarfile.USTAR_FORMAT and len(name.encode()) > 100 and "/" not in name:
                continue  # ustar cannot store it
            data = payload(i, name)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "a.0000.jpg"
        tar.addfile(link)
    return buf.getvalue()


def by_tarfile(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_same_members_as_tarfile(fmt):
    data = make_tar(fmt)
    expected = by_tarfile(data)
    assert len(expected) >= 6
    assert list(iter_tar_members(io.BytesIO(data))) == expected
    assert list(read_members(io.BytesIO(data))) == expected


def test_select_skips_bytes_and_reports_the_name():
    data = make_tar(tarfile.GNU_FORMAT)
    got = list(iter_tar_members(io.BytesIO(data), select=lambda n: n.endswith(".json")))
    assert [n for n, _ in got] == [n for n, _ in by_tarfile(data)]
    assert all((d is None) != n.endswith(".json") for n, d in got)


def test_compressed_tar_goes_through_tarfile():
    data = make_tar(tarfile.PAX_FORMAT)
    assert list(read_members(io.BytesIO(gzip.compress(data)))) == by_tarfile(data)


def test_damaged_tars_raise_read_error():
    data = make_tar(tarfile.GNU_FORMAT)
    bad = bytearray(data)
    bad[600] ^= 0xFF  # inside the second header (after the directory's): checksum no longer matches
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(iter_tar_members(io.BytesIO(bytes(bad))))
    for cut in (700, 512 + 512 + 100, len(data) // 2):
        with pytest.raises(tarfile.ReadError, match="unexpected end"):
            list(iter_tar_members(io.BytesIO(data[:cut])))
    # without the end-of-archive blocks the members are all there (tarfile reads it the same way)
    end = len(data) - 1024
    while data[end - 512 : end] == bytes(512):
        end -= 512
    assert list(iter_tar_members(io.BytesIO(data[:end]))) == by_tarfile(data)


def test_numbers():
    assert _number(b"0000644\0", "mode") == 0o644
    assert _number(b"   12 \0", "size") == 0o12
    assert _number(b"\x80" + (5 << 40).to_bytes(11, "big"), "size") == 5 << 40  # GNU base-256
    with pytest.raises(tarfile.ReadError, match="size"):
        _number(b"12x4\0", "size")


def test_malformed_pax_header_is_a_read_error():
    data = bytearray(make_tar(tarfile.PAX_FORMAT))
    # the first long name is stored in a pax header ("NN path=..."); break its length digits
    at = data.find(b" path=")
    data[at - 3 : at] = b"x9z"
    with pytest.raises(tarfile.ReadError):
        list(iter_tar_members(io.BytesIO(bytes(data))))
