"""The socket side shared by client.py and server.py: frames on a TCP socket, the
encrypted session after the handshake (a reader and a writer thread), sending
and receiving texts and files, the key log."""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import errno
import hashlib
import importlib.util
import ipaddress
import mmap
import os
import queue
import re
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import crypt
import transfer
from limits import LIMITS
from protocol import (
    CHUNK_SIZE,
    FRAME_HEADER,
    MAX_FRAME,
    OP_ID,
    AuthError,
    Bye,
    Delivered,
    Error,
    FileAccept,
    FileCancel,
    FileData,
    FileEnd,
    FileFailed,
    FileOffer,
    FileReject,
    FileSaved,
    LocalProtocolError,
    ProtocolError,
    Reason,
    RemoteProtocolError,
    Text,
    encode_frame,
    frame_length,
    neutralise,
)
from session_core import (
    Close,
    CloseKind,
    FileCancelled,
    FileChunk,
    FileDiscarded,
    FileEnded,
    FileOffered,
    Outbound,
    ReplyReceived,
    SessionCore,
    SessionEnded,
    Side,
    State,
    TextReceived,
)

if TYPE_CHECKING:  # imported lazily where used: see IncomingFile._finishers
    from concurrent.futures import ThreadPoolExecutor

KEYLOG_ENV = "QSOCKET_KEYLOGFILE"
# the session's limits, named here for the code below (all of them are in limits.py)
DATA_IN_FLIGHT = LIMITS.data_in_flight
FINISHERS = LIMITS.finishers
MAX_BACKLOG = LIMITS.max_backlog
REPLY_TIMEOUT = LIMITS.reply_timeout
SAVED_TIMEOUT = LIMITS.saved_timeout
STALL_TIMEOUT = LIMITS.stall_timeout
SEND_TIMEOUT = LIMITS.send_timeout
EXIT_TIMEOUT = LIMITS.exit_timeout


class ConnectionLost(Exception):
    """the connection was lost"""


class PeerClosed(ConnectionLost):
    """the peer closed the connection between two frames (no goodbye)"""


class NoAnswer(ConnectionLost):
    """the peer did not answer in time"""


class HandshakeTimeout(ConnectionLost):
    """the handshake did not finish in time"""


# --- command line shared by both scripts ---------------------------------------------
class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (usage)
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(2)


def port_number(text: str, lowest: int = 1) -> int:
    if not _DECIMAL.fullmatch(text):
        raise argparse.ArgumentTypeError(f"invalid port {text!r}")
    port = int(text)
    if not lowest <= port < 65536:
        raise argparse.ArgumentTypeError(f"port {port} is outside {lowest}-65535")
    return port


def listen_port(text: str) -> int:
    """A port to listen on; 0 lets the system pick a free one."""
    return port_number(text, lowest=0)


def add_common_arguments(p: argparse.ArgumentParser, role: str, version: str) -> None:
    """The flags both scripts share (DESIGN.md section 5)."""
    p.add_argument("--home", type=Path, default=None,
                   help=f"identity and {'known_hosts' if role == 'client' else 'known_clients'}"
                        " directory (default $QSOCKET_HOME or ~/.qsocket)")
    p.add_argument("--assets-dir", type=Path, default=Path("assets"),
                   help="where the menu looks for JPGs to send (default ./assets)")
    p.add_argument("--received-dir", type=Path, default=Path("received_assets"),
                   help="where received files are saved (default ./received_assets)")
    p.add_argument("--max-file-size", type=byte_count, default=transfer.DEFAULT_MAX_FILE_SIZE,
                   metavar="BYTES", help="largest file accepted or sent (default 4 GiB)")
    p.add_argument("--strip-metadata", action="store_true",
                   help="send photos without their EXIF/XMP/IPTC metadata (location, camera, "
                        "serial, thumbnail), losslessly; orientation and colour profile stay")
    p.add_argument("--kem-provider", choices=("auto", "cryptography", "liboqs"), default="auto",
                   help="ML-KEM-1024 implementation (default auto: liboqs where its library "
                        "is installed, else cryptography)")
    p.add_argument("--show-identity", action="store_true",
                   help=f"print this {role}'s fingerprint (creating the identity) and exit")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show handshake details and each session's verification code")
    p.add_argument("--version", action="version", version=f"QSocket 2 {role} {version}")


# Flag values are checked here, before anything else happens, so that a bad one is
# a usage error (exit 2) with one line, never a traceback or a surprise later on.
_DECIMAL = re.compile(r"-?[0-9]+")  # int() would also take "1_000", " 7" and other digits
_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_FINGERPRINT = re.compile(r"(?:SHA256:)?([A-Za-z0-9+/]{43})")
MAX_HOST_NAME = 253  # bytes, without a final dot (RFC 1035)
MAX_SECONDS = 3600.0  # a longer timeout is a typo, and sockets refuse huge ones
MAX_SIZE = (1 << 64) - 1  # the offer's size field


def byte_count(text: str) -> int:
    if not _DECIMAL.fullmatch(text):
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (bytes)")
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("size must not be negative")
    if value > MAX_SIZE:
        raise argparse.ArgumentTypeError(f"size {value} is above the protocol's limit of "
                                         f"{MAX_SIZE} bytes")
    return value


def positive_count(text: str) -> int:
    if not _DECIMAL.fullmatch(text):
        raise argparse.ArgumentTypeError(f"invalid number {text!r}")
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def seconds(text: str) -> float:
    """A timeout: a finite number of seconds above 0 (nan and inf are refused)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 < value <= MAX_SECONDS):  # also false for nan
        raise argparse.ArgumentTypeError(f"invalid timeout {text!r} (seconds: a number above "
                                         f"0, at most {MAX_SECONDS:g})")
    return value


def host_name(text: str) -> str:
    """An IP address, or a host name of dot-separated labels of 1-63 letters, digits,
    hyphens or underscores once IDNA-encoded.  Whether it resolves is found out when
    connecting (exit 3), not here."""
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(text)
        return text
    problem = f"invalid host name {text!r} (an IP address, or dot-separated labels of " \
              f"1-63 letters, digits, '-' or '_')"
    try:
        ascii_name = text.encode("idna").decode("ascii")
    except UnicodeError:  # e.g. a label over 63 characters
        raise argparse.ArgumentTypeError(problem) from None
    labels = ascii_name.removesuffix(".").split(".")
    if len(ascii_name.removesuffix(".")) > MAX_HOST_NAME or \
            not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise argparse.ArgumentTypeError(problem)
    return text


def fingerprint(text: str) -> str:
    """SHA256:<43 base64 characters> (the prefix may be left out), as printed by
    --show-identity; returned with the prefix."""
    m = _FINGERPRINT.fullmatch(text.strip())
    raw = base64.b64decode(m.group(1) + "=") if m else b""
    if m is None or base64.b64encode(raw).decode().rstrip("=") != m.group(1):
        raise argparse.ArgumentTypeError(
            f"invalid fingerprint {text!r} (expected SHA256: and 43 base64 characters, as "
            f"the other side's --show-identity prints it)")
    return f"SHA256:{m.group(1)}"


# --- frames on a socket --------------------------------------------------------------
READ_AHEAD = 64 << 10  # bytes a session's reader may take beyond the frame it needs
DIRECT_MAX = 64 << 10  # a record up to this size may be sent from its caller's thread


def recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytearray:
    """Read exactly n bytes; EOF mid-way is ConnectionLost.  With a deadline the
    whole read must finish by then (a byte a second does not keep it alive)."""
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf), deadline)
    return buf


def _recv_into(sock: socket.socket, view: memoryview, deadline: float | None = None) -> None:
    n = len(view)
    got = 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HandshakeTimeout("handshake timed out")
            sock.settimeout(left)
        try:
            k = sock.recv_into(view[got:])
        except TimeoutError as e:
            raise HandshakeTimeout("handshake timed out") from e
        except OSError as e:
            raise ConnectionLost(f"connection lost: {e.strerror or e}") from e
        if k == 0:
            if got == 0 and n == FRAME_HEADER.size:
                raise PeerClosed("connection closed by peer")
            raise ConnectionLost("connection closed in the middle of a frame")
        got += k


def read_frame(sock: socket.socket, deadline: float | None = None,
               limit: int = MAX_FRAME) -> bytearray:
    length = frame_length(bytes(recv_exact(sock, FRAME_HEADER.size, deadline)), limit)
    return recv_exact(sock, length, deadline)


class FrameReader:
    """The session's frames from one socket through one reused buffer: a recv takes
    every small frame that has come (a photo's offer, data and end are three frames,
    six recv calls one by one, each a hand-over of the GIL in a busy process), a
    large body is received where it lies, never copied.  Only the frames after the
    handshake come through here: it may read ahead."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._view = memoryview(bytearray(FRAME_HEADER.size + MAX_FRAME + READ_AHEAD))
        self._start = self._end = 0  # the bytes received and not yet handed out

    def next(self) -> memoryview:
        """The next frame's body, valid until the next call."""
        if self._start == self._end:
            self._start = self._end = 0
        self._room(FRAME_HEADER.size)  # a header may be cut by the buffer's end too
        self._have(FRAME_HEADER.size)
        start = self._start
        length = frame_length(bytes(self._view[start : start + FRAME_HEADER.size]))
        whole = FRAME_HEADER.size + length
        self._room(whole)
        self._have(whole)
        start = self._start
        self._start = start + whole
        return self._view[start + FRAME_HEADER.size : start + whole]

    def _room(self, n: int) -> None:
        """Room for n bytes from _start: if they would pass the buffer's end, move
        what has come to the front."""
        if self._start + n > len(self._view):
            k = self._end - self._start
            self._view[:k] = self._view[self._start : self._end]
            self._start, self._end = 0, k

    def _have(self, n: int) -> None:
        """Receive until n bytes from _start are here; read ahead only behind a small
        frame, so that a large body arrives in place and nothing has to move."""
        while self._end - self._start < n:
            stop = len(self._view) if n <= READ_AHEAD else self._start + n
            try:
                k = self._sock.recv_into(self._view[self._end : stop])
            except OSError as e:
                raise ConnectionLost(f"connection lost: {e.strerror or e}") from e
            if k == 0:
                if self._end == self._start:
                    raise PeerClosed("connection closed by peer")
                raise ConnectionLost("connection closed in the middle of a frame")
            self._end += k


