"""The session core in memory: two sans-I/O cores wired together, every ordering rule
of PROTOCOL.md section 11 and each close kind, no socket and no thread."""

from __future__ import annotations

import pytest
from conftest import handshake_pair

import crypt
import session_core
from protocol import (
    FRAME_HEADER,
    WINDOW_BYTES,
    WINDOW_FILES,
    AuthError,
    Bye,
    Delivered,
    Error,
    FileAccept,
    FileCancel,
    FileData,
    FileEnd,
    FileFailed,
    FileOffer,
    FileReject,
    FileSaved,
    LocalProtocolError,
    Reason,
    Refused,
    RemoteProtocolError,
    Text,
    Welcome,
)
from session_core import (
    CloseKind,
    FileCancelled,
    FileChunk,
    FileDiscarded,
    FileEnded,
    FileOffered,
    ReplyReceived,
    SessionCore,
    SessionEnded,
    Side,
    State,
    TextReceived,
    WasRefused,
    Welcomed,
)

NOW = 1000.0
LIMIT = 8  # records per key epoch, small enough to see KeyUpdates


class Wire:
    """Two cores, each record sealed by one and opened by the other in memory."""

    def __init__(self, *, opened: bool = True, limit: int = crypt.KEY_UPDATE_RECORDS) -> None:
        pair = handshake_pair()
        self.client = SessionCore(crypt.record_pair(pair.client.keys, crypt.Role.CLIENT, limit),
                                  client=True, opened=opened)
        self.server = SessionCore(crypt.record_pair(pair.server.keys, crypt.Role.SERVER, limit),
                                  client=False, opened=opened)
        self.client.start_clock(NOW)
        self.server.start_clock(NOW)
        self.records = 0

    def send(self, sender: SessionCore, msg, now: float = NOW) -> list:
        """sender seals msg, the other core opens and receives it: the events."""
        receiver = self.server if sender is self.client else self.client
        events = []
        for pieces in sender.seal(msg, now):
            self.records += 1
            events += receiver.receive(receiver.open_record(body(pieces)))
        return events

    def forge(self, sender: SessionCore, msg) -> list:
        """A peer that breaks the rules: msg sealed by the bare record layer, past
        the sending core's own checks, and received by the other core."""
        receiver = self.server if sender is self.client else self.client
        record = sender._sender.seal(msg.TYPE, msg.encode())
        return receiver.receive(receiver.open_record(body(record)))


def body(pieces: list) -> bytes:
    """A sealed record's frame body (what follows its length header)."""
    frame = b"".join(bytes(memoryview(p).cast("B")) for p in pieces)
    assert len(frame) == FRAME_HEADER.size + FRAME_HEADER.unpack_from(frame)[0]
    return frame[FRAME_HEADER.size:]


@pytest.fixture
def wire() -> Wire:
    return Wire()


def offer_accepted(wire: Wire, size: int = 10, op: int = 1, name: str = "a.jpg") -> None:
    assert wire.send(wire.client, FileOffer(op, size, name)) == [FileOffered(op, name, size)]
    reply = wire.send(wire.server, FileAccept(op))
    assert reply == [ReplyReceived(FileAccept(op))]
    wire.client.check_reply(reply[0].msg)


# --- the first record -------------------------------------------------------------------
def test_welcome_opens_the_session_on_both_sides():
    wire = Wire(opened=False)
    with pytest.raises(LocalProtocolError, match="before Welcome or Refused"):
        wire.server.seal(Text(1, "hi"), NOW)
    assert wire.server.state is State.FAILED  # a misuse of our own fails the core too
    wire2 = Wire(opened=False)
    with pytest.raises(LocalProtocolError, match="before the server's Welcome"):
        wire2.client.seal(Text(1, "hi"), NOW)
    wire2.client.state = State.AWAIT_FIRST
    assert wire2.send(wire2.server, Welcome()) == [Welcomed()]
    assert wire2.client.state is State.OPEN
    assert wire2.send(wire2.client, Text(1, "hi")) == [TextReceived(1, "hi")]


def test_refused_closes_the_session_and_nothing_may_follow():
    wire = Wire(opened=False)
    refused = Refused(Reason.BUSY, "full")
    assert wire.send(wire.server, refused) == [WasRefused(Reason.BUSY, "full")]
    assert wire.client.state is State.CLOSED
    with pytest.raises(LocalProtocolError, match="after the session closed"):
        wire.server.seal(Text(1, "x"), NOW)


