"""File-transfer rules without processes: peer names made safe, numbered names,
IncomingFile (whole or nothing, never overwriting) and the sender's checks."""

from __future__ import annotations

import errno
import hashlib
import os
import unicodedata
from pathlib import Path

import pytest
from conftest import files_in, jpeg_of_size, make_jpeg

import transfer
from protocol import MAX_NAME, Reason, RemoteProtocolError
from transfer import IncomingFile, Rejected, check_outgoing, numbered, sanitise_name

JPEG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 40 + b"\xff\xd9"


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def visible(directory: Path) -> list[str]:
    return [n for n in files_in(directory) if not n.startswith(".")]


# --- sanitise_name ------------------------------------------------------------------
@pytest.mark.parametrize(("offered", "expected"), [
    # path components: basename only, whatever the separator
    ("../../etc/passwd.jpg", "passwd.jpg"),
    ("/abs/x.jpg", "x.jpg"),
    ("..\\..\\windows\\evil.jpg", "evil.jpg"),
    ("back\\slash.jpg", "slash.jpg"),
    ("sub/dir/", "received.jpg"),
    # nothing usable
    ("..", "received.jpg"),
    (".", "received.jpg"),
    ("", "received.jpg"),
    ("   ", "received.jpg"),
    ("\x00\x01\x1b", "received.jpg"),
    ("...", "received.jpg"),
    # no leading dot, however it is hidden behind spaces or controls
    (".hidden.jpg", "hidden.jpg"),
    ("...hidden.jpg", "hidden.jpg"),
    (" .hidden.jpg", "hidden.jpg"),
    (". .hidden.jpg", "hidden.jpg"),
    (". . x.jpg", "x.jpg"),
    ("\x00.x.jpg", "x.jpg"),
    ("x/. .y.jpg", "y.jpg"),
    (". . .", "received.jpg"),
    # control characters, ANSI escapes, bidi overrides and other format characters
    ("a\x00b.jpg", "ab.jpg"),
    ("tab\there.jpg", "tabhere.jpg"),
    ("\x1b[2Jclear.jpg", "[2Jclear.jpg"),
    ("\u202egpj.exe", "gpj_exe.jpg"),
    ("\u202ephoto\u202c.jpg", "photo.jpg"),
    ("evil.jpg\u202e", "evil.jpg"),
    ("x\u200b.jpg", "x.jpg"),
    ("\u2028line.jpg", "line.jpg"),
    # always a JPEG name; other extensions made inert
    ("photo.jpg\x00.exe", "photo_jpg_exe.jpg"),
    ("photo.jpg.exe", "photo_jpg_exe.jpg"),
    ("report.pdf", "report_pdf.jpg"),
    ("photo.jpg.", "photo_jpg_.jpg"),
    ("noext", "noext.jpg"),
    (".JPG", "JPG.jpg"),
    (".jpg", "jpg.jpg"),
    # the extension's case is kept; .jpeg is a JPEG too
    ("photo.JPG", "photo.JPG"),
    ("x.JpEg", "x.JpEg"),
    ("photo.jpeg", "photo.jpeg"),
    # Unicode and inner spaces are fine; outer spaces go
    ("  café photo.jpg  ", "café photo.jpg"),
    ("Ünïcødé 写真.jpeg", "Ünïcødé 写真.jpeg"),
    ("photo .jpg", "photo.jpg"),
    ("my holiday 2024 (best).jpg", "my holiday 2024 (best).jpg"),
])
def test_sanitise_name(offered: str, expected: str):
    assert sanitise_name(offered) == expected