def send_frame(sock: socket.socket, body: bytes) -> None:
    try:
        sock.sendall(encode_frame(body))
    except OSError as e:
        raise ConnectionLost(f"connection lost: {e.strerror or e}") from e


def send_pieces(sock: socket.socket, pieces: list) -> None:
    """Gathered send of one sealed record without joining its pieces."""
    views = byte_views(pieces)
    while views:
        drop_sent(views, sock.sendmsg(views))


def byte_views(pieces: list) -> list:
    return [memoryview(p).cast("B") for p in pieces]


def drop_sent(views: list, sent: int) -> None:
    """Remove from views (in place) the first `sent` bytes, which went out."""
    while views and sent >= len(views[0]):
        sent -= len(views[0])
        views.pop(0)
    if sent:
        views[0] = views[0][sent:]


def send_records(sock: socket.socket, records: list) -> None:
    """Send each sealed record of a list (as SessionCore.seal returns them)."""
    for pieces in records:
        send_pieces(sock, pieces)


def set_send_deadline(sock: socket.socket, seconds: float) -> None:
    """A blocking send that makes no progress for `seconds` fails (SO_SNDTIMEO), and
    so does a TCP connection whose sent data stays unacknowledged that long
    (TCP_USER_TIMEOUT: a peer that vanished, not only one that stopped reading)."""
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                    struct.pack("@ll", whole, int((seconds - whole) * 1_000_000)))
    if sock.family in (socket.AF_INET, socket.AF_INET6) and hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(seconds * 1000))


def shut_down(sock: socket.socket) -> None:
    """shutdown() before close(): close() alone does not wake a thread blocked in
    sendmsg or recv on the same socket, which would then live on with it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not connected any more


def write_keylog(client_random: bytes, keys: crypt.SessionKeys) -> None:
    """Append this session's traffic keys when QSOCKET_KEYLOGFILE is set (debugging).

    The keys open every record of the session, so they go only into a regular file
    of ours that nobody else can read: never through a symlink, never into a file
    another user owns or could read.  Any other path is refused; the session goes on."""
    path = os.environ.get(KEYLOG_ENV)
    if not path:
        return
    flags = (os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
             | os.O_NONBLOCK)  # a FIFO without a reader must not hang the session
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:  # a debugging aid must not end the session
        if e.errno == errno.ELOOP:
            _refuse_keylog(path, f"it is a symbolic link; set {KEYLOG_ENV} to a regular file")
        elif e.errno in (errno.EISDIR, errno.ENXIO):
            _refuse_keylog(path, f"it is not a regular file; set {KEYLOG_ENV} to one")
        else:
            print(f"warning: cannot write the key log {path}: {e.strerror or e}",
                  file=sys.stderr, flush=True)
        return
    with os.fdopen(fd, "a") as f:
        why = _keylog_unsafe(os.fstat(fd), path)
        if why:
            _refuse_keylog(path, why)
            return
        print(f"warning: {KEYLOG_ENV} is set: writing this session's traffic keys to {path}; "
              f"anyone with that file can read the traffic", file=sys.stderr, flush=True)
        try:
            f.write(crypt.keylog_lines(client_random, keys))
            f.flush()
        except OSError as e:
            print(f"warning: cannot write the key log {path}: {e.strerror or e}",
                  file=sys.stderr, flush=True)


def _keylog_unsafe(st: os.stat_result, path: str) -> str:
    """Why an opened key log must not be written to ("" when it is fine)."""
    if not stat.S_ISREG(st.st_mode):
        return f"it is not a regular file; set {KEYLOG_ENV} to one"
    if st.st_uid != os.geteuid():
        return (f"it is owned by uid {st.st_uid}, not by you (uid {os.geteuid()}); "
                f"remove it or set {KEYLOG_ENV} to another path")
    if st.st_mode & 0o077:
        return (f"it is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"fix it with: chmod 600 {path}")
    return ""


def _refuse_keylog(path: str, why: str) -> None:
    print(f"error: not writing the key log {path}: {why}", file=sys.stderr, flush=True)


# --- what the user sees ------------------------------------------------------------
def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@dataclass(frozen=True)
class FileResult:
    """A file delivered (sent or received), for its one summary line."""

    name: str  # as saved by the receiver (neutralised for display by the caller)
    size: int
    sha256: bytes
    seconds: float
    note: str = ""  # the sender's "without metadata" / "as is"
    metadata: str = ""  # the receiver's metadata_note: what the saved photo carries

    def summary(self, verb: str, sent_name: str = "") -> str:
        """One line; `sent_name` is the sender's name for the file, named first when
        the receiver saved it under another one (`saved as 'sample (2).jpg'`)."""
        # binary units as everywhere else; no speed when it would read 0.0
        rate = self.size / self.seconds if self.seconds > 0 else 0.0
        speed = f", {human_size(rate)}/s" if rate >= 1024 and self.seconds >= 0.01 else ""
        renamed = sent_name and sent_name != self.name
        return (f"{verb} '{neutralise(sent_name if renamed else self.name)}': "
                f"{self.size} bytes, SHA-256 {self.sha256.hex()}, {self.seconds:.2f} s{speed}"
                + (f", {self.note}" if self.note else "")
                + (f", saved as '{neutralise(self.name)}'" if renamed else ""))


def metadata_note(path: str | os.PathLike, incoming: transfer.IncomingFile | None = None
                  ) -> str:
    """What a received photo carries, for its saved line (the receiver never strips:
    this is how it sees whether the sender did).  From the first bytes `incoming` kept
    when they hold all of its segments, else read back from path."""
    try:
        photo = incoming.photo() if incoming is not None else None
        carries = (photo or transfer.read_photo(path)).carries
    except (transfer.MetadataError, OSError):
        return "metadata not readable"
    return f"carries {transfer.describe(carries)}" if carries else "no metadata"


class Events:
    """How a session reports to its user; client.py and server.py override these."""

    def out(self, line: str) -> None:
        # one write per line: print() writes the text and the newline separately, so
        # lines from concurrent connection threads could be glued together
        sys.stdout.write(f"{line}\n")
        sys.stdout.flush()

    def text(self, conn: Connection, text: str) -> None:
        self.out(f"[{conn.label}] {neutralise(text)}")

    def file_offered(self, conn: Connection, name: str, size: int) -> None:
        self.out(f"[{conn.label}] receiving '{neutralise(name)}' ({human_size(size)})")

    def file_saved(self, conn: Connection, path: str, result: FileResult) -> None:
        self.out(f"[{conn.label}] {result.summary('saved')} ({result.metadata}) "
                 f"at {neutralise(path)}")

    def file_failed(self, conn: Connection, name: str, why: str) -> None:
        self.out(f"[{conn.label}] file '{neutralise(name)}' not saved: {neutralise(why)}")

    def file_aborted(self, conn: Connection, name: str, received: int, why: str) -> None:
        """The session ended while a file was coming in: nothing of it was kept.
        Reported just before closed() (just after it when a finisher or the disk thread
        ended the session with an internal error)."""
        self.out(f"[{conn.label}] receiving '{neutralise(name)}' aborted after "
                 f"{human_size(received)}: {neutralise(why)}; nothing saved")

    def closed(self, conn: Connection, why: str) -> None:
        self.out(f"[{conn.label}] {why}")

    def progress(self, total: int, desc: str, files: int = 0):
        """A bar for `total` bytes: update(n) as they move, close() at the end.  With
        `files` it stands for a batch of that many: file_done(unsent) as each one's
        outcome is known (unsent: the bytes of it that will not move after all)."""
        if not sys.stdout.isatty():
            # even a disabled tqdm starts tqdm's monitor thread, which then never ends
            return NoProgress()
        return MiBProgress(total, desc, files)


MIB = 1 << 20


class MiBProgress:
    """tqdm on stderr counting in MiB, the unit of every other size we print
    (tqdm's own unit_scale is decimal: it would show 210M for 200.0 MiB)."""

    def __init__(self, total: int, desc: str, files: int = 0) -> None:
        from tqdm import tqdm  # noqa: PLC0415 - only needed when a file moves

        self._files, self._done = files, 0
        self._bar = tqdm(total=total / MIB, desc=desc, file=sys.stderr, unit="MiB",
                         dynamic_ncols=True, leave=False,
                         bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} MiB "
                                    "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")
        if files:
            self._bar.set_postfix_str(f"0/{files} photos")

    def __enter__(self) -> MiBProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int) -> None:
        self._bar.update(n / MIB)

    def file_done(self, unsent: int = 0) -> None:
        self._done += 1
        if unsent:
            self._bar.total -= unsent / MIB
        self._bar.set_postfix_str(f"{self._done}/{self._files} photos")

    def close(self) -> None:
        self._bar.close()


