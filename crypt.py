"""QSocket 2 cryptographic core: hybrid KEM, identities, key schedule, records.

Sans-I/O: no sockets, no files, no clock.  Every primitive comes from
`cryptography` (or, optionally, liboqs for ML-KEM); nothing here is home-made.
"""

from __future__ import annotations

import base64
import enum
import functools
import hashlib
import hmac
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, mldsa, mlkem
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from protocol import (
    COMMITMENT_LABEL,
    ECDSA_SIG,
    HASH_SIZE,
    IV_SIZE,
    MAC_SIZE,
    MAX_FRAME,
    MLKEM1024_CT,
    MLKEM1024_EK,
    NONCE_SIZE,
    P256_POINT,
    PROTOCOL_LABEL,
    AuthError,
    ClientAuth,
    HandshakeType,
    IdentityPublic,
    LocalProtocolError,
    MsgType,
    RemoteProtocolError,
    Signatures,
)

KEY_SIZE = 32
# Records under one key without key updates (handshake keys, bare record layers).
MAX_RECORDS = 1 << 32
# Records per direction and key epoch: the sender's KeyUpdate is at the latest the
# last of them; a receiver refuses one more.  And at least once per this much
# session time (the shell passes the time in; the core never reads a clock).
KEY_UPDATE_RECORDS = 1 << 20
KEY_UPDATE_SECONDS = 3600.0
DIRECTION_C2S = 0x01
DIRECTION_S2C = 0x02
AUTH_FAILED = "failed to decrypt and authenticate record"


# --- ML-KEM-1024 providers ------------------------------------------------------
class CryptographyKEM:
    """ML-KEM-1024 (FIPS 203) from `cryptography` / OpenSSL: the default."""

    name = "cryptography"

    def generate(self, seed: bytes | None = None):
        if seed is None:
            key = mlkem.MLKEM1024PrivateKey.generate()
        else:
            key = mlkem.MLKEM1024PrivateKey.from_seed_bytes(seed)
        return key, key.public_key().public_bytes_raw()

    def encapsulate(self, ek: bytes) -> tuple[bytes, bytes]:
        """Return (shared_secret, ciphertext); ek must pass the FIPS 203 check."""
        public = mlkem_public_key(ek)
        return public.encapsulate()

    def decapsulate(self, private, ct: bytes) -> bytes:
        if len(ct) != MLKEM1024_CT:
            raise RemoteProtocolError("ML-KEM ciphertext has the wrong length")
        return private.decapsulate(ct)


def mlkem_public_key(ek: bytes) -> mlkem.MLKEM1024PublicKey:
    if len(ek) != MLKEM1024_EK:
        raise RemoteProtocolError("ML-KEM encapsulation key has the wrong length")
    try:
        # from_public_bytes performs FIPS 203's modulus check on the key
        return mlkem.MLKEM1024PublicKey.from_public_bytes(ek)
    except ValueError as e:
        raise RemoteProtocolError("invalid ML-KEM-1024 encapsulation key") from e


class LiboqsKEM:
    """ML-KEM-1024 from liboqs (optional); speaks the same FIPS 203 bytes.

    Takes liboqs-python's `oqs` module: finding the library and importing it is the
    shell's job (session.kem_provider), so this module reads no environment or disk."""

    name = "liboqs"

    def __init__(self, oqs) -> None:
        self._oqs = oqs

    def generate(self, seed: bytes | None = None):
        kem = self._oqs.KeyEncapsulation("ML-KEM-1024")
        ek = kem.generate_keypair() if seed is None else kem.generate_keypair_seed(seed)
        return kem, ek

    def encapsulate(self, ek: bytes) -> tuple[bytes, bytes]:
        mlkem_public_key(ek)  # liboqs does not run the FIPS 203 input check itself
        with self._oqs.KeyEncapsulation("ML-KEM-1024") as kem:
            ct, ss = kem.encap_secret(ek)
        return ss, ct

    def decapsulate(self, private, ct: bytes) -> bytes:
        if len(ct) != MLKEM1024_CT:
            raise RemoteProtocolError("ML-KEM ciphertext has the wrong length")
        return private.decap_secret(ct)