@pytest.mark.parametrize(("offered", "expected"), [
    ("a" * 1000 + ".jpg", "a" * 251 + ".jpg"),  # exactly 255 bytes
    ("x" * 1000, "x" * 251 + ".jpg"),
    ("../" + "A" * 1000 + ".JPG", "A" * 251 + ".JPG"),
    ("é" * 1000 + ".jpg", "é" * 125 + ".jpg"),  # 2-byte chars: never half a character
    ("€" * 1000 + ".jpeg", "€" * 83 + ".jpeg"),  # 3-byte chars
    ("a" * 1000 + " .jpg", "a" * 251 + ".jpg"),
    ("a" * 250 + " " + "b" * 100 + ".jpg", "a" * 250 + ".jpg"),  # no trailing space left
])
def test_sanitise_name_bounds_long_names_and_keeps_the_extension(offered, expected):
    out = sanitise_name(offered)
    assert out == expected
    assert len(out.encode("utf-8")) <= MAX_NAME


@pytest.mark.parametrize("offered", [
    "../../etc/passwd.jpg", "/abs/x.jpg", "..", ".hidden.jpg", "a\x00b.jpg",
    "\x1b[2Jclear.jpg", "\u202egpj.exe", "z" * 1000, ". .x.jpeg", "\u00a0.x.jpg",
    "\ufeff.x.jpg", "x\r\n.jpg", "con\x7f.jpg", "é" * 999 + ".exe",
])
def test_sanitised_names_are_safe(offered):
    out = sanitise_name(offered)
    assert out and out not in (".", "..")
    assert "/" not in out and "\\" not in out
    assert not out.startswith(".") and not out[0].isspace()
    assert out.lower().endswith((".jpg", ".jpeg"))
    assert all(unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp")
               for ch in out)
    assert 0 < len(out.encode("utf-8")) <= MAX_NAME
    assert sanitise_name(out) == out  # a safe name stays as it is


# --- numbered -----------------------------------------------------------------------
def test_numbered_names():
    assert numbered("photo.jpg", 0) == "photo.jpg"
    assert numbered("photo.jpg", 1) == "photo (1).jpg"
    assert numbered("photo.jpg", 12) == "photo (12).jpg"
    assert numbered("Photo.JPEG", 2) == "Photo (2).JPEG"
    assert numbered("café photo.jpg", 3) == "café photo (3).jpg"
    assert numbered("received.jpg", 1) == "received (1).jpg"


@pytest.mark.parametrize(("name", "n", "expected"), [
    ("a" * 251 + ".jpg", 3, "a" * 247 + " (3).jpg"),
    ("é" * 125 + ".jpg", 7, "é" * 123 + " (7).jpg"),
    ("€" * 83 + ".jpeg", 10000, "€" * 80 + " (10000).jpeg"),
])
def test_numbered_names_stay_within_the_limit(name, n, expected):
    out = numbered(name, n)
    assert out == expected
    assert len(out.encode("utf-8")) <= MAX_NAME


# --- IncomingFile -------------------------------------------------------------------
def receive(directory: Path, name: str, data: bytes, chunk: int = 1000) -> tuple[str, bytes]:
    inc = IncomingFile(directory, name, len(data))
    for i in range(0, len(data), chunk):
        inc.write(data[i:i + chunk])
    return inc.finish(sha(data))


@pytest.mark.parametrize("unnamed", [True, False], ids=["O_TMPFILE", "named-fallback"])
def test_a_full_receive_writes_the_exact_bytes(tmp_path: Path, monkeypatch, unnamed: bool):
    monkeypatch.setattr(transfer, "USE_O_TMPFILE", unnamed)
    data = JPEG
    inc = IncomingFile(tmp_path, "../sneaky/photo.jpg", len(data))
    # while it is being written, nothing visible: no file at all (O_TMPFILE), or
    # only the hidden temporary file (the fallback)
    inc.write(data[:5000])
    names = files_in(tmp_path)
    assert os.fstat(inc._fd).st_mode & 0o777 == 0o600  # private while incomplete
    if unnamed:
        assert names == []
    else:
        assert len(names) == 1 and names[0].startswith(transfer.TEMP_PREFIX)
        assert (tmp_path / names[0]).stat().st_mode & 0o777 == 0o600
        assert names[0].endswith(transfer.TEMP_SUFFIX)
    assert visible(tmp_path) == []
    inc.write(memoryview(data)[5000:])  # memoryviews are fine too
    assert visible(tmp_path) == []
    saved, digest = inc.finish(sha(data))
    assert (saved, digest) == ("photo.jpg", sha(data))
    assert files_in(tmp_path) == ["photo.jpg"]  # the temporary file is gone
    assert (tmp_path / "photo.jpg").read_bytes() == data
    assert (tmp_path / "photo.jpg").stat().st_mode & 0o777 == transfer.RECEIVED_MODE
    assert not (tmp_path.parent / "sneaky").exists()


