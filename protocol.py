"""QSocket 2 wire format: framing, message types and their encodings.

Sans-I/O: everything here takes bytes and returns bytes or frozen dataclasses.
docs/PROTOCOL.md is the byte-exact description of what this module encodes.
"""

from __future__ import annotations

import enum
import struct
import unicodedata
from dataclasses import dataclass

# --- identity of the protocol -------------------------------------------------
MAGIC = b"QSK2"
VERSION = 2
# One suite, no negotiation: the label names every algorithm and is hashed first
# into the transcript, so a different suite or version can never verify.
PROTOCOL_LABEL = (
    b"QSocket2 v2 ECDH-P256+MLKEM1024 ECDSA-P256+MLDSA65 AES256CTR+HMACSHA256"
)
# The ClientHello commits to the client's code nonce: SHA-256(COMMITMENT_LABEL || nonce_c).
COMMITMENT_LABEL = b"QSocket2 v2 code commitment"

# --- sizes ---------------------------------------------------------------------
RANDOM_SIZE = 32
P256_POINT = 65  # uncompressed SEC1 point: 0x04 || X || Y
MLKEM1024_EK = 1568
MLKEM1024_CT = 1568
MLDSA65_PUB = 1952
MLDSA65_SIG = 3309
ECDSA_SIG = 64  # r || s, 32 bytes each, big-endian
MAC_SIZE = 32  # HMAC-SHA-256, never truncated
IV_SIZE = 16
HASH_SIZE = 32
NONCE_SIZE = 32  # the client's code nonce, revealed in the ClientAuth

FRAME_HEADER = struct.Struct(">I")
CHUNK_SIZE = 1 << 20  # file data per record
MAX_TEXT = 64 * 1024  # bytes of UTF-8 in one text message
MAX_NAME = 255  # bytes of UTF-8 in a file name
# The largest body a record can carry is a full file chunk plus its type byte;
# a record adds its IV and MAC.  Anything longer is refused before allocation.
OP_ID = struct.Struct(">I")  # the operation id at the start of every file message
# the file window (PROTOCOL.md 11.2): operations one direction may have open at once
WINDOW_FILES = 32
WINDOW_BYTES = 64 << 20  # their announced sizes together, unless only one is open
MAX_RECORD_PLAINTEXT = 1 + OP_ID.size + CHUNK_SIZE
MAX_FRAME = IV_SIZE + MAX_RECORD_PLAINTEXT + MAC_SIZE


# --- errors (docstrings double as user text) ---------------------------------
class ProtocolError(Exception):
    """protocol error"""


class LocalProtocolError(ProtocolError):
    """we misused the protocol"""


class RemoteProtocolError(ProtocolError):
    """the peer broke the protocol"""


class AuthError(ProtocolError):
    """authentication failed"""


class TransferRejected(ProtocolError):
    """the transfer was rejected"""


# --- framing -------------------------------------------------------------------
def encode_frame(body: bytes) -> bytes:
    if len(body) > MAX_FRAME:
        raise LocalProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return FRAME_HEADER.pack(len(body)) + body


def frame_length(header: bytes, limit: int = MAX_FRAME) -> int:
    """Parse and check a 4-byte frame header before anything is allocated."""
    if len(header) != FRAME_HEADER.size:
        raise RemoteProtocolError("truncated frame header")
    (length,) = FRAME_HEADER.unpack(header)
    if length == 0 or length > limit:
        raise RemoteProtocolError(f"frame length {length} outside 1..{limit}")
    return length


# --- handshake messages (plaintext frames) ----------------------------------
class HandshakeType(enum.IntEnum):
    CLIENT_HELLO = 1
    SERVER_HELLO = 2
    CLIENT_AUTH = 3
    ALERT = 0x7F


class AlertCode(enum.IntEnum):
    """Plaintext, unauthenticated reasons for closing before the handshake ends."""

    BAD_MESSAGE = 1
    BAD_VERSION = 2
    AUTH_FAILED = 3
    BUSY = 4
    TIMEOUT = 5
    INTERNAL = 6


# What a receiver shows for an Alert: the code's meaning only, never the sender's
# free text, which nothing authenticates.
ALERT_MEANING = {
    AlertCode.BAD_MESSAGE: "malformed handshake message",
    AlertCode.BAD_VERSION: "another protocol version",
    AlertCode.AUTH_FAILED: "authentication failed",
    AlertCode.BUSY: "server busy",
    AlertCode.TIMEOUT: "handshake timed out",
    AlertCode.INTERNAL: "internal error",
}