def test_a_first_record_that_is_no_welcome_is_a_protocol_error():
    wire = Wire(opened=False)
    wire.server._first_sent = True  # a server that skips its Welcome
    with pytest.raises(RemoteProtocolError, match="Text instead of Welcome or Refused"):
        wire.send(wire.server, Text(1, "x"))
    assert wire.client.state is State.FAILED


# --- texts and replies ----------------------------------------------------------------------
def test_text_and_delivered(wire: Wire):
    msg_id = wire.client.text_id()
    assert wire.send(wire.client, Text(msg_id, "hello")) == [TextReceived(1, "hello")]
    [reply] = wire.send(wire.server, Delivered(msg_id))
    assert wire.client.check_reply(reply.msg, msg_id=msg_id) == Delivered(1)
    assert wire.client.texts == set()


def test_delivered_for_another_text_is_the_peers_error(wire: Wire):
    wire.send(wire.client, Text(1, "hello"))
    [reply] = wire.send(wire.server, Delivered(7))
    with pytest.raises(RemoteProtocolError, match=r"expected Delivered\(1\), got"):
        wire.client.check_reply(reply.msg, msg_id=1)


@pytest.mark.parametrize("reply", [Delivered(1), FileAccept(1),
                                   FileReject(1, Reason.TOO_LARGE, ""),
                                   FileSaved(1, b"\0" * 32, "a.jpg"),
                                   FileFailed(1, Reason.NO_SPACE, "")])
def test_a_reply_nobody_waits_for_fails_the_session(wire: Wire, reply):
    with pytest.raises(RemoteProtocolError, match="nothing is waiting for a reply"):
        wire.forge(wire.server, reply)
    assert wire.client.state is State.FAILED


def test_a_reply_of_the_wrong_kind_fails_the_waiting_operation(wire: Wire):
    wire.send(wire.client, FileOffer(1, 10, "a.jpg"))
    [reply] = wire.forge(wire.server, FileSaved(1, b"\0" * 32, "a.jpg"))  # waiting, not for this
    with pytest.raises(RemoteProtocolError, match="expected FileAccept, got FileSaved"):
        wire.client.check_reply(reply.msg)


# --- files ----------------------------------------------------------------------------------
def test_a_whole_transfer(wire: Wire):
    offer_accepted(wire, 10)
    assert wire.server.receiving(1) == ("a.jpg", 0)
    [chunk] = wire.send(wire.client, FileData(1, b"\xff\xd8\xff" + b"x" * 7))
    assert isinstance(chunk, FileChunk) and bytes(chunk.data) == b"\xff\xd8\xff" + b"x" * 7
    assert wire.server.receiving(1) == ("a.jpg", 10)
    assert wire.send(wire.client, FileEnd(1, b"h" * 32)) == [FileEnded(1, b"h" * 32)]
    [reply] = wire.send(wire.server, FileSaved(1, b"h" * 32, "a.jpg"))
    assert wire.client.check_reply(reply.msg) == FileSaved(1, b"h" * 32, "a.jpg")
    assert wire.client.outbound == {} and wire.server.inbound == {}
    offer_accepted(wire, 3, op=2)  # the next operation


def test_an_offer_reusing_an_id_is_a_protocol_error(wire: Wire):
    offer_accepted(wire)
    with pytest.raises(RemoteProtocolError, match="FileOffer reuses operation id 1"):
        wire.forge(wire.client, FileOffer(1, 5, "b.jpg"))


def test_our_own_reused_id_is_refused_before_it_leaves(wire: Wire):
    offer_accepted(wire)
    with pytest.raises(LocalProtocolError, match="FileOffer reuses operation id 1"):
        wire.client.seal(FileOffer(1, 5, "b.jpg"), NOW)


def test_an_offer_the_other_way_may_interleave(wire: Wire):
    offer_accepted(wire)
    assert wire.send(wire.server, FileOffer(1, 5, "b.jpg")) == [FileOffered(1, "b.jpg", 5)]
    assert wire.send(wire.server, Text(1, "meanwhile")) == [TextReceived(1, "meanwhile")]


