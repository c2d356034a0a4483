"""FrameReader: the session's frames through one reused buffer, read ahead, split
or joined by the transport anyhow, always handed out whole and in order."""

import random
import socket
import threading

import pytest

from protocol import FRAME_HEADER, MAX_FRAME, RemoteProtocolError
from session import READ_AHEAD, ConnectionLost, FrameReader, PeerClosed


def frame(body: bytes) -> bytes:
    return FRAME_HEADER.pack(len(body)) + body


def bodies(seed: int, large: bool = True) -> list[bytes]:
    """Small frames, frames around READ_AHEAD, and (large) frames of the largest sizes."""
    rng = random.Random(seed)
    sizes = [1, 7, 40, 300, READ_AHEAD - 4, READ_AHEAD, READ_AHEAD + 1, 5000, 33, 12, 60, 2, 3]
    if large:
        sizes += [MAX_FRAME, MAX_FRAME - 1, 1 << 20]
    sizes += [rng.randrange(1, 3000) for _ in range(200)]
    rng.shuffle(sizes)
    return [rng.randbytes(n) for n in sizes]


def feed(sock: socket.socket, data: bytes, pieces) -> None:
    """Send data cut at the given sizes (cycled), then close the send side."""
    def run():
        i = k = 0
        while i < len(data):
            n = pieces[k % len(pieces)]
            sock.sendall(data[i : i + n])
            i, k = i + n, k + 1
        sock.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("pieces", [[1], [3, 1, 7], [4096], [1 << 20], [10_000_000],
                                    [5, 70_000, 2, 1_100_000]],
                         ids=["bytewise", "odd", "page", "mebibyte", "all-at-once", "mixed"])
def test_frames_come_out_whole_and_in_order_however_the_stream_is_cut(pieces):
    sent = bodies(len(pieces), large=max(pieces) >= 4096)  # cut small: seconds less
    a, b = socket.socketpair()
    t = feed(a, b"".join(map(frame, sent)), pieces)
    reader = FrameReader(b)
    got = [bytes(reader.next()) for _ in sent]
    with pytest.raises(PeerClosed):  # EOF between frames: the peer hung up
        reader.next()
    t.join(10)
    assert got == sent
    a.close()
    b.close()


def test_the_end_of_the_stream_inside_a_frame_is_a_lost_connection():
    for cut in (2, FRAME_HEADER.size + 5):  # in the header, in the body
        a, b = socket.socketpair()
        a.sendall(frame(b"whole") + frame(b"x" * 100)[:cut])
        a.shutdown(socket.SHUT_WR)
        reader = FrameReader(b)
        assert bytes(reader.next()) == b"whole"
        with pytest.raises(ConnectionLost, match="in the middle of a frame"):
            reader.next()
        a.close()
        b.close()


@pytest.mark.parametrize("length", [0, MAX_FRAME + 1])
def test_a_frame_length_out_of_bounds_is_refused_before_its_body_is_read(length):
    a, b = socket.socketpair()
    a.sendall(FRAME_HEADER.pack(length))
    with pytest.raises(RemoteProtocolError, match="frame length"):
        FrameReader(b).next()
    a.close()
    b.close()


class _Arrived:
    """A socket whose peer's bytes have all arrived: recv_into takes what fits."""

    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def recv_into(self, view) -> int:
        n = min(len(view), len(self._data) - self._pos)
        view[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


@pytest.mark.parametrize("cut", [1, 2, 3, 4])
def test_a_header_cut_by_the_end_of_the_buffer_is_read_whole(cut):
    """A reader behind its peer fills the buffer to its end: the next header's first
    `cut` bytes end up there, the rest comes with the next recv."""
    size = FRAME_HEADER.size + MAX_FRAME + READ_AHEAD  # the reader's buffer
    sizes = [1000] * ((size - cut) // 1004 - 1)
    sizes.append(size - cut - 1004 * len(sizes) - FRAME_HEADER.size)  # next header at size - cut
    sizes += [50] * 3
    reader = FrameReader(_Arrived(b"".join(frame(bytes([len(sizes) % 251]) * n) for n in sizes)))
    assert [len(reader.next()) for _ in sizes] == sizes