def _check_size(kind: str, body: bytes, size: int) -> None:
    if len(body) != size:
        raise RemoteProtocolError(f"{kind}: {len(body)} bytes, expected {size}")


def _split(body: bytes, sizes: tuple[int, ...]) -> list[bytes]:
    out, pos = [], 0
    for n in sizes:
        out.append(body[pos : pos + n])
        pos += n
    return out


@dataclass(frozen=True, slots=True)
class IdentityPublic:
    """A peer's long-term public keys: ECDSA P-256 point, then ML-DSA-65 key."""

    ecdsa: bytes
    mldsa: bytes

    SIZE = P256_POINT + MLDSA65_PUB

    def __post_init__(self) -> None:
        if len(self.ecdsa) != P256_POINT or len(self.mldsa) != MLDSA65_PUB:
            raise RemoteProtocolError("identity public keys have the wrong size")

    def encode(self) -> bytes:
        return self.ecdsa + self.mldsa

    @classmethod
    def decode(cls, data: bytes) -> IdentityPublic:
        _check_size("identity", data, cls.SIZE)
        return cls(data[:P256_POINT], data[P256_POINT:])


@dataclass(frozen=True, slots=True)
class Signatures:
    """ECDSA P-256 (r || s) and ML-DSA-65 signatures over one transcript hash."""

    ecdsa: bytes
    mldsa: bytes

    SIZE = ECDSA_SIG + MLDSA65_SIG

    def __post_init__(self) -> None:
        if len(self.ecdsa) != ECDSA_SIG or len(self.mldsa) != MLDSA65_SIG:
            raise RemoteProtocolError("signatures have the wrong size")

    def encode(self) -> bytes:
        return self.ecdsa + self.mldsa

    @classmethod
    def decode(cls, data: bytes) -> Signatures:
        _check_size("signatures", data, cls.SIZE)
        return cls(data[:ECDSA_SIG], data[ECDSA_SIG:])


_VERSION = struct.Struct(">4sH")


@dataclass(frozen=True, slots=True)
class ClientHello:
    """Client -> server, first: its key shares and the commitment to its code nonce."""

    random: bytes
    ecdh_share: bytes
    mlkem_ek: bytes
    commitment: bytes  # SHA-256(COMMITMENT_LABEL || nonce_c); the identity comes later

    SIZE = 1 + _VERSION.size + RANDOM_SIZE + P256_POINT + MLKEM1024_EK + HASH_SIZE

    def __post_init__(self) -> None:
        if len(self.random) != RANDOM_SIZE:
            raise RemoteProtocolError("ClientHello: bad random size")
        if len(self.ecdh_share) != P256_POINT or len(self.mlkem_ek) != MLKEM1024_EK:
            raise RemoteProtocolError("ClientHello: bad key share size")
        if len(self.commitment) != HASH_SIZE:
            raise RemoteProtocolError("ClientHello: bad commitment size")

    def encode(self) -> bytes:
        return (
            bytes([HandshakeType.CLIENT_HELLO])
            + _VERSION.pack(MAGIC, VERSION)
            + self.random
            + self.ecdh_share
            + self.mlkem_ek
            + self.commitment
        )

    @classmethod
    def decode(cls, body: bytes) -> ClientHello:
        # magic and version first, so a peer of another version gets BAD_VERSION
        expect_type(body, HandshakeType.CLIENT_HELLO)
        _check_version("ClientHello", body)
        _check_size("ClientHello", body, cls.SIZE)
        rnd, ecdh, ek, commitment = _split(
            body[1 + _VERSION.size :], (RANDOM_SIZE, P256_POINT, MLKEM1024_EK, HASH_SIZE)
        )
        return cls(rnd, ecdh, ek, commitment)


def _check_version(kind: str, body: bytes) -> None:
    """Magic and version first, so a peer of another version learns that, not a size error."""
    if len(body) < 1 + _VERSION.size:
        raise RemoteProtocolError(f"{kind}: truncated")
    magic, version = _VERSION.unpack_from(body, 1)
    if magic != MAGIC:
        raise RemoteProtocolError(f"{kind}: not a QSocket 2 peer (bad magic)")
    if version != VERSION:
        raise VersionMismatch(version)


class VersionMismatch(RemoteProtocolError):
    """the peer speaks another protocol version"""

    def __init__(self, version: int) -> None:
        super().__init__(f"peer speaks protocol version {version}, we speak {VERSION}")
        self.version = version


