"""File-transfer rules shared by both sides: what may be sent, how a peer's name
becomes a safe local name, and how a received file reaches the disk whole or
not at all (temp file -> fsync -> verify -> link into place)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import stat
import tempfile
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
    path: Path
    name: str
    size: int


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
        with open(p, "rb") as f:
            head = f.read(len(JPEG_SOI))
    except OSError as e:
        raise Rejected(Reason.UNSPECIFIED, f"{p}: {e.strerror}") from e
    if head != JPEG_SOI:
        raise Rejected(Reason.NOT_JPEG, f"{p}: not a JPEG (no FF D8 FF start-of-image marker)")
    return Outgoing(p, p.name, st.st_size)


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
        self.directory = Path(directory)
        self.name = sanitise_name(offered_name)
        self.size = size
        self.received = 0
        self._hash = hashlib.sha256()
        self._head = b""
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
        self._direct = _set_direct(fd, True)

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
        if len(self._head) < len(JPEG_SOI):
            self._head += bytes(chunk[: len(JPEG_SOI) - len(self._head)])
            if len(self._head) == len(JPEG_SOI) and self._head != JPEG_SOI:
                self.abort()
                raise Rejected(Reason.NOT_JPEG, "not a JPEG (no FF D8 FF start-of-image marker)")
        self._hash.update(chunk)
        try:
            self._write_all(memoryview(chunk))
        except OSError as e:
            self.abort()
            raise _disk_reason(e) from e
        self.received += len(chunk)

    def finish(self, sender_sha256: bytes) -> tuple[str, bytes]:
        """Flush, verify and move into place; returns (saved name, SHA-256)."""
        if self.received != self.size:
            self.abort()
            raise RemoteProtocolError(
                f"file ended after {self.received} of {self.size} announced bytes")
        digest = self._hash.digest()
        try:
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
            _fsync_dir(self.directory)
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
                try:
                    if proc_fd is None:
                        os.link(self.temp, self.directory / candidate)
                    else:
                        os.link(str(self._fd), self.directory / candidate,
                                src_dir_fd=proc_fd, follow_symlinks=True)
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


def _open_unnamed(directory: Path) -> int | None:
    """An O_TMPFILE file in directory, or None where that is not supported."""
    flag = getattr(os, "O_TMPFILE", 0)
    if not (USE_O_TMPFILE and flag and os.path.isdir("/proc/self/fd")):
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


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
