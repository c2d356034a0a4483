"""Hostile peers and heavy load against a live server (issue 5; DESIGN.md 3.4, 3.7-3.9).

Socket-level fuzzing, slow and idle connections, a crowd of real clients, tampering
through a relay, escape sequences, SIGTERM mid-transfer and a full disk.  Everything
runs on 127.0.0.1; synchronisation is on output lines, process exits and socket
events, each with a timeout; every loop is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import (
    PY,
    ROOT,
    Env,
    Relay,
    child_env,
    counts,
    files_in,
    handshake_pair,
    identity,
    jpeg_of_size,
    read_to_eof,
    wait_until,
)

import session
import transfer
from client_data import ClientHandshake, known_hosts_line
from protocol import (
    FRAME_HEADER,
    MAX_FRAME,
    Alert,
    AlertCode,
    ClientAuth,
    HandshakeType,
    Reason,
    encode_frame,
    frame_length,
)

IO_TIMEOUT = 20.0
CLOSED_RX = r"^connection from 127\.0\.0\.1:(\d+) closed: (.*)$"


# --- helpers ------------------------------------------------------------------------
def pin(env: Env, srv, *ports: int) -> None:
    """Create the client identity and pin the server (on its port and on relays'), so
    runs print no first-contact noise."""
    if not (env.client_home / "known_hosts").exists():
        r = env.client("--show-identity")
        assert r.returncode == 0, r.stderr
    with open(env.client_home / "known_hosts", "a") as f:
        for port in ports or (srv.port,):
            f.write(known_hosts_line("127.0.0.1", port, srv.fingerprint))


def client_fp(env: Env) -> str:
    return env.client("--show-identity").stdout.strip()


def start_client(env: Env, *args: str) -> subprocess.Popen:
    argv = [PY, "client.py", "--home", str(env.client_home),
            "--received-dir", str(env.client_received), "--assets-dir", str(env.assets), *args]
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, env=child_env())


def finish(p: subprocess.Popen, timeout: float = 60.0) -> tuple[int, str, str]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"client did not finish within {timeout}s:\n{out}\n{err}") from None
    return p.returncode, out, err


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def idle_counts(pid: int) -> tuple[int, int]:
    """Counts of a headless server with no connection: the main thread and the accept loop."""
    return wait_until(lambda: (c := counts(pid))[0] == 2 and c, IO_TIMEOUT,
                      "the server to have only its main and accept threads")


def alert_of(data: bytes) -> Alert:
    n = frame_length(data[:FRAME_HEADER.size])
    assert len(data) == FRAME_HEADER.size + n, f"not exactly one frame: {data!r}"
    return Alert.decode(data[FRAME_HEADER.size:])


def flip_bit(frame: bytes, pos: int) -> bytes:
    b = bytearray(frame)
    b[pos] ^= 0x01
    return bytes(b)


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A small tmpfs (we run as root) to make a full disk real, not mocked."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to simulate a full disk: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_disk(directory: Path) -> Path:
    """Another writer takes every free byte of the file system (bounded loop)."""
    filler = directory / "filler"
    block = b"\0" * (256 << 10)
    free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
    with open(filler, "wb", buffering=0) as f:
        for _ in range(free // len(block) + 4):
            try:
                f.write(block)
            except OSError as e:
                assert e.errno == errno.ENOSPC
                break
        else:
            raise AssertionError("the disk never filled up")
    return filler


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- fuzz ---------------------------------------------------------------------------------
FUZZ_INPUTS = 5000
FUZZ_WORKERS = 8


def fuzz_inputs(n: int, hello: bytes, rng: random.Random) -> list[bytes]:
    """Bytes a hostile or broken peer sends first, from a real ClientHello."""
    frame = encode_frame(hello)
    TYPE, MAGIC_AT, VERSION_AT = 4, 5, 9  # offsets in the frame (after the 4-byte length)

    def flips(data: bytes, count: int) -> bytes:
        b = bytearray(data)
        for _ in range(count):
            i = rng.randrange(len(b) * 8)
            b[i // 8] ^= 1 << (i % 8)
        return bytes(b)

    def garbage_auth() -> bytes:
        kind = rng.randrange(8)
        if kind == 0:
            return rng.randbytes(rng.randrange(1, 200))  # unframed noise
        if kind == 1:
            return encode_frame(rng.randbytes(rng.randrange(1, 8000)))
        if kind == 2:  # the right size and type, random proofs
            return encode_frame(bytes([HandshakeType.CLIENT_AUTH])
                                + rng.randbytes(ClientAuth.SIZE - 1))
        if kind == 3:
            return frame  # a second ClientHello
        if kind == 7:  # the right type, the wrong size
            return encode_frame(bytes([HandshakeType.CLIENT_AUTH])
                                + rng.randbytes(rng.randrange(0, 2 * ClientAuth.SIZE)))
        if kind == 4:
            return encode_frame(bytes([HandshakeType.ALERT, rng.randrange(256)])
                                + rng.randbytes(rng.randrange(0, 300)))
        if kind == 5:
            return struct.pack(">I", rng.choice([0, MAX_FRAME + 1, 0xFFFFFFFF]))
        return b""  # EOF right after the ServerHello

    makers = [
        lambda: rng.randbytes(rng.randrange(0, 64)),
        lambda: struct.pack(">I", rng.randrange(1, 10_000)) + rng.randbytes(rng.randrange(0, 200)),
        lambda: frame[:rng.randrange(0, len(frame))],
        lambda: flips(frame, rng.choice([1, 1, 2, 3])),
        lambda: struct.pack(">I", rng.choice([0, MAX_FRAME + 1, 0x80000000, 0xFFFFFFFF,
                                               MAX_FRAME])) + rng.randbytes(rng.randrange(0, 32)),
        lambda: frame[:MAGIC_AT] + rng.choice([b"QSK1", b"QSK3", b"\0\0\0\0", b"GET ",
                                                rng.randbytes(4)]) + frame[MAGIC_AT + 4:],
        lambda: frame[:VERSION_AT] + struct.pack(">H", rng.choice([0, 2, 3, 0xFFFF,
                                                                   rng.randrange(65536)]))
        + frame[VERSION_AT + 2:],
        lambda: frame[:TYPE] + bytes([rng.choice([0, 2, 3, 0x7F, rng.randrange(256)])])
        + frame[TYPE + 1:],
        lambda: frame + garbage_auth(),
        lambda: frame + garbage_auth(),
    ]
    return [makers[i % len(makers)]() for i in range(n)]


def test_fuzzed_handshakes_never_hurt_the_server(env: Env):
    srv = env.server()
    pid = srv.p.pid
    idle = idle_counts(pid)
    hello = ClientHandshake(identity("client")).create_client_hello()
    inputs = fuzz_inputs(FUZZ_INPUTS, hello, random.Random(20250505))
    ports: list[int] = []
    trouble: list[str] = []

    def attack(data: bytes) -> None:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=IO_TIMEOUT) as s:
            ports.append(s.getsockname()[1])
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the server already hung up on an early byte
            _, how = read_to_eof(s, IO_TIMEOUT, limit=64 << 10)
            if how not in ("eof", "reset"):
                trouble.append(f"{how} after sending {data[:16].hex()}...")

    with ThreadPoolExecutor(FUZZ_WORKERS) as pool:
        list(pool.map(attack, inputs))

    assert trouble == []
    assert srv.p.poll() is None, "the server died"
    # exactly one log line per bad connection, naming the peer and the reason
    logged = [srv.wait_for(CLOSED_RX) for _ in range(len(inputs))]
    assert Counter(int(m.group(1)) for m in logged) == Counter(ports)
    # the inputs reached every check: framing, each field of both messages, the proofs
    reasons = {m.group(2) for m in logged}
    for expected in ("frame length", "in the middle of a frame", "closed by peer",
                     "expected CLIENT_HELLO", "bad magic", "peer speaks protocol version",
                     "ClientHello: ", "invalid P-256 point", "expected CLIENT_AUTH",
                     "ClientAuth: ", "authentication failed", "peer refused", "Alert: "):
        assert any(expected in r for r in reasons), \
            f"no input reached {expected!r}; reasons seen: {sorted(reasons)[:40]}"
    out = srv.output()
    assert "Traceback" not in out and "internal error" not in out
    # and an honest client is served afterwards
    pin(env, srv)
    r = env.client("--port", str(srv.port), "--send-text", "still serving after the fuzz")
    assert r.returncode == 0, r.stderr
    srv.wait_for(r"\] still serving after the fuzz$")
    assert wait_until(lambda: counts(pid) == idle, IO_TIMEOUT,
                      f"thread/fd counts back to {idle} (now {counts(pid)})")
    assert "Traceback" not in srv.output()


# --- slow and idle connections ------------------------------------------------------------
def test_slow_and_idle_connections_time_out_while_a_client_is_served(env: Env):
    # 31 handshakes from one address at once: more than the per-source default allows
    srv = env.server("--handshake-timeout", "2", "--max-startups-per-source", "64")
    pin(env, srv)
    gate = threading.Event()
    relay = Relay(srv.port, gate=gate)
    pin(env, srv, relay.port)
    # the client starts (a slow process start-up) and waits connected to the gated relay
    client = start_client(env, "--port", str(relay.port), "--send-text", "not kept waiting")
    try:
        assert relay.client_waiting(IO_TIMEOUT), "the client never connected"
        socks = [socket.create_connection(("127.0.0.1", srv.port), timeout=IO_TIMEOUT)
                 for _ in range(30)]
        ports = Counter(s.getsockname()[1] for s in socks)
        idle, slow = socks[:15], socks[15:]
        hello = encode_frame(ClientHandshake(identity("client")).create_client_hello())
        stop = threading.Event()

        def trickle() -> None:
            """One byte a second on each slow socket until the server hangs up."""
            live = set(slow)
            for i in range(30):
                for s in list(live):
                    if select.select([s], [], [], 0)[0]:
                        live.discard(s)  # the server spoke (alert or EOF): stop
                        continue
                    try:
                        s.send(hello[i:i + 1])
                    except OSError:
                        live.discard(s)
                if not live or stop.wait(1.0):
                    return

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        gate.set()  # the client's connection reaches the server after the 30
        code, out, err = finish(client)
        assert code == 0, err
        assert "delivered: not kept waiting" in out
        # served first: its text is logged before any of the 30 time out
        srv.wait_for(r"\] not kept waiting$")
        closed = [srv.wait_for(CLOSED_RX) for _ in socks]
        assert Counter(int(m.group(1)) for m in closed) == ports
        assert {m.group(2) for m in closed} == {"handshake not finished within 2 s"}
        # each socket saw the server close it, after a TIMEOUT alert
        for s in socks:
            data, how = read_to_eof(s, IO_TIMEOUT)
            assert how in ("eof", "reset"), how
            if s in idle or data:
                assert alert_of(data) == Alert(AlertCode.TIMEOUT, "handshake timed out")
        stop.set()
        trickler.join(IO_TIMEOUT)
        for s in socks:
            s.close()
    finally:
        if client.poll() is None:
            client.kill()
        relay.close()
    assert "Traceback" not in srv.output()


# --- crowd, max clients, leaks --------------------------------------------------------------
CROWD = 50


def test_crowd_of_clients_all_delivered_bit_exact_and_nothing_leaks(env: Env):
    # a crowd from one address is what --max-startups-per-source refuses by default
    srv = env.server("--handshake-timeout", "60", "--max-startups-per-source", str(CROWD))
    pid = srv.p.pid
    pin(env, srv)
    port = str(srv.port)
    warm = env.client("--port", port, "--send-text", "warm-up")
    assert warm.returncode == 0, warm.stderr
    baseline = idle_counts(pid)

    sent = {}  # name: (size, SHA-256), every file different
    for i in range(CROWD):
        path = jpeg_of_size(env.assets / f"crowd-{i:02d}.jpg", 20_000 + 97 * i)
        sent[path.name] = (path.stat().st_size, sha(path))
    procs = [start_client(env, "--port", port, "--send-text", f"crowd {i:02d} hello",
                          "--send-file", str(env.assets / f"crowd-{i:02d}.jpg"),
                          "--send-text", f"crowd {i:02d} bye") for i in range(CROWD)]
    results = [finish(p, timeout=120) for p in procs]
    failed = [(i, code, err) for i, (code, _, err) in enumerate(results) if code != 0]
    assert failed == []

    fp = client_fp(env)
    byes = [srv.wait_for(rf"^\[{re.escape(fp)}\] crowd (\d\d) bye$", timeout=60).group(1)
            for _ in range(CROWD)]
    assert sorted(byes) == [f"{i:02d}" for i in range(CROWD)]
    out = srv.output()
    for i in range(CROWD):
        assert out.count(f"] crowd {i:02d} hello\n") == 1
    # bit-exact: the received files hash like the sent ones, and the server says so
    assert files_in(env.server_received) == sorted(sent)
    for name, (size, digest) in sent.items():
        assert sha(env.server_received / name) == digest
        assert f"received '{name}': {size} bytes, SHA-256 {digest}, " in out
    assert "Traceback" not in out

    # no leaks: every connection thread and socket is gone once the clients left
    assert wait_until(lambda: counts(pid) == baseline, IO_TIMEOUT,
                      f"thread/fd counts back to {baseline} (now {counts(pid)})")


def test_max_clients_exceeded_gets_a_busy_refusal(env: Env):
    srv = env.server("--max-clients", "2", "--handshake-timeout", "60")
    pin(env, srv)
    pid = srv.p.pid
    baseline = idle_counts(pid)
    # two handshaking connections take both slots (accepted in order, before the third)
    held = [socket.create_connection(("127.0.0.1", srv.port), timeout=IO_TIMEOUT)
            for _ in range(2)]
    held_ports = Counter(s.getsockname()[1] for s in held)
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=IO_TIMEOUT) as third:
            data, how = read_to_eof(third, IO_TIMEOUT)
            assert how == "eof"
            assert alert_of(data) == Alert(AlertCode.BUSY, "server busy, try again later")
            srv.wait_for(rf"^connection from 127\.0\.0\.1:{third.getsockname()[1]} refused: "
                         rf"server busy \(2 connections\)$")
        r = env.client("--port", str(srv.port), "--send-text", "one too many")
        assert r.returncode == 3
        assert error_lines(r.stderr) == [
            "error: server refused the connection: server busy"]
    finally:
        for s in held:
            s.close()
    closed = [srv.wait_for(CLOSED_RX) for _ in held]
    assert Counter(int(m.group(1)) for m in closed) == held_ports
    assert {m.group(2) for m in closed} == {"connection closed by peer"}
    r = env.client("--port", str(srv.port), "--send-text", "room again")
    assert r.returncode == 0, r.stderr
    srv.wait_for(r"\] room again$")
    assert "one too many" not in srv.output()
    assert wait_until(lambda: counts(pid) == baseline, IO_TIMEOUT,
                      f"thread/fd counts back to {baseline} (now {counts(pid)})")


# --- tampering through a relay ----------------------------------------------------------
# Client records after the handshake, in batch mode:
#   texts: 0 "tamper one", 1 "tamper two", 2 "tamper three"
#   file:  0 "tamper one", 1 offer, 2..5 four 1 MiB data chunks, 6 end, 7 "tamper three"
def _flip(target):
    return lambda i, f: [flip_bit(f, len(f) // 2)] if i == target else [f]


def _replay(target):
    seen: list[bytes] = []

    def tamper(i, f):
        seen.append(f)
        return [seen[target - 1], f] if i == target else [f]
    return tamper


def _reorder(first):
    held: list[bytes] = []

    def tamper(i, f):
        if i == first:
            held.append(f)
            return []
        return [f, held.pop()] if i == first + 1 else [f]
    return tamper


def _drop(target):
    return lambda i, f: [] if i == target else [f]


TAMPERS = {  # case: (the middle item is a file, a fresh tamper function)
    "flip-text": (False, lambda: _flip(1)),
    "replay-text": (False, lambda: _replay(1)),
    "flip-file-data": (True, lambda: _flip(3)),
    "replay-file-data": (True, lambda: _replay(3)),
    "reorder-file-data": (True, lambda: _reorder(2)),
    "drop-file-data": (True, lambda: _drop(3)),
}


@pytest.mark.parametrize("case", list(TAMPERS))
def test_tampered_records_end_the_session_and_nothing_after_is_delivered(env: Env, case: str):
    with_file, make_tamper = TAMPERS[case]
    tamper = make_tamper()
    srv = env.server()
    pin(env, srv)
    relay = Relay(srv.port, tamper=tamper)
    pin(env, srv, relay.port)
    middle = ["--send-text", "tamper two"]
    if with_file:
        middle = ["--send-file", str(jpeg_of_size(env.assets / "photo.jpg", 3 * (1 << 20) + 1234))]
    try:
        r = env.client("--port", str(relay.port), "--send-text", "tamper one", *middle,
                       "--send-text", "tamper three")
    finally:
        relay.close()
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.returncode == 5, (r.returncode, r.stderr)
    srv.wait_for(r"\] connection closed: failed to decrypt and authenticate record$")
    out = srv.output()
    assert out.count("] tamper one\n") == 1  # before the bad record, and never twice
    assert "tamper two" not in out and "tamper three" not in out
    assert " saved at " not in out
    assert files_in(env.server_received) == []  # neither the file nor its temp
    assert "Traceback" not in out


# --- terminal safety --------------------------------------------------------------------------
def test_escape_sequences_in_text_and_file_name_are_neutralised(env: Env):
    srv = env.server()
    pin(env, srv)
    text = "\x1b[2J\x1b]0;pwned\x07hi\u202eevil"
    name = "esc\x1b[31mred\x07.jpg"
    path = jpeg_of_size(env.assets / name, 5000)
    r = env.client("--port", str(srv.port), "--send-text", text, "--send-file", str(path))
    assert r.returncode == 0, r.stderr
    fp = client_fp(env)
    srv.wait_for(r"saved at ")
    out = srv.output()
    assert f"[{fp}] \\x1b[2J\\x1b]0;pwned\\x07hi\\u202eevil\n" in out + "\n"
    assert re.search(r"\] receiving 'esc\\{1,2}x1b\[31mred\\{1,2}x07\.jpg' ", out)
    for raw in ("\x1b", "\x07", "\u202e"):
        assert raw not in out, f"raw {raw!r} reached the server's terminal"
        assert raw not in r.stdout + r.stderr
    # the name on disk has no control characters either
    assert files_in(env.server_received) == ["esc[31mred.jpg"]
    assert sha(env.server_received / "esc[31mred.jpg") == sha(path)


# --- graceful shutdown ------------------------------------------------------------------------
def test_sigterm_during_a_transfer_exits_cleanly_and_leaves_nothing(env: Env):
    srv = env.server()
    pin(env, srv)
    big = env.assets / "big.jpg"
    with open(big, "wb") as f:  # 200 MiB, sparse: a JPEG start then zeros
        f.write(b"\xff\xd8\xff\xe0")
        f.truncate(200 << 20)
    client = start_client(env, "--port", str(srv.port), "--send-file", str(big))
    try:
        srv.wait_for(r"\] receiving 'big\.jpg' \(200\.0 MiB\)$")
        assert srv.stop(signal.SIGTERM, timeout=5.0) == 0  # killed (-9) if later than 5 s
        code, out, err = finish(client, timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
    assert code == 5, (code, out, err)
    lines = error_lines(err)
    assert len(lines) == 1 and re.fullmatch(r"error: file not delivered: .+", lines[0]), err
    assert files_in(env.server_received) == []  # no temp file, no partial final file
    out = srv.output()
    assert "shutting down" in out and out.rstrip().endswith("bye")
    assert "Traceback" not in out and " saved at " not in out


def test_client_killed_mid_transfer_is_one_line_and_leaves_nothing(env: Env):
    srv = env.server()
    pid = srv.p.pid
    pin(env, srv)
    baseline = idle_counts(pid)
    big = env.assets / "big.jpg"
    with open(big, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0")
        f.truncate(200 << 20)
    client = start_client(env, "--port", str(srv.port), "--send-file", str(big))
    try:
        srv.wait_for(r"\] receiving 'big\.jpg'")
        client.kill()  # the peer vanishes: no goodbye
        finish(client, timeout=IO_TIMEOUT)
    finally:
        if client.poll() is None:
            client.kill()
    fp = client_fp(env)
    srv.wait_for(rf"^\[{re.escape(fp)}\] (connection|disconnected)")
    assert wait_until(lambda: counts(pid) == baseline, IO_TIMEOUT,
                      f"thread/fd counts back to {baseline} (now {counts(pid)})")
    assert files_in(env.server_received) == []
    out = srv.output()
    lines = [line for line in out.splitlines() if line.startswith(f"[{fp}]")]
    # receiving, the aborted transfer (issue 11), then why the session ended
    assert len(lines) == 3 and "receiving" in lines[0], lines
    assert re.fullmatch(rf"\[{re.escape(fp)}\] receiving 'big\.jpg' aborted after "
                        r"[\d.]+ (?:B|KiB|MiB): .+; nothing saved", lines[1]), lines
    assert srv.p.poll() is None and "Traceback" not in out


# --- a full disk ------------------------------------------------------------------------------
def test_disk_full_during_a_transfer_is_refused_cleanly_and_the_server_goes_on(env: Env):
    with tmpfs(env.root / "disk", "2m") as disk:
        srv = env.server("--received-dir", str(disk))
        pin(env, srv)
        photo = jpeg_of_size(env.assets / "photo.jpg", 1_500_000)
        gate = threading.Event()

        def hold_data(i, f):
            # the first data record waits until the disk has filled up after the offer
            if i == 1 and not gate.wait(IO_TIMEOUT):
                raise OSError("gate never opened")
            return [f]

        relay = Relay(srv.port, tamper=hold_data)
        pin(env, srv, relay.port)
        client = start_client(env, "--port", str(relay.port), "--send-file", str(photo))
        try:
            srv.wait_for(r"\] receiving 'photo\.jpg'")  # the offer passed the free-space check
            filler = fill_disk(disk)
            gate.set()
            code, out, err = finish(client, timeout=30)
        finally:
            gate.set()
            if client.poll() is None:
                client.kill()
            relay.close()
        assert code == 5, (code, out, err)
        assert error_lines(err) == ["error: file not delivered: peer could not save it: "
                                    "not enough disk space on the receiver"]
        srv.wait_for(r"\] file 'photo\.jpg' not saved: not enough disk space on the receiver$")
        assert files_in(disk) == ["filler"]  # the temporary file is gone

        # the server goes on: once there is room, the next client is served
        filler.unlink()
        small = jpeg_of_size(env.assets / "small.jpg", 10_000)
        r = env.client("--port", str(srv.port), "--send-file", str(small),
                       "--send-text", "after the full disk")
        assert r.returncode == 0, r.stderr
        srv.wait_for(r"\] after the full disk$")
        assert files_in(disk) == ["small.jpg"] and sha(disk / "small.jpg") == sha(small)
        out = srv.output()
        assert "Traceback" not in out and "internal error" not in out
        assert srv.stop() == 0


class _Recorder(session.Events):
    def __init__(self, on_offer=None) -> None:
        self.lines: list[str] = []
        self.texts: list[str] = []
        self.on_offer = on_offer

    def out(self, line: str) -> None:
        self.lines.append(line)

    def text(self, conn, text):
        self.texts.append(text)
        super().text(conn, text)

    def file_offered(self, conn, name, size):
        super().file_offered(conn, name, size)
        if self.on_offer is not None:
            self.on_offer()


def test_disk_full_mid_transfer_keeps_the_session_going(tmp_path: Path):
    """In process, over a socketpair: the receiver's disk fills up right after it
    accepted an offer; the sender gets the reason and the same session goes on."""
    with tmpfs(tmp_path / "disk", "2m") as disk:
        fill = []
        receiver_events = _Recorder(on_offer=lambda: fill and fill.pop()())
        pair = handshake_pair()
        a, b = socket.socketpair()
        receiver = session.Connection(a, pair.server.records(), label="client",
                                      events=receiver_events, received_dir=str(disk)).start()
        sender = session.Connection(b, pair.client.records(), label="server", events=_Recorder(),
                                    received_dir=str(tmp_path / "unused")).start()
        try:
            photo = jpeg_of_size(tmp_path / "photo.jpg", 1_500_000)
            fill.append(lambda: fill_disk(disk))
            with pytest.raises(transfer.Rejected) as rejected:
                sender.send_file(str(photo))
            assert rejected.value.reason == Reason.NO_SPACE
            assert rejected.value.detail == ("peer could not save it: "
                                             "not enough disk space on the receiver")
            assert files_in(disk) == ["filler"]

            sender.send_text("still connected")
            (disk / "filler").unlink()
            small = jpeg_of_size(tmp_path / "small.jpg", 10_000)
            result = sender.send_file(str(small))
            assert result.sha256.hex() == sha(small)
            assert files_in(disk) == ["small.jpg"] and sha(disk / "small.jpg") == sha(small)
            assert receiver_events.texts == ["still connected"]
            assert not receiver.closed.is_set() and not sender.closed.is_set()
        finally:
            sender.close("done", timeout=5)
            receiver.close("done", timeout=5)


def test_a_peer_that_never_reads_cannot_make_us_buffer_without_bound(tmp_path: Path):
    """A peer floods texts and never reads our Delivered replies: once MAX_BACKLOG
    replies wait for the writer, its session ends; memory stays bounded."""
    from protocol import MsgType, Text

    pair = handshake_pair()
    a, b = socket.socketpair()
    events = _Recorder()
    victim = session.Connection(a, pair.server.records(), label="flooder", events=events,
                                received_dir=str(tmp_path)).start()
    sender, _ = pair.client.records()  # the flooder seals by hand and never reads
    # Once the victim stops reading, a blocking send would never return (the victim's
    # writer is stuck too): each send waits a little, and between waits we look again
    # whether the victim has ended the session, within one generous deadline.
    b.settimeout(0.1)
    deadline = time.monotonic() + 60
    sent = 0
    try:
        for sent in range(1, 200_001):  # bounded: far more than any buffer holds
            record = memoryview(b"".join(sender.seal(MsgType.TEXT, Text(sent, "").encode())))
            while record and not victim.closed.is_set() and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    record = record[b.send(record):]
            if victim.closed.is_set() or time.monotonic() >= deadline:
                break
    except OSError:
        pass  # the victim hung up on us
    assert victim.closed.wait(20)
    assert victim.close_reason == \
        "connection closed: protocol error: peer is not reading what we send"
    # it gave up after a bounded backlog, long before the flood ended
    assert victim._out.qsize() <= session.MAX_BACKLOG + 2
    assert sent < 200_000
    b.close()
    victim.close(timeout=2)