@dataclass(frozen=True, slots=True)
class ServerHello:
    """The server's key shares and identity ("core"), then its proofs."""

    random: bytes
    ecdh_share: bytes
    mlkem_ct: bytes
    identity: IdentityPublic
    signatures: Signatures
    finished: bytes

    CORE_SIZE = 1 + _VERSION.size + RANDOM_SIZE + P256_POINT + MLKEM1024_CT + IdentityPublic.SIZE
    SIZE = CORE_SIZE + Signatures.SIZE + MAC_SIZE

    def __post_init__(self) -> None:
        if len(self.random) != RANDOM_SIZE:
            raise RemoteProtocolError("ServerHello: bad random size")
        if len(self.ecdh_share) != P256_POINT or len(self.mlkem_ct) != MLKEM1024_CT:
            raise RemoteProtocolError("ServerHello: bad key share size")
        if len(self.finished) != MAC_SIZE:
            raise RemoteProtocolError("ServerHello: bad Finished size")

    @staticmethod
    def encode_core(random: bytes, ecdh_share: bytes, mlkem_ct: bytes,
                    identity: IdentityPublic) -> bytes:
        return (
            bytes([HandshakeType.SERVER_HELLO])
            + _VERSION.pack(MAGIC, VERSION)
            + random + ecdh_share + mlkem_ct + identity.encode()
        )

    def core(self) -> bytes:
        return self.encode_core(self.random, self.ecdh_share, self.mlkem_ct, self.identity)

    def encode(self) -> bytes:
        return self.core() + self.signatures.encode() + self.finished

    @classmethod
    def decode(cls, body: bytes) -> ServerHello:
        expect_type(body, HandshakeType.SERVER_HELLO)
        _check_version("ServerHello", body)
        _check_size("ServerHello", body, cls.SIZE)
        rnd, ecdh, ct, ident, sigs, fin = _split(
            body[1 + _VERSION.size :],
            (RANDOM_SIZE, P256_POINT, MLKEM1024_CT, IdentityPublic.SIZE,
             Signatures.SIZE, MAC_SIZE),
        )
        return cls(rnd, ecdh, ct, IdentityPublic.decode(ident), Signatures.decode(sigs), fin)


@dataclass(frozen=True, slots=True)
class ClientAuth:
    """The client's proof, sent sealed under the handshake keys (crypt.seal_client_auth):
    the code nonce, the client's identity, its signatures and its Finished."""

    nonce: bytes
    identity: IdentityPublic
    signatures: Signatures
    finished: bytes

    # plaintext inside the seal; the frame adds the type byte, IV, sealed type byte and tag
    INNER_SIZE = NONCE_SIZE + IdentityPublic.SIZE + Signatures.SIZE + MAC_SIZE
    SIZE = 1 + IV_SIZE + 1 + INNER_SIZE + MAC_SIZE

    def __post_init__(self) -> None:
        if len(self.nonce) != NONCE_SIZE:
            raise RemoteProtocolError("ClientAuth: bad nonce size")
        if len(self.finished) != MAC_SIZE:
            raise RemoteProtocolError("ClientAuth: bad Finished size")

    @staticmethod
    def encode_id(nonce: bytes, identity: IdentityPublic) -> bytes:
        """`cauth_id`: the part of the transcript the client's signatures cover."""
        return nonce + identity.encode()

    def encode_inner(self) -> bytes:
        return (self.encode_id(self.nonce, self.identity) + self.signatures.encode()
                + self.finished)

    @classmethod
    def decode_inner(cls, inner: bytes) -> ClientAuth:
        _check_size("ClientAuth", inner, cls.INNER_SIZE)
        nonce, ident, sigs, fin = _split(
            inner, (NONCE_SIZE, IdentityPublic.SIZE, Signatures.SIZE, MAC_SIZE))
        return cls(nonce, IdentityPublic.decode(ident), Signatures.decode(sigs), fin)

    @classmethod
    def check_frame(cls, body: bytes) -> None:
        """Type and size of the sealed frame, before anything is opened."""
        expect_type(body, HandshakeType.CLIENT_AUTH)
        _check_size("ClientAuth", body, cls.SIZE)


# The largest handshake frame (the ServerHello); a handshake read allocates no more.
MAX_HANDSHAKE = ServerHello.SIZE


