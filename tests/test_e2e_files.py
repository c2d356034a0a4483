"""JPG transfer end to end: real server (and client) processes on 127.0.0.1.

Bit-exact batch transfers of real JPEGs, chunk-boundary sizes, refusals, no
overwrite, order with texts; a crafted peer (built from the sans-I/O core)
offering hostile names and broken streams; transfers cut by a relay at several
offsets; and a receiver whose disk really fills up (a 4 MiB tmpfs).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import socket
import struct
import subprocess
import unicodedata
from pathlib import Path

import pytest
from conftest import (
    LINE_TIMEOUT,
    PY,
    ROOT,
    Env,
    Proc,
    Relay,
    Server,
    child_env,
    files_in,
    identity,
    jpeg_of_size,
    make_jpeg,
)

import session
import transfer
from client_data import ClientHandshake
from protocol import (
    CHUNK_SIZE,
    IV_SIZE,
    MAC_SIZE,
    ClientAuth,
    ClientHello,
    Delivered,
    Error,
    FileAccept,
    FileCancel,
    FileData,
    FileEnd,
    FileFailed,
    FileReject,
    FileSaved,
    MsgType,
    Reason,
    ServerHello,
    Text,
    Welcome,
    decode_message,
)

EXIT_UNDELIVERED = 5
SUMMARY = r"{size} bytes, SHA-256 {sha}, \d+\.\d\d s(?:, \d+(?:\.\d)? (?:B|KiB|MiB|GiB)/s)?"
# the server's line when a connection ends, in the handshake or after it
CLOSED = (r"^(\[SHA256:[^\]]+\] (disconnected|connection .*)"
          r"|connection from [\d.]+:\d+ closed: .*)$")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def client_line(name: str, size: int, sha: str, sent_as: str | None = None) -> str:
    """The sender's line: the name it sent, and `saved as` when the receiver renamed it."""
    renamed = sent_as is not None and sent_as != name
    return (rf"^sent {re.escape(repr(sent_as if renamed else name))}: "
            + SUMMARY.format(size=size, sha=sha)
            + (rf", saved as {re.escape(repr(name))}" if renamed else "") + "$")


def server_line(name: str, size: int, sha: str, path: Path, meta: str | None = None) -> str:
    """The server's saved line; `meta` is what it says the file carries (by default
    what the walker finds in the saved file; tests of that note pass it exactly)."""
    meta = session.metadata_note(path) if meta is None else meta
    return (rf"^\[SHA256:[^\]]+\] received {re.escape(repr(name))}: "
            + SUMMARY.format(size=size, sha=sha)
            + rf" \({re.escape(meta)}\), saved at {re.escape(str(path))}$")


def send(env: Env, port: int, *args: str, timeout: float = 60):
    return env.client("--port", str(port), "--accept-new-host", *args, timeout=timeout)


def assert_received(env: Env, srv: Server, result, sent: Path, saved_as: str) -> None:
    """`sent` arrived bit-exact as `saved_as`; both sides printed it."""
    digest = sha256(sent)
    size = sent.stat().st_size
    path = env.server_received / saved_as
    assert sha256(path) == digest
    assert path.read_bytes() == sent.read_bytes()
    assert re.search(client_line(saved_as, size, digest, sent.name), result.stdout, re.M), \
        result.stdout
    srv.wait_for(server_line(saved_as, size, digest, path))


