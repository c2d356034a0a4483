"""Property/fuzz tests (hypothesis) of every parser that sees peer or file input.

The property everywhere: arbitrary bytes, or a valid message that was mutated (bits
flipped, bytes inserted, deleted, truncated), raise nothing but our own protocol
errors — no IndexError, struct.error, UnicodeDecodeError or ValueError escapes — and a
failed handshake step leaves its state machine FAILED.  Authenticated messages go
further: any change at all is rejected.  DESIGN.md section 3, property 7.
"""

from __future__ import annotations

import hashlib
import struct
import unicodedata

import fixed
import pytest
from conftest import identity, run_handshake
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import client_data
import crypt
import protocol
import server_data
import transfer
from client_data import ClientHandshake, ClientState
from protocol import (
    CHUNK_SIZE,
    MAX_FRAME,
    AuthError,
    ClientAuth,
    ClientHello,
    MsgType,
    ProtocolError,
    RemoteProtocolError,
    ServerHello,
)
from server_data import ServerHandshake, ServerState

# Cheap parsers get many examples; handshake steps (signatures, KEM) fewer, so the
# whole file stays well under ~30 s on 2 shared cores.
FAST = settings(max_examples=300, deadline=None)
MEDIUM = settings(max_examples=300, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

# --- fixed material: a deterministic client, so one genuine ServerHello fits many -------
C_RANDOM = bytes(range(32))
C_SCALAR = 0xC0FFEE
C_SEED = bytes(range(64, 128))
C_NONCE = bytes(range(128, 160))


def fixed_client() -> ClientHandshake:
    return ClientHandshake(identity("client"), fixed.FixedKEM(seed=C_SEED),
                           randomness=fixed.randomness(C_RANDOM, C_NONCE, ecdh_scalar=C_SCALAR))


_GENUINE: dict[str, object] = {}


def genuine() -> dict[str, object]:
    """One complete handshake with the fixed client; computed once per test session."""
    if not _GENUINE:
        c, s = fixed_client(), ServerHandshake(identity("server"))
        ch, sh, ca = run_handshake(c, s)
        sender, _ = c.records()
        frame = b"".join(bytes(p) for p in sender.seal(MsgType.TEXT, bytes(8) + b"hi there"))
        _GENUINE.update(ch=ch, sh=sh, ca=ca, keys=c.keys, record=frame[4:])
    return _GENUINE


# --- strategies -------------------------------------------------------------------------
OPS = st.lists(
    st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
              # negative positions count from the end, where the MACs are
              st.integers(-64, -1) | st.integers(0, 1 << 16), st.integers(0, 255),
              st.binary(min_size=1, max_size=16)),
    min_size=1, max_size=4,
)


def mutate(data: bytes, ops) -> bytes:
    """Apply mutation ops; positions are taken modulo the current length."""
    out = bytearray(data)
    for op, pos, value, blob in ops:
        if op == "flip" and out:
            out[pos % len(out)] ^= 1 << (value % 8)
        elif op == "set" and out:
            out[pos % len(out)] = value
        elif op == "insert":
            i = pos % (len(out) + 1)
            out[i:i] = blob
        elif op == "delete" and out:
            i = pos % len(out)
            del out[i : i + 1 + value % 16]
        elif op == "truncate":
            del out[pos % (len(out) + 1) :]
    return bytes(out)


def expanded(n: int):
    """n pseudo-random bytes from a small, shrinkable seed (big inputs, small buffers)."""
    return st.binary(min_size=0, max_size=32).map(lambda seed: hashlib.shake_256(seed).digest(n))


HEADER_CH = bytes([protocol.HandshakeType.CLIENT_HELLO]) + protocol.MAGIC + \
    struct.pack(">H", protocol.VERSION)
HEADER_SH = bytes([protocol.HandshakeType.SERVER_HELLO]) + protocol.MAGIC + \
    struct.pack(">H", protocol.VERSION)