@dataclass(frozen=True, slots=True)
class Alert:
    """Plaintext and unauthenticated: why a handshake ends (shown by its code only)."""

    code: AlertCode
    reason: str

    def encode(self) -> bytes:
        return bytes([HandshakeType.ALERT, self.code]) + utf8_prefix(self.reason, MAX_NAME)

    @classmethod
    def decode(cls, body: bytes) -> Alert:
        expect_type(body, HandshakeType.ALERT)
        if len(body) < 2 or len(body) > 2 + MAX_NAME:
            raise RemoteProtocolError("Alert: bad length")
        try:
            return cls(AlertCode(body[1]), body[2:].decode("utf-8", "replace"))
        except ValueError as e:
            raise RemoteProtocolError(f"Alert: unknown code {body[1]}") from e


def expect_type(body: bytes, expected: HandshakeType) -> None:
    if not body:
        raise RemoteProtocolError("empty handshake message")
    if body[0] == HandshakeType.ALERT and expected != HandshakeType.ALERT:
        raise PeerAlert(Alert.decode(body))
    if body[0] != expected:
        raise RemoteProtocolError(
            f"expected {expected.name}, got handshake message type {body[0]}"
        )


class PeerAlert(RemoteProtocolError):
    """the peer closed the handshake"""

    def __init__(self, alert: Alert) -> None:
        super().__init__(f"peer refused: {ALERT_MEANING[alert.code]}")
        self.alert = alert


# --- application messages (inside records) -----------------------------------
class MsgType(enum.IntEnum):
    WELCOME = 0x01
    REFUSED = 0x02
    KEY_UPDATE = 0x03
    TEXT = 0x10
    DELIVERED = 0x11
    FILE_OFFER = 0x20
    FILE_ACCEPT = 0x21
    FILE_REJECT = 0x22
    FILE_DATA = 0x23
    FILE_END = 0x24
    FILE_SAVED = 0x25
    FILE_FAILED = 0x26
    FILE_CANCEL = 0x27
    BYE = 0x30
    ERROR = 0x31


class Reason(enum.IntEnum):
    """Why a connection, text or file was refused; the text beside it is for humans."""

    UNSPECIFIED = 0
    NOT_AUTHORIZED = 1
    BUSY = 2
    NOT_JPEG = 3
    TOO_LARGE = 4
    NO_SPACE = 5
    WRITE_FAILED = 6
    HASH_MISMATCH = 7
    BAD_NAME = 8
    CANCELLED = 9


_U64 = struct.Struct(">Q")
_REASON = struct.Struct(">B")


def utf8_prefix(text: str, limit: int) -> bytes:
    """At most `limit` bytes of UTF-8, cut on a character boundary."""
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore").encode("utf-8")