@pytest.mark.parametrize("msg, what", [(FileData(1, b"x"), "file data"),
                                       (FileEnd(1, b"h" * 32), "file end")])
def test_data_or_end_with_no_offer_is_a_protocol_error(wire: Wire, msg, what):
    with pytest.raises(RemoteProtocolError, match=f"{what} without an accepted offer"):
        wire.forge(wire.client, msg)


def test_file_data_before_file_accept_is_a_protocol_error(wire: Wire):
    """PROTOCOL.md 11.2: the sender MUST NOT send FileData before FileAccept."""
    wire.send(wire.client, FileOffer(1, 10, "a.jpg"))
    with pytest.raises(RemoteProtocolError, match="file data without an accepted offer"):
        wire.forge(wire.client, FileData(1, b"x"))  # a peer that does not wait
    ours = Wire()
    ours.send(ours.client, FileOffer(1, 10, "a.jpg"))
    with pytest.raises(LocalProtocolError, match="FileData without an accepted offer"):
        ours.client.seal(FileData(1, b"x"), NOW)  # our own side refuses to


def test_file_data_after_file_reject_is_a_protocol_error(wire: Wire):
    wire.send(wire.client, FileOffer(1, 10, "a.jpg"))
    [reply] = wire.send(wire.server, FileReject(1, Reason.TOO_LARGE, "too big"))
    wire.client.check_reply(reply.msg)
    assert wire.client.outbound == {} and wire.server.inbound == {}
    with pytest.raises(RemoteProtocolError, match="file data without an accepted offer"):
        wire.forge(wire.client, FileData(1, b"x"))


def test_data_past_the_announced_size_is_a_protocol_error(wire: Wire):
    offer_accepted(wire, 4)
    wire.send(wire.client, FileData(1, b"abc"))
    with pytest.raises(RemoteProtocolError, match="file data beyond the announced size"):
        wire.send(wire.client, FileData(1, b"de"))
    assert wire.server.state is State.FAILED
    with pytest.raises(LocalProtocolError, match="already failed"):
        wire.server.receive(Text(1, "x"))


def test_failed_during_the_data_drains_until_the_end(wire: Wire):
    offer_accepted(wire, 10)
    wire.send(wire.client, FileData(1, b"abc"))
    [early] = wire.send(wire.server, FileFailed(1, Reason.NOT_JPEG, "not a JPEG"))
    assert wire.client.check_reply(early.msg) == FileFailed(1, Reason.NOT_JPEG, "not a JPEG")
    assert wire.server.receiving(1) is None  # draining: no file to report as aborted
    assert wire.send(wire.client, FileData(1, b"def")) == [FileDiscarded(1)]
    assert wire.send(wire.client, FileCancel(1, Reason.CANCELLED, "receiver failed")) == \
        [FileCancelled(1, "", "receiver failed")]
    assert wire.client.outbound == {} and wire.server.inbound == {}


def test_draining_also_ends_with_file_end_and_no_reply(wire: Wire):
    offer_accepted(wire, 6)
    wire.send(wire.client, FileData(1, b"abc"))
    wire.send(wire.server, FileFailed(1, Reason.NO_SPACE, "full"))
    wire.send(wire.client, FileData(1, b"def"))
    assert wire.send(wire.client, FileEnd(1, b"h" * 32)) == []
    assert wire.server.inbound == {}


def test_file_failed_after_the_end_is_the_answer(wire: Wire):
    offer_accepted(wire, 3)
    wire.send(wire.client, FileData(1, b"abc"))
    wire.send(wire.client, FileEnd(1, b"h" * 32))
    [reply] = wire.send(wire.server, FileFailed(1, Reason.HASH_MISMATCH, "differs"))
    wire.client.check_reply(reply.msg)
    assert wire.client.outbound == {} and wire.server.inbound == {}


def test_file_cancel_during_the_data(wire: Wire):
    offer_accepted(wire, 10)
    wire.send(wire.client, FileData(1, b"abc"))
    assert wire.send(wire.client, FileCancel(1, Reason.CANCELLED, "file shrank")) == \
        [FileCancelled(1, "a.jpg", "file shrank")]
    assert wire.server.inbound == {}


def in_flight(sender: SessionCore, msg) -> list:
    """msg sealed and on its way: its records, to be opened later (a crossing)."""
    return [body(pieces) for pieces in sender.seal(msg, NOW)]


