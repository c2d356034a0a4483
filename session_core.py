"""The session after the handshake as a sans-I/O state machine (like h11's Connection).

Sans-I/O: this module does no I/O and keeps no clock.  It imports no socket, thread,
queue, time or file module.  Sealed records come out of `seal`, received record
bodies go into `open_record`, decoded messages go into `receive`, which returns
what happened as events; the caller passes `now` (its monotonic clock) where the
key-update rule needs the time.  The ordering rules of PROTOCOL.md section 11
(first record, a window of files per direction, data only after an accepted offer
and within its size, replies only when someone waits, nothing after Bye) are
checked here and only here.  Any exception in a step moves the core to FAILED for
good (one guard, as h11's _process_error): a session that broke once is never used
again.

File operations are kept per operation id in a dict (insertion order = offer
order), one per direction: an _Incoming for the peer's files and an _Outgoing for
ours, both held by the SessionCore: their checks and state changes run in its
guarded steps (file_op, offer_fits and receiving are unguarded queries).  Up to WINDOW_FILES
per direction at once (and WINDOW_BYTES of announced sizes), answered in any order,
their data one stream at a time in offer order (PROTOCOL.md 11.2).  An offer
beyond the window, a reused id, data out of order or a reply for no open operation
is a protocol error.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

from protocol import (
    WINDOW_BYTES,
    WINDOW_FILES,
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
    KeyUpdate,
    LocalProtocolError,
    Refused,
    RemoteProtocolError,
    Text,
    Welcome,
    decode_message,
    neutralise,
)


# --- how a session ended ---------------------------------------------------------------
class CloseKind(enum.Enum):
    PEER_BYE = "peer said bye"
    PEER_ERROR = "peer reported an error"
    PEER_VANISHED = "peer vanished"  # EOF or reset without a goodbye
    CONNECTION_LOST = "connection lost"  # an OS error on the socket
    PROTOCOL_ERROR = "protocol error"
    AUTH_FAILED = "authentication failure"  # a record that does not verify
    LOCAL_SHUTDOWN = "local shutdown"  # we said goodbye
    TIMEOUT = "timeout"  # the peer stopped reading or answering
    INTERRUPTED = "interrupted"  # Ctrl-C / SIGTERM
    INTERNAL_ERROR = "internal error"


class Side(enum.Enum):
    LOCAL = "local"
    PEER = "peer"


@dataclass(frozen=True)
class Close:
    """Why a session ended: the kind (what logic looks at), who caused it, and the
    one line for humans (what the logs show, never parsed)."""

    kind: CloseKind
    by: Side
    detail: str

    def __str__(self) -> str:
        return self.detail

    @property
    def clean(self) -> bool:
        """The peer ended it with a goodbye."""
        return self.kind is CloseKind.PEER_BYE


# --- events returned by receive -----------------------------------------------------------
@dataclass(frozen=True)
class Welcomed:
    """The server admitted us (client side)."""


@dataclass(frozen=True)
class WasRefused:
    """The server refused us after the handshake (client side)."""

    reason: int
    detail: str


@dataclass(frozen=True)
class TextReceived:
    """A text from the peer."""

    msg_id: int
    text: str


@dataclass(frozen=True)
class FileOffered:
    """The peer offers a file: ours to accept or reject."""

    op: int
    name: str
    size: int


@dataclass(frozen=True)
class FileChunk:
    """Data of a file the peer is sending us."""

    op: int
    data: memoryview


@dataclass(frozen=True)
class FileDiscarded:
    """Data of a transfer this side already failed: drop it (the buffer goes back)."""

    op: int


@dataclass(frozen=True)
class FileEnded:
    """The peer's file is complete: its data is to be checked against `sha256`."""

    op: int
    sha256: bytes


@dataclass(frozen=True)
class FileCancelled:
    """The peer gave up on its file: nothing of it is to be saved."""

    op: int
    name: str  # "" when the transfer was being discarded
    detail: str


