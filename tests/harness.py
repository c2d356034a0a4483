"""The test harness, shared by tests/ and benchmarks/: in-memory handshakes, real
server/client processes (`Proc`, `Server`, `Env`), relays, test JPEGs and the
pseudo-terminal driver (`Screen`, `Tty`).

tests/conftest.py re-exports it and adds the pytest fixtures; benchmarks/bench.py
and benchmarks/soak.py import it with tests/ on sys.path.  Nothing here imports
pytest.  Synchronisation is always on output lines with a timeout, never on sleeps.
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pexpect
from wcwidth import wcwidth

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
LINE_TIMEOUT = 20.0
JPEG_HEAD = b"\xff\xd8\xff\xe0"  # SOI + APP0: enough for the JPEG checks

import crypt  # noqa: E402
from client_data import ClientHandshake  # noqa: E402
from server_data import ServerHandshake  # noqa: E402

# Identities are slow-ish to make (ML-DSA keygen); reuse a few per test session.
_IDS: dict[str, crypt.Identity] = {}


def identity(name: str) -> crypt.Identity:
    if name not in _IDS:
        _IDS[name] = crypt.Identity.generate()
    return _IDS[name]


@dataclass
class Pair:
    client: ClientHandshake
    server: ServerHandshake
    client_hello: bytes
    server_hello: bytes
    client_auth: bytes


def handshake_pair(client_id: crypt.Identity | None = None,
                   server_id: crypt.Identity | None = None) -> Pair:
    """A complete in-memory handshake between the two sans-I/O cores."""
    c = ClientHandshake(client_id or identity("client"))
    s = ServerHandshake(server_id or identity("server"))
    return Pair(c, s, *run_handshake(c, s))


def run_handshake(c: ClientHandshake, s: ServerHandshake) -> tuple[bytes, bytes, bytes]:
    """Drive both cores through every step; returns (ClientHello, ServerHello, ClientAuth)."""
    ch = c.create_client_hello()
    s.consume_client_hello(ch)
    sh = s.create_server_hello()
    c.consume_server_hello(sh)
    ca = c.create_client_auth()
    s.consume_client_auth(ca)
    return ch, sh, ca


# --- JPEGs -------------------------------------------------------------------------
def make_jpeg(path: Path, size=(64, 48), *, mode="RGB", progressive=False, exif=False,
              quality=90, noise=False) -> Path:
    from PIL import Image

    if noise:
        img = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
        if mode != "RGB":
            img = img.convert(mode)
    else:
        img = Image.new(mode, size, (10, 120, 200) if mode == "RGB" else None)
    kwargs = {"quality": quality, "progressive": progressive}
    if exif:
        ex = Image.Exif()
        ex[0x010F] = "QSocket test camera"  # Make
        ex[0x0110] = "Model 2"
        kwargs["exif"] = ex.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", **kwargs)
    return path


def jpeg_of_size(path: Path, total: int) -> Path:
    """A file of exactly `total` bytes that starts like a JPEG (SOI + APP0 marker) and
    goes on with random bytes; written in blocks, so a benchmark's 1 GiB is cheap."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(JPEG_HEAD[:total])
        while (left := total - f.tell()) > 0:
            f.write(os.urandom(min(16 << 20, left)))
    return path


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# --- processes ------------------------------------------------------------------------
def child_env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("QSOCKET_KEYLOGFILE", None)
    env["PYTHONUNBUFFERED"] = "1"
    env["PROMPT_TOOLKIT_NO_CPR"] = "1"
    env.update(extra)
    return env