def _utf8(data: bytes, what: str, limit: int) -> str:
    if len(data) > limit:
        raise RemoteProtocolError(f"{what}: {len(data)} bytes exceeds {limit}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RemoteProtocolError(f"{what}: not valid UTF-8") from e


def _reason(code: int) -> Reason:
    try:
        return Reason(code)
    except ValueError:
        return Reason.UNSPECIFIED


@dataclass(frozen=True, slots=True)
class Welcome:
    """Server -> client, the first record: the client is admitted."""

    TYPE = MsgType.WELCOME

    def encode(self) -> bytes:
        return b""

    @classmethod
    def decode(cls, payload: bytes) -> Welcome:
        if payload:
            raise RemoteProtocolError("Welcome: unexpected payload")
        return cls()


@dataclass(frozen=True, slots=True)
class KeyUpdate:
    """The sender's next record is under its next key epoch (crypt ratchets both ends)."""

    TYPE = MsgType.KEY_UPDATE

    def encode(self) -> bytes:
        return b""

    @classmethod
    def decode(cls, payload: bytes) -> KeyUpdate:
        if payload:
            raise RemoteProtocolError("KeyUpdate: unexpected payload")
        return cls()


@dataclass(frozen=True, slots=True)
class _Reasoned:
    """A reason code and a short human text (used by several message types)."""

    reason: Reason
    detail: str = ""

    def __post_init__(self) -> None:
        if len(self.detail.encode("utf-8")) > MAX_TEXT:
            raise LocalProtocolError("detail too long")

    def encode(self) -> bytes:
        return _REASON.pack(self.reason) + self.detail.encode("utf-8")

    @classmethod
    def decode(cls, payload: bytes):
        if len(payload) < 1:
            raise RemoteProtocolError(f"{cls.__name__}: missing reason")
        return cls(_reason(payload[0]), _utf8(payload[1:], cls.__name__, MAX_TEXT))


@dataclass(frozen=True, slots=True)
class Refused(_Reasoned):
    """Server -> client, the first record: the client authenticated but is not admitted."""

    TYPE = MsgType.REFUSED


def _op(payload, name: str) -> tuple[int, bytes | memoryview]:
    """The operation id at the start of a file message, and the rest."""
    if len(payload) < OP_ID.size:
        raise RemoteProtocolError(f"{name}: truncated")
    return OP_ID.unpack_from(payload)[0], payload[OP_ID.size :]


def _check_op(op: int) -> None:
    if not 0 <= op < 1 << 32:
        raise LocalProtocolError("operation id out of range")


@dataclass(frozen=True, slots=True)
class _OpReasoned:
    """A file operation's id, a reason code and a short human text."""

    op: int
    reason: Reason
    detail: str = ""

    def __post_init__(self) -> None:
        _check_op(self.op)
        if len(self.detail.encode("utf-8")) > MAX_TEXT:
            raise LocalProtocolError("detail too long")

    def encode(self) -> bytes:
        return OP_ID.pack(self.op) + _REASON.pack(self.reason) + self.detail.encode("utf-8")

    @classmethod
    def decode(cls, payload: bytes):
        op, rest = _op(payload, cls.__name__)
        if len(rest) < 1:
            raise RemoteProtocolError(f"{cls.__name__}: missing reason")
        return cls(op, _reason(rest[0]), _utf8(rest[1:], cls.__name__, MAX_TEXT))


@dataclass(frozen=True, slots=True)
class FileReject(_OpReasoned):
    """Receiver -> sender: the offered file is not taken."""

    TYPE = MsgType.FILE_REJECT


@dataclass(frozen=True, slots=True)
class FileFailed(_OpReasoned):
    """Receiver -> sender: the file was not saved."""

    TYPE = MsgType.FILE_FAILED


@dataclass(frozen=True, slots=True)
class FileCancel(_OpReasoned):
    """Sender -> receiver: the stream ends here and nothing is to be saved."""

    TYPE = MsgType.FILE_CANCEL


@dataclass(frozen=True, slots=True)
class Text:
    """A text message; the peer answers with Delivered and the same msg_id."""

    TYPE = MsgType.TEXT
    msg_id: int
    text: str

    def __post_init__(self) -> None:
        if len(self.text.encode("utf-8")) > MAX_TEXT:
            raise LocalProtocolError(f"text longer than {MAX_TEXT} bytes")

    def encode(self) -> bytes:
        return _U64.pack(self.msg_id) + self.text.encode("utf-8")

    @classmethod
    def decode(cls, payload: bytes) -> Text:
        if len(payload) < _U64.size:
            raise RemoteProtocolError("Text: truncated")
        (msg_id,) = _U64.unpack_from(payload)
        return cls(msg_id, _utf8(payload[_U64.size :], "Text", MAX_TEXT))


@dataclass(frozen=True, slots=True)
class Delivered:
    """The answer to a Text: it reached the peer."""

    TYPE = MsgType.DELIVERED
    msg_id: int

    def encode(self) -> bytes:
        return _U64.pack(self.msg_id)

    @classmethod
    def decode(cls, payload: bytes) -> Delivered:
        _check_size("Delivered", payload, _U64.size)
        return cls(_U64.unpack(payload)[0])


@dataclass(frozen=True, slots=True)
class FileOffer:
    """Sender -> receiver: a file operation begins, with its id, size and name."""

    TYPE = MsgType.FILE_OFFER
    op: int
    size: int
    name: str

    def __post_init__(self) -> None:
        _check_op(self.op)
        if not 0 <= self.size < 1 << 64:
            raise LocalProtocolError("file size out of range")
        if not self.name or len(self.name.encode("utf-8")) > MAX_NAME:
            raise RemoteProtocolError(f"file name must be 1..{MAX_NAME} bytes of UTF-8")

    def encode(self) -> bytes:
        return OP_ID.pack(self.op) + _U64.pack(self.size) + self.name.encode("utf-8")

    @classmethod
    def decode(cls, payload: bytes) -> FileOffer:
        op, rest = _op(payload, "FileOffer")
        if len(rest) < _U64.size:
            raise RemoteProtocolError("FileOffer: truncated")
        (size,) = _U64.unpack_from(rest)
        return cls(op, size, _utf8(rest[_U64.size :], "FileOffer name", MAX_NAME))


@dataclass(frozen=True, slots=True)
class FileAccept:
    """Receiver -> sender: the offer is taken, its data may come."""

    TYPE = MsgType.FILE_ACCEPT
    op: int

    def encode(self) -> bytes:
        return OP_ID.pack(self.op)

    @classmethod
    def decode(cls, payload: bytes) -> FileAccept:
        _check_size("FileAccept", payload, OP_ID.size)
        return cls(OP_ID.unpack(payload)[0])


@dataclass(frozen=True, slots=True)
class FileData:
    """The op id is the record's head and the data its body: the session seals
    them without joining them (zero copy, see head()); encode() joins them."""

    TYPE = MsgType.FILE_DATA
    op: int
    data: bytes | memoryview

    def head(self) -> bytes:
        return OP_ID.pack(self.op)

    def encode(self) -> bytes:
        return OP_ID.pack(self.op) + bytes(self.data)

    @classmethod
    def decode(cls, payload: bytes) -> FileData:
        op, data = _op(payload, "FileData")
        if not data or len(data) > CHUNK_SIZE:
            raise RemoteProtocolError(f"FileData: chunk must be 1..{CHUNK_SIZE} bytes")
        return cls(op, data)


@dataclass(frozen=True, slots=True)
class FileEnd:
    """Sender -> receiver: all of the file's data was sent; its SHA-256."""

    TYPE = MsgType.FILE_END
    op: int
    sha256: bytes

    def encode(self) -> bytes:
        return OP_ID.pack(self.op) + self.sha256

    @classmethod
    def decode(cls, payload: bytes) -> FileEnd:
        _check_size("FileEnd", payload, OP_ID.size + HASH_SIZE)
        return cls(OP_ID.unpack_from(payload)[0], payload[OP_ID.size :])


@dataclass(frozen=True, slots=True)
class FileSaved:
    """Receiver -> sender: the file is on disk and durable, under this name."""

    TYPE = MsgType.FILE_SAVED
    op: int
    sha256: bytes
    name: str

    def encode(self) -> bytes:
        return OP_ID.pack(self.op) + self.sha256 + self.name.encode("utf-8")

    @classmethod
    def decode(cls, payload: bytes) -> FileSaved:
        op, rest = _op(payload, "FileSaved")
        if len(rest) < HASH_SIZE + 1:
            raise RemoteProtocolError("FileSaved: truncated")
        return cls(op, rest[:HASH_SIZE], _utf8(rest[HASH_SIZE:], "FileSaved name", MAX_NAME))


@dataclass(frozen=True, slots=True)
class Bye:
    """The sender ends the session cleanly: nothing more comes from it."""

    TYPE = MsgType.BYE
    reason: str = ""

    def encode(self) -> bytes:
        return utf8_prefix(self.reason, MAX_NAME)

    @classmethod
    def decode(cls, payload: bytes) -> Bye:
        return cls(_utf8(payload, "Bye", MAX_NAME))


@dataclass(frozen=True, slots=True)
class Error:
    """The sender ends the session on an error: nothing more comes from it."""

    TYPE = MsgType.ERROR
    reason: str = ""

    def encode(self) -> bytes:
        return utf8_prefix(self.reason, MAX_NAME)

    @classmethod
    def decode(cls, payload: bytes) -> Error:
        return cls(_utf8(payload, "Error", MAX_NAME))


MESSAGES = {
    cls.TYPE: cls
    for cls in (Welcome, Refused, KeyUpdate, Text, Delivered, FileOffer, FileAccept, FileReject,
                FileData, FileEnd, FileSaved, FileFailed, FileCancel, Bye, Error)
}


def decode_message(msg_type: int, payload: bytes):
    """Decode one application message; any malformation is a RemoteProtocolError."""
    try:
        cls = MESSAGES[MsgType(msg_type)]
    except ValueError as e:
        raise RemoteProtocolError(f"unknown message type {msg_type}") from e
    # file data stays a view of the caller's buffer; everything else is copied out
    return cls.decode(payload if cls is FileData else bytes(payload))


# --- text from the peer on our terminal --------------------------------------
_UNSAFE = ("Cc", "Cf", "Cs", "Co", "Zl", "Zp")  # controls, bidi/format, separators


def neutralise(text: str) -> str:
    """Peer text made safe to print on one line: every control, format (bidi
    override) or line-separator character, ESC of an ANSI sequence included,
    is shown as a visible escape instead of acting on the terminal."""
    def escape(ch: str) -> str:
        if ch == "\t" or unicodedata.category(ch) not in _UNSAFE:
            return ch
        code = ord(ch)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return "".join(escape(ch) for ch in text)