@dataclass(frozen=True)
class ReplyReceived:
    """A reply to our operation; the waiting operation checks it with check_reply."""

    msg: object


@dataclass(frozen=True)
class SessionEnded:
    """The session is over; `close` says why."""

    close: Close


class State(enum.Enum):
    AWAIT_FIRST = "waiting for Welcome or Refused"  # client, after its ClientAuth
    OPEN = "open"
    CLOSING = "closing"  # we sent Bye or Error: nothing more goes out, the peer may finish
    CLOSED = "closed"  # the peer sent Bye or Error, or refused us: nothing more comes in
    FAILED = "failed"


class Inbound(enum.Enum):
    """A file coming to us; the replies we send move it on."""

    OFFERED = "offered"  # FileAccept or FileReject is ours to send
    RECEIVING = "receiving"  # accepted: data until the announced size, then FileEnd
    DRAINING = "draining"  # we sent FileFailed: data ignored until FileEnd or FileCancel
    ENDED = "ended"  # FileEnd came: FileSaved or FileFailed is ours to send


class Outbound(enum.Enum):
    """What our own file operation waits for."""

    ACCEPT = "FileAccept or FileReject"
    ACCEPTED = "its turn to stream (FileFailed may come early)"
    STREAMING = "nothing (FileFailed may come early)"
    FAILED = "nothing: the receiver failed, our stream still has to end"
    SAVED = "FileSaved or FileFailed"


_OPEN_STREAM = (Outbound.ACCEPTED, Outbound.STREAMING, Outbound.FAILED)


@dataclass
class _InFile:
    """A file the peer is sending us."""

    name: str
    size: int
    state: Inbound = Inbound.OFFERED
    received: int = 0


@dataclass
class _OutFile:
    """A file we are sending."""

    size: int
    state: Outbound = Outbound.ACCEPT


def _in_window(files: dict, size: int, max_files: int, max_bytes: int) -> bool:
    """A new operation of `size` bytes fits beside the open `files` (one alone always fits)."""
    if not files:
        return True
    return len(files) < max_files and sum(f.size for f in files.values()) + size <= max_bytes


def _check_stream(files: dict, msg, error, streaming) -> None:
    """Data, end or cancel of an accepted operation whose turn it is: every
    operation offered before it has ended its stream (one stream at a time,
    in offer order)."""
    name = type(msg).__name__
    current = files.get(msg.op)
    if current is None or current.state not in streaming:
        if error is LocalProtocolError:
            raise error(f"{name} without an accepted offer")
        if isinstance(msg, FileCancel):
            raise error("FileCancel without a transfer")
        what = "file data" if isinstance(msg, FileData) else "file end"
        raise error(f"{what} without an accepted offer")
    for op, f in files.items():
        if op == msg.op:
            return
        if f.state in streaming or f.state in (Outbound.ACCEPT, Inbound.OFFERED):
            raise error(f"{name} of operation {msg.op} before the stream of {op} ended")