class Proc:
    """A child process whose merged output is read line by line in the background."""

    def __init__(self, argv: list[str], env: dict | None = None, cwd: Path | None = None) -> None:
        self.argv = argv
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, text=True, cwd=cwd or ROOT,
                                  env=env or child_env(), bufsize=1)
        self.lines: list[str] = []
        self._q: queue.Queue = queue.Queue()
        self._t = threading.Thread(target=self._pump, daemon=True)
        self._t.start()
        self._seen = 0

    @property
    def pid(self) -> int:
        return self.p.pid

    def _pump(self) -> None:
        for line in self.p.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def _drain(self, timeout: float) -> bool:
        try:
            item = self._q.get(timeout=timeout)
        except queue.Empty:
            return False
        if item is None:
            self._q.put(None)
            return False
        self.lines.append(item)
        return True

    def wait_for(self, pattern: str, timeout: float = LINE_TIMEOUT) -> re.Match:
        """The first line (not yet matched by an earlier wait) matching `pattern`."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for i in range(self._seen, len(self.lines)):
                m = rx.search(self.lines[i])
                if m:
                    self._seen = i + 1
                    return m
            left = deadline - time.monotonic()
            if left <= 0 or (not self._drain(left) and self.p.poll() is not None
                             and self._q.qsize() <= 1):
                raise AssertionError(f"no line matching {pattern!r} within {timeout}s; "
                                     f"output so far:\n" + "\n".join(self.lines))

    def output(self) -> str:
        while self._drain(0.0):
            pass
        return "\n".join(self.lines)

    def stop(self, sig=signal.SIGINT, timeout: float = 10.0) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            code = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            code = self.p.wait()
        self._t.join(5)
        self.output()
        return code


class Server(Proc):
    def __init__(self, home: Path, received: Path, *extra: str, env: dict | None = None) -> None:
        super().__init__([PY, "server.py", "--headless", "--port", "0", "--home", str(home),
                          "--received-dir", str(received), *extra], env=env)
        try:
            m = self.wait_for(r"^listening on ([\d.]+):(\d+)$")
            self.port = int(m.group(2))
            self.fingerprint = self.wait_for(r"^identity (SHA256:\S+)$").group(1)
        except BaseException:
            self.stop()  # no server outlives a start-up that failed
            raise


@dataclass
class Env:
    """Per-test directories: homes, assets and received dirs for both sides."""

    root: Path
    server_home: Path
    client_home: Path
    server_received: Path
    client_received: Path
    assets: Path

    def server(self, *extra: str, **kw) -> Server:
        srv = Server(self.server_home, self.server_received, *extra, **kw)
        self._servers.append(srv)
        return srv

    def client(self, *args: str, home: Path | None = None, timeout: float = 60,
               env: dict | None = None) -> subprocess.CompletedProcess:
        argv = [PY, "client.py", "--home", str(home or self.client_home),
                "--received-dir", str(self.client_received),
                "--assets-dir", str(self.assets), *args]
        return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, env=env or child_env())


# --- sockets and processes, observed ---------------------------------------------------
def counts(pid: int) -> tuple[int, int]:
    """(threads, open file descriptors) of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    threads = int(re.search(r"^Threads:\s+(\d+)$", status, re.M).group(1))
    return threads, len(os.listdir(f"/proc/{pid}/fd"))


def wait_until(condition, timeout: float, what: str):
    """Poll a condition (bounded in time); teardown elsewhere is asynchronous."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def read_to_eof(sock: socket.socket, timeout: float, limit: int = 1 << 20) -> tuple[bytes, str]:
    """Everything the peer sends until it closes: (data, "eof" | "reset" | "timeout")."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    total = 0
    while total <= limit:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks), "timeout"
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return b"".join(chunks), "timeout"
        except OSError:
            return b"".join(chunks), "reset"
        if not data:
            return b"".join(chunks), "eof"
        chunks.append(data)
        total += len(data)
    return b"".join(chunks), "too much data"