class NoProgress:
    """The progress bar when stdout is not a terminal: nothing at all."""

    def __enter__(self) -> NoProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, n: int) -> None:
        pass

    def file_done(self, unsent: int = 0) -> None:
        pass

    def close(self) -> None:
        pass


def send_jpg_menu(conn: Connection, assets_dir: Path, max_size: int, prompt,
                  strip: bool = False, busy=None) -> None:
    """The "send a JPG" menu entry of both consoles: list the assets with what they
    carry, pick one by number or type a path, decide about its metadata, send it
    and say how it went.  `busy(work)` runs the send (the console's status line)."""
    choices = choose_jpgs(assets_dir, max_size, prompt, strip)
    if choices is not None and len(choices) == 1:
        send_jpg(conn, *choices[0], max_size, busy=busy)
    elif choices:
        send_jpg_batch(conn, choices, max_size, busy=busy)


def parse_picks(text: str, count: int) -> list[int] | None:
    """The photo numbers of a pick like `all`, `1,3-5` (in the order given, each
    once); None when text is no list or range.  ValueError names a number that is
    not on the list."""
    text = text.strip().lower()
    if text == "all":
        return list(range(1, count + 1))
    if not re.fullmatch(r"\d+\s*(-\s*\d+)?(\s*,\s*\d+\s*(-\s*\d+)?)*", text) or \
            text.isdigit():
        return None
    picks: dict[int, None] = {}  # in the order given, each once (a list here: n² for 1-5000)
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        first, last = int(lo), int(hi or lo)
        if not 1 <= first <= last <= count:
            raise ValueError(f"no photo number {part.strip()} (the list has "
                             f"{f'1-{count}' if count else 'none'})")
        picks.update(dict.fromkeys(range(first, last + 1)))
    return list(picks)


def choose_jpgs(assets_dir: Path, max_size: int, prompt,
                strip: bool = False) -> list[tuple[transfer.Outgoing, bool, str]] | None:
    """[(checked transfer.Outgoing, strip?, note)] of the photos the user picked: one
    by number or path, or several (`1,3-5`, `all`); None when nothing is to be sent
    (said why).  Each goes only while it is the file checked here."""
    assets = transfer.list_assets(assets_dir)
    for i, (path, size) in enumerate(assets, 1):
        print(f"  {i}) {neutralise(path.name)} ({human_size(size)}){carried_suffix(path)}")
    if not assets:
        print(f"  (no JPGs in {assets_dir}; type a path)")
    choice = prompt("number or path: ").strip()  # or several: 1,3-5 or all
    try:
        picks = parse_picks(choice, len(assets))
    except ValueError as e:
        print(f"not sent: {e}")
        return None
    if picks is None:
        one = _one_jpg(choice, assets, max_size, prompt, strip)
        return None if one is None else [one]
    chosen = []
    for number in picks:
        path = assets[number - 1][0]
        try:
            out = transfer.check_outgoing(path, max_size)
            decision = metadata_choice(path, strip, prompt)
        except transfer.Rejected as e:
            print(f"not sent: {neutralise(e.detail)}")
            continue
        if decision is None:
            print(f"not sent: {neutralise(path.name)}")
            continue
        chosen.append((out, *decision))
    return chosen or None


def as_chosen(out: transfer.Outgoing, stripped: bool) -> transfer.Outgoing:
    """A photo picked in the menu (checked then, its metadata decided then), to be sent
    as decided: only the file that was checked goes (see transfer.unchanged)."""
    return stripped_outgoing(out) if stripped else out


def send_jpg_batch(conn: Connection, choices: list, max_size: int, *, busy=None,
                   who: str = "") -> int:
    """Send several chosen photos pipelined; one summary line, and one line per
    photo that was not delivered.  The number delivered."""
    outcomes: list = [None] * len(choices)
    outs, sent = [], []  # what goes, and at which index of choices
    for index, (out, stripped, _note) in enumerate(choices):
        try:
            outs.append(as_chosen(out, stripped))
            sent.append(index)
        except transfer.Rejected as e:  # e.g. changed since it was picked
            outcomes[index] = e
    started = time.monotonic()

    def work() -> list:
        return conn.send_files(outs, max_size)
    try:
        for index, outcome in zip(sent, (busy or (lambda f: f()))(work), strict=True):
            outcomes[index] = outcome
    except (ConnectionLost, ProtocolError, KeyboardInterrupt) as e:
        print(f"{who}not sent: {e or 'interrupted'}")
        return 0
    seconds = time.monotonic() - started
    delivered = [o for o in outcomes if isinstance(o, FileResult)]
    total = sum(o.size for o in delivered)
    rate = f", {human_size(total / seconds)}/s" if seconds > 0 and total >= 1024 else ""
    print(f"{who}sent {len(delivered)} of {len(outcomes)} photos: {human_size(total)} in "
          f"{seconds:.2f} s{rate}")
    for (out, _, _), outcome in zip(choices, outcomes, strict=True):
        if not isinstance(outcome, FileResult):
            print(f"{who}not sent: {neutralise(out.name)}: {neutralise(outcome.detail)}")
    return len(delivered)


def _one_jpg(choice: str, assets: list, max_size: int, prompt,
             strip: bool) -> tuple[transfer.Outgoing, bool, str] | None:
    if not choice:
        return None
    if choice.isdigit() and 0 < int(choice) <= len(assets):
        path = assets[int(choice) - 1][0]
    elif choice.isdigit() and not Path(choice).exists():
        print(f"not sent: no photo number {choice} (the list has "
              f"{f'1-{len(assets)}' if assets else 'none'})")
        return None
    else:
        path = Path(choice).expanduser()
    try:
        out = transfer.check_outgoing(path, max_size)
        decision = metadata_choice(path, strip, prompt)
    except transfer.Rejected as e:
        print(f"not sent: {neutralise(e.detail)}")
        return None
    if decision is None:
        print("not sent")
        return None
    return (out, *decision)


def send_jpg(conn: Connection, out: transfer.Outgoing, stripped: bool, note: str,
             max_size: int, *, busy=None, who: str = "") -> bool:
    """Send one chosen photo and print one line about it (`who: ` first when given)."""
    def work() -> FileResult:
        return conn.send_file(as_chosen(out, stripped), max_size)
    try:
        result = (busy or (lambda f: f()))(work)
        print(who + dataclasses.replace(result, note=note).summary("sent", out.name))
        return True
    except transfer.Rejected as e:
        print(f"{who}not sent: {neutralise(e.detail)}")
    except (ConnectionLost, ProtocolError) as e:
        print(f"{who}not sent: {e}")
    return False


MENU_CARRIED = 3  # things named beside a photo in the menu; the rest are counted


def carried_suffix(path: Path) -> str:
    """ — GPS location, camera serial" beside a listed photo; "" when it carries nothing."""
    try:
        carries = transfer.read_photo(path).carries
    except transfer.MetadataError:
        return " — metadata not readable"
    except OSError:
        return ""
    return f" — {transfer.describe(carries, MENU_CARRIED)}" if carries else ""


def metadata_choice(path: Path, strip: bool, prompt) -> tuple[bool, str] | None:
    """(strip?, note for the summary) for one photo, asking where the user must
    decide: a location is about to leave (default: without metadata), or stripping
    was asked for and the metadata cannot be read (as is only with consent; without
    --strip-metadata such a photo goes as is, as every file).  None: do not send."""
    name = neutralise(path.name)
    try:
        photo = transfer.read_photo(path)
    except transfer.MetadataError as e:
        if not strip:
            print(f"cannot read the metadata of '{name}' ({e}); sending it as is")
            return False, "as is"
        print(f"cannot read the metadata of '{name}' ({e}): it may carry a location, "
              f"and it cannot be sent without its metadata")
        answer = prompt("send it as is? [y/N] ").strip().lower()
        return (False, "as is") if answer in ("y", "yes") else None
    except OSError as e:
        raise transfer.Rejected(Reason.UNSPECIFIED, f"{path}: {e.strerror}") from e
    if strip:
        return True, "without metadata"
    if transfer.GPS not in photo.carries:
        return False, ""
    print(f"'{name}' carries {transfer.describe(photo.carries)}")
    while True:
        answer = prompt("send 1) without metadata  2) as is [1]: ").strip().lower()
        if answer in ("", "1", "without"):
            return True, "without metadata"
        if answer in ("2", "as is"):
            return False, "as is"


# --- received file data: decrypted into aligned buffers, written by a disk thread -----
PAGE = mmap.PAGESIZE


