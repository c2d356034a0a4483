"""Key updates in a running session (protocol version 2), in process over a socketpair.

With the per-epoch record limit lowered (it is injectable for tests), both directions
ratchet several times in the middle of file transfers and texts, at the limit and on
demand, and every byte still arrives exactly.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from pathlib import Path

from conftest import files_in, handshake_pair, jpeg_of_size

import crypt
import session

LIMIT = 5  # records per key epoch in this test (2^20 in real sessions)


class Quiet(session.Events):
    def __init__(self) -> None:
        self.texts: list[str] = []

    def out(self, line: str) -> None:
        pass

    def text(self, conn, text):
        self.texts.append(text)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_key_updates_at_the_limit_and_on_demand_in_both_directions_during_transfers(
        tmp_path: Path):
    pair = handshake_pair()
    a, b = socket.socketpair()
    c_dir, s_dir = tmp_path / "client-received", tmp_path / "server-received"
    c_dir.mkdir()
    s_dir.mkdir()
    c_events, s_events = Quiet(), Quiet()
    client = session.Connection(a, crypt.record_pair(pair.client.keys, crypt.Role.CLIENT, LIMIT),
                                label="server", events=c_events, received_dir=str(c_dir)).start()
    server = session.Connection(b, crypt.record_pair(pair.server.keys, crypt.Role.SERVER, LIMIT),
                                label="client", events=s_events, received_dir=str(s_dir)).start()
    try:
        up = jpeg_of_size(tmp_path / "up.jpg", 4_200_000)  # 5 FileData records
        down = jpeg_of_size(tmp_path / "down.jpg", 3_100_000)  # 3 FileData records
        results = {}

        # on demand: each direction's first record is a KeyUpdate (so the counts below
        # do not depend on how the two transfers interleave)
        client.update_keys()
        server.update_keys()

        def server_sends():
            results["down"] = server.send_file(str(down))
            server.send_text("after the download")

        t = threading.Thread(target=server_sends)
        t.start()
        client.send_text("before")
        results["up"] = client.send_file(str(up))
        client.send_text("after the upload")
        t.join(60)
        assert not t.is_alive()

        assert results["up"].sha256.hex() == sha(up) == sha(s_dir / "up.jpg")
        assert results["down"].sha256.hex() == sha(down) == sha(c_dir / "down.jpg")
        assert files_in(s_dir) == ["up.jpg"] and files_in(c_dir) == ["down.jpg"]
        assert s_events.texts == ["before", "after the upload"]
        assert c_events.texts == ["after the download"]
        # epoch 0 is the on-demand KeyUpdate alone; then each epoch holds LIMIT - 1 = 4
        # messages and the KeyUpdate sent at the limit.  c2s: 2 texts, offer, 5 chunks,
        # end, and the replies to the download (accept, saved, delivered) = 12 messages:
        # epochs 1, 2 full, 4 messages in epoch 3.  s2c: offer, 3 chunks, end, a text and
        # the replies to the upload (2 delivered, accept, saved) = 10: 2 in epoch 3.
        c_send, c_recv = client._core._sender, client._core._receiver
        s_send, s_recv = server._core._sender, server._core._receiver
        assert (c_send.epoch, c_send.seq) == (s_recv.epoch, s_recv.seq) == (3, 4)
        assert (s_send.epoch, s_send.seq) == (c_recv.epoch, c_recv.seq) == (3, 2)
        assert not client.closed.is_set() and not server.closed.is_set()
    finally:
        client.close("done", timeout=5)
        server.close("done", timeout=5)


def test_without_the_updates_the_receiver_refuses_the_session(tmp_path: Path):
    """The receiver enforces the limit: a peer whose record layer never updates (here:
    its limit set higher than ours) loses the session at our limit."""
    pair = handshake_pair()
    a, b = socket.socketpair()
    events = Quiet()
    server = session.Connection(b, crypt.record_pair(pair.server.keys, crypt.Role.SERVER, LIMIT),
                                label="client", events=events,
                                received_dir=str(tmp_path)).start()
    sender, receiver = crypt.record_pair(pair.client.keys, crypt.Role.CLIENT, 1 << 20)
    client = session.Connection(a, (sender, receiver), label="server", events=Quiet(),
                                received_dir=str(tmp_path)).start()
    try:
        for i in range(LIMIT):
            client.send_text(f"text {i}")
        try:
            client.send_text("one too many")
        except session.ConnectionLost:
            pass
        assert server.closed.wait(10)
        assert server.close_reason == (f"connection closed: protocol error: peer sent more "
                                       f"than {LIMIT} records without a key update")
        assert events.texts == [f"text {i}" for i in range(LIMIT)]
    finally:
        client.close("done", timeout=5)
        server.close("done", timeout=5)