class Relay:
    """A TCP relay on 127.0.0.1 (a given port, or a free one) to a target port, under
    the test's control.  Every accepted connection is piped both ways; a half-close is
    passed on, so each side sees the other finish as it would directly.

    Every client->server byte is kept in `c2s` and counted in `up`; `finished` is set
    when the first connection has ended both ways (`join()` waits for it).
    - tamper(index, frame) -> frames to forward: the client's bytes are read as frames
      (4-byte length prefix); the two handshake frames pass, each record after them
      goes through `tamper` (`records` counts them).
    - cut_after: after this many client->server bytes both sides are shut down.
    - hold_after: server->client bytes beyond this wait until release().
    - gate: accept only once the gate is set (a client waits, connected, meanwhile).
    """

    MAX_FRAMES = 100_000

    def __init__(self, target_port: int, listen_port: int = 0, *, tamper=None,
                 cut_after: int | None = None, hold_after: int | None = None,
                 gate: threading.Event | None = None) -> None:
        assert tamper is None or cut_after is None, "tamper by frames or cut by bytes"
        self.target = target_port
        self.tamper, self.cut_after, self.hold_after, self.gate = (tamper, cut_after,
                                                                   hold_after, gate)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", listen_port))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.c2s = bytearray()
        self.up = 0  # client -> server bytes forwarded
        self.records = 0  # client records after the handshake, with `tamper`
        self.finished = threading.Event()  # set when the first connection has ended
        self._released = threading.Event()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="relay").start()

    # the test's controls ----------------------------------------------------------------
    def client_waiting(self, timeout: float) -> bool:
        """True once a connection is pending in the listener's backlog."""
        return bool(select.select([self.sock], [], [], timeout)[0])

    def release(self) -> None:
        self._released.set()

    def join(self) -> None:
        """Wait until the first connection has ended, then stop listening."""
        assert self.finished.wait(LINE_TIMEOUT), "the relayed connection never ended"
        self.sock.close()

    def close(self) -> None:
        for s in (self.sock, *self._socks):
            s.close()

    # the relay ----------------------------------------------------------------------------
    def _accept(self) -> None:
        if self.gate is not None and not self.gate.wait(60):
            return
        while True:
            try:
                client, _ = self.sock.accept()
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                return
            self._socks += [client, server]
            threading.Thread(target=self._connection, args=(client, server),
                             daemon=True).start()

    def _connection(self, client: socket.socket, server: socket.socket) -> None:
        down = threading.Thread(target=self._down, args=(server, client), daemon=True)
        down.start()
        if self._frames(client, server) if self.tamper else self._bytes(client, server):
            _quietly(server.shutdown, socket.SHUT_WR)  # the client finished: pass it on
        else:  # cut, or a socket failed: both sides end
            for s in (client, server):
                _quietly(s.shutdown, socket.SHUT_RDWR)
        down.join(LINE_TIMEOUT)
        client.close()
        server.close()
        self.finished.set()

    def _bytes(self, client: socket.socket, server: socket.socket) -> bool:
        """Forward client -> server until EOF (True) or the cut (False)."""
        try:
            while self.cut_after is None or self.up < self.cut_after:
                want = 1 << 16
                if self.cut_after is not None:
                    want = min(want, self.cut_after - self.up)
                data = client.recv(want)
                if not data:
                    return True
                self.c2s += data
                server.sendall(data)
                self.up += len(data)
        except OSError:
            pass
        return False

    def _frames(self, client: socket.socket, server: socket.socket) -> bool:
        """Forward client -> server frame by frame through `tamper`; True on EOF."""
        try:
            for n in range(self.MAX_FRAMES):
                header = _recv_exact(client, 4)
                if header is None:
                    return True
                body = _recv_exact(client, int.from_bytes(header, "big"))
                if body is None:
                    raise ConnectionError("EOF after a frame header")
                frame = header + body
                self.c2s += frame
                self.up += len(frame)
                if n < 2:
                    out = [frame]
                else:
                    self.records = n - 1
                    out = self.tamper(n - 2, frame)
                for f in out:
                    server.sendall(f)
        except OSError:
            pass
        return False

    def _down(self, server: socket.socket, client: socket.socket) -> None:
        sent = 0
        try:
            while True:
                want = 1 << 16
                if self.hold_after is not None and not self._released.is_set():
                    if sent >= self.hold_after:
                        self._released.wait(LINE_TIMEOUT)
                        self._released.set()  # never hold longer than that
                        continue
                    want = min(want, self.hold_after - sent)
                data = server.recv(want)
                if not data:
                    break
                client.sendall(data)
                sent += len(data)
        except OSError:
            pass
        _quietly(client.shutdown, socket.SHUT_WR)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """n bytes, or None on EOF before the first byte (the relay's own framing)."""
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        if not data:
            if buf:
                raise ConnectionError("EOF inside a frame")
            return None
        buf += data
    return bytes(buf)


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except OSError:
        pass


