"""End to end, protocol version 2 against a version 1 peer and the v2 handshake rules.

A version 1 peer is crafted byte for byte (the v1 layouts of the old docs/PROTOCOL.md):
whichever side notices the mismatch, the user sees one message and exit code 3.
"""

from __future__ import annotations

import os
import socket
import struct
import threading

import pytest
from conftest import Env, identity

import crypt
import session
from client_data import ClientHandshake
from protocol import (
    MAGIC,
    MAX_FRAME,
    Alert,
    AlertCode,
    Delivered,
    Text,
    Welcome,
    decode_message,
)

VERSION_ERROR = "error: the server speaks another protocol version (this client speaks 2)"
V1_CLIENT_HELLO_SIZE = 3689  # type, magic, version, random, ecdh, ek, identity (v1)
V1_SERVER_HELLO_SIZE = 7094


def v1_header(msg_type: int) -> bytes:
    return bytes([msg_type]) + MAGIC + struct.pack(">H", 1)


def v1_client_hello() -> bytes:
    _, share = crypt.ecdh_generate()
    _, ek = crypt.CryptographyKEM().generate()
    body = v1_header(1) + os.urandom(32) + share + ek + identity("client").public.encode()
    assert len(body) == V1_CLIENT_HELLO_SIZE
    return body


def recv_frame(sock: socket.socket) -> bytes:
    return bytes(session.read_frame(sock, None, MAX_FRAME))


class FakeServer:
    """Accepts one connection, reads the ClientHello, answers with `reply` and records
    what the client sends back until it closes."""

    def __init__(self, reply: bytes) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.reply, self.hello, self.after = reply, None, []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(30)
            self.hello = recv_frame(conn)
            session.send_frame(conn, self.reply)
            try:
                while True:
                    self.after.append(recv_frame(conn))
            except (session.ConnectionLost, OSError):
                pass

    def close(self) -> None:
        self.thread.join(30)
        self.listener.close()


@pytest.mark.parametrize("noticed_by", ["client", "server"])
def test_a_version_1_server_gets_one_message_and_exit_3(env: Env, noticed_by: str):
    if noticed_by == "client":  # a v1 ServerHello: the client refuses it
        reply = v1_header(2) + os.urandom(V1_SERVER_HELLO_SIZE - 7)
    else:  # the v1 server noticed our v2 ClientHello and says so
        reply = Alert(AlertCode.BAD_VERSION, "peer speaks protocol version 2, we speak 1").encode()
    fake = FakeServer(reply)
    r = env.client("--port", str(fake.port), "--accept-new-host", "--send-text", "x")
    fake.close()
    assert r.returncode == 3, r.stderr
    assert [line for line in r.stderr.splitlines() if not line.startswith("created identity")] \
        == [VERSION_ERROR]
    assert fake.hello[5:7] == b"\x00\x02"  # we spoke version 2
    if noticed_by == "client":
        assert [Alert.decode(f).code for f in fake.after] == [AlertCode.BAD_VERSION]
    else:
        assert fake.after == []  # no reply to an Alert


def test_a_version_1_client_is_refused_with_bad_version(env: Env):
    srv = env.server()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        session.send_frame(sock, v1_client_hello())
        alert = Alert.decode(recv_frame(sock))
    assert alert.code is AlertCode.BAD_VERSION
    srv.wait_for(r"closed: peer speaks protocol version 1, we speak 2$")


def test_records_sent_right_after_the_client_auth_are_accepted(env: Env):
    """The pipelining rule of section 9: a client MAY send records right after its
    ClientAuth; the server opens them after its Welcome, in order."""
    srv = env.server()
    hs = ClientHandshake(identity("client"))
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        session.send_frame(sock, hs.create_client_hello())
        hs.consume_server_hello(recv_frame(sock))
        auth = hs.create_client_auth()
        sender, receiver = hs.records()
        text = Text(1, "pipelined")
        # ClientAuth and the first record in one write, before any reply was read
        record = b"".join(bytes(p) for p in sender.seal(Text.TYPE, text.encode()))
        sock.sendall(struct.pack(">I", len(auth)) + auth + record)
        assert isinstance(decode_message(*receiver.open(recv_frame(sock))), Welcome)
        assert decode_message(*receiver.open(recv_frame(sock))) == Delivered(1)
    srv.wait_for(r"\] pipelined$")