class PlainBuffer:
    """Room for one record's plaintext, placed so that the payload after the type
    byte starts on a page boundary (what O_DIRECT-style writes want)."""

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, PAGE + MAX_FRAME)
        # type byte and op id before the page: FileData's data starts on it
        self.plain = memoryview(self._map)[PAGE - 1 - OP_ID.size :]

    def close(self) -> None:
        """Unmap it: its pages go back now, not when the collector gets round to the
        ended session's reference cycles (a busy server kept hundreds of MiB so)."""
        with contextlib.suppress(BufferError):  # a view of it still in use: left to the GC
            self.plain.release()
            self._map.close()


class DiskWriter:
    """Hashes and writes received chunks, and finishes ended files (fsync, link), on
    its own thread, so the reader can verify and decrypt the next records meanwhile
    (hashlib, os.write and fsync release the GIL).  A write failure is kept on the
    file it belongs to until the reader collects it."""

    def __init__(self, free: queue.Queue, name: str, on_failure) -> None:
        self._free = free
        self._on_failure = on_failure  # an unexpected exception in a job ends the session
        self._jobs: queue.Queue = queue.Queue()
        # started with the first job: a chat-only session costs no extra thread
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)

    def _put(self, job) -> None:
        if not self._thread.is_alive():
            self._thread.start()
        self._jobs.put(job)

    def write(self, target: _Receiving, data: memoryview, buf: PlainBuffer) -> None:
        self._put((target, data, buf))

    def run(self, job) -> None:
        """Run job() after everything queued before it (a file's finish)."""
        self._put(job)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if callable(job):
                    job()
                else:
                    self._write(*job)
            except Exception as e:  # e.g. no thread for the finishers: this thread goes on,
                # or the reader would wait forever for the buffers queued behind it (even
                # when saying so fails too: stdout full is one way to get here)
                with contextlib.suppress(Exception):
                    self._on_failure(e)
            finally:
                self._jobs.task_done()
        self._jobs.task_done()

    def _write(self, target: _Receiving, data: memoryview, buf: PlainBuffer) -> None:
        try:
            if target.failure is None:
                target.file.write(data)
        except (transfer.Rejected, ProtocolError) as e:
            target.failure = e
        except Exception as e:  # e.g. an unexpected OSError: fail the transfer only
            target.failure = transfer.Rejected(Reason.WRITE_FAILED, f"receiver error: {e}")
        finally:
            data.release()
            self._free.put(buf)

    def settle(self) -> None:
        """Wait until every queued job is done."""
        self._jobs.join()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()


def stripped_outgoing(out: transfer.Outgoing) -> transfer.Outgoing:
    """out to be sent without metadata; refused when its metadata cannot be read."""
    try:
        return transfer.without_metadata(out)
    except transfer.MetadataError as e:
        raise transfer.Rejected(Reason.UNSPECIFIED,
                                f"{out.path}: cannot read its metadata ({e}), so it cannot "
                                f"be sent without it (without --strip-metadata it goes as is)"
                                ) from e
    except OSError as e:
        raise transfer.Rejected(Reason.UNSPECIFIED, f"{out.path}: {e.strerror}") from e


# --- Ctrl-C and SIGTERM ------------------------------------------------------------------
POLL = LIMITS.poll  # seconds between checks for an interrupt while an operation waits