# --- real JPEGs, bit-exact ---------------------------------------------------------------
def test_real_jpegs_arrive_bit_exact_in_batch_mode(env: Env):
    from PIL import Image

    files = {
        "baseline photo.jpg": make_jpeg(env.assets / "baseline photo.jpg", (640, 480),
                                        noise=True),
        "progressive ünïcødé 写真.jpeg": make_jpeg(
            env.assets / "progressive ünïcødé 写真.jpeg", (320, 240), progressive=True,
            noise=True),
        "exif.JPG": make_jpeg(env.assets / "exif.JPG", (200, 100), exif=True),
        "cmyk.jpg": make_jpeg(env.assets / "cmyk.jpg", (120, 90), mode="CMYK", noise=True),
        "pixel 1x1.jpg": make_jpeg(env.assets / "pixel 1x1.jpg", (1, 1)),
    }
    srv = env.server()
    args = [a for path in files.values() for a in ("--send-file", str(path))]
    r = send(env, srv.port, *args)
    assert r.returncode == 0, r.stderr
    for name, path in files.items():
        assert_received(env, srv, r, path, name)
    assert files_in(env.server_received) == sorted(files)

    # they are still the same pictures
    with Image.open(env.server_received / "progressive ünïcødé 写真.jpeg") as im:
        assert im.info.get("progressive") and im.size == (320, 240)
    with Image.open(env.server_received / "exif.JPG") as im:
        assert im.getexif()[0x010F] == "QSocket test camera"
    with Image.open(env.server_received / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
    with Image.open(env.server_received / "pixel 1x1.jpg") as im:
        assert im.size == (1, 1)


def test_a_20_mib_jpeg_arrives_bit_exact(env: Env):
    big = make_jpeg(env.assets / "big noise.jpg", (3400, 3300), noise=True, quality=100)
    assert big.stat().st_size > 19 * CHUNK_SIZE  # about 20 MiB: many chunks
    srv = env.server()
    r = send(env, srv.port, "--send-file", str(big))
    assert r.returncode == 0, r.stderr
    assert_received(env, srv, r, big, "big noise.jpg")
    assert files_in(env.server_received) == ["big noise.jpg"]


def test_sizes_around_the_chunk_size_arrive_bit_exact(env: Env):
    sizes = [3, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 2 * CHUNK_SIZE + 1]
    paths = [jpeg_of_size(env.assets / f"size {n}.jpg", n) for n in sizes]
    srv = env.server()
    r = send(env, srv.port, *[a for p in paths for a in ("--send-file", str(p))])
    assert r.returncode == 0, r.stderr
    for p in paths:
        assert_received(env, srv, r, p, p.name)
    assert files_in(env.server_received) == sorted(p.name for p in paths)


# --- refusals ----------------------------------------------------------------------------------
def _png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 10, 10)).save(path, "PNG")
    return path


@pytest.mark.parametrize(("case", "message"), [
    ("empty", "{p}: not a JPEG (no FF D8 FF start-of-image marker)"),
    ("png renamed", "{p}: not a JPEG (no FF D8 FF start-of-image marker)"),
    ("missing", "{p}: no such file"),
    ("directory", "{p}: a directory with no JPGs"),  # a directory stands for its JPGs
    ("not a .jpg name", "{p}: not a .jpg/.jpeg file"),
    ("over the client's limit", "{p}: 2001 bytes exceeds the limit of 2000"),
])
def test_local_refusals_exit_5_before_connecting(env: Env, case: str, message: str):
    a = env.assets
    p = {
        "empty": lambda: jpeg_of_size(a / "empty.jpg", 0),
        "png renamed": lambda: _png(a / "fake.jpg"),
        "missing": lambda: a / "missing.jpg",
        "directory": lambda: (a / "folder.jpg").mkdir() or a / "folder.jpg",
        "not a .jpg name": lambda: jpeg_of_size(a / "picture.png", 500),
        "over the client's limit": lambda: jpeg_of_size(a / "big.jpg", 2001),
    }[case]()
    srv = env.server()
    r = send(env, srv.port, "--max-file-size", "2000", "--send-text", "before",
             "--send-file", str(p))
    assert r.returncode == EXIT_UNDELIVERED
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: file not sent: {message.format(p=p)}"]
    assert "Traceback" not in r.stderr
    assert "delivered" not in r.stdout  # refused before anything was sent
    # nothing reached the server: the next client is the first one it sees
    ok = send(env, srv.port, "--send-text", "next client")
    assert ok.returncode == 0, ok.stderr
    srv.wait_for(r"\] next client$")
    assert len(re.findall(r"^client .* connected from", srv.output(), re.M)) == 1
    assert "before" not in srv.output()
    assert files_in(env.server_received) == []


