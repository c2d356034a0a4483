"""How a session ends, in process over a socketpair: each close carries its kind and
side (logic never reads the text), and a file coming in when it ends is reported
as aborted, with nothing saved."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import files_in, handshake_pair

import crypt
import session
from protocol import CHUNK_SIZE, Bye, FileData, FileOffer, Text, decode_message
from session_core import CloseKind, Side

WAIT = 30.0  # generous: only a broken session takes this long


class Lines(session.Events):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def out(self, line: str) -> None:
        self.lines.append(line)


def chunk(first: bool) -> bytes:
    return (b"\xff\xd8\xff" if first else b"\0\0\0") + bytes(CHUNK_SIZE - 3)


class RawPeer:
    """The client side as bare records on a socket: it sends what a test tells it."""

    def __init__(self, tmp_path: Path) -> None:
        pair = handshake_pair()
        self.sock, theirs = socket.socketpair()
        self.sender, _ = crypt.record_pair(pair.client.keys, crypt.Role.CLIENT)
        self.received = tmp_path / "received"
        self.received.mkdir()
        self.events = Lines()
        records = crypt.record_pair(pair.server.keys, crypt.Role.SERVER)
        self.conn = session.Connection(theirs, records,
                                       label="c", events=self.events,
                                       received_dir=str(self.received)).start()

    def send(self, *msgs) -> None:
        for msg in msgs:
            session.send_pieces(self.sock, self.sender.seal(msg.TYPE, msg.encode()))

    def half_a_file(self) -> None:
        self.send(FileOffer(1, 10 * CHUNK_SIZE, "huge.jpg"), FileData(1, chunk(True)),
                  FileData(1, chunk(False)))

    def ended(self) -> None:
        assert self.conn.closed.wait(WAIT)
        self.conn.finish_close(0)  # the threads have ended: nothing is left to wait for


@pytest.fixture
def peer(tmp_path: Path):
    p = RawPeer(tmp_path)
    yield p
    p.sock.close()
    p.conn.close(timeout=1)


def test_a_peer_that_vanishes_mid_file_is_reported_and_nothing_saved(peer: RawPeer):
    peer.half_a_file()
    peer.send(FileData(1, chunk(False)))
    peer.sock.shutdown(socket.SHUT_WR)
    peer.ended()
    assert peer.conn.close_info.kind is CloseKind.PEER_VANISHED
    assert peer.conn.close_info.by is Side.PEER and not peer.conn.close_info.clean
    assert peer.events.lines[-2:] == [  # the aborted file, then the usual close line
        "[c] receiving 'huge.jpg' aborted after 3.0 MiB: peer disconnected; nothing saved",
        "[c] peer disconnected"]
    assert files_in(peer.received) == []


def test_a_protocol_error_mid_file_is_the_peers_and_the_file_is_aborted(peer: RawPeer):
    peer.half_a_file()
    peer.send(FileOffer(1, 1, "x.jpg"))  # the same operation id again
    peer.ended()
    assert peer.conn.close_info.kind is CloseKind.PROTOCOL_ERROR
    assert peer.conn.close_info.by is Side.PEER
    assert str(peer.conn.close_info) == \
        "connection closed: protocol error: FileOffer reuses operation id 1"
    assert ("[c] receiving 'huge.jpg' aborted after 2.0 MiB: connection closed: protocol "
            "error: FileOffer reuses operation id 1; nothing saved"
            ) in peer.events.lines
    assert files_in(peer.received) == []


def test_our_own_close_is_local_shutdown_and_the_file_is_aborted(peer: RawPeer):
    peer.half_a_file()
    peer.send(FileData(1, chunk(False)))
    # the text is answered only after the chunks before it were handled: the second
    # frame back (after FileAccept) is its Delivered
    peer.send(Text(1, "sync"))
    for _ in range(2):
        session.read_frame(peer.sock, time.monotonic() + WAIT)
    peer.conn.begin_close("server shutting down")
    peer.sock.shutdown(socket.SHUT_WR)
    peer.ended()
    assert peer.conn.close_info.kind is CloseKind.LOCAL_SHUTDOWN
    assert peer.conn.close_info.by is Side.LOCAL
    assert "[c] receiving 'huge.jpg' aborted after 3.0 MiB: server shutting down; " \
        "nothing saved" in peer.events.lines
    assert files_in(peer.received) == []


def test_a_goodbye_is_the_only_clean_close(peer: RawPeer):
    peer.send(Bye("done"))
    peer.ended()
    assert peer.conn.close_info.kind is CloseKind.PEER_BYE and peer.conn.close_info.clean
    assert peer.conn.close_reason == "peer said goodbye (done)"
    assert peer.events.lines == ["[c] peer said goodbye (done)"]


class Unstarted:
    """A server-side session registered but not started yet (the server's shutdown
    can take it from the registry in that moment), and the client's end of it."""

    def __init__(self, tmp_path: Path) -> None:
        pair = handshake_pair()
        self.sock, theirs = socket.socketpair()
        _, self.receiver = crypt.record_pair(pair.client.keys, crypt.Role.CLIENT)
        self.events = Lines()
        self.conn = session.Connection(theirs, crypt.record_pair(pair.server.keys,
                                                                  crypt.Role.SERVER),
                                       label="c", events=self.events,
                                       received_dir=str(tmp_path))
        self.errors: list[BaseException] = []

    def finish_close_in_background(self, deadline: float) -> threading.Thread:
        def run() -> None:
            try:
                self.conn.finish_close(deadline)
            except BaseException as e:  # noqa: BLE001 - the test reports it
                self.errors.append(e)
        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t