class _Incoming:
    """The files coming to us, by operation id: what the peer may send for them
    (an offer within the window, then data in offer order and within the announced
    size) and which of our answers each one waits for.  Its checks and changes run
    in the SessionCore's guarded steps: a failure there fails the session."""

    def __init__(self) -> None:
        self.files: dict[int, _InFile] = {}
        self._last_op = -1  # the peer's last offered id: ids only grow

    def check_answer(self, msg) -> None:
        """Our FileAccept, FileReject, FileSaved or FileFailed answers a file waiting for it."""
        name = type(msg).__name__
        current = self.files.get(msg.op)
        if isinstance(msg, FileAccept | FileReject) and \
                (current is None or current.state is not Inbound.OFFERED):
            raise LocalProtocolError(f"{name} without an offer to answer")
        if isinstance(msg, FileSaved) and (current is None or
                                           current.state is not Inbound.ENDED):
            raise LocalProtocolError("FileSaved before the file ended")
        if isinstance(msg, FileFailed) and (current is None or current.state not in (
                Inbound.RECEIVING, Inbound.ENDED)):
            raise LocalProtocolError("FileFailed without a file being received")

    def answered(self, msg) -> None:
        """Our answer went out: the file moves on, or is over."""
        if isinstance(msg, FileAccept):
            self.files[msg.op].state = Inbound.RECEIVING
        elif isinstance(msg, FileReject | FileSaved) or self.files[msg.op].state is Inbound.ENDED:
            del self.files[msg.op]
        else:  # FileFailed during the transfer
            self.files[msg.op].state = Inbound.DRAINING

    def receive(self, msg) -> list:
        """The peer's FileOffer, FileData, FileEnd or FileCancel; the events."""
        if isinstance(msg, FileOffer):
            if msg.op <= self._last_op:
                raise RemoteProtocolError(f"FileOffer reuses operation id {msg.op}")
            if not _in_window(self.files, msg.size, WINDOW_FILES, WINDOW_BYTES):
                raise RemoteProtocolError("file offer beyond the window")
            self._last_op = msg.op
            self.files[msg.op] = _InFile(msg.name, msg.size)
            return [FileOffered(msg.op, msg.name, msg.size)]
        # also data after our FileReject, or before our FileAccept went out
        _check_stream(self.files, msg, RemoteProtocolError, (Inbound.RECEIVING, Inbound.DRAINING))
        current = self.files[msg.op]
        if isinstance(msg, FileCancel):
            del self.files[msg.op]
            name = current.name if current.state is Inbound.RECEIVING else ""
            return [FileCancelled(msg.op, name, msg.detail)]
        if current.state is Inbound.DRAINING:
            if isinstance(msg, FileEnd):
                del self.files[msg.op]
                return []
            return [FileDiscarded(msg.op)]
        if isinstance(msg, FileEnd):
            if current.received != current.size:
                raise RemoteProtocolError(f"file ended after {current.received} of "
                                          f"{current.size} announced bytes")
            current.state = Inbound.ENDED
            return [FileEnded(msg.op, msg.sha256)]
        current.received += len(msg.data)
        if current.received > current.size:
            raise RemoteProtocolError("file data beyond the announced size")
        return [FileChunk(msg.op, msg.data)]

    def receiving(self, op: int) -> tuple[str, int] | None:
        """(name, bytes received) of a file coming in and not failed, else None."""
        current = self.files.get(op)
        if current is None or current.state is not Inbound.RECEIVING:
            return None
        return current.name, current.received


