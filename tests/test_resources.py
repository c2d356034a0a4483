"""Hostile peers, round two (issue 9): nothing leaks, nothing dies, nothing is left behind.

A peer that never reads, an accept() that fails, a thread that cannot start, strangers
filling known_clients, one address holding handshakes open.  Synchronisation is on
output lines and polled /proc counts with generous deadlines, never on sleeps.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import platform
import re
import resource
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import PY, ROOT, Env, child_env, handshake_pair, identity
from test_hostile import (
    IO_TIMEOUT,
    alert_of,
    counts,
    idle_counts,
    pin,
    read_to_eof,
    wait_until,
)

import server
import session
from client_data import ClientHandshake
from protocol import Alert, AlertCode, Bye, Text, Welcome, decode_message
from server_data import known_clients_line

BUSY = Alert(AlertCode.BUSY, "server busy, try again later")
PER_SOURCE_BUSY = Alert(AlertCode.BUSY, "too many handshakes from your address, try again later")


# --- helpers ------------------------------------------------------------------------
def raw_session(port: int, who: str = "raw", *, rcvbuf: int | None = None,
                source: str = "127.0.0.1"):
    """A client handshake done by hand: (socket, our record sender), once welcomed."""
    sock = socket.socket()
    if rcvbuf is not None:  # before connect(), so that the window is small from the start
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        # and a small MSS: the server's kernel sizes its send buffer from the MSS when the
        # connection is set up (4 MiB on loopback's 64 KiB MSS, ~100 KiB with this one), so
        # its writer blocks after a few hundred replies, well within its 60 s send deadline
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    sock.bind((source, 0))
    sock.settimeout(IO_TIMEOUT)
    sock.connect(("127.0.0.1", port))
    hs = ClientHandshake(identity(who))
    session.send_frame(sock, hs.create_client_hello())
    hs.consume_server_hello(bytes(session.read_frame(sock)))
    session.send_frame(sock, hs.create_client_auth())
    sender, receiver = hs.records()
    assert isinstance(decode_message(*receiver.open(session.read_frame(sock))), Welcome)
    return sock, sender


def send_record(sock: socket.socket, sender, msg) -> None:
    session.send_pieces(sock, sender.seal(msg.TYPE, msg.encode()))


def server_sockets(port: int) -> dict[int, tuple[str, int]]:
    """The server's end of each TCP connection to `port`, from /proc/net/tcp:
    {peer port: (state, bytes in its send queue)}; state 01 is ESTABLISHED."""
    found = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1].split(":"), fields[2].split(":")
        if int(local[1], 16) == port and remote[0] != "00000000":
            found[int(remote[1], 16)] = (fields[3], int(fields[4].split(":")[0], 16))
    return found


def established(port: int) -> int:
    return sum(state == "01" for state, _ in server_sockets(port).values())


# --- 1. a peer that never reads -------------------------------------------------------
SENDMSG = {"x86_64": 46, "aarch64": 211}.get(platform.machine())  # syscall numbers


def blocked_in_sendmsg(pid: int, port: int, peer_port: int) -> bool:
    """Whether a thread of `pid` sleeps in sendmsg on its socket to our `peer_port`, i.e.
    waits for room in a send buffer that a peer which never reads will never free
    (from /proc: the socket's inode in /proc/net/tcp, its fd, each thread's syscall)."""
    assert SENDMSG is not None, f"add the sendmsg syscall number of {platform.machine()}"
    inodes = [fields[9] for fields in map(str.split, Path("/proc/net/tcp").read_text()
                                          .splitlines()[1:])
              if fields[1].endswith(f":{port:04X}") and fields[2].endswith(f":{peer_port:04X}")]
    fds = [int(fd) for fd in os.listdir(f"/proc/{pid}/fd") for inode in inodes
           if _readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]"]
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            call = Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()
            state = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # the thread has just ended
            continue
        if state == "S" and call[0] == str(SENDMSG) and int(call[1], 16) in fds:
            return True
    return False


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:  # closed meanwhile
        return ""


def stall_the_writer(srv, sock: socket.socket, sender, fp: str) -> None:
    """Paced texts until the server's writer sleeps in sendmsg on our socket (its send
    buffer is full).  Checked after each batch of 16, so fewer replies than
    session.MAX_BACKLOG wait behind it and the session is still up.  (The kernel may yet
    enlarge a full send buffer and let the writer go on: then we go on too.)"""
    me = sock.getsockname()[1]
    for batch in range(5_000):  # bounded; a few hundred suffice with a tiny window
        for i in range(16):
            send_record(sock, sender, Text(batch * 16 + i, f"t{batch * 16 + i}"))
        srv.wait_for(rf"^\[{fp}\] t{batch * 16 + 15}$")
        if blocked_in_sendmsg(srv.p.pid, srv.port, me):
            return
    raise AssertionError("the server's writer never blocked in sendmsg")


@pytest.mark.parametrize("how", ["bye", "flood"])
def test_a_peer_that_never_reads_leaves_no_thread_and_no_socket_behind(env: Env, how: str):
    """A tiny receive window, texts until the server's writer is stuck, then either a
    goodbye (the session ends at once) or a flood of texts until the server gives up on
    us; we keep our sockets open.  Every server thread and socket of those sessions must go,
    and the slots must be free for a real client."""
    srv = env.server("--max-clients", "2")
    pid = srv.p.pid
    pin(env, srv)
    baseline = idle_counts(pid)
    held = []
    try:
        for n in range(2):  # two such peers take both slots
            sock, sender = raw_session(srv.port, f"never-reads-{n}", rcvbuf=1024)
            held.append(sock)
            fp = re.escape(identity(f"never-reads-{n}").fingerprint())
            stall_the_writer(srv, sock, sender, fp)
            if how == "bye":
                send_record(sock, sender, Bye("not reading"))
                srv.wait_for(rf"^\[{fp}\] peer said goodbye \(not reading\)$")
            else:
                sock.settimeout(0.1)  # our sends stop too once the server stops reading
                closed = threading.Event()
                deadline = time.monotonic() + 120

                def flood(sock=sock, sender=sender) -> None:
                    for i in range(80_000, 1_000_000):  # ids after stall_the_writer's
                        record = memoryview(b"".join(sender.seal(Text.TYPE,
                                                                 Text(i, "").encode())))
                        while record:
                            if closed.is_set() or time.monotonic() > deadline:
                                return
                            try:
                                record = record[sock.send(record):]
                            except TimeoutError:
                                continue
                            except OSError:  # reset: the server has given up on us
                                return

                flooder = threading.Thread(target=flood, daemon=True)
                flooder.start()
                srv.wait_for(rf"^\[{fp}\] connection closed: protocol error: peer is not "
                             rf"reading what we send$", timeout=120)
                closed.set()
                flooder.join(IO_TIMEOUT)
        # our sockets are still open, yet nothing of those sessions is left on the server
        assert wait_until(lambda: counts(pid) == baseline and established(srv.port) == 0,
                          60, f"threads/fds back to {baseline} (now {counts(pid)}) and no "
                              f"established socket (now {established(srv.port)})")
        r = env.client("--port", str(srv.port), "--send-text", "slots are free")
        assert r.returncode == 0, r.stderr
        srv.wait_for(r"\] slots are free$")
    finally:
        for sock in held:
            sock.close()
    assert "Traceback" not in srv.output()


def test_a_writer_that_makes_no_progress_ends_the_session_on_its_own(tmp_path: Path):
    """No goodbye, no flood: the peer just stops reading.  After the send deadline the
    session ends, and both of its threads exit, without the owner closing it."""
    pair = handshake_pair()
    a, b = socket.socketpair()
    events_closed = []

    class Events(session.Events):
        def out(self, line: str) -> None:
            pass

        def closed(self, conn, why: str) -> None:
            events_closed.append(why)

    victim = session.Connection(a, pair.server.records(), label="stuck", events=Events(),
                                received_dir=str(tmp_path), send_timeout=0.5).start()
    try:
        for i in range(40):  # 2.4 MB: far more than a socket pair buffers
            victim.send(Text(i, "x" * 60_000))
        assert victim.closed.wait(IO_TIMEOUT)
        assert victim.close_reason == "connection closed: the peer stopped reading for 0.5 s"
        assert events_closed == [victim.close_reason]
        for thread in (victim._writer, victim._reader):
            thread.join(IO_TIMEOUT)
            assert not thread.is_alive(), thread.name
    finally:
        b.close()
        victim.close(timeout=1)


def test_closing_always_shuts_the_socket_down_first(tmp_path: Path):
    """finish_close with a writer blocked in sendmsg: the shutdown wakes it, so both
    threads are gone when close() returns (close() alone would leave the writer)."""
    pair = handshake_pair()
    a, b = socket.socketpair()
    victim = session.Connection(a, pair.server.records(), label="stuck",
                                events=session.Events(), received_dir=str(tmp_path)).start()
    try:
        for i in range(40):
            victim.send(Text(i, "x" * 60_000))
        wait_until(lambda: victim._out.qsize() > 0, IO_TIMEOUT, "the writer to be stuck")
        victim.close(timeout=0.2)
        assert not victim._writer.is_alive() and not victim._reader.is_alive()
        assert victim.sock.fileno() == -1
    finally:
        b.close()


# --- 2. the accept loop ------------------------------------------------------------------
class Listener:
    """Wraps the real listener; accept() fails with `error` while `failures` lasts."""

    def __init__(self, real: socket.socket, failures: int, error: int) -> None:
        self.real, self.failures, self.error = real, failures, error
        self.calls = 0

    def accept(self):
        self.calls += 1
        if self.failures:
            self.failures -= 1
            raise OSError(self.error, "injected: " + errno.errorcode[self.error])
        return self.real.accept()

    def __getattr__(self, name):
        return getattr(self.real, name)


def in_process_server(tmp_path: Path, *flags: str) -> tuple[server.Server, list[str]]:
    args = server.build_parser().parse_args(
        ["--headless", "--port", "0", "--home", str(tmp_path / "home"),
         "--received-dir", str(tmp_path / "received"), *flags])
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    (tmp_path / "received").mkdir()
    srv = server.Server(args, identity("server"), home, session.kem_provider("auto"), None)
    lines: list[str] = []
    srv.events.out = lines.append
    srv.listen()
    return srv, lines


def run_accept_loop(srv: server.Server) -> threading.Thread:
    t = threading.Thread(target=srv.accept_loop, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("error", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM])
def test_accept_failing_for_lack_of_resources_backs_off_then_serves(tmp_path: Path,
                                                                     error: int):
    srv, lines = in_process_server(tmp_path)
    failing = Listener(srv.listener, failures=12, error=error)
    srv.listener = failing
    waits: list[float] = []
    srv.back_off = waits.append  # records each back-off instead of sleeping it
    loop = run_accept_loop(srv)
    try:
        sock, _ = raw_session(srv.listener.getsockname()[1], "after-the-burst")
        sock.close()
        # every failed accept was followed by a back-off that doubled up to the cap:
        # twelve calls in the burst, not a spin
        assert waits == [0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0, 1.0, 1.0, 1.0]
        # 12 failures, the client's accept, perhaps the loop already waiting for the next
        assert failing.calls in (13, 14)
        burst = [line for line in lines if line.startswith("accept failed")]
        assert burst == [f"accept failed: injected: {errno.errorcode[error]}; retrying with "
                         f"a growing back-off (at most 1 s)"]
        wait_until(lambda: any(" connected from 127.0.0.1:" in line for line in lines),
                   IO_TIMEOUT, "the client to be served")
    finally:
        srv.shutdown()
        loop.join(IO_TIMEOUT)
    assert not loop.is_alive()


def test_a_second_burst_is_logged_again_and_the_back_off_starts_over(tmp_path: Path):
    srv, lines = in_process_server(tmp_path)
    srv.listener = failing = Listener(srv.listener, failures=3, error=errno.EMFILE)
    waits: list[float] = []
    srv.back_off = waits.append
    loop = run_accept_loop(srv)
    try:
        raw_session(srv.listener.getsockname()[1], "one")[0].close()
        failing.failures = 2
        raw_session(srv.listener.getsockname()[1], "two")[0].close()
        assert waits == [0.005, 0.01, 0.02, 0.005, 0.01]
        assert sum(line.startswith("accept failed") for line in lines) == 2
    finally:
        srv.shutdown()
        loop.join(IO_TIMEOUT)


def test_a_thread_that_cannot_start_refuses_that_connection_only(tmp_path: Path,
                                                                  monkeypatch):
    srv, lines = in_process_server(tmp_path, "--max-clients", "1")
    real_thread = threading.Thread
    failures = [RuntimeError("can't start new thread")]

    class Thread(real_thread):
        def start(self):
            if failures:
                raise failures.pop()
            super().start()

    monkeypatch.setattr(server.threading, "Thread", Thread)
    loop = real_thread(target=srv.accept_loop, daemon=True)
    loop.start()
    port = srv.listener.getsockname()[1]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as first:
            data, how = read_to_eof(first, IO_TIMEOUT)
            assert (alert_of(data), how) == (BUSY, "eof")
        assert any(line.startswith("connection from 127.0.0.1:") and
                   line.endswith(" refused: cannot serve it: can't start new thread")
                   for line in lines), lines
        # its slot (the only one) and its handshake count were given back
        sock, _ = raw_session(port, "served-next")
        sock.close()
    finally:
        srv.shutdown()
        loop.join(IO_TIMEOUT)
    assert srv.startups == {}


# --- 3. known_clients ------------------------------------------------------------------
def test_a_client_refused_by_authorized_clients_is_logged_but_not_recorded(env: Env):
    allowed = identity("allowed").fingerprint()
    listing = env.root / "authorized"
    listing.write_text(f"{allowed} alice\n")
    srv = env.server("--authorized-clients", str(listing))
    pin(env, srv)
    stranger = env.client("--show-identity").stdout.strip()
    r = env.client("--port", str(srv.port), "--send-text", "let me in")
    assert r.returncode != 0
    srv.wait_for(rf"^client {re.escape(stranger)} from 127\.0\.0\.1:\d+ refused: not in "
                 rf"{re.escape(str(listing))}$")
    assert not (env.server_home / "known_clients").exists()
    assert "recorded" not in srv.output()


def fake_fingerprint(i: int) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(b"%d" % i).digest()).decode().rstrip("=")


def test_known_clients_stops_growing_at_its_limit_with_one_warning(env: Env):
    """An open server records new clients until MAX_KNOWN_CLIENTS, then admits without
    recording, and says so once."""
    env.server_home.mkdir(mode=0o700)
    path = env.server_home / "known_clients"
    path.write_text("".join(known_clients_line(fake_fingerprint(i), "192.0.2.1:1000",
                                               "2026-01-01T00:00:00Z")
                            for i in range(server.MAX_KNOWN_CLIENTS - 1)))
    path.chmod(0o600)
    srv = env.server()
    fps = [identity(f"stranger-{n}").fingerprint() for n in range(3)]
    for n in range(3):
        sock, _ = raw_session(srv.port, f"stranger-{n}")  # all three are admitted
        sock.close()
        srv.wait_for(rf"^client {re.escape(fps[n])} connected from ")
    lines = path.read_text().splitlines()
    assert len(lines) == server.MAX_KNOWN_CLIENTS
    assert lines[-1].split()[0] == fps[0]
    out = srv.output()
    assert out.count(" recorded in ") == 1
    assert out.count(f"warning: {path} holds {server.MAX_KNOWN_CLIENTS} clients; new clients "
                     f"are admitted but no longer recorded (use --authorized-clients to admit "
                     f"only known ones)") == 1


# --- 4. handshakes per source address --------------------------------------------------
def test_one_address_cannot_hold_more_than_its_share_of_handshakes(env: Env):
    """Three half-open connections from 127.0.0.1 reach the per-source limit: the next
    one from there is refused at once (and gives its slot back), while a client from
    127.0.0.2 (loopback too) completes; when one of the three goes, 127.0.0.1 may
    handshake again."""
    # --max-clients 5, not 4: a closed connection's slot is freed only after its log
    # line (once its threads are gone), so the last client may find 4 still held
    srv = env.server("--max-startups-per-source", "3", "--max-clients", "5",
                     "--handshake-timeout", "60")
    half_open = [socket.create_connection(("127.0.0.1", srv.port), timeout=IO_TIMEOUT)
                 for _ in range(3)]
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=IO_TIMEOUT) as extra:
            data, how = read_to_eof(extra, IO_TIMEOUT)
            assert (alert_of(data), how) == (PER_SOURCE_BUSY, "eof")
            srv.wait_for(rf"^connection from 127\.0\.0\.1:{extra.getsockname()[1]} refused: "
                         rf"3 handshakes from 127\.0\.0\.1 already in progress$")
        other, _ = raw_session(srv.port, "other-address", source="127.0.0.2")
        other.close()
        srv.wait_for(r"^client \S+ connected from 127\.0\.0\.2:\d+$")
        half_open.pop().close()
        srv.wait_for(r"^connection from 127\.0\.0\.1:\d+ closed: connection closed by peer$")
        again, _ = raw_session(srv.port, "same-address-again")
        again.close()
    finally:
        for sock in half_open:
            sock.close()
    assert "Traceback" not in srv.output()


def test_a_failed_handshake_gives_its_address_back_before_its_line_is_logged(tmp_path: Path):
    # whoever reads "closed" in the log (a person, a script, the test above) may connect
    # again from that address at once: the per-source count must already be down
    srv, _ = in_process_server(tmp_path, "--max-startups-per-source", "1")
    order: list[tuple[str, str]] = []
    real_end = srv.admission.end_handshake
    srv.admission.end_handshake = lambda source: (order.append(("end", source)),
                                                  real_end(source))
    srv.events.out = lambda line: order.append(("log", line))
    run_accept_loop(srv)
    try:
        sock = socket.create_connection(("127.0.0.1", srv.listener.getsockname()[1]),
                                        timeout=IO_TIMEOUT)
        port = sock.getsockname()[1]
        sock.close()  # before its ClientHello
        closed = ("log", f"connection from 127.0.0.1:{port} closed: connection closed by peer")
        wait_until(lambda: closed in order, IO_TIMEOUT, "the closed line")
        assert order.index(("end", "127.0.0.1")) < order.index(closed), order
    finally:
        srv.shutdown()


def test_a_sessions_slot_is_free_only_once_its_threads_have_ended(tmp_path: Path, monkeypatch):
    # the --max-clients slot counts threads and sockets, not sessions: a session that has
    # ended but whose threads are still being joined (hang_up) still holds it
    srv, lines = in_process_server(tmp_path, "--max-clients", "1")
    hanging_up, go_on = threading.Event(), threading.Event()
    real_hang_up = session.hang_up

    def held_hang_up(*args) -> None:
        hanging_up.set()
        go_on.wait(IO_TIMEOUT)
        real_hang_up(*args)

    monkeypatch.setattr(session, "hang_up", held_hang_up)
    run_accept_loop(srv)
    port = srv.listener.getsockname()[1]
    try:
        first, sender = raw_session(port, "first")
        send_record(first, sender, Bye("done"))
        first.close()
        assert hanging_up.wait(IO_TIMEOUT)  # its session is over, its threads not yet joined
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as second:
            data, how = read_to_eof(second, IO_TIMEOUT)
        assert (alert_of(data), how) == (BUSY, "eof")
        go_on.set()
        wait_until(lambda: not srv.registry.threads, IO_TIMEOUT, "the first session's thread")
        third, _ = raw_session(port, "third")  # the slot is free again
        third.close()
    finally:
        go_on.set()
        srv.shutdown()


def test_max_startups_per_source_must_be_positive(env: Env):
    r = subprocess.run([PY, "server.py", "--max-startups-per-source", "0", "--port", "0",
                        "--home", str(env.server_home)], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env=child_env())
    assert r.returncode == 2
    assert r.stderr.splitlines() == ["error: argument --max-startups-per-source: 0 is not "
                                     "at least 1 (see --help)"]


def test_a_server_out_of_file_descriptors_logs_once_and_serves_when_they_return(env: Env):
    """A real EMFILE: the server's fd limit is lowered so that two held connections use
    it up.  The third connection (a real client) waits in the backlog while accept()
    fails; one log line for the burst; once the two go, the client is served (even if
    known_clients cannot be written yet for want of an fd: a record, not a gate)."""
    srv = env.server("--handshake-timeout", "60")
    pin(env, srv)
    pid = srv.p.pid
    _, fds = idle_counts(pid)
    hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (fds + 2, hard))
    held = [socket.create_connection(("127.0.0.1", srv.port), timeout=IO_TIMEOUT)
            for _ in range(2)]
    try:
        wait_until(lambda: counts(pid)[1] == fds + 2, IO_TIMEOUT, "both connections accepted")
        late = subprocess.Popen([PY, "client.py", "--home", str(env.client_home), "--port",
                                 str(srv.port), "--send-text", "served after EMFILE"],
                                cwd=ROOT, env=child_env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        srv.wait_for(r"^accept failed: Too many open files; retrying with a growing back-off "
                     r"\(at most 1 s\)$")
    finally:
        for sock in held:
            sock.close()
    out, err = late.communicate(timeout=60)
    assert late.returncode == 0, err
    srv.wait_for(r"\] served after EMFILE$")
    assert srv.output().count("accept failed") == 1
    assert "Traceback" not in srv.output()


def test_a_known_clients_file_that_cannot_be_written_does_not_turn_clients_away(
        tmp_path: Path, monkeypatch):
    srv, lines = in_process_server(tmp_path)

    def cannot_write(path, line):
        raise server.keystore.HomeError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(server.keystore, "append_line", cannot_write)
    loop = run_accept_loop(srv)
    try:
        for _ in range(2):  # admitted each time, and each time it tries to record again
            sock, _ = raw_session(srv.listener.getsockname()[1], "unrecorded")
            sock.close()
        fp = identity("unrecorded").fingerprint()
        path = tmp_path / "home" / "known_clients"
        warning = (f"warning: client {fp} not recorded: cannot write {path}: No space left "
                   f"on device")
        wait_until(lambda: lines.count(warning) == 2, IO_TIMEOUT, "two warnings")
        assert srv.known_clients == set()
    finally:
        srv.shutdown()
        loop.join(IO_TIMEOUT)
