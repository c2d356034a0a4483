"""How a session ends, in process over a socketpair: each close carries its kind and
side (logic never reads the text), and a file coming in when it ends is reported
as aborted, with nothing saved."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from conftest import files_in, handshake_pair

import crypt
import session
from protocol import CHUNK_SIZE, Bye, FileData, FileOffer, Text
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
