"""The server's half of the QSocket 2 handshake, and its client-trust rules.

Sans-I/O: messages in and out are frame bodies (bytes); the authorised-clients
list is parsed from text.  server.py moves the bytes and owns the files.
"""

from __future__ import annotations

import enum

import crypt
from crypt import Role
from protocol import (
    RANDOM_SIZE,
    ClientAuth,
    ClientHello,
    LocalProtocolError,
    ServerHello,
)


class ServerState(enum.Enum):
    WAIT_CLIENT_HELLO = "WAIT_CLIENT_HELLO"
    HELLO_READY = "HELLO_READY"
    WAIT_CLIENT_AUTH = "WAIT_CLIENT_AUTH"
    DONE = "DONE"
    FAILED = "FAILED"


ClientInfo = crypt.PeerIdentity  # what the handshake proved about the peer


class ServerHandshake:
    """(ClientHello) -> ServerHello -> (ClientAuth).  Any failure is final (FAILED).

    `kem` (an ML-KEM-1024 provider) and `randomness` are the only sources of fresh
    values; the documented test vector passes fixed ones."""

    def __init__(self, identity: crypt.Identity, kem=None, *,
                 randomness: crypt.Randomness | None = None) -> None:
        self.state = ServerState.WAIT_CLIENT_HELLO
        self._identity = identity
        self._kem = kem or crypt.CryptographyKEM()
        self._randomness = randomness or crypt.Randomness()
        self._transcript = crypt.Transcript()
        self._hello: ClientHello | None = None
        self.random: bytes | None = None  # the server random, once the ServerHello exists
        self.keys: crypt.SessionKeys | None = None
        self.client: ClientInfo | None = None
        self.client_random: bytes | None = None
        self.code: str | None = None  # the verification code, once DONE

    def _expect(self, state: ServerState) -> None:
        if self.state is not state:
            failed, self.state = self.state, ServerState.FAILED
            raise LocalProtocolError(f"server handshake is {failed.name}, expected {state.name}")

    @crypt.step(ServerState.WAIT_CLIENT_HELLO, then=ServerState.HELLO_READY)
    def consume_client_hello(self, body: bytes) -> None:
        """Check the hello and both of its key shares; the ServerHello is created next."""
        hello = ClientHello.decode(body)

        # invalid shares are rejected here, whatever the KEM provider checks itself
        crypt.p256_public(hello.ecdh_share)
        crypt.mlkem_public_key(hello.mlkem_ek)

        self._transcript.add(body)
        self.client_random = hello.random
        self._hello = hello

    @crypt.step(ServerState.HELLO_READY, then=ServerState.WAIT_CLIENT_AUTH)
    def create_server_hello(self) -> bytes:
        # create the ephemeral key and the random; run both key exchanges
        self.random = self._randomness.random(RANDOM_SIZE)
        ecdh, ecdh_share = self._randomness.ecdh_key()
        ecdh_secret = crypt.ecdh_shared(ecdh, self._hello.ecdh_share)
        mlkem_secret, ct = self._kem.encapsulate(self._hello.mlkem_ek)

        # keys from both secrets and the transcript through our identity
        core = ServerHello.encode_core(self.random, ecdh_share, ct, self._identity.public)
        core_hash = self._transcript.add(core)
        self.keys = crypt.derive_keys(ecdh_secret, mlkem_secret, core_hash)

        # sign, then confirm the keys
        sigs = self._identity.sign(Role.SERVER, core_hash)
        signed_hash = self._transcript.add(sigs.encode())
        finished = crypt.finished_mac(self.keys.server_finished, signed_hash)
        self._transcript.add(finished)
        return core + sigs.encode() + finished

    @crypt.step(ServerState.WAIT_CLIENT_AUTH, then=ServerState.DONE)
    def consume_client_auth(self, body: bytes) -> ClientInfo:
        # only the holder of the session keys can seal it; nobody else sees the identity
        auth = crypt.open_client_auth(self.keys, body)

        # the nonce must open the commitment of the ClientHello
        crypt.check_commitment(self._hello.commitment, auth.nonce)

        # verify the client's signatures over the transcript through its identity
        cid_hash = self._transcript.add(ClientAuth.encode_id(auth.nonce, auth.identity))
        crypt.verify_signatures(Role.CLIENT, auth.identity, auth.signatures, cid_hash)

        # verify the client's Finished
        signed_hash = self._transcript.add(auth.signatures.encode())
        crypt.check_finished(self.keys.client_finished, signed_hash, auth.finished,
                             Role.CLIENT)
        self._transcript.add(auth.finished)

        self.code = crypt.verification_code(self.keys, auth.nonce)
        self.client = ClientInfo(auth.identity, crypt.fingerprint(auth.identity))
        return self.client

    def fail(self) -> None:
        self.state = ServerState.FAILED

    def records(self):
        self._expect(ServerState.DONE)
        return crypt.record_pair(self.keys, Role.SERVER)

    @property
    def transcript_hash(self) -> bytes:
        return self._transcript.digest()


# --- client admission ------------------------------------------------------------
def parse_authorized_clients(text: str) -> dict[str, str]:
    """One `SHA256:...` fingerprint per line, an optional name after it.

    `#` starts a comment; blank lines are ignored.  Returns {fingerprint: name}.
    """
    allowed: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fp, *rest = line.split(None, 1)
        name = rest[0] if rest else ""
        if not fp.startswith("SHA256:") or len(fp) != len("SHA256:") + 43:
            raise ValueError(f"line {number}: {fp[:60]!r} is not a SHA256: fingerprint")
        allowed[fp] = name.strip()
    return allowed


def known_clients_line(fp: str, peer: str, when: str) -> str:
    """One line of the server's known_clients record: fingerprint, first seen, address."""
    return f"{fp} {when} {peer}\n"


def parse_known_clients(text: str) -> set[str]:
    return {line.split()[0] for line in text.splitlines()
            if line.strip() and not line.startswith("#")}