# --- a program in a pseudo-terminal ------------------------------------------------------
_CSI = re.compile(r"\x1b\[([0-?]*)([ -/]*)([@-~])")
_ESC = re.compile(r"\x1b(?:\][^\x07\x1b]*(?:\x07|\x1b\\)|[()][0-9A-Za-z]|[=>78DEHMc])")
_PARTIAL_ESC = re.compile(r"\x1b(?:\[[0-?]*[ -/]*|\][^\x07\x1b]*\x1b?|[()])?")


class Screen:
    """The lines a terminal shows, from the raw bytes a program wrote to its pty.

    Models one line at a time (enough at 200 columns): printable characters by
    cell width, CR, LF, BS, cursor left/right/column, erase to the end. Events are
    ("line", text) when a line is finished and ("shown", text) when prompt_toolkit
    shows the cursor after painting (the prompt the user now sees)."""

    def __init__(self) -> None:
        self.cells: list[str] = []
        self.col = 0
        self.pending = ""
        self.events: list[tuple[str, str]] = []

    def current(self) -> str:
        return "".join(self.cells).rstrip()

    def feed(self, data: str) -> None:
        data, self.pending = self.pending + data, ""
        i = 0
        while i < len(data):
            ch = data[i]
            if ch == "\x1b":
                m = _CSI.match(data, i)
                if m:
                    self._csi(*m.groups())
                    i = m.end()
                    continue
                m = _ESC.match(data, i)
                if m:
                    i = m.end()
                    continue
                if _PARTIAL_ESC.fullmatch(data, i):  # split across reads: wait for the rest
                    self.pending = data[i:]
                    return
                i += 1
                continue
            self._char(ch)
            i += 1

    def _csi(self, params: str, _inter: str, final: str) -> None:
        n = int(params) if params.isdigit() else 1
        if final == "C":
            self.col += n
        elif final == "D":
            self.col = max(0, self.col - n)
        elif final == "G":
            self.col = max(0, n - 1)
        elif final in "JK" and params in ("", "0"):
            del self.cells[self.col:]
        elif final == "h" and params == "?25":
            text = self.current()
            if text and self.events[-1:] != [("shown", text)]:
                self.events.append(("shown", text))

    def _char(self, ch: str) -> None:
        if ch == "\n":
            self.events.append(("line", self.current()))
            self.cells, self.col = [], 0
        elif ch == "\r":
            self.col = 0
        elif ch == "\b":
            self.col = max(0, self.col - 1)
        elif ch >= " ":
            width = wcwidth(ch)
            if width == 0 and self.col > 0:  # combining mark joins the previous cell
                self.cells[self.col - 1] += ch
                return
            width = max(width, 1)
            while len(self.cells) < self.col + width:
                self.cells.append(" ")
            self.cells[self.col] = ch
            for k in range(1, width):
                self.cells[self.col + k] = ""
            self.col += width


