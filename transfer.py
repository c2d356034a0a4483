"""File-transfer rules shared by both sides: what may be sent, how a peer's name
becomes a safe local name, and how a received file reaches the disk whole or
not at all (temp file -> fsync -> verify -> link into place)."""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import os
import re
import stat
import struct
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from protocol import MAX_NAME, Reason, RemoteProtocolError, TransferRejected

JPEG_SOI = b"\xff\xd8\xff"
JPEG_SUFFIXES = (".jpg", ".jpeg")
DEFAULT_MAX_FILE_SIZE = 4 << 30
FALLBACK_NAME = "received.jpg"
TEMP_PREFIX = ".qsocket-"
TEMP_SUFFIX = ".part"
# the names of our named temporary files: tempfile's 8 random characters between them
TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + r"[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX))
# An unnamed temporary file (O_TMPFILE) vanishes with the process that holds it, so
# a receiver killed mid-transfer leaves nothing.  Tests turn it off to exercise the
# named fallback that filesystems without O_TMPFILE get.
USE_O_TMPFILE = True
_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL)  # kernel or filesystem lacks it
# A received picture is an ordinary file: 0666 less the user's umask, as any program
# would create it (read once at import, while nothing else runs).
_UMASK = os.umask(0o022)
os.umask(_UMASK)
RECEIVED_MODE = 0o666 & ~_UMASK
DIRECT_ALIGN = 4096  # O_DIRECT wants offsets, lengths and addresses in whole blocks
# smaller files go through the page cache: for them O_DIRECT saves no measurable
# kernel time and costs four fcntl calls (on, then off again for the unaligned tail)
DIRECT_MIN = 4 << 20
# a received file's first bytes kept in memory: the saved line's metadata note is read
# from them (a photo's segments before its image data rarely pass 64 KiB), not from disk
HEAD_KEPT = 64 << 10


class Rejected(TransferRejected):
    """A transfer refused with a protocol reason code and a human text."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def is_jpeg_name(name: str) -> bool:
    return name.lower().endswith(JPEG_SUFFIXES)


# --- sending -------------------------------------------------------------------
@dataclass(frozen=True)
class Outgoing:
    """A file that passed the sender's checks (check_outgoing)."""

    path: Path
    name: str
    size: int  # of the bytes to send
    pieces: tuple | None = None  # set when sent without metadata (see without_metadata)
    stamp: tuple | None = None  # file_stamp when checked: only that file goes, unchanged