class _Outgoing:
    """Our own file operations, by operation id: what we may send for them (a new
    id within our window, then data in offer order) and which reply each one waits
    for.  Its checks and changes run in the SessionCore's guarded steps (a failure
    there fails the session); file_op and offer_fits are called unguarded."""

    def __init__(self, window: tuple[int, int]) -> None:
        self.files: dict[int, _OutFile] = {}
        self.next_op = 0  # our last file operation's id
        self._sent_op = -1  # our last offered id
        # transfers we cancelled before a FileFailed for them was taken as the answer: one
        # the receiver sent before it read our FileCancel is dropped (see crossed); by id,
        # the last id we had offered when we cancelled it (see _forget_crossings)
        self.cancelled: dict[int, int] = {}
        # our own sending window (files, bytes): at most the protocol's
        self.window = (min(window[0], WINDOW_FILES), min(window[1], WINDOW_BYTES))

    def check_send(self, msg) -> None:
        """Our FileOffer, or the FileData, FileEnd or FileCancel of its stream, may go out."""
        if isinstance(msg, FileOffer):
            if msg.op in self.files or msg.op <= self._sent_op:
                raise LocalProtocolError(f"FileOffer reuses operation id {msg.op}")
            if not self.offer_fits(msg.size):
                raise LocalProtocolError("FileOffer beyond the window")
        else:
            _check_stream(self.files, msg, LocalProtocolError, _OPEN_STREAM)

    def sent(self, msg) -> None:
        """It went out: the operation opens, streams or ends."""
        if isinstance(msg, FileOffer):
            self.files[msg.op] = _OutFile(msg.size)
            self._sent_op = msg.op
        elif isinstance(msg, FileData):
            if self.files[msg.op].state is Outbound.ACCEPTED:
                self.files[msg.op].state = Outbound.STREAMING
        elif isinstance(msg, FileEnd):
            if self.files[msg.op].state is Outbound.FAILED:
                del self.files[msg.op]  # the early FileFailed was its answer
            else:
                self.files[msg.op].state = Outbound.SAVED
        else:  # FileCancel
            if self.files.pop(msg.op).state is not Outbound.FAILED:
                self.cancelled[msg.op] = self._sent_op

    def crossed(self, msg: FileFailed) -> bool:
        """Whether msg is a FileFailed the receiver sent before it read our FileCancel of
        that transfer (PROTOCOL.md 11.2), arrived before or after the cancel went out:
        the cancel ended the transfer, so it is no answer.  Once per transfer."""
        return self.cancelled.pop(msg.op, None) is not None  # ids never repeat: not open

    def _forget_crossings(self, op: int, ended: bool) -> None:
        """The receiver replied to our operation op: it had read every FileCancel we sent
        before op's offer (and, when it saved op, before op's FileEnd), so no FileFailed
        can cross those any more."""
        self.cancelled = {x: last for x, last in self.cancelled.items()
                          if op <= last and not (ended and op > x)}

    def offer_fits(self, size: int) -> bool:
        """Our next FileOffer of `size` bytes stays within our window."""
        return _in_window(self.files, size, *self.window)

    def file_op(self) -> int:
        """The id of our next file operation: 1, 2, 3, ... per session."""
        self.next_op += 1
        return self.next_op

    def check_reply(self, msg):
        """A reply to one of our file operations fits what that operation waits for."""
        name = type(msg).__name__
        current = self.files.get(msg.op) if hasattr(msg, "op") else None
        if current is None:
            raise RemoteProtocolError(f"unexpected {name}: no file operation "
                                      f"{getattr(msg, 'op', '')} is waiting for a reply")
        # only a FileSaved says the receiver read op's FileEnd (a FileFailed may precede it)
        self._forget_crossings(msg.op, ended=current.state is Outbound.SAVED
                               and isinstance(msg, FileSaved))
        if current.state is Outbound.ACCEPT:
            if isinstance(msg, FileReject):
                del self.files[msg.op]
            elif isinstance(msg, FileAccept):
                current.state = Outbound.ACCEPTED
            else:
                raise RemoteProtocolError(f"expected FileAccept, got {name}")
        elif current.state in (Outbound.ACCEPTED, Outbound.STREAMING):
            if not isinstance(msg, FileFailed):
                raise RemoteProtocolError(f"unexpected {name} during a transfer")
            current.state = Outbound.FAILED
        elif current.state is Outbound.SAVED:
            del self.files[msg.op]
            if not isinstance(msg, FileSaved | FileFailed):
                raise RemoteProtocolError(f"expected FileSaved, got {name}")
        else:
            raise RemoteProtocolError(f"unexpected {name}: operation {msg.op} was answered")
        return msg


_REPLIES = (Delivered, FileAccept, FileReject, FileSaved, FileFailed)