def test_a_file_over_the_servers_limit_is_rejected_by_the_server(env: Env):
    srv = env.server("--max-file-size", "100000")
    at_limit = jpeg_of_size(env.assets / "at limit.jpg", 100000)
    over = jpeg_of_size(env.assets / "over.jpg", 100001)

    r = send(env, srv.port, "--max-file-size", "1000000", "--send-file", str(over))
    assert r.returncode == EXIT_UNDELIVERED
    assert r.stderr.strip().splitlines()[-1] == (
        "error: file not delivered: rejected by peer: "
        "100001 bytes exceeds the receiver's limit of 100000")
    srv.wait_for(r"\] file 'over.jpg' not saved: rejected: "
                 r"100001 bytes exceeds the receiver's limit of 100000$")
    assert files_in(env.server_received) == []

    # the client's default limit (4 GiB) does not matter either: the receiver's is enforced
    r = send(env, srv.port, "--send-file", str(over))
    assert r.returncode == EXIT_UNDELIVERED
    assert "rejected by peer: 100001 bytes exceeds the receiver's limit of 100000" in r.stderr
    srv.wait_for(r"\] file 'over.jpg' not saved: rejected: ")
    assert files_in(env.server_received) == []

    # exactly the limit is accepted
    r = send(env, srv.port, "--send-file", str(at_limit))
    assert r.returncode == 0, r.stderr
    assert_received(env, srv, r, at_limit, "at limit.jpg")
    assert files_in(env.server_received) == ["at limit.jpg"]


# --- no overwrite, order ---------------------------------------------------------------------
def test_the_same_name_twice_never_overwrites(env: Env):
    a = make_jpeg(env.assets / "photo.jpg", (100, 80), noise=True)
    b = make_jpeg(env.root / "other" / "photo.jpg", (90, 70), noise=True)
    assert sha256(a) != sha256(b)
    srv = env.server()
    r = send(env, srv.port, "--send-file", str(a), "--send-file", str(a), "--send-file", str(b))
    assert r.returncode == 0, r.stderr
    assert files_in(env.server_received) == ["photo (1).jpg", "photo (2).jpg", "photo.jpg"]
    assert_received(env, srv, r, a, "photo.jpg")
    assert_received(env, srv, r, a, "photo (1).jpg")
    assert_received(env, srv, r, b, "photo (2).jpg")
    # a later run neither: the first file is still the first one
    r = send(env, srv.port, "--send-file", str(b))
    assert r.returncode == 0, r.stderr
    assert_received(env, srv, r, b, "photo (3).jpg")
    assert sha256(env.server_received / "photo.jpg") == sha256(a)


def test_texts_and_files_keep_their_order(env: Env):
    one = make_jpeg(env.assets / "one.jpg")
    two = make_jpeg(env.assets / "two.jpg", (10, 10))
    srv = env.server()
    r = send(env, srv.port, "--send-text", "first", "--send-file", str(one),
             "--send-text", "second", "--send-file", str(two), "--send-text", "third")
    assert r.returncode == 0, r.stderr
    srv.wait_for(r"\] first$")
    srv.wait_for(r"\] received 'one.jpg': ")
    srv.wait_for(r"\] second$")
    srv.wait_for(r"\] received 'two.jpg': ")
    srv.wait_for(r"\] third$")
    out = [line.split(":")[0] for line in r.stdout.splitlines()]
    assert out == ["delivered", "sent 'one.jpg'", "delivered", "sent 'two.jpg'", "delivered"]


# --- a crafted peer built from the core ---------------------------------------------------------
class CraftedPeer:
    """A client made of the sans-I/O core and raw frames: it trusts any server (no
    known_hosts) and sends whatever the test wants, names and streams included."""

    def __init__(self, port: int, who: str = "crafted") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=LINE_TIMEOUT)
        hs = ClientHandshake(identity(who))
        session.send_frame(self.sock, hs.create_client_hello())
        hs.consume_server_hello(bytes(session.read_frame(self.sock)))
        session.send_frame(self.sock, hs.create_client_auth())
        self.handshake = hs
        self.sender, self.receiver = hs.records()
        self.op = 0  # the current file operation's id
        assert isinstance(self.recv(), Welcome)

    def send_raw(self, msg_type: int, payload: bytes = b"") -> None:
        session.send_pieces(self.sock, self.sender.seal(msg_type, payload))

    def send(self, msg) -> None:
        self.send_raw(msg.TYPE, msg.encode())

    def recv(self):
        return decode_message(*self.receiver.open(session.read_frame(self.sock)))

    def offer(self, name: str, size: int):
        # by hand: the FileOffer class would refuse names longer than the protocol allows
        self.op += 1
        self.send_raw(MsgType.FILE_OFFER,
                      struct.pack(">IQ", self.op, size) + name.encode("utf-8"))
        return self.recv()

    def stream(self, data: bytes) -> None:
        for i in range(0, len(data), CHUNK_SIZE):
            self.send(FileData(self.op, data[i:i + CHUNK_SIZE]))

    def send_file(self, name: str, data: bytes):
        reply = self.offer(name, len(data))
        assert isinstance(reply, FileAccept), reply
        self.stream(data)
        self.send(FileEnd(self.op, hashlib.sha256(data).digest()))
        return self.recv()

    def text(self, text: str) -> None:
        self.send(Text(7, text))
        assert self.recv() == Delivered(7)

    def expect_closed(self) -> None:
        with pytest.raises(session.ConnectionLost):
            session.read_frame(self.sock)

    def close(self) -> None:
        self.sock.close()


def tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


HOSTILE = [
    ("../../etc/passwd.jpg", "passwd.jpg"),
    ("/abs/x.jpg", "x.jpg"),
    ("..", "received.jpg"),
    (".hidden.jpg", "hidden.jpg"),
    ("a\x00b.jpg", "ab.jpg"),
    ("\x1b[2Jclear.jpg", "[2Jclear.jpg"),
    ("\u202egpj.exe", "gpj_exe.jpg"),
    ("..\\..\\windows\\evil.jpg", "evil.jpg"),
    (".", "received (1).jpg"),
    ("photo.jpg\x00.exe", "photo_jpg_exe.jpg"),
    ("\u202ephoto\u202c.jpg", "photo.jpg"),
    (". .sneaky.jpg", "sneaky.jpg"),
    ("sub/dir/", "received (2).jpg"),
    ("\u2028line\r\n.jpg", "line.jpg"),
    ("../" + "A" * 248 + ".jpg", "A" * 248 + ".jpg"),  # 255 bytes, the protocol maximum
    ("é" * 125 + ".jpg", "é" * 125 + ".jpg"),  # 254 bytes of UTF-8
    ("Ünïcødé 写真.JPG", "Ünïcødé 写真.JPG"),
]


def test_hostile_names_from_a_crafted_peer_stay_inside_the_received_dir(env: Env, tmp_path):
    srv = env.server()
    jpeg = make_jpeg(tmp_path / "src" / "p.jpg", (40, 30), noise=True).read_bytes()
    digest = hashlib.sha256(jpeg).digest()
    before = tree(tmp_path)
    repo_received = files_in(ROOT / "received_assets")

    peer = CraftedPeer(srv.port)
    try:
        for offered, expected in HOSTILE:
            reply = peer.send_file(offered, jpeg)
            assert reply == FileSaved(peer.op, digest, expected), offered
            srv.wait_for(server_line(expected, len(jpeg), digest.hex(),
                                     env.server_received / expected))
        peer.text("still here")
    finally:
        peer.close()

    names = files_in(env.server_received)
    assert sorted(names) == sorted(expected for _, expected in HOSTILE)
    for name in names:
        assert (env.server_received / name).read_bytes() == jpeg
        assert not name.startswith(".")
        assert name.lower().endswith((".jpg", ".jpeg"))
        assert all(unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp") for ch in name)
        assert len(name.encode("utf-8")) <= 255
    # nothing anywhere else: every new path in the test's tree is in the received dir
    new = tree(tmp_path) - before
    outside = {p for p in new if p.parent != env.server_received}
    assert outside == {env.server_home / "known_clients"}  # the server's own record
    assert not (tmp_path.parent / "etc" / "passwd.jpg").exists()
    assert not Path("/abs/x.jpg").exists()
    assert files_in(ROOT / "received_assets") == repo_received
    # and the offered names reached the terminal neutralised
    out = srv.output()
    assert "\x1b" not in out and "\u202e" not in out and "\x00" not in out


def test_a_name_longer_than_the_protocol_allows_ends_the_connection(env: Env, tmp_path):
    srv = env.server()
    peer = CraftedPeer(srv.port)
    try:
        reply = peer.offer("x" * 1000 + ".jpg", 100)
        assert reply == Error("protocol error: FileOffer name: 1004 bytes exceeds 255")
        peer.expect_closed()
    finally:
        peer.close()
    srv.wait_for(r"\] connection closed: protocol error: FileOffer name: 1004 bytes exceeds 255$")
    assert files_in(env.server_received) == []
    # the server carries on
    r = send(env, srv.port, "--send-text", "next")
    assert r.returncode == 0, r.stderr


def test_crafted_streams_that_fail_leave_nothing_and_the_session_goes_on(env: Env, tmp_path):
    srv = env.server("--max-file-size", "50000")
    jpeg = make_jpeg(tmp_path / "p.jpg", (60, 40), noise=True).read_bytes()
    assert len(jpeg) < 50000
    peer = CraftedPeer(srv.port)
    try:
        # not a JPEG: refused on the first chunk; the rest of the stream is discarded
        png = _png(tmp_path / "x.png").read_bytes()
        assert isinstance(peer.offer("x.jpg", len(png)), FileAccept)
        peer.stream(png)
        peer.send(FileEnd(peer.op, hashlib.sha256(png).digest()))
        assert peer.recv() == FileFailed(peer.op, Reason.NOT_JPEG,
                                         "not a JPEG (no FF D8 FF start-of-image marker)")
        assert files_in(env.server_received) == []

        # the SHA-256 in the end message does not match the data
        assert isinstance(peer.offer("y.jpg", len(jpeg)), FileAccept)
        peer.stream(jpeg)
        peer.send(FileEnd(peer.op, hashlib.sha256(b"something else").digest()))
        assert peer.recv() == FileFailed(peer.op, Reason.HASH_MISMATCH,
                                         "SHA-256 of the received data does not match")
        assert files_in(env.server_received) == []

        # the sender cancels half-way
        assert isinstance(peer.offer("z.jpg", len(jpeg)), FileAccept)
        peer.stream(jpeg[:1000])
        peer.send(FileCancel(peer.op, Reason.CANCELLED, "changed my mind"))
        peer.text("after the cancel")  # in order: the cancel was handled before
        srv.wait_for(r"\] file 'z.jpg' not saved: sender cancelled: changed my mind$")
        assert files_in(env.server_received) == []

        # over the receiver's limit, and empty
        assert peer.offer("big.jpg", 50001) == FileReject(
            peer.op, Reason.TOO_LARGE, "50001 bytes exceeds the receiver's limit of 50000")
        assert peer.offer("empty.jpg", 0) == FileReject(peer.op, Reason.NOT_JPEG,
                                                        "not a JPEG (too short)")
        assert files_in(env.server_received) == []

        # after all that, a good one
        assert peer.send_file("good.jpg", jpeg) == FileSaved(peer.op, hashlib.sha256(jpeg).digest(),
                                                             "good.jpg")
    finally:
        peer.close()
    assert files_in(env.server_received) == ["good.jpg"]


@pytest.mark.parametrize("broken", ["short", "too long", "end without offer", "reused id"])
def test_a_stream_that_breaks_the_protocol_ends_the_connection_and_leaves_nothing(
        env: Env, tmp_path, broken: str):
    srv = env.server()
    jpeg = make_jpeg(tmp_path / "p.jpg", (60, 40), noise=True).read_bytes()
    peer = CraftedPeer(srv.port)
    try:
        if broken == "end without offer":
            peer.send(FileEnd(1, bytes(32)))
            expected = "file end without an accepted offer"
        else:
            assert isinstance(peer.offer("p.jpg", len(jpeg)), FileAccept)
            if broken == "short":
                peer.stream(jpeg[:-1])
                peer.send(FileEnd(peer.op, hashlib.sha256(jpeg[:-1]).digest()))
                expected = f"file ended after {len(jpeg) - 1} of {len(jpeg)} announced bytes"
            elif broken == "too long":
                peer.stream(jpeg + b"\x00")
                expected = "file data beyond the announced size"
            else:
                peer.stream(jpeg[:100])
                peer.send_raw(MsgType.FILE_OFFER, struct.pack(">IQ", peer.op, 10) + b"q.jpg")
                expected = f"FileOffer reuses operation id {peer.op}"
        assert peer.recv() == Error(f"protocol error: {expected}")
        peer.expect_closed()
    finally:
        peer.close()
    srv.wait_for(rf"\] connection closed: protocol error: {re.escape(expected)}$")
    assert files_in(env.server_received) == []


# --- transfers cut by a relay -------------------------------------------------------------------
def record(payload: int) -> int:
    """Bytes on the wire of one record carrying `payload` bytes."""
    return 4 + IV_SIZE + 1 + payload + MAC_SIZE


HANDSHAKE_UP = 4 + ClientHello.SIZE + 4 + ClientAuth.SIZE  # client -> server
HANDSHAKE_DOWN = 4 + ServerHello.SIZE + record(0)  # server -> client, Welcome included
CUT_NAME = "cut.jpg"
CUT_SIZE = 2 * CHUNK_SIZE + 1000
OFFER = record(4 + 8 + len(CUT_NAME))  # op id, size, name
DATA = record(4 + CHUNK_SIZE) * 2 + record(4 + 1000)
CUTS = {
    "in the handshake": HANDSHAKE_UP - 50,
    "in the offer": HANDSHAKE_UP + OFFER - 10,
    "after the offer": HANDSHAKE_UP + OFFER,
    "in the first chunk": HANDSHAKE_UP + OFFER + record(4 + CHUNK_SIZE) // 2,
    "between chunks": HANDSHAKE_UP + OFFER + record(4 + CHUNK_SIZE),
    "in the last chunk": HANDSHAKE_UP + OFFER + 2 * record(4 + CHUNK_SIZE) + 500,
    "before the end message": HANDSHAKE_UP + OFFER + DATA,
    "in the end message": HANDSHAKE_UP + OFFER + DATA + record(4 + 32) - 1,
}


@pytest.mark.parametrize("where", list(CUTS))
def test_a_cut_transfer_leaves_nothing_and_the_server_serves_the_next_client(env: Env,
                                                                              where: str):
    photo = jpeg_of_size(env.assets / CUT_NAME, CUT_SIZE)
    srv = env.server()
    relay = Relay(srv.port, cut_after=CUTS[where])
    r = send(env, relay.port, "--send-file", str(photo))
    relay.join()
    assert relay.up == CUTS[where]  # the cut happened exactly there
    if where == "in the handshake":
        assert r.returncode == 3, r.stderr
        assert f"error: handshake with 127.0.0.1:{relay.port} failed" in r.stderr
    else:
        assert r.returncode == EXIT_UNDELIVERED, (r.stdout, r.stderr)
        assert r.stderr.strip().splitlines()[-1].startswith("error: file not delivered: ")
        assert "sent '" not in r.stdout
    assert "Traceback" not in r.stderr
    srv.wait_for(CLOSED)
    # the offsets mean what they say: the server saw the whole offer only from there on
    offered = f"] receiving '{CUT_NAME}' " in srv.output()
    assert offered == (CUTS[where] >= HANDSHAKE_UP + OFFER)
    assert files_in(env.server_received) == []  # no file, no temporary file

    # the server serves the next client, and the name is free
    r = send(env, srv.port, "--send-file", str(photo))
    assert r.returncode == 0, r.stderr
    assert_received(env, srv, r, photo, CUT_NAME)
    assert srv.stop() == 0
    assert files_in(env.server_received) == [CUT_NAME]


# --- a receiver whose disk fills up ---------------------------------------------------------
TINY_DISK = 4 << 20


@pytest.fixture
def tiny_disk(env: Env, tmp_path: Path):
    """A 4 MiB tmpfs to receive into: a real disk that really fills up (ENOSPC)."""
    d = tmp_path / "tiny-disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TINY_DISK},mode=0755",
                        "qsocket-test", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("a full disk needs a small tmpfs, and mounting one failed: "
                    f"{(r.stderr or r.stdout).strip() or r.returncode}")
    try:
        yield d
    finally:
        for srv in env._servers:  # nothing may hold the mount when it goes
            srv.stop()
        subprocess.run(["umount", str(d)], check=True)


def fill(directory: Path) -> Path:
    """Use up every free block of the file system that holds `directory`."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    block = bytes(4096)
    try:
        while True:
            os.write(fd, block)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_is_reported_to_the_sender_and_leaves_nothing(env: Env, tiny_disk: Path):
    srv = Server(env.server_home, tiny_disk)
    env._servers.append(srv)
    photo = jpeg_of_size(env.assets / "disk.jpg", CHUNK_SIZE + CHUNK_SIZE // 2)

    # larger than the free space: refused at the offer
    huge = jpeg_of_size(env.assets / "huge.jpg", TINY_DISK + 1)
    r = send(env, srv.port, "--send-file", str(huge))
    assert r.returncode == EXIT_UNDELIVERED
    assert r.stderr.strip().splitlines()[-1] == (
        "error: file not delivered: rejected by peer: not enough disk space on the receiver")
    assert files_in(tiny_disk) == []

    # room at the offer, but the disk fills up before the data arrives: the relay holds
    # the server's FileAccept until the disk is full, so the server's write fails
    relay = Relay(srv.port, hold_after=HANDSHAKE_DOWN)
    client = Proc([PY, "client.py", "--home", str(env.client_home),
                   "--received-dir", str(env.client_received), "--port", str(relay.port),
                   "--accept-new-host", "--send-file", str(photo)], env=child_env())
    try:
        srv.wait_for(r"\] receiving 'disk.jpg' ")
        # accepted: the temporary file is open, unnamed (O_TMPFILE), so nothing shows
        assert files_in(tiny_disk) == []
        assert any(os.readlink(f"/proc/{srv.p.pid}/fd/{fd}").startswith(f"{tiny_disk}/")
                   for fd in os.listdir(f"/proc/{srv.p.pid}/fd"))
        filler = fill(tiny_disk)
        relay.release()
        assert client.p.wait(LINE_TIMEOUT) == EXIT_UNDELIVERED
    finally:
        relay.release()
        client.stop()
    client.wait_for(r"^error: file not delivered: peer could not save it: "
                    r"not enough disk space on the receiver$")
    srv.wait_for(r"\] file 'disk.jpg' not saved: not enough disk space on the receiver$")
    assert files_in(tiny_disk) == ["filler"]  # the temporary file is gone
    relay.join()

    # with room again, the server takes the same file from the next client
    filler.unlink()
    r = send(env, srv.port, "--send-file", str(photo))
    assert r.returncode == 0, r.stderr
    assert sha256(tiny_disk / "disk.jpg") == sha256(photo)
    assert files_in(tiny_disk) == ["disk.jpg"]


class FillDiskWhenStreaming(session.Events):
    """Fills the receiver's disk at the moment the peer has accepted the offer and the
    first chunk is about to go (Connection asks for its progress bar right then)."""

    def __init__(self, disk: Path) -> None:
        self.disk = disk
        self.fill_next = False
        self.lines: list[str] = []

    def out(self, line: str) -> None:
        self.lines.append(line)

    def progress(self, total: int, desc: str):
        if self.fill_next:
            self.fill_next = False
            fill(self.disk)
        return _NoBar()


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_full_disk_mid_write_fails_cleanly_and_the_same_session_goes_on(env: Env,
                                                                           tiny_disk: Path):
    srv = Server(env.server_home, tiny_disk)
    env._servers.append(srv)
    photo = jpeg_of_size(env.assets / "disk.jpg", 2 * CHUNK_SIZE + 12345)  # several chunks
    peer = CraftedPeer(srv.port)
    peer.sock.settimeout(None)  # the Connection's reader waits as long as the session lasts
    events = FillDiskWhenStreaming(tiny_disk)
    conn = session.Connection(peer.sock, (peer.sender, peer.receiver), label="server",
                              events=events, received_dir=str(env.client_received)).start()
    try:
        events.fill_next = True
        with pytest.raises(transfer.Rejected) as e:
            conn.send_file(str(photo))
        assert e.value.reason == Reason.NO_SPACE
        assert e.value.detail == "peer could not save it: not enough disk space on the receiver"
        assert files_in(tiny_disk) == ["filler"]  # the temporary file is gone
        srv.wait_for(r"\] file 'disk.jpg' not saved: not enough disk space on the receiver$")

        # the same session goes on: a text, then (with room again) the same file
        conn.send_text("still connected")
        srv.wait_for(r"\] still connected$")
        (tiny_disk / "filler").unlink()
        result = conn.send_file(str(photo))
        assert result.name == "disk.jpg"
        assert result.sha256.hex() == sha256(photo) == sha256(tiny_disk / "disk.jpg")
        assert files_in(tiny_disk) == ["disk.jpg"]
        assert not conn.closed.is_set()
    finally:
        conn.close()