def arrive(receiver: SessionCore, records: list) -> list:
    return [e for record in records for e in receiver.receive(receiver.open_record(record))]


@pytest.mark.parametrize("data", [b"", b"abc"], ids=["before-any-data", "during-the-data"])
def test_a_file_failed_that_crosses_our_cancel_is_ignored(wire: Wire, data: bytes):
    """PROTOCOL.md 11.2: the receiver fails the file while our FileCancel is on its way;
    its FileFailed then ends nothing and is dropped, once, and the session goes on."""
    offer_accepted(wire, 10)
    if data:
        wire.send(wire.client, FileData(1, data))
    failed = in_flight(wire.server, FileFailed(1, Reason.NO_SPACE, "full"))
    # the receiver was draining: the cancel ends it without a second line or a reply
    assert wire.send(wire.client, FileCancel(1, Reason.CANCELLED, "unreadable")) == \
        [FileCancelled(1, "", "unreadable")]
    assert wire.server.inbound == {}
    assert arrive(wire.client, failed) == []
    assert wire.client.state is State.OPEN and wire.client.outbound == {}
    offer_accepted(wire, 3, op=2, name="b.jpg")  # the next file goes as usual
    assert stream(wire, 2, jpeg(3))[-1] == FileEnded(2, b"h" * 32)
    [reply] = wire.send(wire.server, FileSaved(2, b"h" * 32, "b.jpg"))
    assert wire.client.check_reply(reply.msg) == FileSaved(2, b"h" * 32, "b.jpg")
    with pytest.raises(RemoteProtocolError, match="unexpected FileFailed: nothing is waiting"):
        wire.forge(wire.server, FileFailed(1, Reason.NO_SPACE, "again"))  # once only


def test_a_crossing_file_failed_is_dropped_once_only(wire: Wire):
    offer_accepted(wire, 10)
    wire.send(wire.client, FileData(1, b"abc"))
    failed = in_flight(wire.server, FileFailed(1, Reason.NO_SPACE, "full"))
    wire.send(wire.client, FileCancel(1, Reason.CANCELLED, "unreadable"))
    assert arrive(wire.client, failed) == []
    with pytest.raises(RemoteProtocolError, match="unexpected FileFailed: nothing is waiting"):
        wire.forge(wire.server, FileFailed(1, Reason.NO_SPACE, "again"))


def test_a_file_failed_read_before_our_cancel_but_checked_after_it_is_no_answer(wire: Wire):
    # the reader queued the FileFailed; the sender, not having looked, cancels (a read
    # error): the queued FileFailed is then dropped when it is checked, not an error
    offer_accepted(wire, 10)
    offer_accepted(wire, 3, op=2, name="b.jpg")
    wire.send(wire.client, FileData(1, b"abc"))
    [queued] = wire.send(wire.server, FileFailed(1, Reason.NOT_JPEG, "not a JPEG"))
    wire.send(wire.client, FileCancel(1, Reason.CANCELLED, "unreadable"))
    assert wire.client.check_reply(queued.msg) is None
    stream(wire, 2, jpeg(3))
    [reply] = wire.send(wire.server, FileSaved(2, b"h" * 32, "b.jpg"))
    assert wire.client.check_reply(reply.msg) == FileSaved(2, b"h" * 32, "b.jpg")
    assert wire.client.outbound == {}


def test_a_queued_crossing_file_failed_does_not_answer_our_next_text(wire: Wire):
    offer_accepted(wire, 10)
    wire.send(wire.client, FileData(1, b"abc"))
    [queued] = wire.send(wire.server, FileFailed(1, Reason.NOT_JPEG, "not a JPEG"))
    wire.send(wire.client, FileCancel(1, Reason.CANCELLED, "unreadable"))
    wire.client.operation_over()
    wire.send(wire.client, Text(1, "after"))
    assert wire.client.check_reply(queued.msg, msg_id=1) is None
    [delivered] = wire.send(wire.server, Delivered(1))
    assert wire.client.check_reply(delivered.msg, msg_id=1) == Delivered(1)


