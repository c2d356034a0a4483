"""Shared fixtures: in-memory handshakes, real server/client processes, test JPEGs.

Synchronisation is always on output lines with a timeout, never on sleeps.
"""

from __future__ import annotations

import io
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
LINE_TIMEOUT = 20.0

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
    """A file of exactly `total` bytes that starts like a JPEG (SOI + APP0 marker)."""
    head = b"\xff\xd8\xff\xe0"
    body = os.urandom(max(0, total - len(head)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((head + body)[:total])
    return path


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
        m = self.wait_for(r"^listening on ([\d.]+):(\d+)$")
        self.port = int(m.group(2))
        self.fingerprint = self.wait_for(r"^identity (SHA256:\S+)$").group(1)


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


@pytest.fixture
def env(tmp_path: Path):
    e = Env(tmp_path, tmp_path / "server-home", tmp_path / "client-home",
            tmp_path / "server-received", tmp_path / "client-received", tmp_path / "assets")
    e.assets.mkdir()
    e._servers = []
    yield e
    for srv in e._servers:
        srv.stop()


class Relay:
    """A TCP relay on 127.0.0.1 (a given port, or a free one) to a target port.

    Keeps every client->server byte in `c2s`, so a test can read the capture; each
    accepted connection is piped both ways until either side closes.
    """

    def __init__(self, target_port: int, listen_port: int = 0) -> None:
        self.target = target_port
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", listen_port))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.c2s = bytearray()
        self.finished = threading.Event()  # set when the first connection has ended
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.sock.accept()
            except OSError:
                return
            b = socket.create_connection(("127.0.0.1", self.target))
            down = threading.Thread(target=self._pipe, args=(b, a, None), daemon=True)
            down.start()
            threading.Thread(target=self._up, args=(a, b, down), daemon=True).start()

    def _up(self, a, b, down: threading.Thread) -> None:
        self._pipe(a, b, self.c2s)
        down.join(LINE_TIMEOUT)
        self.finished.set()

    @staticmethod
    def _pipe(src, dst, keep: bytearray | None) -> None:
        try:
            while data := src.recv(65536):
                if keep is not None:
                    keep += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


__all__ = ["io", "ROOT", "PY", "identity", "handshake_pair", "make_jpeg", "jpeg_of_size",
           "Proc", "Server", "Env", "Relay", "files_in", "child_env", "run_handshake"]
