"""SocketWriter: a record goes out from the caller's thread only while nothing is
queued for the writer thread, so records leave in the order they were put, also
when the socket is full; after end() nothing more goes out."""

import socket

import pytest

from session import DIRECT_MAX, Close, SocketWriter


def _pair():
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # fills after a few KiB
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return a, b


def _read(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, "peer closed early"
        out += chunk
    return bytes(out)


def _writer(sock):
    failures: list[Close] = []
    w = SocketWriter(sock, "writer test", 30.0, failures.append)
    w.thread.start()
    return w, failures


def test_records_keep_their_order_when_the_socket_fills_up():
    a, b = _pair()
    w, failures = _writer(a)
    sent = []
    records = [bytes([i]) * size for i, size in enumerate((100, 300_000, 50, 200_000, 10, 7))]
    try:
        for i, record in enumerate(records):  # the second one cannot go out at once
            w.put([record[:3], record[3:]], on_sent=lambda i=i: sent.append(i))
        got = _read(b, sum(map(len, records)))
    finally:
        w.end()
        w.thread.join(10)
    assert got == b"".join(records)  # whole, in order, nothing joined across records
    assert sorted(sent) == list(range(len(records)))
    assert not failures
    a.close()
    b.close()


class _Held:
    """Stands in for the writer thread until release(): it counts as running but
    sends nothing yet (the moment a record waits in its queue, or the end does)."""

    def __init__(self, w: SocketWriter) -> None:
        self._w, self._real = w, w.thread
        w.thread = self

    def is_alive(self) -> bool:
        return True

    def release(self) -> None:
        self._w.thread = self._real
        self._real.start()


@pytest.fixture
def held():
    """A writer whose thread is held (see _Held), its socket's far end, and at the
    end the writer stopped and both ends closed."""
    a, b = _pair()
    w = SocketWriter(a, "writer test", 30.0, lambda close: None)
    gate = _Held(w)
    yield w, gate, b
    w.end()
    if w.thread is gate:
        gate.release()
    w.thread.join(10)
    a.close()
    b.close()


def _available(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    out = bytearray()
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except BlockingIOError:
        pass
    sock.setblocking(True)
    return bytes(out)


def test_a_record_put_while_one_waits_for_the_writer_goes_behind_it(held):
    w, gate, b = held
    big, small = b"B" * DIRECT_MAX, b"s" * 10  # big: as large as goes at once
    w.put([big])  # what the socket takes goes at once, the rest waits for the thread
    head = _available(b)  # room again, but the rest of big is still queued
    assert 0 < len(head) < len(big)
    w.put([small])  # must not overtake the rest of big
    assert _available(b) == b""
    gate.release()
    got = head + _read(b, len(big) - len(head) + len(small))
    assert got == big + small


def test_a_large_record_always_goes_to_the_writer_thread(held):
    w, gate, b = held
    large = b"L" * (DIRECT_MAX + 1)  # its caller prepares the next one meanwhile
    w.put([large])
    assert _available(b) == b""
    gate.release()
    assert _read(b, len(large)) == large


def test_nothing_goes_out_after_end(held):
    w, gate, b = held
    w.put([b"first"])
    assert _read(b, 5) == b"first"
    w.end()  # the thread has not taken the end from its queue yet
    w.put([b"late"])  # queued behind the end: never sent
    assert _available(b) == b""
    gate.release()
    w.thread.join(10)
    assert b.recv(100) == b""  # the writer shut the send side down, "late" unsent