@pytest.mark.parametrize("ended", [False, True], ids=["before-its-data", "after-our-end"])
def test_a_later_transfer_failed_early_does_not_forget_a_crossing(wire: Wire, ended: bool):
    # the receiver may fail file 2 at once, before it reads our cancel of file 1 (and our
    # end of file 2): that says nothing about whether its FileFailed of file 1 is still
    # on its way; only a FileSaved says it read that end
    offer_accepted(wire, 10)
    offer_accepted(wire, 3, op=2, name="b.jpg")
    wire.send(wire.client, FileData(1, b"abc"))
    failed_2 = in_flight(wire.server, FileFailed(2, Reason.NO_SPACE, "full"))
    failed_1 = in_flight(wire.server, FileFailed(1, Reason.NO_SPACE, "full"))
    wire.send(wire.client, FileCancel(1, Reason.CANCELLED, "unreadable"))
    if ended:
        stream(wire, 2, jpeg(3))  # our FileEnd(2) goes out: file 2 waits for its answer
    [reply] = arrive(wire.client, failed_2)
    wire.client.check_reply(reply.msg)
    assert arrive(wire.client, failed_1) == []
    assert wire.client.state is State.OPEN


def test_an_answered_earlier_stream_does_not_forget_a_later_crossing(wire: Wire):
    # file 3 is cancelled while the FileSaved of files 1 and 2 are on their way: those
    # answers say the receiver read their ends, not file 3's cancel
    for op in (1, 2, 3):
        offer_accepted(wire, 3, op=op, name=f"{op}.jpg")
    stream(wire, 1, jpeg(3))
    stream(wire, 2, jpeg(3))
    wire.send(wire.client, FileData(3, b"\xff\xd8"))
    on_the_way = [in_flight(wire.server, FileSaved(op, b"h" * 32, f"{op}.jpg")) for op in (1, 2)]
    failed_3 = in_flight(wire.server, FileFailed(3, Reason.NO_SPACE, "full"))
    wire.send(wire.client, FileCancel(3, Reason.CANCELLED, "unreadable"))
    for records in on_the_way:
        [reply] = arrive(wire.client, records)
        wire.client.check_reply(reply.msg)
    assert arrive(wire.client, failed_3) == []
    assert wire.client.state is State.OPEN


def test_a_file_failed_for_a_transfer_cancelled_after_its_failure_is_the_peers_error(
        wire: Wire):
    # the cancel answered the FileFailed that came: a second one crosses nothing
    offer_accepted(wire, 10)
    wire.send(wire.client, FileData(1, b"abc"))
    [early] = wire.send(wire.server, FileFailed(1, Reason.NOT_JPEG, "not a JPEG"))
    wire.client.check_reply(early.msg)
    wire.send(wire.client, FileCancel(1, Reason.CANCELLED, "receiver failed"))
    with pytest.raises(RemoteProtocolError, match="unexpected FileFailed: nothing is waiting"):
        wire.forge(wire.server, FileFailed(1, Reason.NOT_JPEG, "again"))


def test_a_cancelled_transfer_is_forgotten_once_a_later_stream_is_answered(wire: Wire):
    # the receiver answered file 2's stream, so it read our FileCancel of file 1 before:
    # a FileFailed for 1 now can have crossed nothing
    offer_accepted(wire, 10)
    offer_accepted(wire, 3, op=2, name="b.jpg")
    wire.send(wire.client, FileCancel(1, Reason.CANCELLED, "unreadable"))
    stream(wire, 2, jpeg(3))
    offer_accepted(wire, 3, op=3, name="c.jpg")  # so that a reply is awaited
    [reply] = wire.send(wire.server, FileSaved(2, b"h" * 32, "b.jpg"))
    wire.client.check_reply(reply.msg)
    [late] = wire.forge(wire.server, FileFailed(1, Reason.NO_SPACE, "late"))
    with pytest.raises(RemoteProtocolError, match="no file operation 1 is waiting"):
        wire.client.check_reply(late.msg)


def test_file_cancel_without_a_transfer_is_a_protocol_error(wire: Wire):
    with pytest.raises(RemoteProtocolError, match="FileCancel without a transfer"):
        wire.forge(wire.client, FileCancel(1, Reason.CANCELLED, "x"))


def test_the_receiver_cannot_answer_what_it_was_not_asked(wire: Wire):
    with pytest.raises(LocalProtocolError, match="FileAccept without an offer to answer"):
        wire.server.seal(FileAccept(1), NOW)
    other = Wire()
    offer_accepted(other, 3)
    with pytest.raises(LocalProtocolError, match="FileSaved before the file ended"):
        other.server.seal(FileSaved(1, b"h" * 32, "a.jpg"), NOW)


