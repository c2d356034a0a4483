"""docs/PROTOCOL.md against the code.

The test vector, the message layouts, the tables of types, codes and limits, the
key-schedule labels, the signature contexts and the examples are parsed out of the
document and checked byte for byte against the code, so the two cannot drift apart.
Where the document describes a computation (transcript, HKDF, record sealing,
fingerprint, verification code), the test redoes it from the primitives, following
the document rather than calling the code that implements it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

import fixed
import pytest
from conftest import run_handshake
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, mldsa, mlkem
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

import client
import client_data
import crypt
import protocol
import server
import server_data
import transfer
from crypt import Role
from protocol import (
    MESSAGES,
    AlertCode,
    ClientAuth,
    ClientHello,
    IdentityPublic,
    MsgType,
    Reason,
    RemoteProtocolError,
    ServerHello,
)

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"
DOC = DOC_PATH.read_text(encoding="utf-8")


# --- reading the document ------------------------------------------------------------
def fenced(info: str, text: str = DOC) -> str:
    """The body of the fenced block opened with ```info."""
    m = re.search(rf"^```{re.escape(info)}\n(.*?)^```", text, re.M | re.S)
    assert m, f"no ```{info} block in docs/PROTOCOL.md"
    return m.group(1)


def section(title: str) -> str:
    """The text under the heading containing `title`, up to the next heading of the
    same or a higher level (lines inside fenced blocks are never headings)."""
    lines = DOC.splitlines()
    fence = False
    start = level = None
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fence = not fence
            continue
        m = None if fence else re.match(r"^(#+) (.*)$", line)
        if m is None:
            continue
        if start is not None and len(m.group(1)) <= level:
            return "\n".join(lines[start:i])
        if start is None and title in m.group(2):
            start, level = i + 1, len(m.group(1))
    assert start is not None, f"no section {title!r} in docs/PROTOCOL.md"
    return "\n".join(lines[start:])


def tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in `text`, as rows of cells (header and rule dropped)."""
    found, rows = [], None
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip().replace("\\|", "|")
                     for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if rows is None:
                rows = []  # the header row
            elif not set("".join(cells)) <= set("-: "):
                rows.append(cells)
        elif rows is not None:
            found.append(rows)
            rows = None
    return found


def code(cell: str) -> str:
    return cell.strip().strip("`")


def flat(text: str) -> str:
    """Prose with its line breaks and runs of spaces made single spaces."""
    return " ".join(text.split())


def parse_vector(text: str) -> dict[str, str]:
    """`name = value` lines; indented lines continue the previous value; `#` comments."""
    entries: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace():
            assert name is not None, f"continuation line without an entry: {line!r}"
            entries[name] += line.strip()
            continue
        name, eq, value = (part.strip() for part in line.partition("="))
        assert eq and name not in entries, f"bad or repeated vector line: {line!r}"
        entries[name] = value
    return entries


VECTOR = parse_vector(fenced("qsocket2-vector"))


def vb(name: str) -> bytes:
    """A vector value as bytes."""
    return bytes.fromhex(VECTOR[name])


def vint(name: str) -> int:
    return int.from_bytes(vb(name), "big")


# --- the independent pieces the document describes -------------------------------------
LABEL = re.search(r'^LABEL = "(.*)"$', section("2. Protocol label"), re.M).group(1).encode()


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def hmac256(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def doc_key_schedule() -> list[tuple[str, str, int]]:
    """(key name, label, length) for every HKDF-Expand line of section 7."""
    rows = re.findall(r'^(\w+)\s+= HKDF-Expand\(PRK, "([^"]+)", (\d+)\)$',
                      section("7. Key schedule"), re.M)
    assert len(rows) == 8, rows
    return [(name, label, int(length)) for name, label, length in rows]


def doc_epoch_schedule() -> tuple[list[tuple[str, str, int]], str]:
    """The epoch keys from a traffic secret, and the KeyUpdate label, of section 7."""
    text = section("7. Key schedule")
    rows = re.findall(r'^(\w+)\s+= HKDF-Expand\(secret, "([^"]+)", (\d+)\)$', text, re.M)
    assert [name for name, _, _ in rows] == ["enc", "mac", "iv"], rows
    update = re.search(r'^secret_\(i\+1\) = HKDF-Expand\(secret_i, "([^"]+)", 32\)$', text, re.M)
    return [(n, label, int(length)) for n, label, length in rows], update.group(1)


def doc_epoch_keys(secret: bytes) -> dict[str, bytes]:
    rows, _ = doc_epoch_schedule()
    return {name: hmac256(secret, label.encode() + b"\x01")[:n] for name, label, n in rows}


def doc_next_secret(secret: bytes) -> bytes:
    return hmac256(secret, doc_epoch_schedule()[1].encode() + b"\x01")


def doc_derive(ecdh_secret: bytes, mlkem_secret: bytes, salt: bytes) -> dict[str, bytes]:
    """Section 7 with HMAC alone: Extract, then T(1) = HMAC(PRK, info || 0x01)."""
    prk = hmac256(salt, ecdh_secret + mlkem_secret)
    keys = {"prk": prk}
    for name, label, length in doc_key_schedule():
        assert length <= 32
        keys[name] = hmac256(prk, label.encode() + b"\x01")[:length]
    for side in ("c2s", "s2c"):  # epoch 0 record keys from the traffic secrets
        for part, key in doc_epoch_keys(keys[f"{side}_traffic"]).items():
            keys[f"{side}_{part}"] = key
    return keys


def doc_seal(direction: int, enc: bytes, mac: bytes, iv_mask: bytes, seq: int,
             msg_type: int, payload: bytes) -> bytes:
    """Section 8: one record as a whole frame."""
    iv = (int.from_bytes(iv_mask, "big") ^ seq).to_bytes(8, "big") + bytes(8)
    encryptor = Cipher(algorithms.AES(enc), modes.CTR(iv)).encryptor()
    ct = encryptor.update(bytes([msg_type]) + payload) + encryptor.finalize()
    tag = hmac256(mac, bytes([direction]) + seq.to_bytes(8, "big") + iv + ct)
    body = iv + ct + tag
    return len(body).to_bytes(4, "big") + body


def doc_fingerprint(ecdsa: bytes, mldsa_pub: bytes) -> str:
    return "SHA256:" + base64.b64encode(sha256(ecdsa + mldsa_pub)).decode().rstrip("=")


def doc_contexts() -> dict[str, bytes]:
    (rows,) = tables(section("6.6 Signatures"))
    return {role: code(ctx).encode() for role, ctx in rows}


def doc_verify(role: str, ecdsa_pub: bytes, mldsa_pub: bytes, sigs: bytes, h: bytes) -> None:
    """Section 6.6, with the primitives directly; raises if either signature is bad."""
    ctx = doc_contexts()[role]
    r, s = int.from_bytes(sigs[:32], "big"), int.from_bytes(sigs[32:64], "big")
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), ecdsa_pub)
    key.verify(encode_dss_signature(r, s), ctx + b"\x00" + h, ec.ECDSA(hashes.SHA256()))
    mldsa.MLDSA65PublicKey.from_public_bytes(mldsa_pub).verify(sigs[64:], h, ctx)


# --- the vector's handshake, run by the code ---------------------------------------------
@dataclass
class Run:
    client: client_data.ClientHandshake
    server: server_data.ServerHandshake
    client_id: crypt.Identity
    server_id: crypt.Identity
    client_hello: bytes
    server_hello: bytes
    client_auth: bytes


@pytest.fixture(scope="module")
def run() -> Run:
    cid = crypt.Identity.from_seeds(vint("client_identity_ecdsa_scalar"),
                                    vb("client_identity_mldsa_seed"))
    sid = crypt.Identity.from_seeds(vint("server_identity_ecdsa_scalar"),
                                    vb("server_identity_mldsa_seed"))
    # the vector's inputs are the cores' dependencies: a fixed KEM and fixed randomness
    c = client_data.ClientHandshake(
        cid, fixed.FixedKEM(seed=vb("client_mlkem_seed")),
        randomness=fixed.randomness(vb("client_random"), vb("client_nonce"),
                                    ecdh_scalar=vint("client_ecdh_scalar")))
    s = server_data.ServerHandshake(
        sid, fixed.FixedKEM(encapsulation=(vb("mlkem_secret"), vb("mlkem_ciphertext"))),
        randomness=fixed.randomness(vb("server_random"), ecdh_scalar=vint("server_ecdh_scalar")))
    return Run(c, s, cid, sid, *run_handshake(c, s))


# --- the test vector ---------------------------------------------------------------------
def test_vector_has_every_entry():
    expected = {
        "client_random", "server_random", "client_ecdh_scalar", "server_ecdh_scalar",
        "client_mlkem_seed", "client_identity_ecdsa_scalar", "client_identity_mldsa_seed",
        "client_nonce", "commitment", "auth_enc", "auth_mac", "auth_iv",
        "c2s_traffic", "s2c_traffic", "record_c2s_2_key_update", "c2s_traffic_1", "c2s_enc_1",
        "c2s_mac_1", "c2s_iv_1", "record_c2s_epoch_1_0_text_3_again",
        "server_identity_ecdsa_scalar", "server_identity_mldsa_seed", "mlkem_secret",
        "mlkem_ciphertext", "client_ecdh_share", "server_ecdh_share", "client_mlkem_ek_sha256",
        "client_identity_ecdsa_public", "client_identity_mldsa_public_sha256",
        "client_fingerprint", "server_identity_ecdsa_public",
        "server_identity_mldsa_public_sha256", "server_fingerprint", "client_hello_sha256",
        "server_hello_core_sha256", "transcript_label", "transcript_h_ch", "transcript_h_core",
        "ecdh_secret", "prk", "c2s_enc", "c2s_mac", "c2s_iv", "s2c_enc", "s2c_mac", "s2c_iv",
        "server_finished", "client_finished", "verification", "verification_code",
        "record_c2s_0_text_1_hello", "record_c2s_1_text_2_world", "record_s2c_0_welcome",
    }
    assert set(VECTOR) == expected
    assert len(vb("client_mlkem_seed")) == 64
    assert len(vb("mlkem_ciphertext")) == protocol.MLKEM1024_CT
    assert len(vb("mlkem_secret")) == 32


def test_documented_ciphertext_decapsulates_to_documented_secret():
    key = mlkem.MLKEM1024PrivateKey.from_seed_bytes(vb("client_mlkem_seed"))
    assert key.decapsulate(vb("mlkem_ciphertext")) == vb("mlkem_secret")
    # and through the code's own KEM provider
    kem = crypt.CryptographyKEM()
    private, ek = kem.generate(vb("client_mlkem_seed"))
    assert sha256(ek).hex() == VECTOR["client_mlkem_ek_sha256"]
    assert kem.decapsulate(private, vb("mlkem_ciphertext")) == vb("mlkem_secret")


def test_identities_and_fingerprints(run):
    for role, ident in (("client", run.client_id), ("server", run.server_id)):
        ecdsa_pub = ec.derive_private_key(vint(f"{role}_identity_ecdsa_scalar"), ec.SECP256R1()) \
            .public_key().public_bytes(serialization.Encoding.X962,
                                       serialization.PublicFormat.UncompressedPoint)
        mldsa_pub = mldsa.MLDSA65PrivateKey.from_seed_bytes(
            vb(f"{role}_identity_mldsa_seed")).public_key().public_bytes_raw()
        assert ecdsa_pub.hex() == VECTOR[f"{role}_identity_ecdsa_public"]
        assert sha256(mldsa_pub).hex() == VECTOR[f"{role}_identity_mldsa_public_sha256"]
        assert ident.public == IdentityPublic(ecdsa_pub, mldsa_pub)
        fp = VECTOR[f"{role}_fingerprint"]
        assert doc_fingerprint(ecdsa_pub, mldsa_pub) == fp
        assert ident.fingerprint() == fp
        assert len(fp) == 50
    assert run.client.server.fingerprint == VECTOR["server_fingerprint"]
    assert run.server.client.fingerprint == VECTOR["client_fingerprint"]


def test_ecdh_shares_and_secret(run):
    def share(scalar: int) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
        key = ec.derive_private_key(scalar, ec.SECP256R1())
        return key, key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)

    ckey, cshare = share(vint("client_ecdh_scalar"))
    skey, sshare = share(vint("server_ecdh_scalar"))
    assert cshare.hex() == VECTOR["client_ecdh_share"]
    assert sshare.hex() == VECTOR["server_ecdh_share"]
    peer = ec.EllipticCurvePublicKey.from_encoded_point
    secret = ckey.exchange(ec.ECDH(), peer(ec.SECP256R1(), sshare))
    assert secret == skey.exchange(ec.ECDH(), peer(ec.SECP256R1(), cshare))
    assert secret.hex() == VECTOR["ecdh_secret"]
    assert crypt.ecdh_shared(ckey, sshare) == secret


def test_hello_hashes_and_transcript(run):
    core = run.server_hello[: ServerHello.CORE_SIZE]
    assert sha256(run.client_hello).hex() == VECTOR["client_hello_sha256"]
    assert sha256(core).hex() == VECTOR["server_hello_core_sha256"]
    assert LABEL == protocol.PROTOCOL_LABEL
    assert sha256(LABEL).hex() == VECTOR["transcript_label"]
    assert sha256(LABEL + run.client_hello).hex() == VECTOR["transcript_h_ch"]
    assert sha256(LABEL + run.client_hello + core).hex() == VECTOR["transcript_h_core"]
    # the whole transcript, as both cores end it: the ClientAuth's plaintext, not its seal
    whole = sha256(LABEL + run.client_hello + run.server_hello + doc_open_auth(run))
    assert run.client.transcript_hash == run.server.transcript_hash == whole


def test_key_schedule(run):
    keys = doc_derive(vb("ecdh_secret"), vb("mlkem_secret"), vb("transcript_h_core"))
    assert keys["prk"].hex() == VECTOR["prk"]
    code_keys = crypt.derive_keys(vb("ecdh_secret"), vb("mlkem_secret"),
                                  vb("transcript_h_core"))
    assert run.client.keys == run.server.keys == code_keys
    names = {f.name for f in crypt.SessionKeys.__dataclass_fields__.values()}
    for name in names:
        assert keys[name].hex() == VECTOR[name], name
        assert getattr(code_keys, name) == keys[name], name
    for name, _, length in doc_key_schedule():
        assert len(keys[name]) == length
    # the labels of section 7 are exactly the code's, one line per key
    assert sorted(label for _, label, _ in doc_key_schedule()) == sorted(
        label.decode() for label in crypt.LABELS.values())
    rows, update = doc_epoch_schedule()
    assert {f"traffic {n}": label for n, label, _ in rows} | {"key update": update} == {
        f"traffic {k}" if k != "key update" else k: v.decode()
        for k, v in crypt.TRAFFIC_LABELS.items()}
    assert {name for name, _, _ in doc_key_schedule()} | {
        f"{side}_{part}" for side in ("c2s", "s2c") for part in ("enc", "mac", "iv")} == names


def test_first_key_update():
    """Section 8: KeyUpdate sealed as the client's seq 2 of epoch 0, then epoch 1 from
    the next secret, its first record at seq 0."""
    secret_1 = doc_next_secret(vb("c2s_traffic"))
    assert secret_1.hex() == VECTOR["c2s_traffic_1"]
    assert crypt.next_traffic_secret(vb("c2s_traffic")) == secret_1
    epoch_1 = doc_epoch_keys(secret_1)
    for part in ("enc", "mac", "iv"):
        assert epoch_1[part].hex() == VECTOR[f"c2s_{part}_1"]
    assert crypt.traffic_keys(secret_1) == (epoch_1["enc"], epoch_1["mac"], epoch_1["iv"])
    d = crypt.DIRECTION_C2S
    assert doc_seal(d, *_keys(d), 2, MsgType.KEY_UPDATE, b"").hex() == \
        VECTOR["record_c2s_2_key_update"]
    assert doc_seal(d, epoch_1["enc"], epoch_1["mac"], epoch_1["iv"], 0, MsgType.TEXT,
                    protocol.Text(3, "again").encode()).hex() == \
        VECTOR["record_c2s_epoch_1_0_text_3_again"]
    # the code: seal the session's records and the update; the server's side opens them
    sender, _ = crypt.record_pair(crypt.derive_keys(vb("ecdh_secret"), vb("mlkem_secret"),
                                                    vb("transcript_h_core")), Role.CLIENT)
    _, receiver = crypt.record_pair(crypt.derive_keys(vb("ecdh_secret"), vb("mlkem_secret"),
                                                      vb("transcript_h_core")), Role.SERVER)
    for name in ("record_c2s_0_text_1_hello", "record_c2s_1_text_2_world"):
        msg = next(m for n, _, _, m in RECORDS if n == name)
        assert b"".join(sender.seal(msg.TYPE, msg.encode())) == vb(name)
        receiver.open(vb(name)[4:])
    assert b"".join(sender.seal_key_update()) == vb("record_c2s_2_key_update")
    assert receiver.open(vb("record_c2s_2_key_update")[4:]) == (MsgType.KEY_UPDATE, b"")
    again = protocol.Text(3, "again")
    assert b"".join(sender.seal(again.TYPE, again.encode())) == \
        vb("record_c2s_epoch_1_0_text_3_again")
    assert protocol.decode_message(*receiver.open(
        vb("record_c2s_epoch_1_0_text_3_again")[4:])) == again


def test_verification_code(run):
    mac = hmac256(vb("verification"), vb("client_nonce"))
    n = int.from_bytes(mac[:8], "big") % 10**12
    digits = f"{n:012d}"
    assert f"{digits[:4]}-{digits[4:8]}-{digits[8:]}" == VECTOR["verification_code"]
    assert run.client.code == run.server.code == VECTOR["verification_code"]
    assert crypt.verification_code(run.client.keys, vb("client_nonce")) == \
        VECTOR["verification_code"]
    assert VECTOR["verification_code"] in section("6.9 Verification code")


def test_commitment(run):
    label = re.search(r"`SHA-256\(\"([^\"]+)\" \\\|\\\| nonce_c\)`",
                      section("6.1 ClientHello")).group(1).encode()
    assert label == protocol.COMMITMENT_LABEL
    assert f"the {len(label)} ASCII bytes" in flat(section("6.1 ClientHello"))
    assert sha256(label + vb("client_nonce")).hex() == VECTOR["commitment"]
    assert crypt.commitment(vb("client_nonce")) == vb("commitment")
    # the ClientAuth reveals exactly the committed nonce
    assert crypt.open_client_auth(run.server.keys, run.client_auth).nonce == vb("client_nonce")


def doc_open_auth(run) -> bytes:
    """Section 6.3 with the primitives: check the tag, decrypt, drop the sealed type byte."""
    ca = run.client_auth
    iv, ct, tag = ca[1:17], ca[17:-32], ca[-32:]
    assert iv == vb("auth_iv") + bytes(8)
    assert tag == hmac256(vb("auth_mac"), bytes([crypt.DIRECTION_C2S]) + bytes(8) + iv + ct)
    decryptor = Cipher(algorithms.AES(vb("auth_enc")), modes.CTR(iv)).decryptor()
    plain = decryptor.update(ct) + decryptor.finalize()
    assert plain[0] == 0x03
    return plain[1:]


def test_signatures_and_finished_follow_the_transcript(run):
    ch, sh = run.client_hello, run.server_hello
    ca = doc_open_auth(run)  # cauth: nonce, identity, signatures, Finished
    core, sigs_s, fin_s = sh[:3689], sh[3689:7062], sh[7062:]
    h_core = sha256(LABEL + ch + core)
    assert h_core.hex() == VECTOR["transcript_h_core"]
    doc_verify("server", vb("server_identity_ecdsa_public"), run.server_id.public.mldsa,
               sigs_s, h_core)
    assert fin_s == hmac256(vb("server_finished"), sha256(LABEL + ch + core + sigs_s))
    h_sfin = sha256(LABEL + ch + sh)
    h_cid = sha256(LABEL + ch + sh + ca[:2049])
    assert ca[:32] == vb("client_nonce")
    doc_verify("client", vb("client_identity_ecdsa_public"), run.client_id.public.mldsa,
               ca[2049:5422], h_cid)
    assert ca[5422:] == hmac256(vb("client_finished"), sha256(LABEL + ch + sh + ca[:5422]))
    # a signature over another hash, or under the other role's context, does not verify
    with pytest.raises(InvalidSignature):
        doc_verify("server", vb("server_identity_ecdsa_public"), run.server_id.public.mldsa,
                   sigs_s, h_sfin)
    with pytest.raises(protocol.AuthError):
        crypt.verify_signatures(Role.CLIENT, run.server_id.public,
                                protocol.Signatures.decode(sigs_s), h_core)


def test_contexts_and_label_match_the_code():
    assert doc_contexts() == {role.value: ctx for role, ctx in crypt.SIGNATURE_CONTEXT.items()}
    assert set(crypt.SIGNATURE_CONTEXT) == set(Role)
    assert all(len(ctx) == 28 for ctx in crypt.SIGNATURE_CONTEXT.values())
    text = section("2. Protocol label")
    assert f"the {len(protocol.PROTOCOL_LABEL)} ASCII bytes" in flat(text)
    assert f'`MAGIC = "{protocol.MAGIC.decode()}"`' in text
    assert protocol.MAGIC.hex(" ") in text
    assert f"`VERSION = {protocol.VERSION}`" in text


# --- records -------------------------------------------------------------------------------
RECORDS = [
    # (vector name, direction, sequence number, message)
    ("record_c2s_0_text_1_hello", crypt.DIRECTION_C2S, 0, protocol.Text(1, "hello")),
    ("record_c2s_1_text_2_world", crypt.DIRECTION_C2S, 1, protocol.Text(2, "world")),
    ("record_s2c_0_welcome", crypt.DIRECTION_S2C, 0, protocol.Welcome()),
]


def _keys(direction: int) -> tuple[bytes, bytes, bytes]:
    side = "c2s" if direction == crypt.DIRECTION_C2S else "s2c"
    return vb(f"{side}_enc"), vb(f"{side}_mac"), vb(f"{side}_iv")


def test_records_are_sealed_as_documented():
    for name, direction, seq, msg in RECORDS:
        frame = doc_seal(direction, *_keys(direction), seq, msg.TYPE, msg.encode())
        assert frame.hex() == VECTOR[name], name
    text = vb("record_c2s_0_text_1_hello")
    assert len(text) == 4 + 16 + 1 + 8 + 5 + 32
    assert text[4:20] == vb("c2s_iv") + bytes(8)  # seq 0: the mask itself, then zeros


def test_code_reseals_and_opens_the_documented_records(run):
    senders = {crypt.DIRECTION_C2S: crypt.RecordSender(crypt.DIRECTION_C2S,
                                                       *_keys(crypt.DIRECTION_C2S)),
               crypt.DIRECTION_S2C: crypt.RecordSender(crypt.DIRECTION_S2C,
                                                       *_keys(crypt.DIRECTION_S2C))}
    c_send, c_recv = run.client.records()
    s_send, s_recv = run.server.records()
    for name, direction, _, msg in RECORDS:
        expected = vb(name)
        assert b"".join(senders[direction].seal(msg.TYPE, msg.encode())) == expected
        send, recv = (c_send, s_recv) if direction == crypt.DIRECTION_C2S else (s_send, c_recv)
        assert b"".join(send.seal(msg.TYPE, msg.encode())) == expected
        msg_type, payload = recv.open(expected[4:])
        assert protocol.decode_message(msg_type, payload) == msg
        assert protocol.frame_length(expected[:4]) == len(expected) - 4


def test_sequence_number_is_implicit():
    # the seq 1 record offered where seq 0 is expected does not open
    receiver = crypt.RecordReceiver(crypt.DIRECTION_C2S, *_keys(crypt.DIRECTION_C2S))
    with pytest.raises(protocol.AuthError):
        receiver.open(vb("record_c2s_1_text_2_world")[4:])
    # nor does a c2s record opened as s2c with the same keys (direction byte in the MAC)
    wrong_direction = crypt.RecordReceiver(crypt.DIRECTION_S2C, *_keys(crypt.DIRECTION_C2S))
    with pytest.raises(protocol.AuthError):
        wrong_direction.open(vb("record_c2s_0_text_1_hello")[4:])


def test_keylog_example():
    keys = crypt.derive_keys(vb("ecdh_secret"), vb("mlkem_secret"), vb("transcript_h_core"))
    block = fenced("qsocket2-keylog")
    assert block == crypt.keylog_lines(vb("client_random"), keys)
    names = ["CLIENT_TRAFFIC_SECRET", "SERVER_TRAFFIC_SECRET",
             "CLIENT_TRAFFIC_ENC", "CLIENT_TRAFFIC_MAC", "CLIENT_TRAFFIC_IV",
             "SERVER_TRAFFIC_ENC", "SERVER_TRAFFIC_MAC", "SERVER_TRAFFIC_IV"]
    fields = ["c2s_traffic", "s2c_traffic",
              "c2s_enc", "c2s_mac", "c2s_iv", "s2c_enc", "s2c_mac", "s2c_iv"]
    lines = block.splitlines()
    assert lines == [f"QSOCKET2_{n} {VECTOR['client_random']} {VECTOR[f]}"
                     for n, f in zip(names, fields, strict=True)]
    prose = flat(section("14. Key log"))
    for n, f in zip(names, fields, strict=True):
        assert f"`{n}` = `{f}`" in prose
    assert "appends eight lines" in prose
    # the logged secrets give every later epoch, as section 14 says
    assert doc_epoch_keys(doc_next_secret(vb("c2s_traffic")))["enc"] == vb("c2s_enc_1")


# --- layouts ------------------------------------------------------------------------------
def layout(title: str) -> dict[str, tuple[int, int, str]]:
    """{field: (offset, size, content)} of the first table of a section, checked to be
    contiguous from offset 0."""
    rows = tables(section(title))[0]
    fields, pos = {}, 0
    for offset, size, field, content in rows:
        assert int(offset) == pos, f"{title}: {field} at {offset}, expected {pos}"
        fields[code(field)] = (int(offset), int(size), content)
        pos += int(size)
    fields["<total>"] = (0, pos, "")
    return fields


def _field(data: bytes, fields, name: str) -> bytes:
    offset, size, _ = fields[name]
    return data[offset : offset + size]


def test_layout_tables_match_sizes():
    for title, size in (("4. Identities", IdentityPublic.SIZE),
                        ("6.1 ClientHello", ClientHello.SIZE),
                        ("6.2 ServerHello", ServerHello.SIZE),
                        ("6.3 ClientAuth", ClientAuth.SIZE)):
        assert layout(title)["<total>"][1] == size, title
    for title, size in (("6.1 ClientHello", ClientHello.SIZE),
                        ("6.2 ServerHello", ServerHello.SIZE),
                        ("6.3 ClientAuth", ClientAuth.SIZE)):
        assert section(title).lstrip().startswith(f"{size} bytes"), title
    assert f"`core` = bytes 0..{ServerHello.CORE_SIZE - 1}" in section("6.2 ServerHello")
    assert layout("6.2 ServerHello")["sig_ecdsa"][0] == ServerHello.CORE_SIZE


def _check_header(data: bytes, fields, msg_type: int) -> None:
    assert _field(data, fields, "type") == bytes([msg_type])
    assert code(fields["type"][2]) == f"0x{msg_type:02x}"
    if "magic" in fields:
        assert _field(data, fields, "magic") == protocol.MAGIC
        assert code(fields["magic"][2]) == f'"{protocol.MAGIC.decode()}"'
        assert _field(data, fields, "version") == protocol.VERSION.to_bytes(2, "big")


def test_client_hello_fields(run):
    f, ch = layout("6.1 ClientHello"), run.client_hello
    _check_header(ch, f, protocol.HandshakeType.CLIENT_HELLO)
    assert _field(ch, f, "random") == vb("client_random")
    assert _field(ch, f, "ecdh_share") == vb("client_ecdh_share")
    assert sha256(_field(ch, f, "mlkem_ek")).hex() == VECTOR["client_mlkem_ek_sha256"]
    assert _field(ch, f, "commitment") == vb("commitment")
    # the client's identity is nowhere in the clear
    assert vb("client_identity_ecdsa_public") not in ch + run.server_hello + run.client_auth


def test_server_hello_fields(run):
    f, sh = layout("6.2 ServerHello"), run.server_hello
    _check_header(sh, f, protocol.HandshakeType.SERVER_HELLO)
    assert _field(sh, f, "random") == vb("server_random")
    assert _field(sh, f, "ecdh_share") == vb("server_ecdh_share")
    assert _field(sh, f, "mlkem_ct") == vb("mlkem_ciphertext")
    assert _field(sh, f, "identity_ecdsa") == vb("server_identity_ecdsa_public")
    assert sha256(_field(sh, f, "identity_mldsa")).hex() == \
        VECTOR["server_identity_mldsa_public_sha256"]
    sigs = _field(sh, f, "sig_ecdsa") + _field(sh, f, "sig_mldsa")
    doc_verify("server", vb("server_identity_ecdsa_public"), run.server_id.public.mldsa,
               sigs, vb("transcript_h_core"))
    core = sh[: ServerHello.CORE_SIZE]
    assert _field(sh, f, "finished") == hmac256(
        vb("server_finished"), sha256(LABEL + run.client_hello + core + sigs))


def test_client_auth_fields(run):
    f, ca = layout("6.3 ClientAuth"), run.client_auth
    _check_header(ca, f, protocol.HandshakeType.CLIENT_AUTH)
    assert _field(ca, f, "iv") == vb("auth_iv") + bytes(8)
    inner_rows = tables(section("6.3 ClientAuth"))[1]
    g, pos = {}, 0
    for offset, size, name, _ in inner_rows:
        assert int(offset) == pos
        g[code(name)] = (pos, int(size), "")
        pos += int(size)
    assert pos == ClientAuth.INNER_SIZE
    assert f["ciphertext"][1] == 1 + pos and f["<total>"][1] == ClientAuth.SIZE
    cauth = doc_open_auth(run)
    assert _field(cauth, g, "nonce") == vb("client_nonce")
    assert _field(cauth, g, "identity_ecdsa") == vb("client_identity_ecdsa_public")
    assert sha256(_field(cauth, g, "identity_mldsa")).hex() == \
        VECTOR["client_identity_mldsa_public_sha256"]
    h_cid = sha256(LABEL + run.client_hello + run.server_hello + cauth[: g["sig_ecdsa"][0]])
    sigs = _field(cauth, g, "sig_ecdsa") + _field(cauth, g, "sig_mldsa")
    doc_verify("client", vb("client_identity_ecdsa_public"), run.client_id.public.mldsa,
               sigs, h_cid)
    signed = cauth[: g["finished"][0]]
    assert _field(cauth, g, "finished") == hmac256(
        vb("client_finished"), sha256(LABEL + run.client_hello + run.server_hello + signed))


def test_name_sanitising_examples():
    examples = fenced("qsocket2-names", section("11.3 Names"))
    pairs = [line.split(" -> ") for line in examples.splitlines()]
    assert len(pairs) == 8
    for sent, saved in pairs:
        assert transfer.sanitise_name(sent) == saved, sent


def test_alert_tables():
    layout_rows, codes = tables(section("6.4 Alert"))
    assert [code(r[2]) for r in layout_rows] == ["type", "code", "reason"]
    assert code(layout_rows[0][3]) == f"0x{protocol.HandshakeType.ALERT:02x}"
    assert layout_rows[2][1] == f"0..{protocol.MAX_NAME}"
    assert {(int(c), code(n)) for c, n, _ in codes} == {(a.value, a.name) for a in AlertCode}
    alert = protocol.Alert(AlertCode.BUSY, "x" * 300).encode()
    assert alert[:2] == bytes([0x7F, 4]) and len(alert) == 2 + protocol.MAX_NAME
    assert f"2 to {2 + protocol.MAX_NAME} bytes" in section("6.4 Alert")


def test_record_direction_table():
    direction_rows = tables(section("8. Records"))[0]
    assert [(code(r[1]), re.findall(r"`(\w+)`", r[2])) for r in direction_rows] == [
        (f"0x{crypt.DIRECTION_C2S:02x}", ["c2s_enc", "c2s_mac", "c2s_iv"]),
        (f"0x{crypt.DIRECTION_S2C:02x}", ["s2c_enc", "s2c_mac", "s2c_iv"]),
    ]
    assert f"`MAX_RECORDS` = 2^{crypt.MAX_RECORDS.bit_length() - 1}" in section("8. Records")


# --- application messages ------------------------------------------------------------------
_PREFIX = {"op (u32)": 4, "reason (u8)": 1, "msg_id (u64)": 8, "size (u64)": 8,
           "sha256 (32 bytes)": 32}


def _check_payload_rule(cls, payload_cell: str) -> None:
    """Decode at and beyond the bounds the table gives for one message type."""
    def ok(payload: bytes) -> None:
        cls.decode(payload)

    def bad(payload: bytes) -> None:
        with pytest.raises(RemoteProtocolError):
            cls.decode(payload)

    cell = payload_cell.replace("`", "")
    if cell == "empty":
        ok(b"")
        bad(b"x")
        return
    m = re.search(r"exactly (\d+) bytes", cell)
    if m:
        n = int(m.group(1))
        ok(bytes(n))
        bad(bytes(n - 1))
        bad(bytes(n + 1))
        return
    *fixed, last = (part.strip() for part in cell.split("||"))
    prefix = b"".join(bytes(_PREFIX[part]) for part in fixed)
    lo, hi = (int(x) for x in re.search(r"(\d+)\.\.(\d+) bytes", last).groups())
    ok(prefix + b"a" * hi)
    bad(prefix + b"a" * (hi + 1))
    if lo:
        ok(prefix + b"a" * lo)
        bad(prefix + b"a" * (lo - 1))
    else:
        ok(prefix)
    if "UTF-8" in last:
        bad(prefix + b"\xff")


def test_message_type_table():
    rows = tables(section("10. Application messages"))[0]
    seen = set()
    for type_cell, name, _direction, payload in rows:
        msg_type = MsgType(int(code(type_cell), 16))
        cls = MESSAGES[msg_type]
        assert cls.__name__ == code(name), type_cell
        _check_payload_rule(cls, payload)
        seen.add(msg_type)
    assert seen == set(MsgType)


def test_payload_limits_are_the_constants():
    rows = {code(r[1]): r[3] for r in tables(section("10. Application messages"))[0]}
    assert f"0..{protocol.MAX_TEXT} bytes" in rows["Text"]
    assert f"1..{protocol.MAX_NAME} bytes" in rows["FileOffer"]
    assert f"1..{protocol.CHUNK_SIZE} bytes" in rows["FileData"]
    assert f"0..{protocol.MAX_NAME} bytes" in rows["Bye"]


def test_reason_table():
    rows = tables(section("10. Application messages"))[1]
    assert {(int(c), code(n)) for c, n, _ in rows} == {(r.value, r.name) for r in Reason}
    # an unknown code is read as UNSPECIFIED, as the text says
    unknown = protocol.FileReject.decode(bytes([0, 0, 0, 1, 200]) + b"why")
    assert unknown.reason is Reason.UNSPECIFIED


# --- sizes, limits and defaults -----------------------------------------------------------
def _constant(name: str) -> int:
    for module in (protocol, crypt):
        if hasattr(module, name):
            return getattr(module, name)
    raise AssertionError(f"{name} is in docs/PROTOCOL.md but not in protocol.py or crypt.py")


def test_size_and_limit_tables():
    sizes = tables(section("1. Conventions"))[0]
    limits = tables(section("13. Limits"))[0]
    checked = 0
    for name, value, _ in sizes + limits:
        name = code(name)
        if name.startswith("--"):
            continue
        assert _constant(name) == int(value), name
        checked += 1
    assert checked == len(sizes) + 11
    m = re.search(r"MAX_FRAME = IV_SIZE \+ \(1 \+ 4 \+ CHUNK_SIZE\) \+ MAC_SIZE = "
                  r"(\d+) \+ (\d+) \+ (\d+) = (\d+)", section("3. Framing"))
    assert tuple(int(x) for x in m.groups()) == (
        protocol.IV_SIZE, 1 + protocol.OP_ID.size + protocol.CHUNK_SIZE, protocol.MAC_SIZE,
        protocol.MAX_FRAME)
    assert protocol.MAX_FRAME == protocol.IV_SIZE + protocol.MAX_RECORD_PLAINTEXT \
        + protocol.MAC_SIZE


def test_documented_defaults_are_the_cli_defaults():
    limits = {code(r[0]): float(r[1]) for r in tables(section("13. Limits"))[0]}
    server_args = server.build_parser().parse_args([])
    client_args = client.build_parser().parse_args([])
    assert limits["--handshake-timeout"] == server_args.handshake_timeout
    assert limits["--max-clients"] == server_args.max_clients
    assert limits["--max-file-size"] == server_args.max_file_size == client_args.max_file_size
    rules = flat(section("6.8 Processing"))
    assert f"reference default {server_args.handshake_timeout:g} s" in rules
    assert f"reference client allows {client.HANDSHAKE_TIMEOUT:g} s from connecting to the " \
           f"ServerHello, and {client.HANDSHAKE_TIMEOUT:g} s again" in rules


def test_frame_limits():
    assert protocol.frame_length(protocol.MAX_FRAME.to_bytes(4, "big")) == protocol.MAX_FRAME
    for bad in (0, protocol.MAX_FRAME + 1):
        with pytest.raises(RemoteProtocolError):
            protocol.frame_length(bad.to_bytes(4, "big"))
    # during the handshake nothing larger than the ServerHello is ever allocated
    limit = protocol.MAX_HANDSHAKE
    assert limit == protocol.ServerHello.SIZE >= protocol.ClientHello.SIZE
    assert protocol.frame_length(limit.to_bytes(4, "big"), limit) == limit
    with pytest.raises(RemoteProtocolError):
        protocol.frame_length((limit + 1).to_bytes(4, "big"), limit)


# --- trust files -----------------------------------------------------------------------------
def test_trust_file_examples_parse():
    hosts = client_data.parse_known_hosts(fenced("", section("15.1 `known_hosts`")))
    assert hosts["[127.0.0.1]:5555"] == (VECTOR["server_fingerprint"], 2)
    assert client_data.check_host(fenced("", section("15.1 `known_hosts`")), "127.0.0.1",
                                  5555, VECTOR["server_fingerprint"]).trust \
        is client_data.Trust.KNOWN
    known = fenced("", section("15.2 `known_clients`"))
    assert server_data.parse_known_clients(known) == {VECTOR["client_fingerprint"]}
    assert known == server_data.known_clients_line(
        VECTOR["client_fingerprint"], "127.0.0.1:50412", "2025-01-31T12:00:00Z")
    authorized = fenced("", section("15.3 Authorised clients"))
    assert server_data.parse_authorized_clients(authorized) == {
        VECTOR["client_fingerprint"]: "alice laptop"}
    tabbed = authorized.replace(" alice", "\talice")  # any whitespace, as the text says
    assert server_data.parse_authorized_clients(tabbed) == {
        VECTOR["client_fingerprint"]: "alice laptop"}
    assert client_data.known_hosts_line("127.0.0.1", 5555, VECTOR["server_fingerprint"]) \
        in fenced("", section("15.1 `known_hosts`"))