def _step(method):
    """The one guard: any exception in a step leaves the core FAILED for good."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        # a failed session may still seal its last word, the Error that says why
        last_word = method.__name__ == "seal" and args and isinstance(args[0], Error)
        if self.state is State.FAILED and not last_word:
            raise LocalProtocolError("the session already failed")
        try:
            return method(self, *args, **kwargs)
        except BaseException:
            self.state = State.FAILED
            raise

    return guarded


class SessionCore:
    """One side of a session after the handshake.  `records` is the (sender,
    receiver) pair of crypt's record layer; `client` says which side speaks first
    (the server sends Welcome or Refused, the client waits for it); `opened` makes
    a core whose first record has already been exchanged.  The session's state,
    texts and the one guard are kept here; the files each way are an _Incoming and
    an _Outgoing that it holds (`inbound` and `outbound` are their files)."""

    def __init__(self, records, *, client: bool, opened: bool = False,
                 window: tuple[int, int] = (WINDOW_FILES, WINDOW_BYTES)) -> None:
        self._sender, self._receiver = records
        self.client = client
        self.state = State.AWAIT_FIRST if client and not opened else State.OPEN
        self._first_sent = client or opened  # the server's first record: Welcome or Refused
        self._incoming = _Incoming()  # files coming in
        self._outgoing = _Outgoing(window)  # our file operations; window: at most the protocol's
        self.texts: set[int] = set()  # msg_ids of our texts waiting for Delivered
        self.next_msg_id = 0

    @property
    def inbound(self) -> dict[int, _InFile]:
        """Files coming in, by operation id (insertion order = offer order)."""
        return self._incoming.files

    @property
    def outbound(self) -> dict[int, _OutFile]:
        """Our file operations, by operation id (insertion order = offer order)."""
        return self._outgoing.files

    # records in and out ---------------------------------------------------------------
    def start_clock(self, now: float) -> None:
        self._sender.start_clock(now)  # the hour of a key epoch counts from here

    @_step
    def seal(self, msg, now: float, out: memoryview | None = None) -> list:
        """The records (lists of pieces, in order) that carry msg: a KeyUpdate first
        when one is due at `now`.  `out` receives msg's ciphertext (zero copy)."""
        self._check_sendable(msg)
        records = []
        if self._sender.update_due(now):
            records.append(self._sender.seal_key_update(now))
        if isinstance(msg, FileData):  # the data is sealed where it lies: zero copy
            records.append(self._sender.seal(msg.TYPE, msg.data, out, msg.head()))
        else:
            records.append(self._sender.seal(msg.TYPE, msg.encode(), out))
        self._sent(msg)
        return records

    @_step
    def seal_key_update(self, now: float) -> list:
        self._check_sendable(KeyUpdate())
        return self._sender.seal_key_update(now)

    @_step
    def open_record(self, body, into: memoryview | None = None):
        """Verify, decrypt and decode one record body (into `into` when given)."""
        if into is None:
            return decode_message(*self._receiver.open(body))
        return decode_message(*self._receiver.open(body, into))

    # what we send -------------------------------------------------------------------------
    def _check_sendable(self, msg) -> None:
        name = type(msg).__name__
        if self.state is State.AWAIT_FIRST:
            raise LocalProtocolError(f"{name} before the server's Welcome")
        if not self._first_sent and not isinstance(msg, Welcome | Refused):
            raise LocalProtocolError(f"{name} before Welcome or Refused")
        if self.state in (State.CLOSING, State.CLOSED) and not isinstance(msg, Error | Bye):
            raise LocalProtocolError(f"{name} after the session closed")
        if isinstance(msg, FileOffer | FileData | FileEnd | FileCancel):
            self._outgoing.check_send(msg)
        if isinstance(msg, FileAccept | FileReject | FileSaved | FileFailed):
            self._incoming.check_answer(msg)

    def _sent(self, msg) -> None:
        if isinstance(msg, Welcome | Refused):
            self._first_sent = True
            if isinstance(msg, Refused):
                self.state = State.CLOSING
        elif isinstance(msg, Text):
            self.texts.add(msg.msg_id)
        elif isinstance(msg, FileOffer | FileData | FileEnd | FileCancel):
            self._outgoing.sent(msg)
        elif isinstance(msg, FileAccept | FileReject | FileSaved | FileFailed):
            self._incoming.answered(msg)
        elif isinstance(msg, Bye | Error) and self.state is State.OPEN:
            self.state = State.CLOSING

    def offer_fits(self, size: int) -> bool:
        """Our next FileOffer of `size` bytes stays within our window."""
        return self._outgoing.offer_fits(size)

    def file_op(self) -> int:
        """The id of our next file operation: 1, 2, 3, ... per session."""
        return self._outgoing.file_op()

    def text_id(self) -> int:
        """The msg_id of our next text: 1, 2, 3, ... per session."""
        self.next_msg_id += 1
        return self.next_msg_id

    # what the peer sends ------------------------------------------------------------------
    @_step
    def receive(self, msg) -> list:
        """Check one message from the peer against the session's state; the events."""
        if self.state is State.AWAIT_FIRST:
            return self._first(msg)
        if self.state is State.CLOSED:  # after Bye or Error (or Refused) comes nothing
            raise RemoteProtocolError(f"{type(msg).__name__} after the session ended")
        if isinstance(msg, Text):
            return [TextReceived(msg.msg_id, msg.text)]
        if isinstance(msg, FileOffer | FileData | FileEnd | FileCancel):
            return self._incoming.receive(msg)
        if isinstance(msg, FileFailed) and self._outgoing.crossed(msg):
            return []
        if isinstance(msg, _REPLIES):
            if not self.texts and not self.outbound:
                raise RemoteProtocolError(f"unexpected {type(msg).__name__}: nothing is waiting "
                                          f"for a reply")
            return [ReplyReceived(msg)]
        if isinstance(msg, Bye):
            self.state = State.CLOSED
            return [SessionEnded(Close(CloseKind.PEER_BYE, Side.PEER, "peer said goodbye" + (
                f" ({neutralise(msg.reason)})" if msg.reason else "")))]
        if isinstance(msg, Error):
            self.state = State.CLOSED
            return [SessionEnded(Close(CloseKind.PEER_ERROR, Side.PEER,
                                       f"peer reported an error: {neutralise(msg.reason)}"))]
        if isinstance(msg, KeyUpdate):
            return []  # the record layer has already moved to the peer's next key epoch
        raise RemoteProtocolError(f"unexpected {type(msg).__name__} in a session")

    def _first(self, msg) -> list:
        if isinstance(msg, Welcome):
            self.state = State.OPEN
            return [Welcomed()]
        if isinstance(msg, Refused):
            self.state = State.CLOSED
            return [WasRefused(msg.reason, msg.detail)]
        raise RemoteProtocolError(f"{type(msg).__name__} instead of Welcome or Refused")

    # what the plumbing asks ----------------------------------------------------------------
    def receiving(self, op: int) -> tuple[str, int] | None:
        """(name, bytes received) of a file coming in and not failed, else None."""
        return self._incoming.receiving(op)

    # replies to our operations, checked by the operation that waits for them ----------------
    @_step
    def check_reply(self, msg, *, msg_id: int | None = None):
        """The reply our waiting operation reads; a reply that does not fit it is
        the peer's protocol error (PROTOCOL.md 11.2).  Returns msg, or None for a
        FileFailed that crossed our FileCancel (dropped: wait for the next reply)."""
        if isinstance(msg, FileFailed) and self._outgoing.crossed(msg):
            return None  # it came before our FileCancel went out, and is read after it
        if msg_id is not None:
            self.texts.discard(msg_id)
            if not isinstance(msg, Delivered) or msg.msg_id != msg_id:
                raise RemoteProtocolError(f"expected Delivered({msg_id}), got {msg}")
            return msg
        return self._outgoing.check_reply(msg)

    def operation_over(self) -> None:
        """Our operation ended (answered, failed or given up): it waits for nothing."""
        self.outbound.clear()
        self.texts.clear()