# --- several files in flight (the window) -----------------------------------------------------
def jpeg(n: int) -> bytes:
    return b"\xff\xd8\xff" + b"x" * (n - 3)


def stream(wire: Wire, op: int, data: bytes) -> list:
    events = wire.send(wire.client, FileData(op, data))
    return events + wire.send(wire.client, FileEnd(op, b"h" * 32))


def test_the_window_is_never_exceeded_and_frees_as_files_are_saved(wire: Wire):
    files = WINDOW_FILES
    for op in range(1, files + 1):
        assert wire.client.offer_fits(10)
        wire.send(wire.client, FileOffer(op, 10, f"{op}.jpg"))
    assert len(wire.server.inbound) == files
    assert not wire.client.offer_fits(10)  # full: the sender holds the next offer
    with pytest.raises(LocalProtocolError, match="FileOffer beyond the window"):
        wire.client.seal(FileOffer(files + 1, 10, "x.jpg"), NOW)
    other = Wire()
    for op in range(1, files + 1):
        other.send(other.client, FileOffer(op, 10, f"{op}.jpg"))
    [reply] = other.send(other.server, FileReject(1, Reason.TOO_LARGE, "no"))
    other.client.check_reply(reply.msg)
    assert other.client.offer_fits(10)  # one answered: one more may go
    other.send(other.client, FileOffer(files + 1, 10, "next.jpg"))
    assert not other.client.offer_fits(10)


def test_the_byte_window_bounds_the_announced_sizes_but_one_file_always_fits():
    wire = Wire()
    big = WINDOW_BYTES + 1
    assert wire.client.offer_fits(big)  # alone, any size
    wire.send(wire.client, FileOffer(1, big, "huge.jpg"))
    assert not wire.client.offer_fits(1)
    small = Wire()
    small.send(small.client, FileOffer(1, WINDOW_BYTES - 5, "a.jpg"))
    assert small.client.offer_fits(5) and not small.client.offer_fits(6)
    with pytest.raises(RemoteProtocolError, match="file offer beyond the window"):
        small.forge(small.client, FileOffer(2, 6, "b.jpg"))
    assert small.server.state is State.FAILED


def test_an_offer_beyond_the_file_window_is_a_protocol_error(wire: Wire):
    for op in range(1, WINDOW_FILES + 1):
        wire.send(wire.client, FileOffer(op, 10, f"{op}.jpg"))
    with pytest.raises(RemoteProtocolError, match="file offer beyond the window"):
        wire.forge(wire.client, FileOffer(WINDOW_FILES + 1, 10, "one too many.jpg"))
    assert wire.server.state is State.FAILED


def test_replies_in_any_order_are_matched_to_their_files(wire: Wire):
    for op in (1, 2, 3):
        wire.send(wire.client, FileOffer(op, 3, f"{op}.jpg"))
    replies = [wire.send(wire.server, FileAccept(op))[0].msg for op in (3, 1, 2)]
    for reply in replies:
        wire.client.check_reply(reply)
    assert all(f.state is session_core.Outbound.ACCEPTED for f in wire.client.outbound.values())
    for op in (1, 2, 3):
        assert stream(wire, op, jpeg(3)) == [FileChunk(op, memoryview(jpeg(3))),
                                            FileEnded(op, b"h" * 32)]
    for op in (2, 3, 1):  # saved out of order
        [reply] = wire.send(wire.server, FileSaved(op, b"h" * 32, f"{op}.jpg"))
        assert wire.client.check_reply(reply.msg) == FileSaved(op, b"h" * 32, f"{op}.jpg")
        assert op not in wire.client.outbound and op not in wire.server.inbound
    assert wire.client.outbound == {} and wire.server.inbound == {}


def test_a_reply_for_no_open_operation_is_a_protocol_error(wire: Wire):
    wire.send(wire.client, FileOffer(1, 3, "a.jpg"))
    [reply] = wire.forge(wire.server, FileAccept(2))
    with pytest.raises(RemoteProtocolError, match="no file operation 2 is waiting"):
        wire.client.check_reply(reply.msg)


