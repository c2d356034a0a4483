"""Photo metadata (issue 13): what a JPEG carries, and the same JPEG without it.

The photos are made by Pillow in the tests; the EXIF blocks are built here by hand
(a small TIFF writer) so that every tag, offset and thumbnail is exactly known and
can be mangled.  Stripping must be lossless: the same pixels, the orientation and
the ICC profile kept, no sensitive byte left anywhere in the file.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import struct
import tracemalloc
from pathlib import Path

import pytest
from conftest import Env, files_in, make_jpeg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import session
import transfer

MAKE, MODEL, SERIAL = b"QSocketMakeCo", b"QSocketModel9", b"SN4711BODY0815"
DATE = b"2026:07:14 12:34:56"
XMP_PACKET = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description '
              b'exif:GPSLatitude="48,51.4932N" exif:GPSLongitude="2,17.7342E"/></x:xmpmeta>')
IPTC_BODY = b"Photoshop 3.0\x008BIM\x04\x04\x00\x00\x00\x00\x00\x12\x1c\x02\x5a\x00\x0eSecret City"
COMMENT = b"taken at home, 12 Example Street"
EVERYTHING = (transfer.GPS, transfer.SERIAL, transfer.MAKE_MODEL, transfer.THUMBNAIL,
              transfer.OTHER_EXIF, transfer.XMP, transfer.IPTC, transfer.COMMENT)
SOS = b"\xff\xda"


# --- a small TIFF/EXIF writer ----------------------------------------------------------
ASCII, SHORT, LONG, RATIONAL = 2, 3, 4, 5


def rationals(order: str, *pairs: tuple[int, int]) -> bytes:
    return b"".join(struct.pack(order + "II", n, d) for n, d in pairs)


def ifd(order: str, at: int, entries: list, next_ifd: int = 0) -> bytes:
    """One IFD placed at offset `at`, its out-of-line values right after it."""
    head = struct.pack(order + "H", len(entries))
    extra = b""
    data_at = at + 2 + 12 * len(entries) + 4
    for tag, typ, count, payload in sorted(entries):
        if len(payload) <= 4:
            field = payload.ljust(4, b"\0")
        else:
            field = struct.pack(order + "I", data_at + len(extra))
            extra += payload + b"\0" * (len(payload) % 2)
        head += struct.pack(order + "HHI", tag, typ, count) + field
    return head + struct.pack(order + "I", next_ifd) + extra


def exif_block(order: str = ">", *, gps: bool = True, serial: bool = True, make: bool = True,
               orientation: int | None = 6, thumbnail: bytes | None = None) -> bytes:
    """TIFF bytes (what follows Exif\\0\\0): IFD0 -> EXIF IFD, GPS IFD, IFD1 + thumbnail."""
    def asc(text: bytes):
        return ASCII, len(text) + 1, text + b"\0"

    def short(v: int):
        return SHORT, 1, struct.pack(order + "H", v)

    def long(v: int):
        return LONG, 1, struct.pack(order + "I", v)

    def layout(offsets: dict[str, int]) -> dict[str, bytes]:
        ifd0 = [(0x0131, *asc(b"QSocket tests"))]
        if make:
            ifd0 += [(0x010F, *asc(MAKE)), (0x0110, *asc(MODEL))]
        if orientation is not None:
            ifd0.append((0x0112, *short(orientation)))
        ifd0.append((0x8769, *long(offsets["exif"])))
        if gps:
            ifd0.append((0x8825, *long(offsets["gps"])))
        exif = [(0x9003, *asc(DATE))]
        if serial:
            exif.append((0xA431, *asc(SERIAL)))
        parts = {"ifd0": ifd(order, 8, ifd0, offsets.get("ifd1", 0) if thumbnail else 0),
                 "exif": ifd(order, offsets["exif"], exif)}
        if gps:
            parts["gps"] = ifd(order, offsets["gps"], [
                (1, ASCII, 2, b"N\0"), (2, RATIONAL, 3, rationals(order, (48, 1), (51, 1),
                                                                  (2959, 100))),
                (3, ASCII, 2, b"E\0"), (4, RATIONAL, 3, rationals(order, (2, 1), (17, 1),
                                                                  (4405, 100)))])
        if thumbnail:
            parts["ifd1"] = ifd(order, offsets["ifd1"], [
                (0x0103, *short(6)), (0x0201, *long(offsets["thumb"])),
                (0x0202, *long(len(thumbnail)))])
            parts["thumb"] = thumbnail
        return parts

    names = ["ifd0", "exif"] + (["gps"] if gps else []) + (["ifd1", "thumb"] if thumbnail else [])
    offsets = dict.fromkeys(names, 0)
    for _ in range(2):  # sizes do not depend on offsets: the second pass places them
        parts = layout(offsets)
        at = 8
        for name in names:
            offsets[name] = at
            at += len(parts[name])
    parts = layout(offsets)
    prefix = b"MM" if order == ">" else b"II"
    return prefix + struct.pack(order + "HI", 42, 8) + b"".join(parts[n] for n in names)


def gps_bytes(order: str) -> bytes:
    return rationals(order, (48, 1), (51, 1), (2959, 100))


def insert_segments(jpeg: bytes, *segments: tuple[int, bytes]) -> bytes:
    """Put APPn/COM segments right after SOI and the JFIF APP0 (if any)."""
    at = 2
    if jpeg[2:4] == b"\xff\xe0":
        at = 4 + struct.unpack(">H", jpeg[4:6])[0] - 2 + 2
    new = b"".join(struct.pack(">BBH", 0xFF, m, len(body) + 2) + body for m, body in segments)
    return jpeg[:at] + new + jpeg[at:]


def icc_profile() -> bytes:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def thumbnail_jpeg() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.frombytes("RGB", (16, 12), os.urandom(16 * 12 * 3)).save(out, "JPEG")
    return out.getvalue()


def photo(path: Path, *, order: str = ">", mode: str = "RGB", progressive: bool = False,
          icc: bytes | None = None, everything: bool = True, size=(96, 64)) -> Path:
    """A noisy photo with EXIF (GPS, make/model, serial, orientation 6, thumbnail) and,
    when `everything`, XMP with a location, IPTC and a comment."""
    from PIL import Image

    img = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
    if mode != "RGB":
        img = img.convert(mode)
    kwargs = {"exif": b"Exif\0\0" + exif_block(order, thumbnail=thumbnail_jpeg()),
              "quality": 90, "progressive": progressive}
    if icc:
        kwargs["icc_profile"] = icc
    out = io.BytesIO()
    img.save(out, "JPEG", **kwargs)
    data = out.getvalue()
    if everything:
        data = insert_segments(data, (0xE1, transfer.ID_XMP + XMP_PACKET), (0xED, IPTC_BODY),
                               (0xFE, COMMENT))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def stripped_bytes(path: Path) -> bytes:
    """The bytes --strip-metadata sends, through the same reader the sender uses."""
    out = transfer.without_metadata(transfer.check_outgoing(path))
    buf = memoryview(bytearray(1 << 16))
    parts = []
    with transfer.open_outgoing(out) as f:
        while n := f.readinto(buf):
            parts.append(bytes(buf[:n]))
    data = b"".join(parts)
    assert len(data) == out.size
    return data


def pixels(data: bytes):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.mode, im.size, im.tobytes(), im.getexif(), im.info


def first_scan(data: bytes) -> int:
    return transfer.parse_photo(io.BytesIO(data), len(data)).pieces[-1][0]


def image_data(path: Path) -> bytes:
    """The original from its first scan on (what must arrive byte for byte)."""
    offset, length = transfer.read_photo(path).pieces[-1]
    return path.read_bytes()[offset:]


def assert_clean(data: bytes, order: str = ">") -> None:
    for secret in (MAKE, MODEL, SERIAL, DATE, gps_bytes(order), b"GPSLatitude", b"Secret City",
                   COMMENT, b"Photoshop", b"http://ns.adobe.com/xap"):
        assert secret not in data, secret


# --- what a photo carries, and the same photo without it ----------------------------
@pytest.mark.parametrize("order", [">", "<"], ids=["big-endian", "little-endian"])
def test_a_photo_with_everything_is_described_and_stripped_losslessly(tmp_path: Path,
                                                                      order: str):
    icc = icc_profile()
    src = photo(tmp_path / "holiday.jpg", order=order, icc=icc)
    original = src.read_bytes()
    thumb = transfer.read_photo(src)
    assert thumb.carries == EVERYTHING
    assert thumb.orientation == 6

    data = stripped_bytes(src)
    assert len(data) == thumb.stripped_size < len(original)
    mode, size, raw, exif, info = pixels(data)
    assert (mode, size, raw) == pixels(original)[:3]  # the same pixels
    assert dict(exif) == {0x0112: 6}  # only the orientation is left
    assert info["icc_profile"] == icc  # the colour profile is unchanged
    assert data.startswith(b"\xff\xd8\xff\xe0\x00\x10JFIF\0")  # JFIF kept first
    assert data.endswith(image_data(src))  # image data copied byte for byte
    assert_clean(data, order)
    exif_in_original = original[original.index(b"Exif\0\0"):]
    assert exif_in_original.find(thumbnail_marker := b"\xff\xd8\xff", 6) > 0  # a thumbnail...
    assert data.count(thumbnail_marker) == 1  # ...that is gone: one SOI, the photo's own

    # stripping a stripped photo changes nothing, and it says it carries nothing
    again = tmp_path / "again.jpg"
    again.write_bytes(data)
    assert transfer.read_photo(again).carries == ()
    assert stripped_bytes(again) == data
    assert session.metadata_note(again) == "no metadata"
    assert session.metadata_note(src) == ("carries GPS location, camera serial, camera "
                                          "make/model, thumbnail, other EXIF, XMP, IPTC, comment")


def test_a_progressive_photo_stays_progressive_with_the_same_pixels(tmp_path: Path):
    src = photo(tmp_path / "p.jpg", progressive=True, size=(200, 120))
    data = stripped_bytes(src)
    mode, size, raw, exif, info = pixels(data)
    assert info.get("progressive")
    assert (mode, size, raw) == pixels(src.read_bytes())[:3]
    assert dict(exif) == {0x0112: 6}
    assert data.endswith(image_data(src))
    assert_clean(data)


def test_a_cmyk_photo_keeps_its_adobe_segment(tmp_path: Path):
    src = photo(tmp_path / "cmyk.jpg", mode="CMYK")
    original = src.read_bytes()
    adobe = original.index(b"\xff\xee")
    segment = original[adobe: adobe + 2 + struct.unpack(">H", original[adobe + 2: adobe + 4])[0]]
    assert segment[4:9] == b"Adobe"
    data = stripped_bytes(src)
    assert segment in data
    mode, size, raw, exif, _ = pixels(data)
    assert mode == "CMYK" and (mode, size, raw) == pixels(original)[:3]
    assert dict(exif) == {0x0112: 6}
    assert_clean(data)


@pytest.mark.parametrize("kind", ["plain", "icc", "orientation only"])
def test_a_photo_without_anything_to_remove_is_left_as_it_is(tmp_path: Path, kind: str):
    from PIL import Image

    src = tmp_path / "p.jpg"
    kwargs = {}
    if kind == "icc":
        kwargs["icc_profile"] = icc_profile()
    if kind == "orientation only":
        kwargs["exif"] = transfer.minimal_exif(3)[4:]
    Image.frombytes("RGB", (40, 30), os.urandom(40 * 30 * 3)).save(src, "JPEG", **kwargs)
    found = transfer.read_photo(src)
    assert found.carries == ()
    assert found.orientation == (3 if kind == "orientation only" else None)
    assert stripped_bytes(src) == src.read_bytes()


def test_a_jfif_thumbnail_and_other_segments_are_removed(tmp_path: Path):
    jpeg = make_jpeg(tmp_path / "a.jpg", (32, 24), noise=True).read_bytes()
    assert jpeg[2:4] == b"\xff\xe0"
    # a JFIF APP0 with a 2x1 RGB thumbnail, a JFXX extension and two unknown APPn
    jfif = b"JFIF\0\x01\x02\x00\x00\x01\x00\x01\x02\x01" + b"\x10\x20\x30\x40\x50\x60"
    rest = jpeg[4 + struct.unpack(">H", jpeg[4:6])[0]:]
    data = (b"\xff\xd8" + struct.pack(">BBH", 0xFF, 0xE0, len(jfif) + 2) + jfif + rest)
    data = insert_segments(data, (0xE0, b"JFXX\0\x10" + b"\x99" * 20),
                           (0xEC, b"Ducky\0secret"), (0xE2, b"FPXR\0flashpix"))
    src = tmp_path / "b.jpg"
    src.write_bytes(data)
    assert transfer.read_photo(src).carries == (transfer.THUMBNAIL, transfer.OTHER)
    out = stripped_bytes(src)
    assert out[:20] == b"\xff\xd8\xff\xe0\x00\x10JFIF\0\x01\x02\x00\x00\x01\x00\x01\x00\x00"
    for gone in (b"\x10\x20\x30\x40\x50\x60", b"JFXX", b"Ducky", b"FPXR"):
        assert gone not in out
    assert pixels(out)[:3] == pixels(data)[:3]


# --- malformed headers: a defined error, never a crash --------------------------------
@pytest.mark.parametrize("mangle, message", [
    (lambda d: d[:1], "the file ends inside a segment"),
    (lambda d: b"\x00\x00" + d[2:], "no start-of-image marker"),
    (lambda d: d[:2] + b"\xff\xe1\x00\x01" + d[2:], "bad length"),
    (lambda d: d[:2] + b"\xff\xe1\xff\xff" + d[2:100], "bad length"),
    (lambda d: d[:2] + b"\xff\xd9" + d[2:], "unexpected marker FFD9"),
    (lambda d: d[:2] + b"\x00" + d[2:], "no marker at byte 2"),
    (lambda d: d[:first_scan(d)], "no marker at byte"),
])
def test_broken_segment_structure_is_a_metadata_error(tmp_path: Path, mangle, message):
    data = mangle(photo(tmp_path / "a.jpg").read_bytes())
    with pytest.raises(transfer.MetadataError, match=message):
        transfer.parse_photo(io.BytesIO(data), len(data))


def exif_photo(tiff: bytes) -> bytes:
    jpeg = insert_segments(b"\xff\xd8\xff\xdb\x00\x04\x00\x00\xff\xda\x00\x02\x00",
                           (0xE1, b"Exif\0\0" + tiff))
    return jpeg


@pytest.mark.parametrize("tiff, message", [
    (b"MM\x00\x2a\x00\x00\xff\xff", "EXIF offset outside its block"),
    (b"MM\x00\x2a\x00\x00\x00\x08\x00\x40", "EXIF directory runs past its block"),
    (b"XX\x00\x2a\x00\x00\x00\x08", "EXIF without a TIFF header"),
    (b"MM\x00\x2b\x00\x00\x00\x08", "bad TIFF header"),
    # IFD0 whose next-IFD pointer points back at itself
    (b"MM\x00\x2a\x00\x00\x00\x08\x00\x00\x00\x00\x00\x08", "loop"),
    # an EXIF sub-IFD pointer past the end
    (b"MM\x00\x2a\x00\x00\x00\x08\x00\x01\x87\x69\x00\x04\x00\x00\x00\x01\x00\x00\x10\x00"
     b"\x00\x00\x00\x00", "EXIF offset outside its block"),
    # a sub-IFD pointer that is not a LONG
    (b"MM\x00\x2a\x00\x00\x00\x08\x00\x01\x88\x25\x00\x02\x00\x00\x00\x01\x00\x00\x00\x08"
     b"\x00\x00\x00\x00", "wrong type"),
])
def test_exif_pointing_outside_its_block_or_looping_is_a_metadata_error(tiff: bytes,
                                                                        message: str):
    data = exif_photo(tiff)
    with pytest.raises(transfer.MetadataError, match=message):
        transfer.parse_photo(io.BytesIO(data), len(data))


def _good() -> bytes:
    from PIL import Image

    img = Image.frombytes("RGB", (16, 16), bytes(range(256)) * 3)
    out = io.BytesIO()
    img.save(out, "JPEG", exif=b"Exif\0\0" + exif_block("<", thumbnail=b"\xff\xd8\xff\xd9"))
    return insert_segments(out.getvalue(), (0xFE, COMMENT), (0xE1, transfer.ID_XMP + b"x"))


GOOD = _good()
HEADER_END = first_scan(GOOD)


def check_parse(data: bytes) -> None:
    """parse_photo gives MetadataError or a plan whose pieces lie inside the file and
    whose output, parsed again, carries nothing and strips to itself."""
    try:
        found = transfer.parse_photo(io.BytesIO(data), len(data))
    except transfer.MetadataError:
        return
    out = b""
    for piece in found.pieces:
        if isinstance(piece, bytes):
            out += piece
        else:
            offset, length = piece
            assert 0 <= offset and length >= 0 and offset + length <= len(data)
            out += data[offset: offset + length]
    assert len(out) == found.stripped_size
    again = transfer.parse_photo(io.BytesIO(out), len(out))
    assert again.carries == ()
    assert again.orientation == found.orientation


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, HEADER_END + 8), st.integers(0, 255)), max_size=8),
       st.integers(0, len(GOOD)))
def test_mangled_header_bytes_and_truncation_never_crash(flips, cut):
    data = bytearray(GOOD)
    for at, value in flips:
        data[at] = value
    check_parse(bytes(data[:cut]))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 0xFFFF), st.integers(0, 40))
def test_any_segment_length_never_crashes(length, which):
    # overwrite the length field of the which-th segment before the scan
    data = bytearray(GOOD)
    offsets = [m.start() for m in re.finditer(rb"\xff[\xc0-\xfe]", bytes(data[:HEADER_END]))]
    at = offsets[which % len(offsets)]
    data[at + 2: at + 4] = struct.pack(">H", length)
    check_parse(bytes(data))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 0xFFFFFFFF)), max_size=4))
def test_exif_offsets_anywhere_never_crash(patches):
    # 32-bit values written over the EXIF block: IFD offsets, counts, pointers
    start = GOOD.index(b"Exif\0\0") + 6
    data = bytearray(GOOD)
    for rel, value in patches:
        at = start + rel
        if at + 4 <= HEADER_END:
            data[at: at + 4] = struct.pack("<I", value)
    check_parse(bytes(data))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_after_the_start_of_image_never_crash(tail):
    check_parse(b"\xff\xd8" + tail)


# --- a large photo streams without being read whole ---------------------------------------
class CountingFile(io.FileIO):
    """A raw file that counts the bytes read through it."""

    bytes_read = 0

    def read(self, n=-1):
        data = super().read(n)
        CountingFile.bytes_read += len(data)
        return data

    def readinto(self, b):
        n = super().readinto(b)
        CountingFile.bytes_read += n or 0
        return n


def test_a_1_gib_photo_is_inspected_from_its_header_and_stripped_in_constant_memory(
        tmp_path: Path):
    src = photo(tmp_path / "big.jpg")
    header = src.read_bytes()
    size = 1 << 30
    with open(src, "r+b") as f:  # sparse: 1 GiB of "image data" after the real header
        f.truncate(size)

    # inspecting it reads the segments before the scan only
    CountingFile.bytes_read = 0
    with CountingFile(src, "rb") as f:
        found = transfer.parse_photo(f, size)
    assert found.carries == EVERYTHING
    assert CountingFile.bytes_read < len(header) + 1024
    tail_offset, tail_length = found.pieces[-1]
    assert tail_offset + tail_length == size

    # streaming it as the sender does: one reused buffer, memory stays flat
    out = transfer.without_metadata(transfer.check_outgoing(src, size))
    new_header = sum(len(p) if isinstance(p, bytes) else p[1] for p in found.pieces[:-1])
    assert out.size == found.stripped_size == new_header + size - tail_offset
    buf = memoryview(bytearray(session.CHUNK_SIZE))
    sent = 0
    tracemalloc.start()
    try:
        with transfer.open_outgoing(out) as f:
            while n := f.readinto(buf):
                sent += n
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sent == out.size  # what was planned is what was read
    assert peak < 256 * 1024, peak  # no copy of the file, nor of a 1 MiB chunk


# --- end to end: batch mode ------------------------------------------------------------------
SUMMARY = r"(\d+) bytes, SHA-256 ([0-9a-f]{64}), \d+\.\d\d s(?:, \d+(?:\.\d)? (?:B|KiB|MiB|GiB)/s)?"


def send(env: Env, port: int, *args: str):
    return env.client("--port", str(port), "--accept-new-host", *args)


def test_batch_strip_metadata_sends_the_stripped_bytes_and_both_sides_say_so(env: Env):
    src = photo(env.assets / "holiday.jpg", icc=icc_profile())
    plain = make_jpeg(env.assets / "plain.jpg", (40, 30), noise=True)
    expected = stripped_bytes(src)
    digest = hashlib.sha256(expected).hexdigest()
    srv = env.server()
    r = send(env, srv.port, "--strip-metadata", "--send-file", str(src), "--send-file", str(plain))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2, r.stdout
    first = re.fullmatch(rf"sent 'holiday\.jpg': {SUMMARY}, without metadata", lines[0])
    assert first and first.groups() == (str(len(expected)), digest)
    assert re.fullmatch(rf"sent 'plain\.jpg': {SUMMARY}, without metadata", lines[1])
    saved = env.server_received / "holiday.jpg"
    assert saved.read_bytes() == expected
    assert (env.server_received / "plain.jpg").read_bytes() == plain.read_bytes()
    m = srv.wait_for(rf"\] received 'holiday\.jpg': {SUMMARY} \(no metadata\), "
                     rf"saved at {re.escape(str(saved))}$")
    assert m.groups() == (str(len(expected)), digest)
    srv.wait_for(r"\] received 'plain\.jpg': .* \(no metadata\), saved at ")


def test_without_the_flag_a_photo_goes_byte_for_byte_and_the_receiver_names_what_it_carries(
        env: Env):
    src = photo(env.assets / "holiday.jpg")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    srv = env.server()
    r = send(env, srv.port, "--send-file", str(src))
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(rf"sent 'holiday\.jpg': {SUMMARY}\n", r.stdout)  # unchanged line
    saved = env.server_received / "holiday.jpg"
    assert saved.read_bytes() == src.read_bytes()
    m = srv.wait_for(rf"\] received 'holiday\.jpg': {SUMMARY} \(carries GPS location, camera "
                     rf"serial, camera make/model, thumbnail, other EXIF, XMP, IPTC, comment\), "
                     rf"saved at ")
    assert m.groups() == (str(src.stat().st_size), digest)


def test_batch_strip_metadata_refuses_a_photo_it_cannot_parse(env: Env):
    broken = env.assets / "broken.jpg"  # an APP0 longer than the file
    broken.write_bytes(b"\xff\xd8\xff\xe0\xff\xff" + os.urandom(5000))
    srv = env.server()
    r = send(env, srv.port, "--strip-metadata", "--send-text", "before", "--send-file",
             str(broken))
    assert r.returncode == 5
    assert r.stdout == ""  # refused before connecting: not even the text went
    assert r.stderr.splitlines()[-1] == (
        f"error: file not sent: {broken}: cannot read its metadata (segment FFE0 at byte 2 "
        f"has a bad length), so it cannot be sent without it (without --strip-metadata it "
        f"goes as is)")
    assert files_in(env.server_received) == []
    # without the flag the same file goes as is, as before
    r = send(env, srv.port, "--send-file", str(broken))
    assert r.returncode == 0, r.stderr
    assert (env.server_received / "broken.jpg").read_bytes() == broken.read_bytes()
    srv.wait_for(r"\] received 'broken\.jpg': .* \(metadata not readable\), saved at ")


def test_a_zero_sub_directory_pointer_means_none(tmp_path: Path):
    # some writers leave a GPS pointer of 0 for "no GPS": that is no location, not junk
    tiff = (b"MM\x00\x2a\x00\x00\x00\x08\x00\x02"
            + struct.pack(">HHIHH", 0x0112, SHORT, 1, 8, 0)
            + struct.pack(">HHII", 0x8825, LONG, 1, 0) + b"\x00\x00\x00\x00")
    data = exif_photo(tiff)
    found = transfer.parse_photo(io.BytesIO(data), len(data))
    assert found.carries == ()
    assert found.orientation == 8


def with_mpf(primary: bytes, extra: bytes, *, claimed: int | None = None) -> bytes:
    """primary + extra as a multi-picture file: an MPF index in the primary's header
    (CIPA DC-007) saying the first image is the primary, the second the extra."""
    def index(primary_size: int) -> bytes:
        entries = struct.pack(">IIIHH", 0x20030000, primary_size, 0, 0, 0)
        entries += struct.pack(">IIIHH", 0x00020002, len(extra), primary_size, 0, 0)
        tiff = b"MM\x00\x2a\x00\x00\x00\x08" + ifd(">", 8, [
            (0xB000, 7, 4, b"0100"), (0xB001, LONG, 1, struct.pack(">I", 2)),
            (0xB002, 7, len(entries), entries)])
        return transfer.ID_MPF + tiff

    size = len(insert_segments(primary, (0xE2, index(0))))  # the index's size is fixed
    whole = insert_segments(primary, (0xE2, index(size if claimed is None else claimed)))
    assert len(whole) == size
    return whole + extra


@pytest.mark.filterwarnings("ignore:Image appears to be a malformed MPO file")
def test_extra_images_after_the_photo_are_named_and_dropped(tmp_path: Path):
    # phones append extra images (depth, gain maps) after the photo's EOI; here the extra
    # image carries the location: stripping must not send it along
    from PIL import Image

    out = io.BytesIO()
    Image.frombytes("RGB", (48, 32), os.urandom(48 * 32 * 3)).save(out, "JPEG")
    primary = out.getvalue()
    extra = photo(tmp_path / "extra.jpg", everything=False).read_bytes()
    src = tmp_path / "multi.jpg"
    src.write_bytes(with_mpf(primary, extra))
    found = transfer.read_photo(src)
    assert found.carries == (transfer.EXTRA,)
    data = stripped_bytes(src)
    assert data == primary  # the index and the extra image gone, the photo byte for byte
    assert_clean(data)


@pytest.mark.parametrize("claimed", [10, 1 << 20, -1])
def test_an_mpf_index_that_does_not_match_the_file_is_a_metadata_error(tmp_path: Path,
                                                                         claimed: int):
    primary = make_jpeg(tmp_path / "a.jpg", (16, 16)).read_bytes()
    extra = make_jpeg(tmp_path / "b.jpg", (8, 8)).read_bytes()
    size = len(with_mpf(primary, b""))
    data = with_mpf(primary, extra, claimed=size - 1 if claimed == -1 else claimed)
    with pytest.raises(transfer.MetadataError, match="the MPF index does not match the file"):
        transfer.parse_photo(io.BytesIO(data), len(data))


GOOD_MPF = with_mpf(GOOD, b"\xff\xd8\xff\xe1\x00\x08Exif\0\0\xff\xd9")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 120), st.integers(0, 0xFFFFFFFF)), max_size=4),
       st.integers(0, len(GOOD_MPF)))
def test_mangled_mpf_indexes_and_truncated_multi_picture_files_never_crash(patches, cut):
    start = GOOD_MPF.index(transfer.ID_MPF) + len(transfer.ID_MPF)
    data = bytearray(GOOD_MPF)
    for rel, value in patches:
        data[start + rel: start + rel + 4] = struct.pack(">I", value)
    check_parse(bytes(data[:cut]))


# --- the receiver's note comes from the bytes it kept, not from reading the file back ------
def receive(directory: Path, data: bytes, chunk: int = 1 << 20) -> tuple[transfer.IncomingFile,
                                                                            Path]:
    """data received as IncomingFile does it, in chunks; the file and where it was saved."""
    incoming = transfer.IncomingFile(directory, "photo.jpg", len(data))
    for at in range(0, len(data), chunk):
        incoming.write(data[at: at + chunk])
    saved, _digest = incoming.finish(hashlib.sha256(data).digest())
    return incoming, directory / saved


def test_the_saved_line_describes_a_photo_from_its_kept_bytes_without_reading_it_back(
        tmp_path: Path, monkeypatch):
    data = photo(tmp_path / "src" / "a.jpg").read_bytes()
    assert first_scan(data) < transfer.HEAD_KEPT
    incoming, path = receive(tmp_path, data, chunk=1000)
    expected = session.metadata_note(path)
    assert expected == ("carries GPS location, camera serial, camera make/model, thumbnail, "
                        "other EXIF, XMP, IPTC, comment")

    def no_read_back(path):
        raise AssertionError(f"{path} was read back")
    monkeypatch.setattr(transfer, "read_photo", no_read_back)
    assert session.metadata_note(path, incoming) == expected


def test_a_header_longer_than_the_kept_bytes_is_read_back_from_the_saved_file(tmp_path: Path,
                                                                               monkeypatch):
    # two 60 KiB comments before the scan: the walk leaves the first 64 KiB
    data = insert_segments(photo(tmp_path / "src" / "a.jpg", everything=False).read_bytes(),
                           (0xFE, b"c" * 60_000), (0xFE, b"d" * 60_000))
    assert first_scan(data) > transfer.HEAD_KEPT
    incoming, path = receive(tmp_path, data)
    assert incoming.photo() is None
    read_back = []
    real = transfer.read_photo
    monkeypatch.setattr(transfer, "read_photo", lambda p: read_back.append(p) or real(p))
    assert session.metadata_note(path, incoming) == (
        "carries GPS location, camera serial, camera make/model, thumbnail, other EXIF, "
        "comment")
    assert read_back == [path]


@pytest.mark.filterwarnings("ignore:Image appears to be a malformed MPO file")
def test_extra_images_are_named_from_the_kept_bytes_or_the_file_alike(tmp_path: Path):
    # the MPF check looks at the photo's end, past the kept bytes of a large file
    primary = photo(tmp_path / "p.jpg", everything=False).read_bytes()
    for extra in (b"\xff\xd8\xff\xd9", os.urandom(100_000)):
        data = with_mpf(primary, extra)
        incoming, path = receive(tmp_path, data)
        assert session.metadata_note(path, incoming) == session.metadata_note(path)
        assert "extra images" in session.metadata_note(path)
        path.unlink()


@settings(max_examples=200, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, HEADER_END + 8), st.integers(0, 255)), max_size=8),
       st.integers(3, len(GOOD)), st.sampled_from([8, 100, 1 << 16]))
def test_the_kept_bytes_give_the_note_the_file_gives(tmp_path_factory, flips, cut, kept):
    # any header, cut anywhere, with any number of bytes kept: the same note either way
    data = bytearray(GOOD)
    for at, value in flips:
        data[at] = value
    data = bytes(data[:cut])
    if not data.startswith(transfer.JPEG_SOI):
        return  # refused as not a JPEG before any of this
    directory = tmp_path_factory.mktemp("kept")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transfer, "HEAD_KEPT", kept)
        incoming, path = receive(directory, data, chunk=37)
    assert session.metadata_note(path, incoming) == session.metadata_note(path)