class Interrupt:
    """SIGINT and SIGTERM as a flag that the main thread acts on at safe points.

    An exception raised by a signal handler can land anywhere, e.g. between sealing
    a record and queueing it: that record's sequence number is then used up and the
    goodbye that follows fails the peer's MAC check, which reads as tampering.  So
    the handler only sets `event`; Connection operations check it between records
    (and while they wait) and raise KeyboardInterrupt there.  Only while the main
    thread waits at a prompt, which seals nothing, does the handler raise at once."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._at_prompt = False  # touched by the main thread only (handlers run there)

    def install(self) -> Interrupt:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def _on_signal(self, signum, frame) -> None:
        self.event.set()
        if self._at_prompt:
            self._at_prompt = False  # once: a second signal must not cut the exit short
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def prompting(self):
        """Around a blocking wait for the user: an interrupt ends it at once."""
        self._at_prompt = True  # first: a signal from here on raises in the handler,
        try:
            if self.event.is_set():  # and one that came before is acted on here
                raise KeyboardInterrupt
            yield
        finally:
            self._at_prompt = False


# --- the file coming in, the file going out -------------------------------------------------
@dataclass
class _Receiving:
    """One file coming in: its temp file, progress bar and a write failure."""

    file: transfer.IncomingFile
    started: float
    bar: object
    failure: Exception | None = None  # set by the disk thread


class IncomingFile:
    """The files coming in, as one piece on the reader thread: the answer to each
    offer, each verified chunk to the disk thread, each end (its finish, fsync and
    link, on the disk thread while the reader takes the next file's records), a
    cancel, and the abort when the session ends.  The ordering and window rules
    were checked by the core."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        # plaintext buffers for received records: one being filled by the reader,
        # the others queued for the disk thread (page-aligned payloads)
        self.free: queue.Queue = queue.Queue()
        self._buffers = [PlainBuffer() for _ in range(DATA_IN_FLIGHT + 1)]
        for buf in self._buffers:
            self.free.put(buf)
        self._disk = DiskWriter(self.free, f"disk {conn.label}", conn._fail)
        self._files: dict[int, _Receiving] = {}  # by operation id
        self._pool: ThreadPoolExecutor | None = None
        # files finish in parallel but are reported (line, then reply) in the order they ended
        self._ending: deque = deque()
        self._ready: dict = {}
        self._report_lock = threading.Lock()
        self._lock = threading.Lock()  # _files: the reader adds, the disk thread removes

    def offered(self, offer: FileOffered) -> None:
        conn = self._conn
        try:
            incoming = transfer.IncomingFile(conn.received_dir, offer.name, offer.size,
                                             conn.max_file_size)
        except transfer.Rejected as r:
            conn.events.file_failed(conn, offer.name, f"rejected: {r.detail}")
            conn.send(FileReject(offer.op, r.reason, r.detail))
            return
        started = time.monotonic()
        # announce first: a bar drawn before it would leave "receiving ... 0%|" glued
        # to the front of the announcement line on a terminal
        conn.events.file_offered(conn, offer.name, offer.size)
        bar = conn.events.progress(offer.size, f"receiving {neutralise(offer.name)[:30]}")
        with self._lock:
            self._files[offer.op] = _Receiving(incoming, started, bar)
        conn.send(FileAccept(offer.op))

    def chunk(self, op: int, data: memoryview, buf: PlainBuffer) -> None:
        """Hand a verified chunk to the disk thread, which hashes and writes it while
        the reader verifies and decrypts the next record."""
        target = self._files[op]
        if target.failure is not None:
            data.release()
            self.free.put(buf)
            self._disk.settle()
            if not isinstance(target.failure, transfer.Rejected):
                raise target.failure
            self._fail(op, target.failure)
            return
        n = len(data)  # the disk thread releases `data` once written
        self._disk.write(target, data, buf)
        target.bar.update(n)

    def ended(self, op: int, sha256: bytes) -> None:
        """After the file's last chunk is written, a finisher thread flushes and links
        it while the reader and the disk thread go on with the next files: fsyncs of
        several files at once share the file system's journal commits."""
        target = self._files[op]
        with self._lock:
            self._ending.append(op)
        self._disk.run(lambda: self._finishers().submit(self._finish, op, target, sha256))

    def _finishers(self) -> ThreadPoolExecutor:
        if self._pool is None:  # created with the first file: chat costs no threads
            # imported here: it pulls in logging (~5 ms), and a text-only run never needs it
            from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415
            self._pool = ThreadPoolExecutor(
                FINISHERS, thread_name_prefix=f"finish {self._conn.label}")
        return self._pool

    def _finish(self, op: int, target: _Receiving, sha256: bytes) -> None:
        """On a finisher thread: flush the file's data (the slow part, several files at
        once), then verify, link and reply in the order the files ended (the same name
        twice is numbered in that order)."""
        try:
            if target.failure is None:
                target.file.flush()
            self._in_order(op, lambda: self._complete(op, target, sha256))
        except Exception as e:  # a bug, or a line that could not be written (stdout full):
            # the pool would keep it to itself, and the sender would wait for replies that
            # never come; it ends this session as on the reader thread
            self._conn._fail(e)

    def _complete(self, op: int, target: _Receiving, sha256: bytes):
        """Verify and link (its fsync is cheap now); returns (report, linked): the
        report says it and sends FileSaved (or FileFailed) once the directory is
        flushed, linked says whether that flush is needed."""
        conn, incoming = self._conn, target.file
        try:
            try:
                if target.failure is not None:
                    raise target.failure
                saved, digest = incoming.finish(sha256, sync_dir=False)
            except transfer.Rejected:
                raise
            except Exception as e:  # a ProtocolError too: the core checked the size
                raise transfer.Rejected(Reason.WRITE_FAILED, f"receiver error: {e}") from e
        except transfer.Rejected as r:
            incoming.abort()
            self._forget(op)
            return self._failed_report(op, incoming.name, r), False
        self._forget(op)
        path = os.path.join(incoming.directory, saved)
        result = FileResult(saved, incoming.size, digest, time.monotonic() - target.started,
                            metadata=metadata_note(path, incoming))

        def report(dir_error: transfer.Rejected | None) -> None:
            if dir_error is not None:  # linked, but the link may not survive a crash:
                # not saved, so it must not stay (DESIGN 3.8: whole and durable, or nothing)
                with contextlib.suppress(OSError):
                    os.unlink(path)
                self._failed_report(op, incoming.name, dir_error)(None)
                return
            # said here first: what the sender does after our reply is shown after it
            conn.events.file_saved(conn, path, result)
            self._send_quietly(FileSaved(op, digest, saved))
        return report, True

    def _failed_report(self, op: int, name: str, r: transfer.Rejected):
        def report(_dir_error) -> None:
            self._conn.events.file_failed(self._conn, name, r.detail)
            self._send_quietly(FileFailed(op, r.reason, r.detail))
        return report

    def _in_order(self, op: int, report) -> None:
        """Run the completions of the flushed files in the order the files ended.
        One finisher at a time runs them, for every file whose turn it is; another
        that finds it busy leaves its file to it rather than wait (the busy one looks
        again after it is done, so none is left behind)."""
        with self._lock:
            self._ready[op] = report
        error = None
        while self._report_lock.acquire(blocking=False):
            try:
                error = self._complete_ready() or error
            finally:
                self._report_lock.release()
            with self._lock:
                if not self._head_ready():
                    break
        if error is not None:  # raised once no file is left to this finisher
            raise error

    def _head_ready(self) -> bool:
        """Whether the next file to complete is flushed (called under _lock)."""
        return bool(self._ending) and self._ending[0] in self._ready

    def _complete_ready(self) -> Exception | None:
        """Complete every file whose turn it is; the first unexpected exception (a bug,
        a line that cannot be written) is returned once all of them are done: one
        file's failure must not leave the others linked but unreported, or never
        completed."""
        done = []  # every file whose turn it is: linked now, one directory fsync for all
        error = None
        while True:
            with self._lock:
                if not self._head_ready():
                    break
                report = self._ready.pop(self._ending.popleft())
            try:
                done.append(report())
            except Exception as e:
                error = error or e
        dir_error = None
        if any(linked for _, linked in done):
            try:
                transfer.flush_dir(self._conn.received_dir)  # before any FileSaved
            except OSError as e:
                dir_error = transfer.Rejected(Reason.WRITE_FAILED,
                                              f"cannot flush the directory: {e.strerror}")
        for report, _ in done:
            try:
                report(dir_error)
            except Exception as e:
                error = error or e
        return error

    def _send_quietly(self, msg) -> None:
        try:
            self._conn.send(msg)
        except (ConnectionLost, ProtocolError):
            pass  # the session ended meanwhile: the file is saved (or not) all the same

    def _forget(self, op: int) -> _Receiving | None:
        with self._lock:
            target = self._files.pop(op, None)
        if target is not None and target.bar is not None:
            target.bar.close()
        return target

    def cancelled(self, event: FileCancelled) -> None:
        self._abort(event.op)
        if event.name:
            self._conn.events.file_failed(self._conn, event.name,
                                          f"sender cancelled: {event.detail}")

    def _fail(self, op: int, r: transfer.Rejected) -> None:
        """FileFailed: during the data the core then drains the rest of the stream."""
        name = self._files[op].file.name
        self._abort(op)
        self._conn.send(FileFailed(op, r.reason, r.detail))
        self._conn.events.file_failed(self._conn, name, r.detail)

    def _abort(self, op: int) -> None:
        if op in self._files:
            self._disk.settle()  # no write may race the temp file's removal
            target = self._forget(op)
            if target is not None:
                target.file.abort()

    def aborted(self, close: Close) -> None:
        """The session ended: delete each file still coming in and say so; a file that
        ended is finished by the disk thread (verified, durable); stop that thread."""
        for op in list(self._files):
            running = self._conn._core.receiving(op)
            if running is not None:
                self._abort(op)
                self._conn.events.file_aborted(self._conn, running[0], running[1],
                                               close.detail)
        self._disk.stop()
        if self._pool is not None:  # files that ended are finished: verified and durable
            self._pool.shutdown(wait=True)
        for op in list(self._files):  # ended but never completed, as a finisher failed:
            target = self._forget(op)  # not saved, so nothing of it stays
            if target is not None:
                target.file.abort()
        for buf in self._buffers:  # nothing reads into them any more
            buf.close()


class OutgoingFile:
    """The file going out, as one piece on the caller's thread: read, hash and seal
    chunk after chunk into a small pool of reused cipher buffers, which the writer
    thread sends while the next chunk is prepared (memory stays flat)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._plain = memoryview(bytearray(CHUNK_SIZE))
        self._pool: queue.Queue = queue.Queue()
        for _ in range(DATA_IN_FLIGHT):
            self._pool.put(memoryview(bytearray(CHUNK_SIZE + 16)))

    def stream(self, out: transfer.Outgoing, op: int, early_failure, bar=None) -> bytes:
        """Every FileData and the FileEnd of operation op; the file's SHA-256.
        early_failure() handles the replies that came meanwhile and returns a
        FileFailed of this operation, if one came.  The bytes count on `bar` (a
        batch's) or on a bar of the file's own."""
        conn, plain, pool = self._conn, self._plain, self._pool
        h = hashlib.sha256()
        sent = 0
        try:
            f = transfer.open_outgoing(out)
        except OSError as e:  # gone or unreadable since it was checked, but offered
            raise self._cancel(op, out, e) from e
        with f, (conn.events.progress(out.size, f"sending {out.name[:30]}") if bar is None
                 else contextlib.nullcontext(bar)) as bar:
            self._unchanged(op, out, f, "since it was checked")
            while sent < out.size:
                conn._check_interrupted()
                failure = early_failure()
                if failure is not None:
                    conn.send(FileCancel(op, Reason.CANCELLED, "receiver failed"))
                    raise transfer.Rejected(failure.reason,
                                            f"peer could not save it: {failure.detail}")
                try:
                    n = f.readinto(plain[: min(CHUNK_SIZE, out.size - sent)])
                except OSError as e:
                    raise self._cancel(op, out, e) from e
                if not n:
                    conn.send(FileCancel(op, Reason.CANCELLED, "file shrank while being sent"))
                    raise transfer.Rejected(Reason.CANCELLED, f"{out.path} changed while sending")
                h.update(plain[:n])
                buf = self._free_cipher_buffer()
                conn.send(FileData(op, plain[:n]), out=buf, on_sent=lambda b=buf: pool.put(b))
                sent += n
                bar.update(n)
            self._unchanged(op, out, f, "while sending")  # grown, or edited in place
        conn.send(FileEnd(op, h.digest()))
        return h.digest()

    def _unchanged(self, op: int, out: transfer.Outgoing, f, when: str) -> None:
        """Cancel a file that is no longer the one checked at its offer."""
        try:
            transfer.unchanged(out, os.fstat(f.fileno()), when)
        except transfer.Rejected:
            self._conn.send(FileCancel(op, Reason.CANCELLED, "file changed after its check"))
            raise

    def _cancel(self, op: int, out: transfer.Outgoing, e: OSError) -> transfer.Rejected:
        """The file cannot be read any more: the receiver drops it; why it was not sent."""
        self._conn.send(FileCancel(op, Reason.CANCELLED, "sender cannot read the file"))
        return transfer.Rejected(Reason.UNSPECIFIED, f"{out.path}: {e.strerror or e}")

    def _free_cipher_buffer(self) -> memoryview:
        # at most DATA_IN_FLIGHT records wait for the writer: memory stays flat
        conn = self._conn
        stalled_since = time.monotonic()
        while True:
            conn._check_interrupted()
            try:
                return self._pool.get(timeout=POLL)
            except queue.Empty:
                if conn.closed.is_set() or conn._closing:
                    raise ConnectionLost(conn.close_reason or "connection closed") from None
                if time.monotonic() - stalled_since > STALL_TIMEOUT:
                    raise NoAnswer(f"the peer stopped reading for {STALL_TIMEOUT:g} s") from None


def _planned_size(path) -> int:
    """A batch's bar counts the sizes the files have now (0 for one that is not
    there: it will be refused); a stripped or changed file corrects it as it ends."""
    if isinstance(path, transfer.Outgoing):
        return path.size
    try:
        return os.stat(path).st_size
    except (OSError, ValueError):
        return 0


class _Share:
    """One file's part of a batch's bar: what it streamed counts for the batch."""

    def __init__(self, batch: _Batch, index: int) -> None:
        self._batch, self._index = batch, index

    def update(self, n: int) -> None:
        self._batch._sent[self._index] += n
        self._batch.bar.update(n)


class _Batch:
    """The sending side of send_files: offers within the window, streams in offer
    order, replies matched to their operations by id (the core checks each)."""

    def __init__(self, conn: Connection, paths: list, max_size: int, strip: bool,
                 report) -> None:
        self.conn = conn
        self.max_size, self.strip, self.report = max_size, strip, report
        self.outcomes: list = [None] * len(paths)
        self._todo = deque(enumerate(paths))  # not offered yet
        self._next: tuple[int, transfer.Outgoing] | None = None  # checked, waiting for room
        self._ops: dict[int, dict] = {}  # op -> index, out, started, digest, failed
        self._turns: deque = deque()  # offered ops whose stream has not gone out, in order
        self._reported = 0
        self._out = OutgoingFile(conn)  # one cipher buffer pool for the whole batch
        # several files: one bar for all of them (files done, bytes, speed, time left)
        self._planned = [_planned_size(p) for p in paths]
        self._sent = [0] * len(paths)
        self.bar = None  # see run

    def open_bar(self) -> None:
        if len(self.outcomes) > 1:
            self.bar = self.conn.events.progress(sum(self._planned), "sending photos",
                                                 files=len(self.outcomes))

    def run(self) -> None:
        core = self.conn._core
        while True:
            self._offer()
            if not self._ops:
                return
            head = self._turns[0] if self._turns else None
            state = core.outbound[head].state if head in core.outbound else None
            if state in (Outbound.ACCEPTED, Outbound.FAILED):
                self._turns.popleft()
                self._stream(head, state)
                continue
            waiting_accept = state is Outbound.ACCEPT
            self._handle(self.conn.replies.get(REPLY_TIMEOUT if waiting_accept
                                               else SAVED_TIMEOUT))

    def _offer(self) -> None:
        """Offer what fits the window; a file refused here gets its outcome at once."""
        conn, core = self.conn, self.conn._core
        while self._next is not None or self._todo:
            if self._next is None:
                index, path = self._todo.popleft()
                try:
                    out = path if isinstance(path, transfer.Outgoing) else \
                        transfer.check_outgoing(path, self.max_size)
                    if self.strip and not isinstance(path, transfer.Outgoing):
                        out = stripped_outgoing(out)
                except transfer.Rejected as r:
                    self._settle(index, r)
                    continue
                self._next = (index, out)
            index, out = self._next
            with conn._seal_lock:
                fits = core.offer_fits(out.size)
                op = core.file_op() if fits else 0
            if not fits:
                return
            self._next = None
            conn._check_interrupted()
            conn.send(FileOffer(op, out.size, out.name))
            self._ops[op] = dict(index=index, out=out, started=time.monotonic(),
                                 digest=None, failed=None)
            self._turns.append(op)

    def _stream(self, op: int, state: Outbound) -> None:
        entry = self._ops[op]
        if state is Outbound.FAILED:  # failed before its stream began: end it unsent
            self.conn.send(FileCancel(op, Reason.CANCELLED, "receiver failed"))
            self._done(op, self._failed(entry["failed"]))
            return
        share = None if self.bar is None else _Share(self, entry["index"])
        try:
            entry["digest"] = self._out.stream(entry["out"], op,
                                               lambda: self._early_failure(op), share)
        except transfer.Rejected as r:
            self._done(op, r)

    def _early_failure(self, op: int) -> FileFailed | None:
        """Between chunks: handle every reply that came; this op's FileFailed, if any."""
        while (msg := self.conn.replies.get_nowait()) is not None:
            self._handle(msg)
        return self._ops[op]["failed"] if op in self._ops else None

    def _handle(self, reply) -> None:
        reply = self.conn.replies.check(reply)  # matched to its operation by the core
        if reply is None:  # a FileFailed that crossed our FileCancel: no answer
            return
        entry = self._ops[reply.op]
        if isinstance(reply, FileAccept):
            return
        if isinstance(reply, FileReject):
            self._turns.remove(reply.op)
            self._done(reply.op, transfer.Rejected(reply.reason,
                                                   f"rejected by peer: {reply.detail}"))
        elif isinstance(reply, FileFailed) and entry["digest"] is None:
            entry["failed"] = reply  # during (or before) its stream: the stream ends it
        elif isinstance(reply, FileFailed):
            self._done(reply.op, self._failed(reply))
        elif reply.sha256 != entry["digest"]:
            self._done(reply.op, transfer.Rejected(Reason.HASH_MISMATCH,
                                                   "peer's SHA-256 differs from ours"))
        else:
            out = entry["out"]
            self._done(reply.op, FileResult(
                reply.name, out.size, entry["digest"], time.monotonic() - entry["started"],
                "without metadata" if self.strip else ""))

    @staticmethod
    def _failed(reply: FileFailed) -> transfer.Rejected:
        return transfer.Rejected(reply.reason, f"peer could not save it: {reply.detail}")

    def _done(self, op: int, outcome) -> None:
        self._settle(self._ops.pop(op)["index"], outcome)

    def _settle(self, index: int, outcome) -> None:
        self.outcomes[index] = outcome
        if self.bar is not None:
            self.bar.file_done(self._planned[index] - self._sent[index])
        self._flush()

    def _flush(self) -> None:
        while self._reported < len(self.outcomes) and \
                self.outcomes[self._reported] is not None:
            if self.report is not None:
                self.report(self._reported, self.outcomes[self._reported])
            self._reported += 1

    def cut_short(self, e: BaseException) -> None:
        """The batch ends early: an interrupt or a lost session reports the files
        not delivered (after those that were); any other error is the caller's."""
        if isinstance(e, KeyboardInterrupt):
            why = "interrupted"
        elif isinstance(e, ConnectionLost):
            why = str(e) or "connection lost"
        else:
            return
        for index, outcome in enumerate(self.outcomes):
            if outcome is None:
                self.outcomes[index] = NotDelivered(why, isinstance(e, KeyboardInterrupt))
        self._flush()


class NotDelivered(transfer.Rejected):
    """A file of a batch cut short: the session ended or we were interrupted."""

    def __init__(self, detail: str, interrupted: bool) -> None:
        super().__init__(Reason.CANCELLED, detail)
        self.interrupted = interrupted


# --- the socket's two directions --------------------------------------------------------------
class SocketWriter:
    """The socket's send side: each sealed record goes out whole (gathered, never
    joined), in the order it was put.  A small record put while nothing waits goes
    out at once from the caller's thread, as far as the socket takes it without
    blocking (asyncio's transports do the same); the rest, and everything behind
    it, is sent by the writer thread, which may block.  Handing every record to the
    thread cost two thread switches per record, most of a small file's cost.  After a
    failure the rest is dropped, never retried, and `on_failure` gets the Close; at
    the end the send side is shut down."""

    def __init__(self, sock: socket.socket, name: str, send_timeout: float, on_failure) -> None:
        self.sock = sock
        self.send_timeout = send_timeout
        self.queue: queue.Queue = queue.Queue()
        self._on_failure = on_failure
        self.progressed = 0.0  # time.monotonic() when the last record was sent whole
        self.thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._waiting = 0  # records put for the thread that it has not sent yet
        self._count = threading.Lock()  # around _waiting
        self._failed = False
        self._ended = False

    def end(self) -> None:
        """Nothing more goes out after what was put so far (a record put later is
        dropped, as after a failure)."""
        with self._count:
            self._ended = True
        self.queue.put(None)

    def put(self, pieces: list, on_sent=None) -> None:
        """Send a sealed record after those put before it; the callers serialise
        their puts (the session's seal lock), which keeps the records in order.
        A large record always goes to the thread: its caller prepares the next one
        meanwhile (a bulk transfer is slower when the caller sends itself)."""
        with self._count:
            direct = not (self._waiting or self._failed or self._ended) and self.thread.is_alive()
            if direct and sum(map(len, pieces)) <= DIRECT_MAX:
                # under the lock (it never blocks): an end() cannot come between the
                # check and the send, so nothing goes out after the end
                pieces = self._send_now(pieces)
            if pieces:
                self._waiting += 1
        if not pieces:
            if on_sent is not None:
                on_sent()
            return
        self.queue.put((pieces, on_sent))

    def _send_now(self, pieces: list) -> list:
        """What the socket takes without blocking; returns the rest (the writer
        thread sends it, or meets the same error and ends the session)."""
        views = byte_views(pieces)
        try:
            drop_sent(views, self.sock.sendmsg(views, (), socket.MSG_DONTWAIT))
        except OSError:  # BlockingIOError (full), or a failure the thread will report
            return views
        if not views:
            self.progressed = time.monotonic()
        return views

    def sent_or_stalled(self, patience: float) -> float:
        """Wait until the writer has sent all that is queued, or has sent no record for
        `patience` s (at most send_timeout in all); the deadline for the rest of the close."""
        started = time.monotonic()
        limit = started + self.send_timeout
        while True:
            deadline = min(limit, max(started, self.progressed) + patience)
            if not self.thread.is_alive() or time.monotonic() >= deadline:
                return deadline
            _join(self.thread, deadline)

    def _run(self) -> None:
        failed = False
        while (item := self.queue.get()) is not None:
            pieces, on_sent = item
            try:
                if not failed:
                    send_pieces(self.sock, pieces)
                    self.progressed = time.monotonic()
            except (BlockingIOError, TimeoutError):  # SO_SNDTIMEO: no progress at all
                failed = True
                self._on_failure(Close(CloseKind.TIMEOUT, Side.PEER,
                                       f"connection closed: the peer stopped reading for "
                                       f"{self.send_timeout:g} s"))
                shut_down(self.sock)  # wakes the reader: the session is over
            except OSError as e:
                failed = True
                self._on_failure(Close(CloseKind.CONNECTION_LOST, Side.PEER,
                                       f"connection lost: {e.strerror or e}"))
                shut_down(self.sock)
            finally:
                with self._count:
                    self._waiting -= 1
                    self._failed = failed
                if on_sent is not None:
                    on_sent()
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def reader_close(e: Exception) -> tuple[Close, Error | None]:
    """How the reader's exception ends the session, and the Error that tells the peer
    (None when it is gone anyway)."""
    if isinstance(e, AuthError):
        return Close(CloseKind.AUTH_FAILED, Side.PEER, f"connection closed: {e}"), Error(str(e))
    if isinstance(e, ProtocolError):
        by = Side.PEER if isinstance(e, RemoteProtocolError) else Side.LOCAL
        return (Close(CloseKind.PROTOCOL_ERROR, by, f"connection closed: protocol error: {e}"),
                Error(f"protocol error: {e}"))
    if isinstance(e, PeerClosed):
        return Close(CloseKind.PEER_VANISHED, Side.PEER, "peer disconnected"), None
    if isinstance(e, ConnectionLost):
        return Close(CloseKind.CONNECTION_LOST, Side.PEER, str(e)), None
    return (Close(CloseKind.INTERNAL_ERROR, Side.LOCAL,
                  f"connection closed: internal error: {e!r}"), Error("internal error"))


class RecordReader:
    """The reader thread of a Connection: it receives every record into one reused
    frame, opens it through the core and acts on the events (the ordering rules were
    checked there); a received chunk goes on to the incoming file's disk thread."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def run(self) -> None:
        conn = self.conn
        close = Close(CloseKind.PEER_VANISHED, Side.PEER, "connection closed")
        frames = FrameReader(conn.sock)  # every record is received into its buffer
        try:
            while (ended := self._read_one(frames)) is None:
                pass
            close = ended
        except Exception as e:  # also a bug: it must end this session only, with one line
            close, last_word = reader_close(e)
            if last_word is not None:
                conn._send_quietly(last_word)
        finally:
            conn._note_close(close)  # before the clean-up, which takes a while
            try:
                conn._in.aborted(conn.close_info or close)
            finally:  # even if the clean-up fails (a temp file that cannot be removed)
                conn._end(close)

    def _read_one(self, frames: FrameReader) -> Close | None:
        """Receive one record and act on it; the Close when the peer ended the session."""
        conn = self.conn
        body = frames.next()
        buf = conn._in.free.get()
        msg = None
        try:
            msg = conn._core.open_record(body, buf.plain)
            with conn._seal_lock:
                events = conn._core.receive(msg)
                for event in events:  # why, known before a send can find the core closed
                    if isinstance(event, SessionEnded):
                        conn._note_close(event.close)
        except BaseException:
            if isinstance(msg, FileData):
                msg.data.release()
            conn._in.free.put(buf)
            raise
        if not isinstance(msg, FileData):
            conn._in.free.put(buf)  # decode_message copied everything else
        for event in events:
            if isinstance(event, SessionEnded):
                return event.close
            self._handle(event, buf)
        return None

    def _handle(self, event, buf: PlainBuffer) -> None:
        conn, incoming = self.conn, self.conn._in
        if isinstance(event, TextReceived):
            conn.events.text(conn, event.text)
            conn.send(Delivered(event.msg_id))
        elif isinstance(event, FileChunk):
            incoming.chunk(event.op, event.data, buf)  # the disk thread gives buf back
        elif isinstance(event, FileDiscarded):
            incoming.free.put(buf)  # the receiver already failed; the sender ends the stream
        elif isinstance(event, FileOffered):
            incoming.offered(event)
        elif isinstance(event, FileEnded):
            incoming.ended(event.op, event.sha256)
        elif isinstance(event, FileCancelled):
            incoming.cancelled(event)
        elif isinstance(event, ReplyReceived):
            conn.replies.queue.put(event.msg)


class Replies:
    """The caller's side of a Connection: one operation at a time, and the replies
    it waits for (put by the reader; None once the session has ended)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def operation(self):
        """One caller operation at a time.  A peer that breaks the exchange or never
        answers loses the session: any violation closes, as in the reader."""
        conn = self.conn
        with self._lock:
            interrupted = False
            try:
                yield
            except RemoteProtocolError as e:
                conn._send_quietly(Error(f"protocol error: {e}"))
                conn.begin_close(kind=CloseKind.PROTOCOL_ERROR)
                raise
            except NoAnswer:
                conn.begin_close("no answer", kind=CloseKind.TIMEOUT)
                raise
            except KeyboardInterrupt:
                # the session ends (its goodbye follows), but what we sent is still open
                # for the peer (PROTOCOL.md 11.2): its reply may come before our Bye
                interrupted = True
                raise
            finally:
                if not interrupted:
                    with conn._seal_lock:
                        conn._core.operation_over()  # a late reply is the peer's error

    def check(self, reply, *, msg_id: int | None = None):
        """The reply, checked by the core against what the operation waits for."""
        with self.conn._seal_lock:
            return self.conn._core.check_reply(reply, msg_id=msg_id)

    def get(self, timeout: float | None = None):
        """The next reply; NoAnswer after `timeout` s, ConnectionLost once it ended."""
        conn = self.conn
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            conn._check_interrupted()
            left = POLL if deadline is None else min(POLL, deadline - time.monotonic())
            try:
                msg = self.queue.get(timeout=max(0.0, left))
                break
            except queue.Empty as e:
                if deadline is not None and time.monotonic() >= deadline:
                    raise NoAnswer(f"no answer from the peer within {timeout:g} s") from e
        return self._live(msg)

    def get_nowait(self):
        """A reply that has come, or None; ConnectionLost once the session ended."""
        try:
            return self._live(self.queue.get_nowait())
        except queue.Empty:
            return None

    def _live(self, msg):
        """msg, unless it is the end (None): then ConnectionLost, and the end stays
        queued to wake later waiters."""
        if msg is None:
            self.queue.put(None)
            raise ConnectionLost(self.conn.close_reason or "connection closed")
        return msg


# --- the encrypted session ------------------------------------------------------------
class Connection:
    """One authenticated session: a reader thread (RecordReader) that handles what
    the peer sends, a writer thread (SocketWriter) that owns the socket's send side,
    and blocking operations (send_text, send_file(s)) for the caller, one at a time
    (Replies).  The protocol's state is the SessionCore's; this is its plumbing."""

    def __init__(self, sock: socket.socket, records, *, label: str, events: Events,
                 received_dir: str, max_file_size: int = transfer.DEFAULT_MAX_FILE_SIZE,
                 send_timeout: float = SEND_TIMEOUT,
                 interrupted: threading.Event | None = None) -> None:
        self.sock = sock
        self.send_timeout = send_timeout
        self._interrupted = interrupted  # see Interrupt: checked between records
        self.label = label
        self.events = events
        self.received_dir = received_dir
        self.max_file_size = max_file_size
        # the protocol's state lives in the sans-I/O core; this class is its plumbing
        self._core = records if isinstance(records, SessionCore) else \
            SessionCore(records, client=False, opened=True)
        self._seal_lock = threading.Lock()  # around every step of the core
        self._sending = SocketWriter(sock, f"writer {label}", send_timeout, self._end)
        self._out = self._sending.queue  # (pieces, on_sent) of each sealed record; None ends
        self._in = IncomingFile(self)
        self.replies = Replies(self)
        self.closed = threading.Event()
        self._end_lock = threading.Lock()
        self.close_reason = ""  # for people; logic looks at close_info
        self._seen_close: Close | None = None  # what ended the reader or the writer
        self._local_close: Close | None = None  # begin_close, when we ended it first
        self._closing = False  # we ended it: no "peer disconnected" report
        self._reader = threading.Thread(target=RecordReader(self).run, daemon=True,
                                        name=f"reader {label}")
        self._writer = self._sending.thread
        # start() and a shutdown's finish_close() may race (the server registers a session
        # before its thread starts it): this lock orders them, and a close that gave up
        # waiting for the start makes a late start() end the session instead
        self._life = threading.Lock()
        self._started = threading.Event()
        self._abandoned = False

    def start(self) -> Connection:
        with self._life:
            if self._abandoned:
                self._end(Close(CloseKind.LOCAL_SHUTDOWN, Side.LOCAL, "closed before it started"))
                return self
            self._core.start_clock(time.monotonic())  # a key epoch's hour counts from here
            set_send_deadline(self.sock, self.send_timeout)
            try:
                self._writer.start()
                self._reader.start()
            except BaseException:  # e.g. RuntimeError: can't start new thread
                # never started: a close returns at once, and a writer that did start
                # finds the end of its queue (put by _end) and exits
                self._abandoned = True
                self._end(Close(CloseKind.INTERNAL_ERROR, Side.LOCAL,
                                "the session's threads could not start"))
                raise
            self._started.set()
        return self

    # sending side ------------------------------------------------------------------
    def send(self, msg, *, out: memoryview | None = None, on_sent=None) -> None:
        """Seal and queue one message; `out` receives the ciphertext (see seal) and
        `on_sent` runs once the writer is done with it."""
        if self.closed.is_set():
            raise ConnectionLost(self.close_reason or "connection closed")
        if self._out.qsize() > MAX_BACKLOG:
            # an honest peer has one operation outstanding, so our replies cannot pile
            # up unless it stopped reading: it may not make us buffer without bound
            raise RemoteProtocolError("peer is not reading what we send")
        with self._seal_lock:
            if self._core.state is State.CLOSED:  # the peer's Bye came; closed is set next
                raise ConnectionLost(self.close_reason or "connection closed")
            if self._core.state is State.CLOSING and not isinstance(msg, Error | Bye):
                if on_sent is not None:  # we said goodbye: the writer sends nothing more
                    on_sent()
                return
            *key_update, pieces = self._core.seal(msg, time.monotonic(), out)
            for record in key_update:  # a KeyUpdate when one is due
                self._sending.put(record)
            self._sending.put(pieces, on_sent)

    def update_keys(self) -> None:
        """Send a KeyUpdate now (on demand): our direction moves to its next key epoch."""
        if self.closed.is_set():
            raise ConnectionLost(self.close_reason or "connection closed")
        with self._seal_lock:
            self._sending.put(self._core.seal_key_update(time.monotonic()))

    def _send_quietly(self, msg) -> None:
        try:
            self.send(msg)
        except (ConnectionLost, ProtocolError):
            pass

    def _fail(self, e: Exception) -> None:
        """End the session for an exception on one of its threads (the reader's way)."""
        close, last_word = reader_close(e)
        self._note_close(close)  # first: the peer may hang up as soon as it reads the Error
        if last_word is not None:
            self._send_quietly(last_word)
        self._end(close)

    # operations for the caller -------------------------------------------------------
    def _check_interrupted(self) -> None:
        """Act on Ctrl-C/SIGTERM here, between records, never inside one."""
        if self._interrupted is not None and self._interrupted.is_set():
            raise KeyboardInterrupt

    def send_text(self, text: str, timeout: float | None = REPLY_TIMEOUT) -> None:
        """Send one text and wait until the peer acknowledges it."""
        with self.replies.operation():
            msg_id = self._core.text_id()
            self.send(Text(msg_id, text))
            while self.replies.check(self.replies.get(timeout), msg_id=msg_id) is None:
                pass  # a FileFailed that crossed our FileCancel: not this text's answer

    def send_file(self, path: str | transfer.Outgoing,
                  max_size: int = transfer.DEFAULT_MAX_FILE_SIZE, *,
                  strip: bool = False) -> FileResult:
        """Offer, stream and confirm one JPG (without its metadata when strip);
        raises transfer.Rejected when refused (locally or by the peer) or when the
        peer's SHA-256 differs."""
        [outcome] = self.send_files([path], max_size, strip=strip)
        if isinstance(outcome, transfer.Rejected):
            raise outcome
        return outcome

    def send_files(self, paths: list, max_size: int = transfer.DEFAULT_MAX_FILE_SIZE, *,
                   strip: bool = False, report=None) -> list:
        """Send several JPGs pipelined (PROTOCOL.md 11.2): the next files are offered
        while earlier ones stream or wait for FileSaved, within the window; the data
        goes one file at a time in order.  `paths` are paths or checked
        transfer.Outgoing.  Returns one outcome per path, in order: a FileResult, or
        the transfer.Rejected that says why it was not delivered.  report(index,
        outcome) is called in order as soon as each outcome is known.  When the
        batch is cut short (interrupt, lost session), the outcomes known by then are
        reported first, the rest as not delivered, and the exception propagates."""
        batch = _Batch(self, paths, max_size, strip, report)
        try:
            with self.replies.operation():
                batch.open_bar()  # in here: the bar's clock starts with the operation
                batch.run()
        except BaseException as e:
            batch.cut_short(e)
            raise
        finally:
            if batch.bar is not None:
                batch.bar.close()
        return batch.outcomes

    # closing ---------------------------------------------------------------------------
    def _note_close(self, close: Close) -> None:
        """Record what ended the session ahead of _end, so that a send or a wait that
        finds it over meanwhile says why (not just "connection closed")."""
        with self._end_lock:
            if not self.closed.is_set():
                self._record_close(close)

    def _record_close(self, close: Close) -> None:
        """The first close recorded stays (called under _end_lock)."""
        self._seen_close = self._seen_close or close
        self.close_reason = self.close_reason or close.detail

    def _end(self, close: Close) -> None:
        # the reader, the writer, a finisher or the disk thread may end it at once: one wins
        with self._end_lock:
            if self.closed.is_set():
                return
            self._record_close(close)
            say = not self._closing  # decided before anyone woken by `closed` begins a close
            self.closed.set()
        self.replies.queue.put(None)
        self._sending.end()
        if say:
            self.events.closed(self, self.close_reason)

    @property
    def close_info(self) -> Close | None:
        """How the session ended: our own close when we ended it first, else what
        the reader or writer saw (None while it is open)."""
        return self._local_close or self._seen_close

    def begin_close(self, reason: str = "", kind: CloseKind = CloseKind.LOCAL_SHUTDOWN) -> None:
        """Say goodbye (if still connected) and stop sending; returns at once."""
        if self._local_close is None and self._seen_close is None:
            self._local_close = Close(kind, Side.LOCAL, reason or kind.value)
        self._closing = True
        if not self.closed.is_set():
            self._send_quietly(Bye(reason))
        self._sending.end()

    def finish_close(self, deadline: float) -> None:
        """Wait for the goodbye to go out and the peer to hang up, then close.

        Waiting for the peer's EOF (rather than closing at once) keeps the kernel
        from answering late data with a reset that could destroy our goodbye.
        A session not started yet gets until `deadline` to start (and send the goodbye
        queued for it); if it does not, it never will and its socket is closed."""
        if not self._abandoned:  # (a second close of an abandoned one returns at once)
            self._started.wait(max(0.0, deadline - time.monotonic()))
        with self._life:
            if not self._started.is_set():
                self._abandoned = True
                self.sock.close()
                return
        hang_up(self.sock, self._writer, self._reader, deadline)

    def close(self, reason: str = "", timeout: float = LIMITS.close_timeout, *,
              kind: CloseKind = CloseKind.LOCAL_SHUTDOWN) -> None:
        """Goodbye, then close: the goodbye gets `timeout` s without progress, not in all,
        as up to DATA_IN_FLIGHT file records may be queued ahead of it for a slow peer."""
        self.begin_close(reason, kind)
        self.finish_close(self._sending.sent_or_stalled(timeout))


def hang_up(sock: socket.socket, writer: threading.Thread, reader: threading.Thread,
            deadline: float) -> None:
    """Wait until `deadline` for both threads, then shut the socket down (which wakes
    a writer blocked in sendmsg, a reader in recv), let them exit and close it."""
    for thread in (writer, reader):
        _join(thread, deadline)
    if writer.is_alive():
        # what it still holds will never be read: reset rather than leave the
        # kernel to keep it (and the socket) for a peer that does not read
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("@ii", 1, 0))
    shut_down(sock)
    exit_by = time.monotonic() + EXIT_TIMEOUT
    for thread in (writer, reader):
        _join(thread, exit_by)
    sock.close()