def test_one_refusal_amid_successes(wire: Wire):
    for op in (1, 2, 3):
        wire.send(wire.client, FileOffer(op, 3, f"{op}.jpg"))
    for msg in (FileAccept(1), FileReject(2, Reason.TOO_LARGE, "too big"), FileAccept(3)):
        [reply] = wire.send(wire.server, msg)
        wire.client.check_reply(reply.msg)
    assert list(wire.client.outbound) == [1, 3] and list(wire.server.inbound) == [1, 3]
    with pytest.raises(LocalProtocolError, match="FileData without an accepted offer"):
        wire.client._check_sendable(FileData(2, jpeg(3)))  # unguarded: the core goes on
    for op in (1, 3):
        stream(wire, op, jpeg(3))
        [reply] = wire.send(wire.server, FileSaved(op, b"h" * 32, f"{op}.jpg"))
        wire.client.check_reply(reply.msg)
    assert wire.client.outbound == {} and wire.server.inbound == {}


def test_a_cancel_mid_batch_ends_that_file_only(wire: Wire):
    for op in (1, 2, 3):
        offer_accepted(wire, 6, op=op, name=f"{op}.jpg")
    stream(wire, 1, jpeg(6))
    wire.send(wire.client, FileData(2, jpeg(3)))
    assert wire.send(wire.client, FileCancel(2, Reason.CANCELLED, "stop")) == \
        [FileCancelled(2, "2.jpg", "stop")]
    assert list(wire.server.inbound) == [1, 3] and list(wire.client.outbound) == [1, 3]
    assert stream(wire, 3, jpeg(6))[-1] == FileEnded(3, b"h" * 32)
    for op in (1, 3):
        [reply] = wire.send(wire.server, FileSaved(op, b"h" * 32, f"{op}.jpg"))
        wire.client.check_reply(reply.msg)
    assert wire.client.outbound == {} and wire.server.inbound == {}


def test_data_of_two_files_interleaved_is_a_protocol_error(wire: Wire):
    offer_accepted(wire, 6, op=1)
    offer_accepted(wire, 6, op=2)
    wire.send(wire.client, FileData(1, jpeg(3)))
    with pytest.raises(LocalProtocolError, match="FileData of operation 2 before the stream of 1"):
        wire.client.seal(FileData(2, jpeg(3)), NOW)
    with pytest.raises(RemoteProtocolError, match="FileData of operation 2 before the stream of 1"):
        wire.forge(wire.client, FileData(2, jpeg(3)))
    assert wire.server.state is State.FAILED


def test_a_stream_before_an_earlier_offer_was_answered_is_out_of_order(wire: Wire):
    wire.send(wire.client, FileOffer(1, 3, "a.jpg"))
    offer_accepted(wire, 3, op=2, name="b.jpg")
    with pytest.raises(RemoteProtocolError, match="FileData of operation 2 before the stream of 1"):
        wire.forge(wire.client, FileData(2, jpeg(3)))


def test_an_early_failure_before_the_stream_still_needs_its_end(wire: Wire):
    offer_accepted(wire, 6, op=1)
    offer_accepted(wire, 6, op=2)
    wire.send(wire.client, FileData(1, jpeg(3)))
    [early] = wire.send(wire.server, FileFailed(1, Reason.NO_SPACE, "full"))
    wire.client.check_reply(early.msg)
    assert wire.client.outbound[1].state is session_core.Outbound.FAILED
    with pytest.raises(LocalProtocolError, match="before the stream of 1 ended"):
        wire.client._check_sendable(FileData(2, jpeg(3)))  # unguarded: the core goes on
    assert wire.send(wire.client, FileCancel(1, Reason.CANCELLED, "receiver failed")) == \
        [FileCancelled(1, "", "receiver failed")]
    assert stream(wire, 2, jpeg(6))[-1] == FileEnded(2, b"h" * 32)


def test_a_file_end_short_of_the_size_is_a_protocol_error(wire: Wire):
    offer_accepted(wire, 6)
    wire.send(wire.client, FileData(1, jpeg(3)))
    with pytest.raises(RemoteProtocolError, match="file ended after 3 of 6 announced bytes"):
        wire.send(wire.client, FileEnd(1, b"h" * 32))