# --- ECDH P-256 ------------------------------------------------------------------
def ecdh_generate(scalar: int | None = None) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    if scalar is None:
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        key = ec.derive_private_key(scalar, ec.SECP256R1())
    return key, _point(key.public_key())


def _point(public: ec.EllipticCurvePublicKey) -> bytes:
    return public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def p256_public(point: bytes) -> ec.EllipticCurvePublicKey:
    if len(point) != P256_POINT or point[0] != 0x04:
        raise RemoteProtocolError("P-256 share must be a 65-byte uncompressed point")
    try:
        # from_encoded_point rejects points that are not on the curve
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError as e:
        raise RemoteProtocolError("invalid P-256 point") from e


def ecdh_shared(private: ec.EllipticCurvePrivateKey, peer_point: bytes) -> bytes:
    """The 32-byte x-coordinate of the shared point."""
    return private.exchange(ec.ECDH(), p256_public(peer_point))


@dataclass(frozen=True)
class Randomness:
    """Where a handshake draws its fresh values: random bytes (`random(n)`) and
    ephemeral ECDH key pairs (`ecdh_key()`).  The defaults are the operating system's;
    the documented test vector passes fixed ones, as it passes a fixed KEM provider
    (dependencies passed in, like noise's `from_name(name, backend=...)`)."""

    random: Callable[[int], bytes] = secrets.token_bytes
    ecdh_key: Callable[[], tuple[ec.EllipticCurvePrivateKey, bytes]] = ecdh_generate


# --- roles -----------------------------------------------------------------------
class Role(enum.Enum):
    """Which end of the handshake: picks the signature context, the Finished key and
    the direction of each record layer.  An enum, not a string: a typo is an error,
    never the other role's keys."""

    CLIENT = "client"
    SERVER = "server"


def check_role(role: Role) -> Role:
    if not isinstance(role, Role):
        raise LocalProtocolError(f"a role is crypt.Role.CLIENT or crypt.Role.SERVER, "
                                 f"not {role!r}")
    return role