def _join(thread: threading.Thread, deadline: float) -> None:
    thread.join(max(0.0, deadline - time.monotonic()))


# --- ML-KEM provider choice (the shell's: it reads the environment and the disk) ------
def liboqs_library() -> str | None:
    """Path of the liboqs shared library if one is installed, else None.

    Checked *before* importing `oqs`, whose import tries to git-clone and build
    liboqs when the library is missing.
    """
    install = os.environ.get("OQS_INSTALL_PATH")
    roots = [Path(install)] if install else [Path.home() / "_oqs"]
    for root in roots:
        for sub in ("lib", "lib64"):
            for name in ("liboqs.so", "liboqs.dylib"):
                if (root / sub / name).exists():
                    return str(root / sub / name)
    import ctypes.util  # noqa: PLC0415 - ~20 ms to import, ~15 ms to ask ldconfig

    return ctypes.util.find_library("oqs")


def oqs_installed() -> bool:
    """Whether liboqs-python is installed: found, not imported (its import is only
    safe once the library is known to exist)."""
    if "oqs" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("oqs") is not None
    except (ImportError, ValueError):
        return False


def _liboqs_kem() -> crypt.LiboqsKEM:
    if liboqs_library() is None:
        raise LocalProtocolError(
            "liboqs is not installed (no liboqs shared library found; "
            "set OQS_INSTALL_PATH or use --kem-provider cryptography)"
        )
    try:
        import oqs  # noqa: PLC0415 - only safe once the library is known to exist
    except Exception as e:  # ImportError, or liboqs-python's own SystemExit-free errors
        raise LocalProtocolError(f"liboqs found but its Python module cannot be used: {e} "
                                 f"(pip install liboqs-python)") from e
    return crypt.LiboqsKEM(oqs)


def kem_provider(name: str = "auto"):
    """`cryptography`, `liboqs`, or `auto` (liboqs where its library exists)."""
    if name == "cryptography":
        return crypt.CryptographyKEM()
    if name == "liboqs":
        return _liboqs_kem()
    if name == "auto":
        if not oqs_installed():  # no liboqs-python: no library to look for
            return crypt.CryptographyKEM()
        try:
            return _liboqs_kem() if liboqs_library() else crypt.CryptographyKEM()
        except LocalProtocolError:  # library present, Python module missing or broken
            return crypt.CryptographyKEM()
    raise LocalProtocolError(f"unknown KEM provider {name!r}")
