"""Every limit, timeout and backlog of the reference implementation in one place.

Wire constants (frame and chunk sizes, name and text lengths, key-update limits)
stay with the wire format in protocol.py and crypt.py; what is here is local
policy, which the shells, the session, the tests and the benchmarks read from
LIMITS rather than keeping copies."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """The reference implementation's local policy (see the module docstring)."""

    # the session (session.py)
    data_in_flight: int = 4  # file records queued for the writer at most
    finishers: int = 3  # threads flushing received files at once (fsyncs overlap; more contend)
    max_backlog: int = 64  # records waiting for the writer before the peer counts as not reading
    reply_timeout: float = 30.0  # s for Delivered and FileAccept, answered at once by the peer
    saved_timeout: float = 600.0  # s for FileSaved: the receiver flushes the whole file first
    stall_timeout: float = 120.0  # s a file stream may make no progress before we give up
    send_timeout: float = 60.0  # s the writer may make no progress before the session ends
    exit_timeout: float = 5.0  # s a connection's threads get to exit once its socket is shut down
    close_timeout: float = 3.0  # s Connection.close waits for the goodbye without progress
    poll: float = 0.1  # s between checks for an interrupt while an operation waits
    # the client (client.py)
    connect_timeout: float = 10.0
    handshake_timeout: float = 30.0
    # the server (server.py)
    listen_backlog: int = 128  # listen(): connections the kernel queues before accept
    refuse_timeout: float = 1.0  # s a plaintext refusal may take to go out
    shutdown_grace: float = 4.0  # s clients get to take their goodbye on shutdown
    accept_backoff_first: float = 0.005  # accept() failing: first wait, doubled up to the cap
    accept_backoff_cap: float = 1.0
    max_known_clients: int = 10_000  # lines in known_clients: strangers cannot grow it unbounded


LIMITS = Limits()
