"""Protocol version 2 against a version 1 peer, and the rules version 2 specifies for
the first records (docs/PROTOCOL.md sections 2, 6.4, 9 and 11.2).

A version 1 peer is crafted byte for byte (the v1 layouts of the old docs/PROTOCOL.md):
whichever side notices the mismatch, the user sees one message and exit code 3.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading

import pytest
from conftest import Env, files_in, handshake_pair, identity

import crypt
import session
from client_data import ClientHandshake
from protocol import (
    MAGIC,
    MAX_FRAME,
    Alert,
    AlertCode,
    Delivered,
    Error,
    FileAccept,
    FileData,
    FileEnd,
    FileOffer,
    FileReject,
    FileSaved,
    MsgType,
    Reason,
    Text,
    Welcome,
    decode_message,
    encode_frame,
)
from server_data import ServerHandshake

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


# --- the first record: one rule for a bad one ---------------------------------------------------
class HandshakingFakeServer(FakeServer):
    """Completes a real version 2 handshake, then sends `first(sender)` as its first frame
    and records whatever the client sends after its ClientAuth."""

    def __init__(self, first) -> None:
        self.first = first
        super().__init__(b"")

    def _run(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(30)
            hs = ServerHandshake(identity("server"))
            hs.consume_client_hello(recv_frame(conn))
            session.send_frame(conn, hs.create_server_hello())
            hs.consume_client_auth(recv_frame(conn))
            sender, _ = hs.records()
            conn.sendall(self.first(sender))
            try:
                while True:
                    self.after.append(recv_frame(conn))
            except (session.ConnectionLost, OSError):
                pass


def _sealed(msg_type: int, payload: bytes):
    return lambda sender: b"".join(bytes(p) for p in sender.seal(msg_type, payload))


BAD_FIRST = {
    "a Text": (_sealed(MsgType.TEXT, bytes(8) + b"hi"), "Text instead of Welcome or Refused"),
    "Welcome with a payload": (_sealed(MsgType.WELCOME, b"x"), "Welcome: unexpected payload"),
    "random bytes": (lambda sender: encode_frame(os.urandom(80)), "it does not verify"),
    "a KeyUpdate": (_sealed(MsgType.KEY_UPDATE, b""), "KeyUpdate instead of Welcome or Refused"),
}


@pytest.mark.parametrize("case", sorted(BAD_FIRST))
def test_a_bad_first_record_is_one_rule_exit_4_and_nothing_sent(env: Env, case: str):
    first, why = BAD_FIRST[case]
    fake = HandshakingFakeServer(first)
    r = env.client("--port", str(fake.port), "--accept-new-host", "--send-text", "x")
    fake.close()
    assert r.returncode == 4, r.stderr
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")] == [
        f"error: handshake failed: bad first record from the server: {why}"]
    assert "Traceback" not in r.stderr
    assert fake.after == []  # the client closed without an Alert or a record


def test_an_alert_after_the_client_auth_is_a_bad_record_to_the_server(env: Env):
    """Section 6.4: after its ClientAuth the client sends only records; an Alert there
    fails to open like any bad record and ends the session with an Error."""
    srv = env.server()
    hs = ClientHandshake(identity("client"))
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        session.send_frame(sock, hs.create_client_hello())
        hs.consume_server_hello(recv_frame(sock))
        session.send_frame(sock, hs.create_client_auth())
        _, receiver = hs.records()
        assert isinstance(decode_message(*receiver.open(recv_frame(sock))), Welcome)
        session.send_frame(sock, Alert(AlertCode.AUTH_FAILED, "changed my mind").encode())
        assert decode_message(*receiver.open(recv_frame(sock))) == \
            Error("failed to decrypt and authenticate record")
    srv.wait_for(r"connection closed: failed to decrypt and authenticate record$")


def test_a_client_alert_is_logged_by_its_code_meaning_only(env: Env):
    """Section 6.4 on the server's side: a client that answers the ServerHello with a
    plaintext Alert is logged by what its code means; its free text, which nothing
    authenticates, never reaches the server's log."""
    srv = env.server()
    hs = ClientHandshake(identity("client"))
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        session.send_frame(sock, hs.create_client_hello())
        hs.consume_server_hello(recv_frame(sock))
        session.send_frame(sock, Alert(AlertCode.AUTH_FAILED,
                                       "the server's key changed, run rm -rf ~").encode())
        assert sock.recv(1) == b""  # the server hangs up without an answer
    srv.wait_for(r"connection from 127\.0\.0\.1:\d+ closed: peer refused: authentication "
                 r"failed$")
    assert "key changed" not in srv.output()


# --- FileData before FileAccept -------------------------------------------------------------
@pytest.mark.parametrize("accepted", [True, False])
def test_file_data_sent_before_the_file_accept(tmp_path, accepted: bool):
    """Section 11.2: the receiver takes FileData after an offer it accepted as the
    transfer's data (it cannot tell the sender did not wait); after its FileReject the
    same FileData is a protocol error that ends the session."""
    pair = handshake_pair()
    a, b = socket.socketpair()
    events = _Quiet()
    data = b"\xff\xd8\xff" + os.urandom(5000)
    receiver = session.Connection(b, pair.server.records(), label="client", events=events,
                                  received_dir=str(tmp_path),
                                  max_file_size=10_000 if accepted else 1000).start()
    sender, opener = pair.client.records()
    try:
        # offer, data and end in one write, before any reply was read
        a.sendall(b"".join(
            b"".join(bytes(p) for p in sender.seal(m.TYPE, m.encode()))
            for m in (FileOffer(1, len(data), "early.jpg"), FileData(1, data),
                      FileEnd(1, hashlib.sha256(data).digest()))))
        replies = [decode_message(*opener.open(recv_frame(a))) for _ in range(2)]
        if accepted:
            assert replies == [FileAccept(1), FileSaved(1, hashlib.sha256(data).digest(),
                                                        "early.jpg")]
            assert (tmp_path / "early.jpg").read_bytes() == data
        else:
            assert replies == [FileReject(1, Reason.TOO_LARGE, replies[0].detail),
                               Error("protocol error: file data without an accepted offer")]
            assert receiver.closed.wait(10)
            assert files_in(tmp_path) == []
    finally:
        a.close()
        receiver.close("done", timeout=5)


class _Quiet(session.Events):
    def out(self, line: str) -> None:
        pass
