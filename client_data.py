"""The client's half of the QSocket 2 handshake, and its known_hosts trust rules.

Sans-I/O: messages in and out are frame bodies (bytes); known_hosts is handled
as text.  client.py moves the bytes and owns the files.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import crypt
from crypt import Role
from protocol import (
    NONCE_SIZE,
    RANDOM_SIZE,
    ClientAuth,
    ClientHello,
    LocalProtocolError,
    ServerHello,
)


class ClientState(enum.Enum):
    START = "START"
    WAIT_SERVER_HELLO = "WAIT_SERVER_HELLO"
    SERVER_VERIFIED = "SERVER_VERIFIED"
    DONE = "DONE"
    FAILED = "FAILED"


ServerInfo = crypt.PeerIdentity  # what the handshake proved about the peer


class ClientHandshake:
    """ClientHello -> (ServerHello) -> ClientAuth.  Any failure is final (FAILED).

    `kem` (an ML-KEM-1024 provider) and `randomness` are the only sources of fresh
    values; the documented test vector passes fixed ones."""

    def __init__(self, identity: crypt.Identity, kem=None, *,
                 randomness: crypt.Randomness | None = None) -> None:
        self.state = ClientState.START
        self._identity = identity
        self._kem = kem or crypt.CryptographyKEM()
        self._randomness = randomness or crypt.Randomness()
        self._transcript = crypt.Transcript()
        self._nonce = self._ecdh = self._mlkem = None  # created by create_client_hello
        self.random: bytes | None = None  # the client random, once the ClientHello exists
        self.keys: crypt.SessionKeys | None = None
        self.server: ServerInfo | None = None
        self.code: str | None = None  # the verification code, once DONE

    def _expect(self, state: ClientState) -> None:
        if self.state is not state:
            failed, self.state = self.state, ClientState.FAILED
            raise LocalProtocolError(f"client handshake is {failed.name}, expected {state.name}")

    @crypt.step(ClientState.START, then=ClientState.WAIT_SERVER_HELLO)
    def create_client_hello(self) -> bytes:
        # create the ephemeral keys, the random and the code nonce (committed to here,
        # revealed in the ClientAuth)
        self.random = self._randomness.random(RANDOM_SIZE)
        self._nonce = self._randomness.random(NONCE_SIZE)
        self._ecdh, ecdh_share = self._randomness.ecdh_key()
        self._mlkem, mlkem_ek = self._kem.generate()

        body = ClientHello(self.random, ecdh_share, mlkem_ek,
                           crypt.commitment(self._nonce)).encode()
        self._transcript.add(body)
        return body

    @crypt.step(ClientState.WAIT_SERVER_HELLO, then=ClientState.SERVER_VERIFIED)
    def consume_server_hello(self, body: bytes) -> ServerInfo:
        hello = ServerHello.decode(body)

        # both shared secrets: ECDH x-coordinate, then ML-KEM
        ecdh_secret = crypt.ecdh_shared(self._ecdh, hello.ecdh_share)
        mlkem_secret = self._kem.decapsulate(self._mlkem, hello.mlkem_ct)
        core_hash = self._transcript.add(hello.core())
        self.keys = crypt.derive_keys(ecdh_secret, mlkem_secret, core_hash)
        # the ephemeral secrets are not needed any more
        self._ecdh = self._mlkem = None

        # verify the server's signatures over the transcript up to its identity
        crypt.verify_signatures(Role.SERVER, hello.identity, hello.signatures, core_hash)

        # verify the server's Finished (key confirmation)
        signed_hash = self._transcript.add(hello.signatures.encode())
        crypt.check_finished(self.keys.server_finished, signed_hash, hello.finished,
                             Role.SERVER)
        self._transcript.add(hello.finished)

        self.server = ServerInfo(hello.identity, crypt.fingerprint(hello.identity))
        return self.server

    @crypt.step(ClientState.SERVER_VERIFIED, then=ClientState.DONE)
    def create_client_auth(self) -> bytes:
        """Reveal the nonce and our identity, sign them with the transcript through the
        server's Finished, confirm the keys; all of it sealed under the handshake keys."""
        cauth_id = ClientAuth.encode_id(self._nonce, self._identity.public)
        sigs = self._identity.sign(Role.CLIENT, self._transcript.add(cauth_id))
        signed_hash = self._transcript.add(sigs.encode())
        finished = crypt.finished_mac(self.keys.client_finished, signed_hash)
        self._transcript.add(finished)
        auth = ClientAuth(self._nonce, self._identity.public, sigs, finished)
        sealed = crypt.seal_client_auth(self.keys, auth.encode_inner())
        self.code = crypt.verification_code(self.keys, self._nonce)
        return sealed

    def fail(self) -> None:
        self.state = ClientState.FAILED

    def records(self):
        self._expect(ClientState.DONE)
        return crypt.record_pair(self.keys, Role.CLIENT)

    @property
    def transcript_hash(self) -> bytes:
        return self._transcript.digest()


# --- known_hosts -------------------------------------------------------------------
class Trust(enum.Enum):
    KNOWN = "known"  # pinned and matching
    UNKNOWN = "unknown"  # never seen this host:port
    CHANGED = "changed"  # pinned to a different identity


@dataclass(frozen=True)
class TrustResult:
    """What known_hosts says of a server's identity."""

    trust: Trust
    expected: str | None = None  # pinned fingerprint, when there is one
    line: int | None = None  # 1-based line of the pin in known_hosts


def host_key(host: str, port: int) -> str:
    """known_hosts entries are per host:port, written like ssh's `[host]:port`."""
    return f"[{host}]:{port}"


def parse_known_hosts(text: str) -> dict[str, tuple[str, int]]:
    """`[host]:port SHA256:...` per line; `#` comments and blank lines ignored.

    Returns {host key: (fingerprint, line number)}; the first entry wins.
    """
    entries: dict[str, tuple[str, int]] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 2 or not parts[1].startswith("SHA256:"):
            raise ValueError(f"line {number}: expected '[host]:port SHA256:...'")
        entries.setdefault(parts[0], (parts[1], number))
    return entries


def check_host(text: str, host: str, port: int, offered: str) -> TrustResult:
    entry = parse_known_hosts(text).get(host_key(host, port))
    if entry is None:
        return TrustResult(Trust.UNKNOWN)
    expected, line = entry
    if expected == offered:
        return TrustResult(Trust.KNOWN, expected, line)
    return TrustResult(Trust.CHANGED, expected, line)


def known_hosts_line(host: str, port: int, fp: str) -> str:
    return f"{host_key(host, port)} {fp}\n"


def normalise_fingerprint(text: str) -> str:
    """Accept a pasted fingerprint with or without the SHA256: prefix."""
    text = text.strip()
    return text if text.startswith("SHA256:") else "SHA256:" + text