def test_a_real_jpeg_round_trips(tmp_path: Path):
    src = make_jpeg(tmp_path / "src" / "p.jpg", (80, 60), progressive=True, exif=True)
    data = src.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    assert receive(out, "p.jpg", data, chunk=333) == ("p.jpg", sha(data))
    assert (out / "p.jpg").read_bytes() == data


def test_smallest_jpeg_is_three_bytes(tmp_path: Path):
    assert receive(tmp_path, "tiny.jpg", b"\xff\xd8\xff", chunk=1) == ("tiny.jpg",
                                                                       sha(b"\xff\xd8\xff"))
    assert (tmp_path / "tiny.jpg").read_bytes() == b"\xff\xd8\xff"


@pytest.mark.parametrize("unnamed", [True, False], ids=["O_TMPFILE", "named-fallback"])
def test_never_overwrites(tmp_path: Path, monkeypatch, unnamed: bool):
    monkeypatch.setattr(transfer, "USE_O_TMPFILE", unnamed)  # both ways into place link()
    first = JPEG
    second = JPEG[:-2] + b"\x00\xff\xd9"
    third = JPEG + b"3"
    assert receive(tmp_path, "photo.jpg", first)[0] == "photo.jpg"
    assert receive(tmp_path, "photo.jpg", second)[0] == "photo (1).jpg"
    assert receive(tmp_path, "/elsewhere/photo.jpg", third)[0] == "photo (2).jpg"
    assert files_in(tmp_path) == ["photo (1).jpg", "photo (2).jpg", "photo.jpg"]
    assert (tmp_path / "photo.jpg").read_bytes() == first
    assert (tmp_path / "photo (1).jpg").read_bytes() == second
    assert (tmp_path / "photo (2).jpg").read_bytes() == third