# --- handshake steps -------------------------------------------------------------
def step(expected: enum.Enum, then: enum.Enum):
    """Make a method a handshake step: it runs only in state `expected` and leaves the
    handshake in `then`; *any* exception inside it (a peer's bad message, a failing KEM
    provider or random source, a bug, an interrupt) moves the handshake to FAILED for
    good and propagates (h11's `except: self._process_error(...); raise`).

    The handshake object provides `state` and `_expect(state)`; both state enums have
    a FAILED member."""
    failed = type(expected).FAILED

    def decorate(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            try:
                self._expect(expected)
                result = method(self, *args, **kwargs)
            except BaseException:
                self.state = failed
                raise
            self.state = then
            return result

        return run

    return decorate


# --- long-term identities -----------------------------------------------------
SIGNATURE_CONTEXT = {
    Role.SERVER: b"QSocket2 v2 server signature",
    Role.CLIENT: b"QSocket2 v2 client signature",
}


@dataclass(frozen=True)
class Identity:
    """A long-term hybrid identity: ECDSA P-256 plus ML-DSA-65."""

    ecdsa: ec.EllipticCurvePrivateKey
    mldsa: mldsa.MLDSA65PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(ec.generate_private_key(ec.SECP256R1()), mldsa.MLDSA65PrivateKey.generate())

    @classmethod
    def from_seeds(cls, ecdsa_scalar: int, mldsa_seed: bytes) -> Identity:
        return cls(
            ec.derive_private_key(ecdsa_scalar, ec.SECP256R1()),
            mldsa.MLDSA65PrivateKey.from_seed_bytes(mldsa_seed),
        )

    @property
    def public(self) -> IdentityPublic:
        return IdentityPublic(
            _point(self.ecdsa.public_key()), self.mldsa.public_key().public_bytes_raw()
        )

    def fingerprint(self) -> str:
        return fingerprint(self.public)

    def sign(self, role: Role, transcript_hash: bytes) -> Signatures:
        context = SIGNATURE_CONTEXT[check_role(role)]
        der = self.ecdsa.sign(context + b"\x00" + transcript_hash, ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return Signatures(r.to_bytes(32, "big") + s.to_bytes(32, "big"),
                          self.mldsa.sign(transcript_hash, context))

    # On-disk form: PKCS#8 PEM, one file per algorithm (the shell writes them).
    def to_pem(self) -> tuple[bytes, bytes]:
        enc = serialization.Encoding.PEM
        fmt = serialization.PrivateFormat.PKCS8
        none = serialization.NoEncryption()
        return (self.ecdsa.private_bytes(enc, fmt, none), self.mldsa.private_bytes(enc, fmt, none))

    @classmethod
    def from_pem(cls, ecdsa_pem: bytes, mldsa_pem: bytes) -> Identity:
        """Load both keys; any corruption or wrong algorithm is a ValueError."""
        try:
            e = serialization.load_pem_private_key(ecdsa_pem, password=None)
            m = serialization.load_pem_private_key(mldsa_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"not a valid unencrypted PKCS#8 key ({exc})") from exc
        if not isinstance(e, ec.EllipticCurvePrivateKey) or not isinstance(e.curve, ec.SECP256R1):
            raise ValueError("ECDSA key is not a P-256 key")
        if not isinstance(m, mldsa.MLDSA65PrivateKey):
            raise ValueError("ML-DSA key is not an ML-DSA-65 key")
        return cls(e, m)


@dataclass(frozen=True)
class PeerIdentity:
    """A peer's verified long-term public keys and their fingerprint."""

    identity: IdentityPublic
    fingerprint: str


def fingerprint(public: IdentityPublic) -> str:
    """`SHA256:` + unpadded base64 of SHA-256(ECDSA point || ML-DSA-65 public key)."""
    digest = hashlib.sha256(public.encode()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def verify_signatures(role: Role, public: IdentityPublic, sigs: Signatures,
                      transcript_hash: bytes) -> None:
    """Both signatures must verify; any failure is the same AuthError."""
    context = SIGNATURE_CONTEXT[check_role(role)]
    try:
        ecdsa_key = p256_public(public.ecdsa)
        r = int.from_bytes(sigs.ecdsa[:32], "big")
        s = int.from_bytes(sigs.ecdsa[32:ECDSA_SIG], "big")
        ecdsa_key.verify(encode_dss_signature(r, s), context + b"\x00" + transcript_hash,
                         ec.ECDSA(hashes.SHA256()))
        mldsa_key = mldsa.MLDSA65PublicKey.from_public_bytes(public.mldsa)
        mldsa_key.verify(sigs.mldsa, transcript_hash, context)
    except (InvalidSignature, ValueError, RemoteProtocolError) as e:
        raise AuthError(f"the {role.value}'s signature does not verify") from e


# --- transcript and key schedule --------------------------------------------------
class Transcript:
    """Running SHA-256 over the protocol label and every handshake message."""

    def __init__(self) -> None:
        self._h = hashlib.sha256(PROTOCOL_LABEL)

    def add(self, message: bytes) -> bytes:
        self._h.update(message)
        return self._h.digest()

    def digest(self) -> bytes:
        return self._h.digest()


LABELS = {
    "c2s traffic": b"QSocket2 v2 c2s traffic",
    "s2c traffic": b"QSocket2 v2 s2c traffic",
    "auth enc": b"QSocket2 v2 client auth enc",
    "auth mac": b"QSocket2 v2 client auth mac",
    "auth iv": b"QSocket2 v2 client auth iv",
    "server finished": b"QSocket2 v2 server finished",
    "client finished": b"QSocket2 v2 client finished",
    "verification code": b"QSocket2 v2 verification code",
}
# Labels of the expansions of one direction's traffic secret (keys, and the next secret).
TRAFFIC_LABELS = {
    "enc": b"QSocket2 v2 traffic enc",
    "mac": b"QSocket2 v2 traffic mac",
    "iv": b"QSocket2 v2 traffic iv",
    "key update": b"QSocket2 v2 key update",
}


def traffic_keys(secret: bytes) -> tuple[bytes, bytes, bytes]:
    """(enc, mac, iv mask) of one key epoch, from that epoch's traffic secret."""
    def expand(label: str, length: int) -> bytes:
        return HKDFExpand(hashes.SHA256(), length, TRAFFIC_LABELS[label]).derive(secret)

    return expand("enc", KEY_SIZE), expand("mac", KEY_SIZE), expand("iv", 8)


def next_traffic_secret(secret: bytes) -> bytes:
    """The KeyUpdate ratchet: HKDF-Expand(secret, "QSocket2 v2 key update", 32)."""
    return HKDFExpand(hashes.SHA256(), KEY_SIZE, TRAFFIC_LABELS["key update"]).derive(secret)


@dataclass(frozen=True)
class SessionKeys:
    """The handshake's keys and secrets, as derive_keys makes them."""

    c2s_traffic: bytes  # epoch 0 traffic secrets; the keys below derive from them
    s2c_traffic: bytes
    c2s_enc: bytes
    c2s_mac: bytes
    c2s_iv: bytes
    s2c_enc: bytes
    s2c_mac: bytes
    s2c_iv: bytes
    auth_enc: bytes  # the handshake keys that seal the ClientAuth (client identity)
    auth_mac: bytes
    auth_iv: bytes
    server_finished: bytes
    client_finished: bytes
    verification: bytes


def derive_keys(ecdh_secret: bytes, mlkem_secret: bytes, transcript_hash: bytes) -> SessionKeys:
    """HKDF-SHA-256: Extract(salt=transcript hash, IKM = ECDH x || ML-KEM secret), then
    one Expand per labelled key."""
    if len(ecdh_secret) != 32 or len(mlkem_secret) != 32 or len(transcript_hash) != HASH_SIZE:
        raise LocalProtocolError("key schedule inputs have the wrong length")
    prk = HKDF.extract(hashes.SHA256(), transcript_hash, ecdh_secret + mlkem_secret)

    def expand(label: str, length: int = KEY_SIZE) -> bytes:
        return HKDFExpand(hashes.SHA256(), length, LABELS[label]).derive(prk)

    c2s, s2c = expand("c2s traffic"), expand("s2c traffic")
    (c2s_enc, c2s_mac, c2s_iv), (s2c_enc, s2c_mac, s2c_iv) = traffic_keys(c2s), traffic_keys(s2c)
    return SessionKeys(
        c2s_traffic=c2s, s2c_traffic=s2c,
        c2s_enc=c2s_enc, c2s_mac=c2s_mac, c2s_iv=c2s_iv,
        s2c_enc=s2c_enc, s2c_mac=s2c_mac, s2c_iv=s2c_iv,
        auth_enc=expand("auth enc"), auth_mac=expand("auth mac"), auth_iv=expand("auth iv", 8),
        server_finished=expand("server finished"),
        client_finished=expand("client finished"),
        verification=expand("verification code"),
    )


# --- commit-then-reveal code nonce ---------------------------------------------------
def commitment(nonce: bytes) -> bytes:
    """SHA-256(COMMITMENT_LABEL || nonce_c): sent in the ClientHello, opened in the ClientAuth."""
    if len(nonce) != NONCE_SIZE:
        raise LocalProtocolError("code nonce has the wrong length")
    return hashlib.sha256(COMMITMENT_LABEL + nonce).digest()


def check_commitment(expected: bytes, nonce: bytes) -> None:
    if not hmac.compare_digest(commitment(nonce), expected):
        raise AuthError("the client's nonce does not open its commitment")


# --- the sealed ClientAuth -----------------------------------------------------------
def _auth_keys(keys: SessionKeys) -> tuple[int, bytes, bytes, bytes]:
    return DIRECTION_C2S, keys.auth_enc, keys.auth_mac, keys.auth_iv


def seal_client_auth(keys: SessionKeys, inner: bytes) -> bytes:
    """`0x03 || record`: the ClientAuth plaintext sealed as record seq 0 (type 0x03)
    under the handshake keys, so only the server that proved itself can read it."""
    pieces = RecordSender(*_auth_keys(keys)).seal(HandshakeType.CLIENT_AUTH, inner)
    return bytes([HandshakeType.CLIENT_AUTH]) + b"".join(pieces[1:])


def open_client_auth(keys: SessionKeys, body: bytes) -> ClientAuth:
    """Check type and size, open the seal (AuthError on any failure), parse."""
    ClientAuth.check_frame(body)
    msg_type, inner = RecordReceiver(*_auth_keys(keys)).open(body[1:])
    if msg_type != HandshakeType.CLIENT_AUTH:
        raise AuthError(AUTH_FAILED)
    return ClientAuth.decode_inner(bytes(inner))


def finished_mac(key: bytes, transcript_hash: bytes) -> bytes:
    return hmac.new(key, transcript_hash, hashlib.sha256).digest()


def check_finished(key: bytes, transcript_hash: bytes, received: bytes, who: Role) -> None:
    check_role(who)
    if not hmac.compare_digest(finished_mac(key, transcript_hash), received):
        raise AuthError(f"the {who.value}'s Finished MAC does not verify")


def verification_code(keys: SessionKeys, nonce: bytes) -> str:
    """12 decimal digits in three groups, equal on both sides of one session.

    HMAC(verification, nonce_c): the key comes from both secrets and the transcript
    through the server's core (the client's commitment included), the nonce is the
    one revealed in the ClientAuth; nothing either side chooses after the reveal
    enters it, and no one can compute it before the reveal."""
    if len(nonce) != NONCE_SIZE:
        raise LocalProtocolError("verification code nonce has the wrong length")
    digest = hmac.new(keys.verification, nonce, hashlib.sha256).digest()
    n = int.from_bytes(digest[:8], "big") % 10**12
    digits = f"{n:012d}"
    return "-".join(digits[i : i + 4] for i in range(0, 12, 4))


def keylog_lines(client_random: bytes, keys: SessionKeys) -> str:
    """Lines in the QSOCKET_KEYLOGFILE format (see docs/PROTOCOL.md)."""
    cr = client_random.hex()
    rows = [
        ("CLIENT_TRAFFIC_SECRET", keys.c2s_traffic), ("SERVER_TRAFFIC_SECRET", keys.s2c_traffic),
        ("CLIENT_TRAFFIC_ENC", keys.c2s_enc), ("CLIENT_TRAFFIC_MAC", keys.c2s_mac),
        ("CLIENT_TRAFFIC_IV", keys.c2s_iv),
        ("SERVER_TRAFFIC_ENC", keys.s2c_enc), ("SERVER_TRAFFIC_MAC", keys.s2c_mac),
        ("SERVER_TRAFFIC_IV", keys.s2c_iv),
    ]
    return "".join(f"QSOCKET2_{label} {cr} {key.hex()}\n" for label, key in rows)


# --- records ---------------------------------------------------------------------
_MAC_HEADER = struct.Struct(">BQ")  # direction, sequence number
_FRAME_LEN = struct.Struct(">I")


def record_iv(iv_mask: bytes, seq: int) -> bytes:
    """The IV of record `seq`: (mask XOR seq) as the high 64 bits, zero low 64 bits.

    AES-CTR increments the whole 128-bit block, and a record is far below 2^64
    blocks, so the counter ranges of two records can never overlap.
    """
    high = int.from_bytes(iv_mask, "big") ^ seq
    return high.to_bytes(8, "big") + bytes(8)


class _RecordLayer:
    def __init__(self, direction: int, enc_key: bytes, mac_key: bytes, iv_mask: bytes, *,
                 secret: bytes | None = None, update_limit: int = KEY_UPDATE_RECORDS) -> None:
        """With `secret` (the epoch's traffic secret) the layer can ratchet (KeyUpdate)
        and holds at most `update_limit` records per epoch; without, MAX_RECORDS."""
        if update_limit < 2:  # room for one message and the KeyUpdate
            raise LocalProtocolError("a key epoch must hold at least 2 records")
        self._direction = direction
        self._install(enc_key, mac_key, iv_mask)
        self._secret = secret
        self.limit = MAX_RECORDS if secret is None else update_limit
        self.epoch = 0

    def _install(self, enc_key: bytes, mac_key: bytes, iv_mask: bytes) -> None:
        if len(enc_key) != KEY_SIZE or len(mac_key) != KEY_SIZE or len(iv_mask) != 8:
            raise LocalProtocolError("record keys have the wrong length")
        # one AES-CTR context per key, set to each record's own IV with reset_nonce:
        # a new context per record cost more than encrypting a small record
        self._ctr = self._context(Cipher(algorithms.AES(enc_key), modes.CTR(bytes(IV_SIZE))))
        self._mac = hmac.new(mac_key, digestmod=hashlib.sha256)
        self._iv_mask = iv_mask
        self.seq = 0

    def _ratchet(self) -> None:
        """Next epoch: new secret and keys, sequence number 0; the old ones are dropped
        (Python cannot promise their bytes are wiped from memory)."""
        if self._secret is None:
            raise LocalProtocolError("this record layer has no traffic secret to update")
        self._secret = next_traffic_secret(self._secret)
        self._install(*traffic_keys(self._secret))
        self.epoch += 1

    def _next(self) -> tuple[int, bytes, hmac.HMAC]:
        seq, iv, mac = self._peek()
        self.seq += 1
        return seq, iv, mac

    def _peek(self) -> tuple[int, bytes, hmac.HMAC]:
        """The next record's number, IV and MAC, without using the number up."""
        if self.seq >= self.limit:
            if self._secret is not None:
                raise LocalProtocolError(f"{self.limit} records under one key: "
                                         f"a key update was due")
            raise LocalProtocolError("record sequence number exhausted; reconnect")
        seq = self.seq
        mac = self._mac.copy()
        mac.update(_MAC_HEADER.pack(self._direction, seq))
        return seq, record_iv(self._iv_mask, seq), mac


class RecordSender(_RecordLayer):
    """Seals records: IV || AES-256-CTR(type || payload) || HMAC-SHA-256."""

    @staticmethod
    def _context(cipher: Cipher):
        return cipher.encryptor()

    _epoch_start: float | None = None

    def start_clock(self, now: float) -> None:
        """The session began at `now`: the time rule counts from here."""
        if self._epoch_start is None:
            self._epoch_start = now

    def update_due(self, now: float) -> bool:
        """Must the next record be a KeyUpdate?  At the last record of an epoch, or once
        KEY_UPDATE_SECONDS of `now` (the caller's monotonic clock) passed in it."""
        if self._secret is None:
            return False
        self.start_clock(now)
        return self.seq >= self.limit - 1 or now - self._epoch_start >= KEY_UPDATE_SECONDS

    def seal_key_update(self, now: float | None = None) -> list:
        """Seal a KeyUpdate under the current keys, then ratchet to the next epoch."""
        pieces = self.seal(MsgType.KEY_UPDATE, b"")
        self._ratchet()
        self._epoch_start = now
        return pieces

    def seal(self, msg_type: int, payload: bytes | memoryview = b"",
             out: memoryview | None = None, head: bytes = b"") -> list:
        """Return one frame as pieces (length, IV, ciphertext..., tag) for a gathered send.

        With `out` (at least len(payload) + 15 bytes) the payload's ciphertext is
        written there instead of a new buffer; the pieces then refer to `out`.
        `head` is plaintext that comes before `payload` (a file record's op id),
        encrypted with the type byte so that payload is never joined to it."""
        n = 1 + len(head) + len(payload)
        if IV_SIZE + n + MAC_SIZE > MAX_FRAME:
            raise LocalProtocolError("record too large")
        # the number is used up only once the record is complete: an exception
        # part-way (even KeyboardInterrupt) must not leave a gap the peer reads as
        # tampering when the next record, e.g. the goodbye, goes out
        seq, iv, mac = self._peek()
        # CTR is a stream: the type byte and the payload are encrypted in one
        # keystream without first copying them into one buffer.
        enc = self._ctr
        enc.reset_nonce(iv)
        pieces = [enc.update(bytes([msg_type]) + head)]
        if payload and out is not None:
            pieces.append(out[: enc.update_into(payload, out)])
        elif payload:
            pieces.append(enc.update(payload))
        mac.update(iv)
        for piece in pieces:
            mac.update(piece)
        frame = [_FRAME_LEN.pack(IV_SIZE + n + MAC_SIZE), iv, *pieces, mac.digest()]
        self.seq = seq + 1
        return frame


class RecordReceiver(_RecordLayer):
    """Opens records in order; any failure is fatal to the connection."""

    @staticmethod
    def _context(cipher: Cipher):
        return cipher.decryptor()

    def open(self, body: bytes | memoryview,
             out: memoryview | None = None) -> tuple[int, bytes | memoryview]:
        """Verify, then decrypt; returns (type, payload).

        With `out` (at least len(body) bytes) the plaintext is written there and
        the payload returned is a view of it, valid until `out` is reused."""
        if self.seq >= self.limit:
            raise RemoteProtocolError(f"peer sent more than {self.limit} records without "
                                      f"a key update")
        if len(body) < IV_SIZE + 1 + MAC_SIZE:
            raise AuthError(AUTH_FAILED)
        body = memoryview(body)
        iv, ct, tag = body[:IV_SIZE], body[IV_SIZE:-MAC_SIZE], body[-MAC_SIZE:]
        _, expected_iv, mac = self._next()
        # verify first: MAC over direction, sequence number, IV and ciphertext
        mac.update(iv)
        mac.update(ct)
        if not hmac.compare_digest(mac.digest(), tag) or iv != expected_iv:
            raise AuthError(AUTH_FAILED)
        dec = self._ctr
        dec.reset_nonce(expected_iv)
        if out is None:
            plain = dec.update(ct)
            msg_type, payload = plain[0], plain[1:]
        else:
            n = dec.update_into(ct, out)
            msg_type, payload = out[0], out[1:n]
        if msg_type == MsgType.KEY_UPDATE and self._secret is not None:
            # the peer's next record is under the next epoch's keys
            if len(payload):
                raise RemoteProtocolError("KeyUpdate: unexpected payload")
            self._ratchet()
        return msg_type, payload


def record_pair(keys: SessionKeys, role: Role, update_limit: int = KEY_UPDATE_RECORDS
                ) -> tuple[RecordSender, RecordReceiver]:
    """The session's two record layers; `update_limit` (records per key epoch) is
    lowered only by tests."""
    c2s = (DIRECTION_C2S, keys.c2s_enc, keys.c2s_mac, keys.c2s_iv)
    s2c = (DIRECTION_S2C, keys.s2c_enc, keys.s2c_mac, keys.s2c_iv)
    c2s_kw = {"secret": keys.c2s_traffic, "update_limit": update_limit}
    s2c_kw = {"secret": keys.s2c_traffic, "update_limit": update_limit}
    if check_role(role) is Role.CLIENT:
        return RecordSender(*c2s, **c2s_kw), RecordReceiver(*s2c, **s2c_kw)
    return RecordSender(*s2c, **s2c_kw), RecordReceiver(*c2s, **c2s_kw)