def arbitrary_handshake(kind: str):
    """Arbitrary bytes, or bytes of exactly the right size behind a valid header."""
    size, header = {"ch": (ClientHello.SIZE, HEADER_CH), "sh": (ServerHello.SIZE, HEADER_SH),
                    "ca": (ClientAuth.SIZE, bytes([protocol.HandshakeType.CLIENT_AUTH]))}[kind]
    return st.one_of(
        st.binary(max_size=64),
        expanded(size - len(header)).map(lambda b: header + b),
        st.builds(lambda t, b: bytes([t]) + b, st.integers(0, 255), expanded(size - 1)),
    )


def mutated(kind: str):
    return OPS.map(lambda ops: mutate(genuine()[kind], ops))


def only_remote_errors(call, *args):
    """Call a pure decoder: success or RemoteProtocolError (the peer's fault), nothing else."""
    try:
        return call(*args)
    except RemoteProtocolError:
        return None


# --- framing ------------------------------------------------------------------------------
@FAST
@given(st.binary(max_size=8))
@example(b"\x00\x00\x00\x00")
@example(struct.pack(">I", MAX_FRAME))
@example(struct.pack(">I", MAX_FRAME + 1))
@example(b"\xff\xff\xff\xff")
def test_frame_length(header):
    n = only_remote_errors(protocol.frame_length, header)
    if n is not None:
        assert len(header) == 4 and 1 <= n <= MAX_FRAME
        assert n == struct.unpack(">I", header)[0]


VALID_STREAM = b"".join(protocol.encode_frame(b) for b in (b"a", b"hello" * 10, bytes(300)))


def _read_frames(chunks: list[bytes]) -> list[bytes]:
    """Feed a byte stream, in the given pieces, to session.read_frame over a real
    socket pair (the product's framing path); returns frames until end of stream."""
    import socket
    import threading

    import session

    a, b = socket.socketpair()

    def feed():
        try:
            for chunk in chunks:
                a.sendall(chunk)
        except OSError:
            pass  # the reader refused the stream and hung up
        finally:
            a.close()

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    frames = []
    try:
        while True:
            try:
                frames.append(bytes(session.read_frame(b)))
            except session.ConnectionLost:
                return frames
    finally:
        b.close()
        t.join(5)


@FAST
@given(st.one_of(
    st.lists(st.binary(max_size=40), max_size=8),
    st.tuples(OPS, st.lists(st.integers(0, 400), max_size=5)).map(
        lambda t: [mutate(VALID_STREAM, t[0])[a:b] for a, b in
                   zip([0, *sorted(t[1])], [*sorted(t[1]), None], strict=True)]),
))
def test_read_frame_on_arbitrary_and_mutated_streams(chunks):
    try:
        for frame in _read_frames(chunks):
            assert 1 <= len(frame) <= MAX_FRAME
    except RemoteProtocolError:
        pass


@FAST
@given(st.lists(st.binary(min_size=1, max_size=50), max_size=6), st.lists(st.integers(0, 400)))
def test_read_frame_reassembles_any_split(bodies, cuts):
    stream = b"".join(protocol.encode_frame(b) for b in bodies)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    assert _read_frames([stream[a:b] for a, b in zip(points, points[1:], strict=False)]) \
        == bodies


@FAST
@given(st.integers(MAX_FRAME + 1, 2**32 - 1) | st.just(0), st.binary(max_size=3))
def test_read_frame_refuses_a_bad_length_before_any_data(length, tail):
    with pytest.raises(RemoteProtocolError):
        _read_frames([struct.pack(">I", length) + tail])


# --- handshake message decoders --------------------------------------------------------------
class _Sealed:
    """A ClientAuth opened with the genuine session's handshake keys; encode() reseals."""

    def __init__(self, auth: ClientAuth) -> None:
        self.auth = auth

    def encode(self) -> bytes:
        return crypt.seal_client_auth(genuine()["keys"], self.auth.encode_inner())


def decode_client_auth(body: bytes) -> _Sealed:
    """The ClientAuth is sealed: its decoder is the opening, which fails as an AuthError
    (the seal does not verify) or a RemoteProtocolError (type, size), nothing else."""
    try:
        return _Sealed(crypt.open_client_auth(genuine()["keys"], body))
    except protocol.AuthError as e:
        raise RemoteProtocolError(str(e)) from e