def test_an_existing_symlink_is_neither_followed_nor_replaced(tmp_path: Path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    target = tmp_path / "outside.jpg"
    (inbox / "photo.jpg").symlink_to(target)  # dangling, pointing outside
    assert receive(inbox, "photo.jpg", JPEG)[0] == "photo (1).jpg"
    assert not target.exists()
    assert (inbox / "photo.jpg").is_symlink()
    assert (inbox / "photo (1).jpg").read_bytes() == JPEG


def test_not_a_jpeg_is_rejected_on_the_first_bytes_and_nothing_is_left(tmp_path: Path):
    png = b"\x89PNG\r\n\x1a\n" + bytes(100)
    inc = IncomingFile(tmp_path, "fake.jpg", len(png))
    with pytest.raises(Rejected) as e:
        inc.write(png)
    assert e.value.reason == Reason.NOT_JPEG
    assert "not a JPEG" in e.value.detail
    assert files_in(tmp_path) == []
    inc.abort()  # idempotent
    assert files_in(tmp_path) == []


def test_not_a_jpeg_is_caught_when_its_first_bytes_come_one_at_a_time(tmp_path: Path):
    inc = IncomingFile(tmp_path, "fake.jpg", 10)
    inc.write(b"\xff")
    inc.write(b"\xd8")
    with pytest.raises(Rejected) as e:
        inc.write(b"\x00" + bytes(7))
    assert e.value.reason == Reason.NOT_JPEG
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("size", [0, 1, 2])
def test_an_offer_shorter_than_a_jpeg_header_is_not_a_jpeg(tmp_path: Path, size: int):
    with pytest.raises(Rejected) as e:
        IncomingFile(tmp_path, "x.jpg", size)
    assert e.value.reason == Reason.NOT_JPEG
    assert files_in(tmp_path) == []


def test_size_over_the_maximum_is_too_large(tmp_path: Path):
    with pytest.raises(Rejected) as e:
        IncomingFile(tmp_path, "big.jpg", 1001, max_size=1000)
    assert e.value.reason == Reason.TOO_LARGE
    assert e.value.detail == "1001 bytes exceeds the receiver's limit of 1000"
    assert files_in(tmp_path) == []
    # exactly at the limit is fine
    inc = IncomingFile(tmp_path, "big.jpg", 1000, max_size=1000)
    inc.abort()
    assert files_in(tmp_path) == []


def test_default_limit_is_4_gib_and_sizes_beyond_4_gib_are_representable(tmp_path: Path):
    assert transfer.DEFAULT_MAX_FILE_SIZE == 4 << 30
    with pytest.raises(Rejected) as e:
        IncomingFile(tmp_path, "huge.jpg", (4 << 30) + 1)
    assert e.value.reason == Reason.TOO_LARGE


def test_an_offer_larger_than_the_free_space_is_refused_up_front(tmp_path, monkeypatch):
    real = os.statvfs(tmp_path)

    class Full:
        f_frsize = real.f_frsize
        f_bavail = 10

    monkeypatch.setattr(transfer.os, "statvfs", lambda path: Full)
    with pytest.raises(Rejected) as e:
        IncomingFile(tmp_path, "x.jpg", Full.f_frsize * 10 + 1)
    assert e.value.reason == Reason.NO_SPACE
    assert e.value.detail == "not enough disk space on the receiver"
    assert files_in(tmp_path) == []


def test_hash_mismatch_is_rejected_and_nothing_is_left(tmp_path: Path):
    inc = IncomingFile(tmp_path, "photo.jpg", len(JPEG))
    inc.write(JPEG)
    with pytest.raises(Rejected) as e:
        inc.finish(sha(JPEG + b"other"))
    assert e.value.reason == Reason.HASH_MISMATCH
    assert files_in(tmp_path) == []
    inc.abort()
    assert files_in(tmp_path) == []


def test_short_data_is_the_peers_protocol_error_and_abort_leaves_nothing(tmp_path: Path):
    inc = IncomingFile(tmp_path, "photo.jpg", len(JPEG))
    inc.write(JPEG[:-1])
    with pytest.raises(RemoteProtocolError, match=f"after {len(JPEG) - 1} of {len(JPEG)}"):
        inc.finish(sha(JPEG[:-1]))
    inc.abort()
    assert files_in(tmp_path) == []


def test_data_beyond_the_announced_size_is_the_peers_protocol_error(tmp_path: Path):
    inc = IncomingFile(tmp_path, "photo.jpg", len(JPEG))
    inc.write(JPEG[:100])
    with pytest.raises(RemoteProtocolError, match="beyond the announced size"):
        inc.write(JPEG[100:] + b"!")
    inc.abort()
    assert files_in(tmp_path) == []


def test_abort_mid_transfer_leaves_nothing(tmp_path: Path):
    inc = IncomingFile(tmp_path, "photo.jpg", len(JPEG))
    inc.write(JPEG[:10])
    inc.abort()
    inc.abort()
    assert files_in(tmp_path) == []


@pytest.mark.parametrize(("err", "reason", "detail"), [
    (errno.ENOSPC, Reason.NO_SPACE, "not enough disk space on the receiver"),
    (errno.EDQUOT, Reason.NO_SPACE, "not enough disk space on the receiver"),
    (errno.EIO, Reason.WRITE_FAILED, "receiver cannot write the file: Input/output error"),
])
def test_a_failing_disk_write_is_rejected_and_the_temp_file_removed(tmp_path, monkeypatch,
                                                                    err, reason, detail):
    inc = IncomingFile(tmp_path, "photo.jpg", len(JPEG))
    inc.write(JPEG[:100])
    real_write = os.write
    failing_fd = inc._fd

    def write(fd, data):
        if fd == failing_fd:
            raise OSError(err, os.strerror(err))
        return real_write(fd, data)

    monkeypatch.setattr(transfer.os, "write", write)
    with pytest.raises(Rejected) as e:
        inc.write(JPEG[100:])
    assert (e.value.reason, e.value.detail) == (reason, detail)
    assert files_in(tmp_path) == []
    inc.abort()
    assert files_in(tmp_path) == []


def test_a_failing_fsync_is_rejected_and_nothing_appears(tmp_path, monkeypatch):
    inc = IncomingFile(tmp_path, "photo.jpg", len(JPEG))
    inc.write(JPEG)

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(transfer.os, "fsync", fsync)
    with pytest.raises(Rejected) as e:
        inc.finish(sha(JPEG))
    assert e.value.reason == Reason.NO_SPACE
    assert files_in(tmp_path) == []
    monkeypatch.undo()
    inc.abort()
    assert files_in(tmp_path) == []


def test_an_early_flush_that_failed_fails_the_file_even_if_a_later_fsync_succeeds(
        tmp_path, monkeypatch):
    # a batch flushes each file early (several at once), then finishes it: the error
    # of that first fsync must not be lost, as a second fsync can succeed although
    # the data never reached the disk
    inc = IncomingFile(tmp_path, "photo.jpg", len(JPEG))
    inc.write(JPEG)
    real, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(transfer.os, "fsync", fsync)
    inc.flush()
    with pytest.raises(Rejected) as e:
        inc.finish(sha(JPEG))
    assert (e.value.reason, e.value.detail) == \
        (Reason.WRITE_FAILED, "receiver cannot write the file: Input/output error")
    assert files_in(tmp_path) == []


def test_a_received_dir_that_cannot_take_files_is_rejected(tmp_path: Path):
    missing = tmp_path / "gone"
    with pytest.raises(Rejected) as e:
        IncomingFile(missing, "photo.jpg", len(JPEG))
    assert e.value.reason == Reason.WRITE_FAILED
    assert not missing.exists()


# --- check_outgoing (the sender's checks) -----------------------------------------------
def test_check_outgoing_accepts_a_jpeg(tmp_path: Path):
    p = make_jpeg(tmp_path / "Holiday Photo.JPEG")
    out = check_outgoing(p)
    assert (out.path, out.name, out.size) == (p, "Holiday Photo.JPEG", p.stat().st_size)


def test_check_outgoing_accepts_exactly_the_limit(tmp_path: Path):
    p = jpeg_of_size(tmp_path / "edge.jpg", 5000)
    assert check_outgoing(p, max_size=5000).size == 5000


def png(path: Path) -> Path:
    from PIL import Image

    buf = Path(path)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PNG")
    return buf


@pytest.mark.parametrize(("case", "reason", "message"), [
    ("missing", Reason.UNSPECIFIED, "{p}: no such file"),
    ("directory", Reason.UNSPECIFIED, "{p}: not a regular file"),
    ("png renamed", Reason.NOT_JPEG, "{p}: not a JPEG (no FF D8 FF start-of-image marker)"),
    ("not .jpg", Reason.NOT_JPEG, "{p}: not a .jpg/.jpeg file"),
    ("too big", Reason.TOO_LARGE, "{p}: 5001 bytes exceeds the limit of 5000"),
    ("empty", Reason.NOT_JPEG, "{p}: not a JPEG (no FF D8 FF start-of-image marker)"),
    ("two bytes", Reason.NOT_JPEG, "{p}: not a JPEG (no FF D8 FF start-of-image marker)"),
])
def test_check_outgoing_refusals(tmp_path: Path, case, reason, message):
    p = {
        "missing": lambda: tmp_path / "missing.jpg",
        "directory": lambda: (tmp_path / "folder.jpg").mkdir() or tmp_path / "folder.jpg",
        "png renamed": lambda: png(tmp_path / "fake.jpg"),
        "not .jpg": lambda: make_jpeg(tmp_path / "real.jpg").rename(tmp_path / "real.png")
        or tmp_path / "real.png",
        "too big": lambda: jpeg_of_size(tmp_path / "big.jpg", 5001),
        "empty": lambda: jpeg_of_size(tmp_path / "empty.jpg", 0),
        "two bytes": lambda: jpeg_of_size(tmp_path / "two.jpg", 2),
    }[case]()
    with pytest.raises(Rejected) as e:
        check_outgoing(p, max_size=5000)
    assert e.value.reason == reason
    assert e.value.detail == message.format(p=p)


def test_list_assets_lists_jpegs_only_any_case_sorted_with_sizes(tmp_path: Path):
    for name in ("b.JPG", "a.jpeg", "c.png", "d.jpg.txt"):
        jpeg_of_size(tmp_path / name, 10)
    (tmp_path / "dir.jpg").mkdir()
    assert [(p.name, size) for p, size in transfer.list_assets(tmp_path)] == [
        ("a.jpeg", 10), ("b.JPG", 10)]
    assert transfer.list_assets(tmp_path / "missing") == []


def test_direct_io_path_and_its_fallbacks_write_the_exact_bytes(tmp_path):
    """Page-aligned whole pages take the O_DIRECT path where the filesystem allows it;
    an unaligned buffer, an odd length and the tail fall back to ordinary writes.
    Whatever path each chunk takes, the file must be bit-exact."""
    import hashlib
    import mmap

    pages = mmap.mmap(-1, 3 * 4096)
    pages.write(b"\xff\xd8\xff" + os.urandom(3 * 4096 - 3))
    aligned = memoryview(pages)
    unaligned = bytes(os.urandom(5000))  # a bytes object: no alignment promise
    chunks = [aligned[:8192], aligned[8192:], unaligned, aligned[:4096], b"tail"]
    expected = b"".join(bytes(c) for c in chunks)
    incoming = transfer.IncomingFile(tmp_path, "direct.jpg", len(expected))
    for c in chunks:
        incoming.write(c)
    saved, digest = incoming.finish(hashlib.sha256(expected).digest())
    assert (tmp_path / saved).read_bytes() == expected
    assert digest == hashlib.sha256(expected).digest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["direct.jpg"]


def test_sizes_beyond_4_gib_are_64_bit_on_the_wire_and_in_the_offer_check(tmp_path):
    """No 32-bit size anywhere: a 5 GiB offer survives encoding, and the receiver's
    limit check compares the full 64-bit value (not tested by moving 5 GiB)."""
    from protocol import FileOffer

    five_gib = 5 << 30
    offer = FileOffer.decode(FileOffer(1, five_gib, "huge.jpg").encode())
    assert offer.size == five_gib
    with pytest.raises(Rejected) as r:
        IncomingFile(tmp_path, "huge.jpg", five_gib, max_size=4 << 30)
    assert r.value.reason == Reason.TOO_LARGE
    assert files_in(tmp_path) == []


def test_a_named_temp_file_stays_private_until_it_is_verified(tmp_path, monkeypatch):
    """Where there is no O_TMPFILE the temp file has a name in the directory: flushed
    whole, it still waits (its turn, then the SHA-256 check) as 0600, and a file
    whose check fails is never readable by others."""
    monkeypatch.setattr(transfer, "USE_O_TMPFILE", False)
    data = b"\xff\xd8\xff" + os.urandom(5000)
    inc = transfer.IncomingFile(tmp_path, "photo.jpg", len(data))
    inc.write(data)
    inc.flush()
    assert inc.temp is not None and inc.temp.stat().st_mode & 0o777 == 0o600
    with pytest.raises(transfer.Rejected) as e:
        inc.finish(hashlib.sha256(b"something else").digest())
    assert e.value.reason == Reason.HASH_MISMATCH
    assert files_in(tmp_path) == []
    inc = transfer.IncomingFile(tmp_path, "photo.jpg", len(data))
    inc.write(data)
    inc.flush()
    assert inc.temp.stat().st_mode & 0o777 == 0o600
    saved, _ = inc.finish(hashlib.sha256(data).digest())
    assert (tmp_path / saved).stat().st_mode & 0o777 == transfer.RECEIVED_MODE
