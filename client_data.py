"""The client's half of the QSocket 2 handshake, and its known_hosts trust rules.

Sans-I/O: messages in and out are frame bodies (bytes); known_hosts is handled
as text.  client.py moves the bytes and owns the files.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

import crypt
from protocol import (
    NONCE_SIZE,
    RANDOM_SIZE,
    ClientAuth,
    ClientHello,
    LocalProtocolError,
    ProtocolError,
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
    """ClientHello -> (ServerHello) -> ClientAuth.  Any failure is final (FAILED)."""

    def __init__(self, identity: crypt.Identity, kem=None, *, random: bytes | None = None,
                 ecdh_scalar: int | None = None, mlkem_seed: bytes | None = None,
                 nonce: bytes | None = None) -> None:
        self.state = ClientState.START
        self._identity = identity
        self._kem = kem or crypt.CryptographyKEM()
        # fixed values exist only for the documented test vector
        self.random = random if random is not None else os.urandom(RANDOM_SIZE)
        # the code nonce: committed to in the ClientHello, revealed in the ClientAuth
        self._nonce = nonce if nonce is not None else os.urandom(NONCE_SIZE)
        self._ecdh, self._ecdh_share = crypt.ecdh_generate(ecdh_scalar)
        self._mlkem, self._mlkem_ek = self._kem.generate(mlkem_seed)
        self._transcript = crypt.Transcript()
        self.keys: crypt.SessionKeys | None = None
        self.server: ServerInfo | None = None
        self.code: str | None = None  # the verification code, once DONE

    def _expect(self, state: ClientState) -> None:
        if self.state is not state:
            failed, self.state = self.state, ClientState.FAILED
            raise LocalProtocolError(f"client handshake is {failed.name}, expected {state.name}")

    def create_client_hello(self) -> bytes:
        self._expect(ClientState.START)
        body = ClientHello(self.random, self._ecdh_share, self._mlkem_ek,
                           crypt.commitment(self._nonce)).encode()
        self._transcript.add(body)
        self.state = ClientState.WAIT_SERVER_HELLO
        return body

    def consume_server_hello(self, body: bytes) -> ServerInfo:
        self._expect(ClientState.WAIT_SERVER_HELLO)
        try:
            info = self._consume_server_hello(body)
        except ProtocolError:
            self.state = ClientState.FAILED
            raise
        self.state = ClientState.SERVER_VERIFIED
        return info

    def _consume_server_hello(self, body: bytes) -> ServerInfo:
        hello = ServerHello.decode(body)

        # both shared secrets: ECDH x-coordinate, then ML-KEM
        ecdh_secret = crypt.ecdh_shared(self._ecdh, hello.ecdh_share)
        mlkem_secret = self._kem.decapsulate(self._mlkem, hello.mlkem_ct)
        core_hash = self._transcript.add(hello.core())
        self.keys = crypt.derive_keys(ecdh_secret, mlkem_secret, core_hash)
        # the ephemeral secrets are not needed any more
        self._ecdh = self._mlkem = None

        # verify the server's signatures over the transcript up to its identity
        crypt.verify_signatures("server", hello.identity, hello.signatures, core_hash)

        # verify the server's Finished (key confirmation)
        signed_hash = self._transcript.add(hello.signatures.encode())
        crypt.check_finished(self.keys.server_finished, signed_hash, hello.finished, "server")
        self._transcript.add(hello.finished)

        self.server = ServerInfo(hello.identity, crypt.fingerprint(hello.identity))
        return self.server

    def create_client_auth(self) -> bytes:
        """Reveal the nonce and our identity, sign them with the transcript through the
        server's Finished, confirm the keys; all of it sealed under the handshake keys."""
        self._expect(ClientState.SERVER_VERIFIED)
        cauth_id = ClientAuth.encode_id(self._nonce, self._identity.public)
        sigs = self._identity.sign("client", self._transcript.add(cauth_id))
        signed_hash = self._transcript.add(sigs.encode())
        finished = crypt.finished_mac(self.keys.client_finished, signed_hash)
        self._transcript.add(finished)
        auth = ClientAuth(self._nonce, self._identity.public, sigs, finished)
        self.code = crypt.verification_code(self.keys, self._nonce)
        self.state = ClientState.DONE
        return crypt.seal_client_auth(self.keys, auth.encode_inner())

    def fail(self) -> None:
        self.state = ClientState.FAILED

    def records(self):
        self._expect(ClientState.DONE)
        return crypt.record_pair(self.keys, "client")

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