DECODERS = {"ch": ClientHello.decode, "sh": ServerHello.decode, "ca": decode_client_auth}


@pytest.mark.parametrize("kind", sorted(DECODERS))
@FAST
@given(data=st.data())
def test_handshake_decoders(kind, data):
    body = data.draw(st.one_of(arbitrary_handshake(kind), mutated(kind)))
    msg = only_remote_errors(DECODERS[kind], body)
    if msg is not None:
        assert msg.encode() == body  # what parsed is exactly what came in


VALID_ALERT = protocol.Alert(protocol.AlertCode.BUSY, "server busy").encode()


@FAST
@given(st.one_of(st.binary(max_size=300), OPS.map(lambda ops: mutate(VALID_ALERT, ops))))
@example(VALID_ALERT)
@example(b"\x7f")
@example(b"\x7f\x00")
@example(b"\x7f\x03\xff\xfe")
@example(b"\x7f\x01" + b"x" * 256)
def test_alert_decode(body):
    alert = only_remote_errors(protocol.Alert.decode, body)
    if alert is not None:
        assert isinstance(alert.code, protocol.AlertCode)
        assert isinstance(alert.reason, str)


def test_handshake_decoders_round_trip_the_genuine_messages():
    g = genuine()
    for kind, decode in DECODERS.items():
        assert decode(g[kind]).encode() == g[kind]


# --- application messages -----------------------------------------------------------------
VALID_MESSAGES = [
    protocol.Welcome(), protocol.Refused(protocol.Reason.BUSY, "busy"), protocol.KeyUpdate(),
    protocol.Text(7, "héllo"), protocol.Delivered(7), protocol.FileOffer(3, 1234, "a.jpg"),
    protocol.FileAccept(3), protocol.FileReject(3, protocol.Reason.NOT_JPEG, "no"),
    protocol.FileData(3, b"\xff\xd8\xff" + bytes(20)), protocol.FileEnd(3, bytes(32)),
    protocol.FileSaved(3, bytes(32), "a (1).jpg"),
    protocol.FileFailed(3, protocol.Reason.NO_SPACE),
    protocol.FileCancel(3, protocol.Reason.CANCELLED, "stop"), protocol.Bye("bye"),
    protocol.Error("oops"),
]


def test_every_message_type_has_a_valid_example():
    assert {m.TYPE for m in VALID_MESSAGES} == set(MsgType) == set(protocol.MESSAGES)
    for m in VALID_MESSAGES:
        assert protocol.decode_message(m.TYPE, bytes(m.encode())) == m


@pytest.mark.parametrize("msg_type", list(MsgType), ids=lambda t: t.name)
@FAST
@given(payload=st.binary(max_size=300))
def test_decode_message_on_arbitrary_payloads(msg_type, payload):
    only_remote_errors(protocol.decode_message, msg_type, payload)


@FAST
@given(st.sampled_from(VALID_MESSAGES), OPS, st.integers(0, 255))
def test_decode_message_on_mutated_messages_and_any_type(msg, ops, any_type):
    payload = mutate(bytes(msg.encode()), ops)
    only_remote_errors(protocol.decode_message, msg.TYPE, payload)
    only_remote_errors(protocol.decode_message, any_type, payload)


def test_decode_message_limits():
    for msg_type, payload in ((MsgType.FILE_DATA, bytes(4 + CHUNK_SIZE + 1)),
                              (MsgType.FILE_DATA, bytes(4)),
                              (MsgType.FILE_DATA, b""),
                              (MsgType.TEXT, bytes(8) + b"x" * (protocol.MAX_TEXT + 1)),
                              (MsgType.FILE_OFFER, bytes(12) + b"x" * (protocol.MAX_NAME + 1)),
                              (MsgType.FILE_OFFER, bytes(12)),
                              (MsgType.FILE_SAVED, bytes(36)),
                              (MsgType.TEXT, bytes(8) + b"\xff")):
        with pytest.raises(RemoteProtocolError):
            protocol.decode_message(msg_type, payload)