class Tty:
    """One program in a pseudo-terminal, 24x200, with a cursor over what it showed."""

    def __init__(self, script: str, *args: str, preexec_fn=None) -> None:
        env = child_env(TERM="xterm", LANG="C.UTF-8")
        for var in ("COLUMNS", "LINES", "LC_ALL", "NO_COLOR"):
            env.pop(var, None)
        self.child = pexpect.spawn(PY, [script, *args], cwd=str(ROOT), env=env,
                                   dimensions=(24, 200), timeout=LINE_TIMEOUT, encoding="utf-8",
                                   codec_errors="replace", preexec_fn=preexec_fn)
        self.screen = Screen()
        self.seen = 0
        self.eof = False

    # reading ----------------------------------------------------------------------
    def _read(self, timeout: float) -> None:
        try:
            self.screen.feed(self.child.read_nonblocking(65536, timeout=max(timeout, 0.01)))
        except pexpect.TIMEOUT:
            pass
        except pexpect.EOF:
            self.eof = True
            if self.screen.current():  # a last line without a newline
                self.screen.feed("\n")

    def _wait(self, what: str, found, timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            hit = found()
            if hit is not None:
                return hit
            left = deadline - time.monotonic()
            if left <= 0 or self.eof:
                raise AssertionError(f"{what} not seen within {timeout:g} s"
                                     f"{' (program ended)' if self.eof else ''}; "
                                     f"the terminal showed:\n{self.text()}")
            self._read(min(left, 1.0))

    def expect_line(self, pattern: str, timeout: float = LINE_TIMEOUT) -> re.Match:
        """The first finished line after the cursor that matches `pattern`."""
        rx = re.compile(pattern)

        def found():
            for i in range(self.seen, len(self.screen.events)):
                kind, text = self.screen.events[i]
                m = rx.search(text) if kind == "line" else None
                if m:
                    self.seen = i + 1
                    return m
            return None
        return self._wait(f"a line matching {pattern!r}", found, timeout)

    def expect_prompt(self, prompt: str, timeout: float = LINE_TIMEOUT) -> None:
        """Wait until the terminal shows `prompt` with nothing typed after it."""
        want = prompt.rstrip()

        def found():
            for i in range(self.seen, len(self.screen.events)):
                if self.screen.events[i] == ("shown", want):
                    self.seen = i + 1
                    return True
            if self.screen.current() == want and not self.screen.pending:
                self.seen = len(self.screen.events)  # e.g. input() in cooked mode
                return True
            return None
        self._wait(f"the prompt {prompt!r}", found, timeout)

    def lines(self, pattern: str) -> list[re.Match]:
        """Every finished line so far matching `pattern` (does not move the cursor)."""
        rx = re.compile(pattern)
        return [m for kind, text in self.screen.events if kind == "line"
                for m in [rx.search(text)] if m]

    def text(self) -> str:
        lines = [text for kind, text in self.screen.events if kind == "line"]
        return "\n".join(lines + [self.screen.current()])

    # typing and ending --------------------------------------------------------------------
    def type(self, text: str) -> None:
        """Type a line and press Enter (a terminal sends CR)."""
        self.child.send(text + "\r")

    def answer(self, prompt: str, text: str) -> None:
        self.expect_prompt(prompt)
        self.type(text)

    def ctrl_c(self) -> None:
        self.wait_idle()
        self.child.sendcontrol("c")

    def wait_idle(self, timeout: float = LINE_TIMEOUT) -> None:
        """Wait until the program's main thread sleeps, i.e. waits for the user.

        A prompt on the screen is not enough for ^C at a cooked-mode input(): CPython
        raises KeyboardInterrupt there only when the signal interrupts the read, so a
        SIGINT that lands between printing the prompt and blocking in read() waits
        for the next Enter.  No person is that fast; a loaded test machine is."""
        stat = Path(f"/proc/{self.child.pid}/stat")
        if not stat.exists():  # no procfs: fall back to the prompt alone
            return
        deadline = time.monotonic() + timeout
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "S":
            assert time.monotonic() < deadline, f"never idle:\n{self.text()}"
            time.sleep(0.005)  # polling a state, not waiting a fixed time

    def wait_exit(self, timeout: float = LINE_TIMEOUT) -> int:
        """Read to the end of output; the exit status (negative: killed by that signal)."""
        self._wait("the end of output", lambda: True if self.eof else None, timeout)
        deadline = time.monotonic() + timeout
        while self.child.isalive():
            assert time.monotonic() < deadline, f"still running after EOF:\n{self.text()}"
            time.sleep(0.02)  # the pty is closed; reap the process
        if self.child.signalstatus is not None:
            return -self.child.signalstatus
        return self.child.exitstatus

    def kill(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)
        self.child.close(force=True)


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


__all__ = ["io", "ROOT", "PY", "LINE_TIMEOUT", "JPEG_HEAD", "identity", "handshake_pair",
           "run_handshake", "make_jpeg", "jpeg_of_size", "file_sha256", "child_env", "Proc",
           "Server", "Env", "Relay", "Screen", "Tty", "files_in", "counts", "wait_until",
           "read_to_eof"]