def file_stamp(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What tells a file from its replacement or an edit of it (device, inode, size,
    mtime, and ctime, which an editor that restores the mtime cannot set back): a
    file checked or planned at its offer may be streamed much later."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def unchanged(out: Outgoing, st: os.stat_result, when: str) -> None:
    """Rejected when the file is no longer the one checked: its size, or the plan of
    its stripped copy, would not be its own (a truncated or a metadata-leaking copy)."""
    if out.stamp is not None and file_stamp(st) != out.stamp:
        raise Rejected(Reason.CANCELLED, f"{out.path} changed {when}")


def open_regular(path: str | os.PathLike):
    """A raw binary file for reading path, which must be a regular file.  Opened without
    blocking first: a FIFO put in a checked file's place would block open() until
    someone writes to it, and Ctrl-C cannot end that wait (the handler only sets a flag)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        os.set_blocking(fd, True)
        return open(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def check_outgoing(path: str | os.PathLike, max_size: int = DEFAULT_MAX_FILE_SIZE) -> Outgoing:
    """The sender's checks: exists, regular file, a JPEG by name and content, fits."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError as e:
        raise Rejected(Reason.UNSPECIFIED, f"{p}: no such file") from e
    except OSError as e:
        raise Rejected(Reason.UNSPECIFIED, f"{p}: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        raise Rejected(Reason.UNSPECIFIED, f"{p}: not a regular file")
    if not is_jpeg_name(p.name):
        raise Rejected(Reason.NOT_JPEG, f"{p}: not a .jpg/.jpeg file")
    if st.st_size > max_size:
        raise Rejected(Reason.TOO_LARGE, f"{p}: {st.st_size} bytes exceeds the limit of {max_size}")
    try:
        with open_regular(p) as f:
            head = f.read(len(JPEG_SOI))
    except OSError as e:
        raise Rejected(Reason.UNSPECIFIED, f"{p}: {e.strerror}") from e
    if head != JPEG_SOI:
        raise Rejected(Reason.NOT_JPEG, f"{p}: not a JPEG (no FF D8 FF start-of-image marker)")
    return Outgoing(p, p.name, st.st_size, stamp=file_stamp(st))


def list_assets(directory: str | os.PathLike) -> list[tuple[Path, int]]:
    """JPGs in a directory (by name, any case), sorted, with their sizes."""
    d = Path(directory)
    if not d.is_dir():
        return []
    out = []
    for entry in sorted(d.iterdir(), key=lambda e: e.name.lower()):
        if is_jpeg_name(entry.name) and entry.is_file():
            out.append((entry, entry.stat().st_size))
    return out


# --- names from the peer ----------------------------------------------------------
def _clean_char(ch: str) -> str:
    # controls, bidi overrides and other format characters, separators
    return "" if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp") else ch


def _truncate_utf8(text: str, limit: int) -> str:
    data = text.encode("utf-8")[:limit]
    return data.decode("utf-8", "ignore")


def sanitise_name(name: str) -> str:
    """A peer's file name made safe to create in the received dir.

    Basename only; no control, bidi or format characters; no leading dot; ends
    in .jpg/.jpeg (anything else gets .jpg, with its own dots made inert); at
    most MAX_NAME bytes with the extension kept; unusable -> received.jpg.
    """
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(_clean_char(ch) for ch in name)
    name = name.strip()
    while name.startswith("."):  # ". .x.jpg" must not become ".x.jpg"
        name = name.lstrip(".").strip()
    lower = name.lower()
    suffix = next((s for s in JPEG_SUFFIXES if lower.endswith(s)), None)
    if suffix:
        stem, ext = name[: -len(suffix)], name[-len(suffix):]
    else:
        stem, ext = name.replace(".", "_"), ".jpg"
    stem = stem.rstrip(" .")
    if not stem:
        return FALLBACK_NAME
    return _truncate_utf8(stem, MAX_NAME - len(ext.encode("utf-8"))).rstrip(" .") + ext


def numbered(name: str, n: int) -> str:
    """photo.jpg, photo (1).jpg, photo (2).jpg ... within MAX_NAME bytes."""
    if n == 0:
        return name
    stem, dot, ext = name.rpartition(".")
    tag = f" ({n})"
    room = MAX_NAME - len(tag.encode()) - len(dot + ext)
    return _truncate_utf8(stem, room) + tag + dot + ext


# --- receiving ---------------------------------------------------------------------
def _disk_reason(e: OSError) -> Rejected:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return Rejected(Reason.NO_SPACE, "not enough disk space on the receiver")
    return Rejected(Reason.WRITE_FAILED, f"receiver cannot write the file: {e.strerror}")


class IncomingFile:
    """One file being received: the chain decide name -> check offer -> temp file
    -> write -> verify -> link into place.  Any failure removes the temp file."""

    def __init__(self, directory: str | os.PathLike, offered_name: str, size: int,
                 max_size: int = DEFAULT_MAX_FILE_SIZE) -> None:
        self.directory = os.fspath(directory)  # a str: path objects cost on every file
        self.name = sanitise_name(offered_name)
        self.size = size
        self.received = 0
        self._flush_error: OSError | None = None  # see flush
        self._flushed_whole = False  # flush made it all durable, final mode included
        self._hash = hashlib.sha256()
        self._head = bytearray()  # the first HEAD_KEPT bytes: the JPEG check, then photo()
        self._fd: int | None = None
        self.temp: Path | None = None
        self._check_offer(max_size)
        self._open_temp()

    # check the offer
    def _check_offer(self, max_size: int) -> None:
        if self.size > max_size:
            raise Rejected(Reason.TOO_LARGE,
                           f"{self.size} bytes exceeds the receiver's limit of {max_size}")
        if self.size < len(JPEG_SOI):
            raise Rejected(Reason.NOT_JPEG, "not a JPEG (too short)")
        try:
            fs = os.statvfs(self.directory)
        except OSError as e:
            raise _disk_reason(e) from e
        if fs.f_bavail * fs.f_frsize < self.size:
            raise Rejected(Reason.NO_SPACE, "not enough disk space on the receiver")

    # write to a temporary file (0600): unnamed where the filesystem allows, else
    # named and locked, so that start-up clean-up can tell it from a dead one's
    def _open_temp(self) -> None:
        try:
            fd = _open_unnamed(self.directory)
            while fd is None:
                # imported here: only this fallback needs it, and it pulls in shutil,
                # bz2, lzma and zlib (~4 ms of every client's start)
                import tempfile  # noqa: PLC0415

                fd, path = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX,
                                            dir=self.directory)
                if _lock_if_still_there(fd, path):
                    self.temp = Path(path)
                else:  # a start-up clean-up took it before we locked it: once more
                    os.close(fd)
                    fd = None
        except OSError as e:
            raise _disk_reason(e) from e
        self._fd = fd  # 0600 while incomplete
        self._direct = self.size >= DIRECT_MIN and _set_direct(fd, True)

    def _write_all(self, view: memoryview) -> None:
        # Whole pages from an aligned buffer go straight to the disk (O_DIRECT): a
        # fresh 1 GiB file written through the page cache costs ~2 s of kernel CPU
        # here.  Anything else (the tail, a filesystem or buffer that refuses it)
        # falls back to ordinary writes for the rest of the file.
        if self._direct and (len(view) % DIRECT_ALIGN or self.received % DIRECT_ALIGN):
            self._direct = _set_direct(self._fd, False)
        while view:
            try:
                view = view[os.write(self._fd, view):]
            except OSError as e:
                if not (self._direct and e.errno == errno.EINVAL):
                    raise
                self._direct = _set_direct(self._fd, False)

    def write(self, chunk: bytes | memoryview) -> None:
        if self.received + len(chunk) > self.size:
            self.abort()
            raise RemoteProtocolError("file data beyond the announced size")
        if len(self._head) < HEAD_KEPT:
            checked = len(self._head) >= len(JPEG_SOI)
            self._head += chunk[: HEAD_KEPT - len(self._head)]  # in place: tiny chunks too
            if not checked and len(self._head) >= len(JPEG_SOI) and \
                    self._head[: len(JPEG_SOI)] != JPEG_SOI:
                self.abort()
                raise Rejected(Reason.NOT_JPEG, "not a JPEG (no FF D8 FF start-of-image marker)")
        self._hash.update(chunk)
        try:
            self._write_all(memoryview(chunk))
        except OSError as e:
            self.abort()
            raise _disk_reason(e) from e
        self.received += len(chunk)

    def flush(self) -> None:
        """Flush the data written so far: lets several files' flushes run at once.
        A failure is kept for finish to report: once fsync has failed, a second
        fsync may succeed although the data never reached the disk (the kernel
        forgets the error, and may drop the pages, once it has reported it).
        Once every byte is in, an unnamed file gets its final mode first (as finish
        would give it), so that finish, which runs for one file after the other, has
        nothing left to flush.  A named fallback temp file keeps 0600 until it is
        verified: others could read it in the directory meanwhile."""
        if self._fd is not None and self._flush_error is None:
            try:
                whole = self.received == self.size and self.temp is None
                if whole:
                    os.fchmod(self._fd, RECEIVED_MODE)
                os.fsync(self._fd)
                self._flushed_whole = whole
            except OSError as e:
                self._flush_error = e

    def photo(self) -> Photo | None:
        """What the received photo carries, walked over its first bytes as they came in
        (read_photo without reading the file back: its saved line costs no syscall);
        None when its segments run past them.  MetadataError as read_photo."""
        try:
            return parse_photo(_Prefix(self._head), self.size)
        except _PastPrefix:
            return None

    def finish(self, sender_sha256: bytes, sync_dir: bool = True) -> tuple[str, bytes]:
        """Flush, verify and move into place; returns (saved name, SHA-256).  Without
        sync_dir the caller fsyncs the directory (once for several files) before it
        reports any of them saved."""
        if self.received != self.size:
            self.abort()
            raise RemoteProtocolError(
                f"file ended after {self.received} of {self.size} announced bytes")
        digest = self._hash.digest()
        try:
            if self._flush_error is not None:
                raise self._flush_error
            if not self._flushed_whole:
                os.fchmod(self._fd, RECEIVED_MODE)
                os.fsync(self._fd)
        except OSError as e:
            self.abort()
            raise _disk_reason(e) from e
        if digest != sender_sha256:
            self.abort()
            raise Rejected(Reason.HASH_MISMATCH, "SHA-256 of the received data does not match")
        try:
            saved = self._link_into_place()
            if sync_dir:
                flush_dir(self.directory)
        except OSError as e:
            raise _disk_reason(e) from e
        finally:
            self.abort()
        return saved, digest

    def _link_into_place(self) -> str:
        # link() never replaces an existing file, so two receivers racing for
        # photo.jpg get photo.jpg and photo (1).jpg, and nothing is clobbered
        # an unnamed file is linked through its /proc/self/fd entry: linkat with
        # AT_SYMLINK_FOLLOW needs no privilege (AT_EMPTY_PATH does).  os.link calls
        # plain link(), which would not follow, unless a dir fd is given.
        proc_fd = None if self.temp else os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
        try:
            for n in range(10_000):
                candidate = numbered(self.name, n)
                target = os.path.join(self.directory, candidate)
                try:
                    if proc_fd is None:
                        os.link(self.temp, target)
                    else:
                        os.link(str(self._fd), target, src_dir_fd=proc_fd, follow_symlinks=True)
                    return candidate
                except FileExistsError:
                    continue
        finally:
            if proc_fd is not None:
                os.close(proc_fd)
        raise OSError(errno.EEXIST, "too many files with this name")

    def abort(self) -> None:
        """Drop the temporary file (idempotent)."""
        if self.temp is not None:  # removed while still locked: never seen unlocked
            try:
                os.unlink(self.temp)
            except FileNotFoundError:
                pass
            self.temp = None
        if self._fd is not None:
            os.close(self._fd)  # an unnamed file is gone with its last descriptor
            self._fd = None


@functools.cache
def _have_proc_fds() -> bool:
    """Whether /proc/self/fd exists (an unnamed file is linked through it)."""
    return os.path.isdir("/proc/self/fd")


def _open_unnamed(directory: str) -> int | None:
    """An O_TMPFILE file in directory, or None where that is not supported."""
    flag = getattr(os, "O_TMPFILE", 0)
    if not (USE_O_TMPFILE and flag and _have_proc_fds()):
        return None
    try:
        return os.open(directory, flag | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno in _NO_TMPFILE:
            return None
        raise


def _lock_if_still_there(fd: int, path: str) -> bool:
    """Lock a new named temp file; False if a clean-up removed it before the lock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # a clean-up holds it and is about to remove it
        return False
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def remove_stale_temps(directory: str | os.PathLike) -> list[str]:
    """Remove our named temporary files that no live process holds (left by a crash
    on a filesystem without O_TMPFILE, or by an older release); returns their names.
    Only regular files of ours with our name pattern and no lock are touched."""
    removed = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return removed
    for name in names:
        if not TEMP_NAME.fullmatch(name):
            continue
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue  # a symlink, gone meanwhile, or not ours to read
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live receiver is writing it
            if os.stat(path, follow_symlinks=False).st_ino == st.st_ino:
                os.unlink(path)
                removed.append(name)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for fd; returns whether it is on (False where the
    platform or filesystem does not support it, e.g. tmpfs)."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | direct if on else flags & ~direct)
    except OSError:
        return False
    return on


def flush_dir(directory: str | os.PathLike) -> None:
    """fsync a directory: the files linked into it before survive a crash."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- photo metadata: what a JPEG carries, and the same JPEG without it ---------------
# A marker-segment walker rather than a library: the job is a few hundred lines over a
# format fixed since 1992, and the libraries at hand (Pillow, piexif, exif) either
# re-encode, hold the whole file in memory, or do not stream a stripped copy whose
# size is known before it is read; a new runtime dependency would buy none of that.
#
# Only the segments before the first scan (SOS) are read, each one's 4-byte header
# and, where its content matters, its body (at most 64 KiB); from SOS on the file is
# copied, never decoded.  Stripping keeps JFIF (APP0, without a thumbnail), the ICC
# profile (APP2), the Adobe segment (APP14: CMYK decoding needs it) and every table
# and frame segment; it drops every other APPn and COM, rewrites EXIF as a minimal
# block holding only the orientation when the photo has one, and ends the file at
# the photo's EOI when an MPF index says extra images follow it.
SEGMENT_HEADER = struct.Struct(">BBH")  # FF, marker, length (counts itself, not the marker)
TIFF_HEADER_SIZE = 8  # byte order (II or MM), 42, offset of IFD0
MAX_HEADER_SEGMENTS = 1024  # segments before the first scan; a real photo has < 20
MAX_FILL = 64  # 0xFF fill bytes allowed before a marker
MAX_IFDS = 8  # IFD0, IFD1, EXIF, GPS, interoperability: more is a loop or junk
M_SOI, M_EOI, M_SOS, M_COM = 0xD8, 0xD9, 0xDA, 0xFE
M_APP0, M_APP1, M_APP2, M_APP13, M_APP14, M_APP15 = 0xE0, 0xE1, 0xE2, 0xED, 0xEE, 0xEF
STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: no length, never before a scan
ID_JFIF, ID_JFXX = b"JFIF\0", b"JFXX\0"
ID_EXIF = b"Exif\0\0"
ID_XMP, ID_XMP_EXT = b"http://ns.adobe.com/xap/1.0/\0", b"http://ns.adobe.com/xmp/extension/\0"
ID_ICC, ID_PHOTOSHOP, ID_ADOBE = b"ICC_PROFILE\0", b"Photoshop 3.0\0", b"Adobe"
ID_MPF = b"MPF\0"  # CIPA DC-007 multi-picture index: where the extra images after EOI are
JFIF_FIXED = 14  # JFIF\0, version, units, densities; then the thumbnail's size and pixels
ID_READ = 40  # bytes of a segment body read to tell what it is
TAG_ORIENTATION, TAG_EXIF_IFD, TAG_GPS_IFD, TAG_INTEROP_IFD = 0x0112, 0x8769, 0x8825, 0xA005
TAGS_MAKE_MODEL = {0x010F, 0x0110}
TAGS_SERIAL = {0xA431, 0xA435, 0xC62F}  # body serial, lens serial, DNG camera serial
TAGS_GPS_POSITION = {1, 2, 3, 4}  # latitude (ref), longitude (ref)
TYPE_SHORT, TYPE_LONG, TYPE_UNDEFINED = 3, 4, 7
TAG_MP_ENTRY = 0xB002
MP_ENTRY = "IIIHH"  # attribute, size, offset, two dependent images (after the byte order)
MP_ENTRY_SIZE = struct.calcsize("<" + MP_ENTRY)

# what a photo may carry, in the order the menu names it
GPS, SERIAL, MAKE_MODEL, THUMBNAIL, EXTRA = ("GPS location", "camera serial",
                                             "camera make/model", "thumbnail", "extra images")
OTHER_EXIF, XMP, IPTC, COMMENT, OTHER = "other EXIF", "XMP", "IPTC", "comment", "other metadata"
CARRIED_ORDER = (GPS, SERIAL, MAKE_MODEL, THUMBNAIL, EXTRA, OTHER_EXIF, XMP, IPTC, COMMENT, OTHER)


class MetadataError(ValueError):
    """the photo's metadata cannot be parsed"""


@dataclass(frozen=True)
class Photo:
    """What a JPEG carries, and how to write it without that.

    `pieces` is the stripped file: (offset, length) ranges of the original and
    new bytes, in order; `stripped_size` is their total."""

    carries: tuple[str, ...]
    orientation: int | None
    pieces: tuple[tuple[int, int] | bytes, ...]
    stripped_size: int


def read_photo(path: str | os.PathLike) -> Photo:
    """Walk a JPEG's segments up to its first scan; MetadataError when it cannot."""
    with open_regular(path) as f:
        return parse_photo(f, os.fstat(f.fileno()).st_size)


class _PastPrefix(Exception):
    """parse_photo wanted bytes beyond those kept in memory"""


class _Prefix:
    """seek/read over a file's first bytes (what parse_photo calls); a read past them
    raises _PastPrefix.  The size checks stay parse_photo's, against the whole file."""

    def __init__(self, head: bytes | bytearray) -> None:
        self._head, self._pos = head, 0

    def seek(self, pos: int) -> None:
        self._pos = pos

    def read(self, n: int) -> bytes:
        if self._pos + n > len(self._head):
            raise _PastPrefix
        return bytes(self._head[self._pos : self._pos + n])


def describe(carries: tuple[str, ...], limit: int | None = None) -> str:
    """"GPS location, camera serial"; past `limit` items, "... and 2 more"."""
    if limit is None or len(carries) <= limit:
        return ", ".join(carries)
    return ", ".join(carries[:limit]) + f" and {len(carries) - limit} more"


def _read_exact(f, offset: int, n: int, size: int) -> bytes:
    if offset + n > size:
        raise MetadataError("the file ends inside a segment")
    f.seek(offset)
    data = f.read(n)
    if len(data) != n:
        raise MetadataError("the file ends inside a segment")
    return data


def _next_marker(f, pos: int, size: int) -> tuple[int, int]:
    """The marker at pos after optional fill bytes: (marker, offset of its FF)."""
    head = _read_exact(f, pos, min(MAX_FILL + 2, size - pos), size) if pos < size else b""
    if len(head) < 2 or head[0] != 0xFF:
        raise MetadataError(f"no marker at byte {pos}")
    i = 0
    while i + 1 < len(head) and head[i + 1] == 0xFF:
        i += 1
    if i + 1 >= len(head):
        raise MetadataError(f"no marker at byte {pos}")
    return head[i + 1], pos + i


def parse_photo(f, size: int) -> Photo:
    """read_photo over an open binary file (seek/read) of `size` bytes."""
    if _read_exact(f, 0, 2, size) != b"\xff\xd8":
        raise MetadataError("no start-of-image marker")
    carried: set[str] = set()
    pieces: list = [(0, 2)]
    orientation: int | None = None
    exif_at: int | None = None  # where the minimal EXIF goes: the first EXIF's place
    primary_end: int | None = None  # from an MPF index: extra images follow the photo
    pos = 2
    for _ in range(MAX_HEADER_SEGMENTS):
        marker, at = _next_marker(f, pos, size)
        if marker == M_SOS:
            break
        if marker in STANDALONE or marker in (M_SOI, M_EOI, 0x00):
            raise MetadataError(f"unexpected marker FF{marker:02X} before the image data")
        _ff, _m, length = SEGMENT_HEADER.unpack(_read_exact(f, at, SEGMENT_HEADER.size, size))
        if length < 2 or at + 2 + length > size:
            raise MetadataError(f"segment FF{marker:02X} at byte {at} has a bad length")
        pos = at + 2 + length
        body_at, body_len = at + 4, length - 2
        if not (M_APP0 <= marker <= M_APP15 or marker == M_COM):
            pieces.append((at, pos - at))  # tables, frame header, restart interval...
            continue
        if marker == M_COM:
            carried.add(COMMENT)
            continue
        body = _read_exact(f, body_at, min(ID_READ, body_len), size)
        if marker == M_APP1 or (marker == M_APP2 and body.startswith(ID_MPF)):  # <= 64 KiB
            body = _read_exact(f, body_at, body_len, size)
        keep = _app_segment(marker, body, body_len, carried)
        if keep is True:
            pieces.append((at, pos - at))
        elif isinstance(keep, bytes):
            pieces.append(keep)
        elif marker == M_APP1 and body.startswith(ID_EXIF):
            found = _parse_exif(body[len(ID_EXIF):], carried)
            if orientation is None and found is not None:
                orientation = found
            if exif_at is None:
                exif_at = len(pieces)
        elif marker == M_APP2 and body.startswith(ID_MPF) and primary_end is None:
            primary_end = _mpf_primary_size(body[len(ID_MPF):])
    else:
        raise MetadataError(f"more than {MAX_HEADER_SEGMENTS} segments before the image data")
    end = size if primary_end is None else _check_primary_end(f, primary_end, at, size)
    if end < size:
        carried.add(EXTRA)
    pieces.append((at, end - at))  # the image data, from the first scan on
    if orientation is not None:
        pieces.insert(exif_at, minimal_exif(orientation))
    total = sum(len(p) if isinstance(p, bytes) else p[1] for p in pieces)
    carries = tuple(c for c in CARRIED_ORDER if c in carried)
    return Photo(carries, orientation, tuple(pieces), total)


def _app_segment(marker: int, body: bytes, body_len: int, carried: set[str]) -> bool | bytes:
    """Keep (True), replace (new segment bytes) or drop (False) one APPn segment,
    noting what it carries.  EXIF is dropped here and parsed by the caller."""
    if marker == M_APP0 and body.startswith(ID_JFIF) and body_len >= JFIF_FIXED:
        if body_len == JFIF_FIXED:
            return True
        if body[12:14] != b"\0\0":
            carried.add(THUMBNAIL)  # a JFIF thumbnail: keep the header, drop the pixels
        return SEGMENT_HEADER.pack(0xFF, M_APP0, JFIF_FIXED + 2) + body[:12] + b"\0\0"
    if marker == M_APP0 and body.startswith(ID_JFXX):
        carried.add(THUMBNAIL)
        return False
    if marker == M_APP2 and body.startswith(ID_ICC):
        return True
    if marker == M_APP2 and body.startswith(ID_MPF):
        return False  # the index itself; the caller drops the images it points to
    if marker == M_APP14 and body.startswith(ID_ADOBE):
        return True
    if marker == M_APP1 and body.startswith(ID_EXIF):
        return False
    if marker == M_APP1 and (body.startswith(ID_XMP) or body.startswith(ID_XMP_EXT)):
        carried.add(XMP)
        if b"GPSLatitude" in body or b"GPSLongitude" in body:
            carried.add(GPS)
        return False
    carried.add(IPTC if marker == M_APP13 and body.startswith(ID_PHOTOSHOP) else OTHER)
    return False


def minimal_exif(orientation: int) -> bytes:
    """An APP1 EXIF segment holding only the orientation (big-endian TIFF, one IFD)."""
    tiff = (b"MM" + struct.pack(">HI", 42, 8)
            + struct.pack(">H", 1) + struct.pack(">HHIHH", TAG_ORIENTATION, TYPE_SHORT, 1,
                                                 orientation, 0)
            + struct.pack(">I", 0))
    body = ID_EXIF + tiff
    return SEGMENT_HEADER.pack(0xFF, M_APP1, len(body) + 2) + body


def _parse_exif(tiff: bytes, carried: set[str]) -> int | None:
    """Note what an EXIF block carries; returns its orientation (1-8) or None.
    Every offset is checked against the block; loops and junk are MetadataError."""
    order, ifd0 = _tiff_header(tiff, "EXIF")
    orientation = None
    seen: set[int] = set()
    todo = [(ifd0, "ifd0")]
    while todo:
        offset, kind = todo.pop(0)
        if offset in seen:
            raise MetadataError("EXIF directories form a loop")
        if len(seen) >= MAX_IFDS:
            raise MetadataError("too many EXIF directories")
        seen.add(offset)
        entries, next_ifd = _read_ifd(tiff, order, offset)
        if kind == "ifd0" and next_ifd:
            carried.add(THUMBNAIL)  # IFD1 describes the embedded thumbnail
            todo.append((next_ifd, "ifd1"))
        for tag, typ, count, value in entries:
            if kind in ("ifd0", "exif") and tag in (TAG_EXIF_IFD, TAG_GPS_IFD, TAG_INTEROP_IFD):
                sub = {TAG_EXIF_IFD: "exif", TAG_GPS_IFD: "gps", TAG_INTEROP_IFD: "interop"}[tag]
                pointer = _ifd_pointer(order, typ, count, value)
                if pointer:  # some writers leave 0 for "none"
                    todo.append((pointer, sub))
            elif kind == "ifd0" and tag == TAG_ORIENTATION:
                if typ == TYPE_SHORT and count == 1:
                    v = struct.unpack_from(order + "H", value)[0]
                    orientation = v if 1 <= v <= 8 else None
            elif kind == "gps":
                carried.add(GPS if tag in TAGS_GPS_POSITION else OTHER_EXIF)
            elif tag in TAGS_SERIAL:
                carried.add(SERIAL)
            elif kind == "ifd0" and tag in TAGS_MAKE_MODEL:
                carried.add(MAKE_MODEL)
            elif kind != "ifd1":
                carried.add(OTHER_EXIF)
    return orientation


def _tiff_header(tiff: bytes, what: str) -> tuple[str, int]:
    """The struct byte order and IFD0's offset of a TIFF block (EXIF, MPF)."""
    if len(tiff) < TIFF_HEADER_SIZE or tiff[:2] not in (b"II", b"MM"):
        raise MetadataError(f"{what} without a TIFF header")
    order = "<" if tiff[:2] == b"II" else ">"
    magic, ifd0 = struct.unpack_from(order + "HI", tiff, 2)
    if magic != 42:
        raise MetadataError(f"{what} with a bad TIFF header")
    return order, ifd0


def _mpf_primary_size(tiff: bytes) -> int:
    """The size of the first image (the photo itself, SOI to EOI) in an MPF index."""
    order, ifd0 = _tiff_header(tiff, "MPF")
    entries, _next = _read_ifd(tiff, order, ifd0)
    for tag, typ, count, value in entries:
        if tag == TAG_MP_ENTRY:
            if typ != TYPE_UNDEFINED or count < MP_ENTRY_SIZE or count % MP_ENTRY_SIZE:
                raise MetadataError("MPF image list of the wrong type")
            (at,) = struct.unpack(order + "I", value)
            if at < TIFF_HEADER_SIZE or at + MP_ENTRY_SIZE > len(tiff):
                raise MetadataError("MPF offset outside its block")
            return struct.unpack_from(order + MP_ENTRY, tiff, at)[1]
    raise MetadataError("MPF index without an image list")


def _check_primary_end(f, end: int, sos: int, size: int) -> int:
    # the photo must end with EOI exactly where the index says, or it is not this file's
    if not sos + 2 <= end <= size or _read_exact(f, end - 2, 2, size) != b"\xff\xd9":
        raise MetadataError("the MPF index does not match the file")
    return end


def _read_ifd(tiff: bytes, order: str, offset: int) -> tuple[list, int]:
    """One IFD's entries (tag, type, count, 4-byte value field) and the next IFD's offset."""
    if offset < TIFF_HEADER_SIZE or offset + 2 > len(tiff):
        raise MetadataError("EXIF offset outside its block")
    (count,) = struct.unpack_from(order + "H", tiff, offset)
    end = offset + 2 + 12 * count
    if end + 4 > len(tiff):
        raise MetadataError("EXIF directory runs past its block")
    entries = [struct.unpack_from(order + "HHI4s", tiff, offset + 2 + 12 * i)
               for i in range(count)]
    (next_ifd,) = struct.unpack_from(order + "I", tiff, end)
    return entries, next_ifd


def _ifd_pointer(order: str, typ: int, count: int, value: bytes) -> int:
    if typ not in (TYPE_LONG, 13) or count != 1:  # LONG or IFD
        raise MetadataError("EXIF sub-directory pointer of the wrong type")
    return struct.unpack(order + "I", value)[0]


def without_metadata(out: Outgoing) -> Outgoing:
    """The same outgoing file, to be sent stripped: its size is the stripped size.
    The plan is made from the file that was checked, or Rejected."""
    with open_regular(out.path) as f:
        st = os.fstat(f.fileno())
        unchanged(out, st, "since it was checked")
        photo = parse_photo(f, st.st_size)
    return Outgoing(out.path, out.name, photo.stripped_size, photo.pieces, out.stamp)


def open_outgoing(out: Outgoing):
    """A raw file object for the bytes to send: the file, or its stripped version."""
    if out.pieces is None:
        return open_regular(out.path)
    return PieceReader(out.path, out.pieces)


class PieceReader:
    """readinto() over file ranges and new bytes: the stripped photo as a stream,
    never more than one caller's buffer in memory."""

    def __init__(self, path: Path, pieces: tuple) -> None:
        self._f = open_regular(path)
        self._pieces = list(pieces)
        self._i = 0
        self._done = 0  # bytes of the current piece already served

    def __enter__(self) -> PieceReader:
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()

    def fileno(self) -> int:
        return self._f.fileno()

    def readinto(self, view) -> int:
        """At most len(view) bytes, never across a piece boundary; 0 at the end or
        when the file is shorter than planned (it changed)."""
        while self._i < len(self._pieces):
            piece = self._pieces[self._i]
            length = len(piece) if isinstance(piece, bytes) else piece[1]
            if self._done == length:
                self._i, self._done = self._i + 1, 0
                continue
            n = min(len(view), length - self._done)
            if isinstance(piece, bytes):
                view[:n] = piece[self._done:self._done + n]
            else:
                if self._done == 0:
                    self._f.seek(piece[0])
                n = self._f.readinto(view[:n])
                if not n:
                    return 0
            self._done += n
            return n
        return 0