# --- handshake steps on hostile input --------------------------------------------------------
@MEDIUM
@given(data=st.data())
def test_server_consume_client_hello(data):
    body = data.draw(st.one_of(arbitrary_handshake("ch"), mutated("ch")))
    s = ServerHandshake(identity("server"))
    try:
        s.consume_client_hello(body)
    except ProtocolError:
        assert s.state is ServerState.FAILED
        with pytest.raises(protocol.LocalProtocolError):
            s.create_server_hello()
    else:
        assert s.state is ServerState.HELLO_READY


@MEDIUM
@given(data=st.data())
def test_client_consume_server_hello(data):
    body = data.draw(st.one_of(arbitrary_handshake("sh"), mutated("sh")))
    c = fixed_client()
    assert c.create_client_hello() == genuine()["ch"]
    try:
        c.consume_server_hello(body)
    except ProtocolError:
        assert c.state is ClientState.FAILED
        assert c.server is None
        with pytest.raises(protocol.LocalProtocolError):
            c.create_client_auth()
    else:
        # every byte of the ServerHello is signed or MACed: only the original passes
        assert body == genuine()["sh"]
        assert c.state is ClientState.SERVER_VERIFIED


@SLOW
@given(st.one_of(arbitrary_handshake("ca").map(lambda b: ("raw", b)),
                 OPS.map(lambda ops: ("ops", ops))))
def test_server_consume_client_auth(case):
    c, s = ClientHandshake(identity("client")), ServerHandshake(identity("server"))
    s.consume_client_hello(c.create_client_hello())
    c.consume_server_hello(s.create_server_hello())
    ca = c.create_client_auth()
    kind, value = case
    body = value if kind == "raw" else mutate(ca, value)
    try:
        s.consume_client_auth(body)
    except ProtocolError:
        assert s.state is ServerState.FAILED
        assert s.client is None
        with pytest.raises(protocol.LocalProtocolError):
            s.records()
    else:
        assert body == ca  # signatures and Finished cover every byte
        assert s.state is ServerState.DONE


# --- records ---------------------------------------------------------------------------------
def fresh_receiver() -> crypt.RecordReceiver:
    return crypt.record_pair(genuine()["keys"], crypt.Role.SERVER)[1]


@FAST
@given(st.one_of(st.binary(max_size=200), OPS.map(lambda ops: mutate(genuine()["record"], ops))))
@example(b"")
@example(bytes(protocol.IV_SIZE + protocol.MAC_SIZE))
def test_record_receiver_open(body):
    receiver = fresh_receiver()
    if body == genuine()["record"]:
        assert receiver.open(body) == (MsgType.TEXT, bytes(8) + b"hi there")
        return
    with pytest.raises(AuthError) as info:
        receiver.open(body)
    assert str(info.value) == crypt.AUTH_FAILED


# --- trust files ------------------------------------------------------------------------------
FP = "SHA256:" + "A" * 43
LINE = st.one_of(
    st.text(max_size=60),
    st.sampled_from(["", "#", "# comment", "   ", "\t", FP, "[h]:1", f"[h]:1 {FP}",
                     f"[::1]:5555 {FP} extra", f"{FP} alice", f"{FP}   # note", "SHA256:",
                     "SHA256:x", f"[h]:1 {FP[:-1]}", "\x00", "\u2028", "\r", "\x0b\x0c"]),
)
TRUST_TEXT = st.one_of(st.text(max_size=200),
                       st.lists(LINE, max_size=8).map("\n".join),
                       st.binary(max_size=200).map(lambda b: b.decode("utf-8", "replace")))


@FAST
@given(TRUST_TEXT)
def test_parse_known_hosts(text):
    try:
        entries = client_data.parse_known_hosts(text)
    except ValueError:
        return
    for key, (fp, line) in entries.items():
        assert key and fp.startswith("SHA256:") and line >= 1
        assert not any(ch.isspace() for ch in key + fp)