# --- key updates ----------------------------------------------------------------------------
def test_key_update_after_the_records_of_an_epoch_and_after_an_hour():
    wire = Wire(limit=LIMIT)
    for i in range(1, 3 * LIMIT):
        assert wire.send(wire.client, Text(i, "x")) == [TextReceived(i, "x")]
    assert wire.records > 3 * LIMIT - 1  # KeyUpdates went in between, invisibly
    before = wire.records
    wire.send(wire.server, Text(1, "y"), now=NOW + crypt.KEY_UPDATE_SECONDS)
    assert wire.records == before + 2  # the hour passed: a KeyUpdate came first
    assert wire.send(wire.client, Text(99, "z")) == [TextReceived(99, "z")]


def test_key_update_on_demand(wire: Wire):
    record = wire.client.seal_key_update(NOW)
    assert wire.server.receive(wire.server.open_record(body(record))) == []
    assert wire.send(wire.client, Text(1, "after")) == [TextReceived(1, "after")]


# --- closing --------------------------------------------------------------------------------
def test_peer_said_bye_and_anything_after_it_is_an_error(wire: Wire):
    [ended] = wire.send(wire.client, Bye("done"))
    assert ended == SessionEnded(session_core.Close(CloseKind.PEER_BYE, Side.PEER,
                                                    "peer said goodbye (done)"))
    assert ended.close.clean and str(ended.close) == "peer said goodbye (done)"
    assert wire.client.state is State.CLOSING and wire.server.state is State.CLOSED
    with pytest.raises(LocalProtocolError, match="Text after the session closed"):
        wire.client.seal(Text(1, "late"), NOW)
    with pytest.raises(RemoteProtocolError, match="Text after the session ended"):
        wire.forge(wire.client, Text(1, "late"))  # a peer that goes on after its Bye


def test_our_bye_still_lets_the_peer_finish(wire: Wire):
    in_flight = wire.server.seal(Text(1, "in flight"), NOW)  # sealed before our Bye came
    wire.send(wire.client, Bye(""))
    [pieces] = in_flight
    assert wire.client.receive(wire.client.open_record(body(pieces))) == \
        [TextReceived(1, "in flight")]
    [ended] = wire.forge(wire.server, Bye(""))  # the server's own core is CLOSED by now
    assert ended.close.kind is CloseKind.PEER_BYE and str(ended.close) == "peer said goodbye"


def test_peer_error_is_its_own_close_kind(wire: Wire):
    [ended] = wire.send(wire.server, Error("protocol error: \x1b[31mred"))
    assert ended.close.kind is CloseKind.PEER_ERROR and not ended.close.clean
    assert ended.close.by is Side.PEER
    assert str(ended.close) == "peer reported an error: protocol error: \\x1b[31mred"


def test_a_failed_core_still_says_why_once(wire: Wire):
    offer_accepted(wire, 1)
    with pytest.raises(RemoteProtocolError):
        wire.send(wire.client, FileData(1, b"too much"))
    [ended] = wire.send(wire.server, Error("protocol error: file data beyond the announced size"))
    assert ended.close.kind is CloseKind.PEER_ERROR
    with pytest.raises(LocalProtocolError, match="already failed"):
        wire.server.seal(Bye(""), NOW)


def test_a_record_that_does_not_verify_fails_the_core(wire: Wire):
    tampered = bytearray(body(wire.client.seal(Text(1, "x"), NOW)[0]))
    tampered[-1] ^= 1
    with pytest.raises(AuthError):
        wire.server.open_record(bytes(tampered))
    assert wire.server.state is State.FAILED


@pytest.mark.parametrize("kind", list(CloseKind))
def test_every_close_kind_has_a_human_name_and_only_bye_is_clean(kind):
    close = session_core.Close(kind, Side.LOCAL, "detail for humans")
    assert str(close) == "detail for humans"
    assert close.clean is (kind is CloseKind.PEER_BYE)
    assert kind.value and kind.value == kind.value.lower()


def test_the_core_is_sans_io():
    """It imports no socket, thread, queue, clock, file or signal module."""
    import ast
    from pathlib import Path

    source = Path(session_core.__file__).read_text()
    tree = ast.parse(source)
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported == {"__future__", "enum", "functools", "dataclasses", "protocol"}
    assert "sans-I/O" in session_core.__doc__
    assert " open(" not in source and "(open(" not in source  # the builtin: no file