def test_a_shutdown_meeting_a_session_still_starting_waits_and_says_goodbye(tmp_path: Path):
    # the server's shutdown: begin_close, then finish_close from its own thread, while the
    # session's thread is (or is about to be) in start(); either order must end the same
    s = Unstarted(tmp_path)
    waiting = threading.Event()

    class Started(threading.Event):  # says when the close is waiting for the start
        def wait(self, timeout=None):
            waiting.set()
            return super().wait(timeout)

    s.conn._started = Started()
    s.conn.begin_close("server shutting down")
    closer = s.finish_close_in_background(time.monotonic() + WAIT)
    assert waiting.wait(WAIT)  # the close is waiting: now the session's thread starts it
    s.conn.start()
    msg = decode_message(*s.receiver.open(session.read_frame(s.sock, time.monotonic() + WAIT)))
    assert msg == Bye("server shutting down")
    s.sock.shutdown(socket.SHUT_WR)  # our EOF lets its reader end
    closer.join(WAIT)
    assert not closer.is_alive() and s.errors == []
    assert not s.conn._reader.is_alive() and not s.conn._writer.is_alive()
    assert s.sock.recv(1) == b""  # and it closed its end
    s.sock.close()


def test_a_session_that_never_starts_is_closed_by_the_deadline_and_cannot_start_late(
        tmp_path: Path):
    s = Unstarted(tmp_path)
    s.conn.begin_close("server shutting down")
    s.conn.finish_close(time.monotonic())  # the deadline has come: no start to wait for
    assert s.sock.recv(1) == b""  # its socket is closed, nothing sent
    s.conn.start()  # too late: the session ends instead of starting
    assert s.conn.closed.is_set()
    assert not s.conn._reader.is_alive() and not s.conn._writer.is_alive()
    assert s.conn._reader.ident is None and s.conn._writer.ident is None
    assert s.conn.close_info.kind is CloseKind.LOCAL_SHUTDOWN
    # the session's own thread then closes it as usual: nothing left to wait for
    s.conn.close(timeout=WAIT)
    assert s.conn._started.is_set() is False and s.events.lines == []
    s.sock.close()


def test_a_session_whose_threads_cannot_start_ends_and_leaves_no_thread(tmp_path: Path):
    s = Unstarted(tmp_path)

    def cannot_start() -> None:
        raise RuntimeError("can't start new thread")

    s.conn._reader.start = cannot_start  # the writer starts, the reader cannot
    with pytest.raises(RuntimeError, match="can't start new thread"):
        s.conn.start()
    s.conn._writer.join(WAIT)
    assert not s.conn._writer.is_alive()  # it found the end of its queue
    assert s.conn.closed.is_set()
    assert s.conn.close_info.kind is CloseKind.INTERNAL_ERROR
    assert s.events.lines == ["[c] the session's threads could not start"]
    s.conn.close(timeout=WAIT)  # returns at once: nothing to wait for
    assert s.sock.recv(1) == b""  # its socket is closed
    s.sock.close()


def test_a_reply_to_an_interrupted_operation_is_no_error_before_the_goodbye(tmp_path: Path):
    """Interrupted while waiting for a FileAccept, the operation ends, but the offer
    is still open for the peer (PROTOCOL.md 11.2): its FileAccept may come before our
    Bye, and the session must take it and go on to say goodbye, not fail."""
    from protocol import Delivered, FileAccept, FileOffer

    pair = handshake_pair()
    sock, theirs = socket.socketpair()
    sender, receiver = crypt.record_pair(pair.client.keys, crypt.Role.CLIENT)
    interrupted = threading.Event()
    received = tmp_path / "received"
    received.mkdir()
    conn = session.Connection(theirs, crypt.record_pair(pair.server.keys, crypt.Role.SERVER),
                              label="c", events=Lines(), received_dir=str(received),
                              interrupted=interrupted).start()
    photo = tmp_path / "a.jpg"
    photo.write_bytes(b"\xff\xd8\xff" + bytes(5000))
    outcome = []

    def send():
        try:
            conn.send_files([str(photo)])
        except KeyboardInterrupt:
            outcome.append("interrupted")

    def read():
        return decode_message(*receiver.open(session.read_frame(sock, time.monotonic() + WAIT)))

    t = threading.Thread(target=send)
    t.start()
    offer = read()
    assert isinstance(offer, FileOffer)
    interrupted.set()  # Ctrl-C while the operation waits for the answer to its offer
    t.join(WAIT)
    assert outcome == ["interrupted"]
    for msg in (FileAccept(offer.op), Text(1, "still there?")):
        session.send_pieces(sock, sender.seal(msg.TYPE, msg.encode()))
    assert read() == Delivered(1)  # the late FileAccept was taken: no protocol error
    conn.begin_close("interrupted")
    assert read() == Bye("interrupted")
    sock.shutdown(socket.SHUT_WR)
    assert conn.closed.wait(WAIT)
    conn.finish_close(time.monotonic() + WAIT)
    assert conn.close_info.kind is CloseKind.LOCAL_SHUTDOWN
    sock.close()