@FAST
@given(TRUST_TEXT)
def test_parse_authorized_clients(text):
    try:
        allowed = server_data.parse_authorized_clients(text)
    except ValueError:
        return
    for fp, name in allowed.items():
        assert fp.startswith("SHA256:") and len(fp) == len(FP)
        assert "#" not in fp + name and name == name.strip()


# --- names from the peer -----------------------------------------------------------------------
UNSAFE_IN_NAMES = ("Cc", "Cf", "Cs", "Co", "Zl", "Zp")
NAME_PIECES = st.sampled_from(["/", "\\", ".", "..", " ", "\x00", "\n", "\x1b[31m", "\u202e",
                               "\u200b", "\u2028", "\ufeff", "jpg", ".jpg", ".JPEG", ".jpeg.",
                               "é", "😀", "名", "a", "\u3000", "\xa0", "\t", "~"])
NAMES = st.one_of(
    st.text(),
    st.text(st.characters(codec=None), max_size=300),
    st.lists(NAME_PIECES, max_size=30).map("".join),
    st.builds(lambda n, s, ext: s * n + ext, st.integers(0, 300),
              st.sampled_from(["a", "é", "😀", " .", ". ", "x.y"]),
              st.sampled_from(["", ".jpg", ".JPG", ".jpeg", ".png", ".jpg.exe"])),
)


@settings(max_examples=600, deadline=None)
@given(NAMES)
@example(". .a.jpg")
@example(".. ..x.jpeg")
@example("../../etc/passwd")
@example("..\\..\\boot.ini")
@example("\u202egpj.exe")
@example("😀" * 100 + ".jpeg")
@example("")
def test_sanitise_name_is_always_safe(name):
    out = transfer.sanitise_name(name)
    assert isinstance(out, str) and out
    assert "/" not in out and "\\" not in out and "\x00" not in out
    assert not any(unicodedata.category(ch) in UNSAFE_IN_NAMES for ch in out), out
    assert not out.startswith("."), out
    assert out not in (".", "..")
    assert len(out.encode("utf-8")) <= protocol.MAX_NAME
    assert out.lower().endswith((".jpg", ".jpeg")), out
    assert out.lower() not in (".jpg", ".jpeg")


# --- text from the peer on the terminal -----------------------------------------------------------
UNSAFE_ON_TERMINAL = ("Cc", "Cf", "Cs", "Zl", "Zp")
TERMINAL_TEXT = st.one_of(
    st.text(st.characters(codec=None), max_size=200),
    st.lists(st.sampled_from(["\x1b[2J", "\x1b]0;title\x07", "\r", "\n", "\x08", "\x7f",
                              "\x9b", "\u202e", "\u2066", "\u200f", "\u2028", "\u2029",
                              "\ufeff", "\U000e0041", "\t", "plain", "é", "😀", "\\x1b"]),
             max_size=20).map("".join),
)


def is_unsafe(ch: str) -> bool:
    return ch != "\t" and unicodedata.category(ch) in UNSAFE_ON_TERMINAL


def is_visible(ch: str) -> bool:
    """Letters, marks, numbers, punctuation, symbols, spaces (Zs) and tab."""
    return ch == "\t" or unicodedata.category(ch) in (
        "Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc", "Me", "Nd", "Nl", "No", "Pc", "Pd", "Ps",
        "Pe", "Pi", "Pf", "Po", "Sm", "Sc", "Sk", "So", "Zs")


@settings(max_examples=600, deadline=None)
@given(TERMINAL_TEXT)
def test_neutralise_leaves_no_control_or_format_characters(text):
    out = protocol.neutralise(text)
    assert not any(is_unsafe(ch) for ch in out), repr(out)
    assert "\x1b" not in out and "\n" not in out and "\r" not in out
    # the visible text is all there, in order, and plain visible text is left alone
    visible = [ch for ch in text if is_visible(ch)]
    it = iter(out)
    assert all(ch in it for ch in visible), (text, out)
    if len(visible) == len(text):
        assert out == text
    # and every neutralised character is shown, not silently dropped
    for ch in set(text):
        if is_unsafe(ch):
            code = ord(ch)
            assert (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}") in out
