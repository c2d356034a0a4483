#!/usr/bin/env python3
"""QSocket 2 server: accepts clients (one thread each), authenticates them, and
exchanges end-to-end encrypted texts and JPGs.  Console by default; --headless
runs until SIGINT/SIGTERM."""

from __future__ import annotations

import errno
import socket
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import crypt
import keystore
import session
import transfer
from limits import LIMITS
from protocol import (
    MAX_HANDSHAKE,
    Alert,
    AlertCode,
    AuthError,
    PeerAlert,
    ProtocolError,
    Reason,
    Refused,
    RemoteProtocolError,
    VersionMismatch,
    Welcome,
    neutralise,
)
from server_data import (
    ServerHandshake,
    parse_authorized_clients,
)
from session_core import CloseKind, SessionCore

__version__ = "2.0.0"
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
SHUTDOWN_GRACE = LIMITS.shutdown_grace
# accept() failing (EMFILE, ENFILE, ENOBUFS, ENOMEM...): wait, doubling from the first
# delay up to the cap, as Go's net/http does, rather than spin on a listener that stays
# readable while the error lasts
ACCEPT_BACKOFF_FIRST, ACCEPT_BACKOFF_CAP = LIMITS.accept_backoff_first, LIMITS.accept_backoff_cap
MAX_KNOWN_CLIENTS = LIMITS.max_known_clients  # strangers cannot grow known_clients unbounded


class StartupError(Exception):
    """The server cannot start: it cannot listen, or cannot use its received dir or
    its --authorized-clients file (exit 1, like a bad home)."""


def build_parser() -> session.Parser:
    p = session.Parser(
        prog="server.py",
        description="QSocket 2 server: end-to-end encrypted chat and JPG transfer with a hybrid "
                    "ECDH P-256 + ML-KEM-1024 key exchange and ECDSA + ML-DSA-65 identities.  "
                    "Prints 'listening on HOST:PORT' and 'identity SHA256:...' at start-up.",
        epilog="exit codes: 0 stopped by SIGINT/SIGTERM or the console's quit, 1 start-up "
               "error (home, keys, --authorized-clients, cannot listen), 2 usage",
    )
    p.add_argument("--host", type=session.host_name, default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=session.listen_port, default=5555,
                   help="port to listen on (default 5555; 0 picks a free port)")
    p.add_argument("--headless", action="store_true",
                   help="no console; run until SIGINT/SIGTERM (implied when stdin is not a "
                        "terminal)")
    p.add_argument("--max-clients", type=session.positive_count, default=64, metavar="N",
                   help="connections at once, handshaking ones included (default 64); "
                        "one more gets a 'server busy' refusal")
    p.add_argument("--handshake-timeout", type=session.seconds, default=10.0, metavar="S",
                   help="seconds a connection has to finish the handshake (default 10)")
    p.add_argument("--max-startups-per-source", type=session.positive_count, default=10,
                   metavar="N",
                   help="connections from one address still in the handshake (default 10, "
                        "as OpenSSH's MaxStartups); one more gets a 'busy' refusal")
    p.add_argument("--authorized-clients", type=Path, metavar="FILE",
                   help="admit only the client fingerprints listed in FILE "
                        "(one per line, optional name after it, # comments)")
    session.add_common_arguments(p, "server", __version__)
    return p


class ServerEvents(session.Events):
    def file_saved(self, conn, path, result):
        self.out(f"[{conn.label}] {result.summary('received')} ({session.metadata_note(path)}), "
                 f"saved at {neutralise(path)}")

    def closed(self, conn, why):
        vanished = conn.close_info is not None and conn.close_info.kind is CloseKind.PEER_VANISHED
        self.out(f"[{conn.label}] {'disconnected' if vanished else why}")


class Client:
    """A connected, authenticated client as the console sees it."""

    def __init__(self, conn: session.Connection, fp: str, name: str, addr: str) -> None:
        self.conn, self.fingerprint, self.name, self.addr = conn, fp, name, addr

    def __str__(self) -> str:
        return f"{self.name + ' ' if self.name else ''}{self.fingerprint} ({self.addr})"


class Admission:
    """The admission rule for accepted connections: at most --max-clients at once
    (a slot per connection, released only once its threads ended), and at most
    --max-startups-per-source of them in the handshake from one address (OpenSSH's
    PerSourceMaxStartups).  Thread-safe."""

    def __init__(self, max_clients: int, max_startups_per_source: int) -> None:
        self.max_clients = max_clients
        self.max_startups_per_source = max_startups_per_source
        self.slots = threading.BoundedSemaphore(max_clients)
        self.startups: dict[str, int] = {}  # source address: connections in the handshake
        self._lock = threading.Lock()

    def take_slot(self) -> bool:
        return self.slots.acquire(blocking=False)

    def release_slot(self) -> None:
        self.slots.release()

    def start_handshake(self, source: str) -> bool:
        """Count one more connection from `source` in the handshake, unless it already
        has as many as allowed."""
        with self._lock:
            n = self.startups.get(source, 0)
            if n >= self.max_startups_per_source:
                return False
            self.startups[source] = n + 1
            return True

    def end_handshake(self, source: str) -> None:
        with self._lock:
            n = self.startups.pop(source) - 1
            if n:
                self.startups[source] = n


class Registry:
    """The connected clients (what the console picks from and shutdown says goodbye
    to) and the threads serving connections.  Thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.clients: dict[int, Client] = {}
        self.threads: set[threading.Thread] = set()
        self.stopping = threading.Event()
        self._next = 0

    def add(self, client: Client) -> int | None:
        """The client's key; None once shutdown began (the caller says goodbye)."""
        with self.lock:
            # shutdown sets `stopping` before it takes its list of clients under this
            # lock, so a client is either in that list or sees `stopping` here
            if self.stopping.is_set():
                return None
            self._next += 1
            self.clients[self._next] = client
            return self._next

    def remove(self, key: int) -> None:
        with self.lock:
            self.clients.pop(key, None)

    def snapshot(self) -> list[Client]:
        with self.lock:
            return list(self.clients.values())

    def stop(self) -> tuple[list[Client], list[threading.Thread]]:
        """No more clients from here on; those connected and the serving threads."""
        self.stopping.set()
        with self.lock:
            return list(self.clients.values()), list(self.threads)


def listen(host: str, port: int) -> socket.socket:
    """The listening socket; StartupError when the address cannot be had."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LIMITS.listen_backlog)
    except (OSError, OverflowError) as e:
        raise StartupError(f"cannot listen on {host}:{port}: "
                           f"{getattr(e, 'strerror', None) or e}") from e
    return sock


class Server:
    def __init__(self, args, identity: crypt.Identity, home: Path, kem,
                 authorized: dict[str, str] | None) -> None:
        self.args = args
        self.identity = identity
        self.home = home
        self.kem = kem
        self.authorized = authorized
        self.events = ServerEvents()
        self.interrupt = session.Interrupt()  # Ctrl-C/SIGTERM: see session.Interrupt
        self.registry = Registry()
        self.stopping = self.registry.stopping
        self.lock = self.registry.lock  # also guards known_clients
        self.admission = Admission(args.max_clients, args.max_startups_per_source)
        self.startups = self.admission.startups
        self.listener: socket.socket | None = None
        self.known = keystore.KnownClients(home, MAX_KNOWN_CLIENTS)
        self.known_clients = self.known.seen  # the fingerprints recorded (the same set)

    def log(self, line: str) -> None:
        self.events.out(line)

    # listening -------------------------------------------------------------------------
    def listen(self) -> tuple[str, int]:
        self.listener = listen(self.args.host, self.args.port)
        return self.listener.getsockname()[:2]

    def accept_loop(self) -> None:
        """Accept until shutdown.  Nothing one connection does, and no lack of
        resources, ends this loop: it backs off and serves again once they return."""
        backoff = 0.0
        while not self.stopping.is_set():
            try:
                sock, addr = self.listener.accept()
            except OSError as e:
                if self.stopping.is_set():
                    return
                if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                    continue  # that connection is gone; the next one may be fine
                if not backoff:  # one line per burst, not one per failed accept
                    self.log(f"accept failed: {e.strerror or e}; retrying with a growing "
                             f"back-off (at most {ACCEPT_BACKOFF_CAP:g} s)")
                backoff = min(backoff * 2 or ACCEPT_BACKOFF_FIRST, ACCEPT_BACKOFF_CAP)
                self.back_off(backoff)
                continue
            backoff = 0.0
            peer = f"{addr[0]}:{addr[1]}"
            try:
                self.admit(sock, peer, addr[0])
            except Exception as e:  # last resort: that connection only, never the loop
                self.log(f"connection from {peer} refused: internal error: {e!r}")
                sock.close()

    def back_off(self, seconds: float) -> None:
        self.stopping.wait(seconds)

    def admit(self, sock: socket.socket, peer: str, source: str) -> None:
        """Give one accepted connection a slot and a thread, or refuse it cheaply:
        a plaintext alert, never a thread."""
        if not self.admission.take_slot():
            self.log(f"connection from {peer} refused: server busy "
                     f"({self.args.max_clients} connections)")
            refuse(sock, Alert(AlertCode.BUSY, "server busy, try again later"))
            return
        if not self.admission.start_handshake(source):
            self.admission.release_slot()
            self.log(f"connection from {peer} refused: {self.args.max_startups_per_source} "
                     f"handshakes from {source} already in progress")
            refuse(sock, Alert(AlertCode.BUSY, "too many handshakes from your address, "
                                               "try again later"))
            return
        t = threading.Thread(target=self.serve, args=(sock, peer, source), daemon=True,
                             name=f"client {peer}")
        try:
            with self.lock:
                self.registry.threads.add(t)
            t.start()
        except Exception as e:  # e.g. RuntimeError: can't start new thread
            with self.lock:
                self.registry.threads.discard(t)
            self.admission.end_handshake(source)
            self.admission.release_slot()
            self.log(f"connection from {peer} refused: cannot serve it: {e}")
            refuse(sock, Alert(AlertCode.BUSY, "server busy, try again later"))

    # one connection ------------------------------------------------------------------------
    def serve(self, sock: socket.socket, peer: str, source: str) -> None:
        try:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                result = self.handshake(sock, peer)
            finally:
                self.admission.end_handshake(source)  # a session is no startup any more
            if result is not None:
                self._serve(sock, peer, *result)
        except Exception as e:  # a bad peer must never take the server down
            self.log(f"connection from {peer} closed: internal error: {e!r}")
        finally:
            session.shut_down(sock)
            sock.close()
            # the slot is free only now: _serve returned once the session's threads ended
            self.admission.release_slot()
            with self.lock:
                self.registry.threads.discard(threading.current_thread())

    def _serve(self, sock: socket.socket, peer: str, hs: ServerHandshake, fp: str) -> None:
        """After the handshake: admit or refuse, then the session until it ends."""
        core = SessionCore(hs.records(), client=False)  # its first record: Welcome or Refused
        if not self._welcome(sock, core, peer, fp):
            return
        session.write_keylog(hs.client_random, hs.keys)
        name = (self.authorized or {}).get(fp, "")
        label = f"{name} {fp}" if name else fp
        conn = session.Connection(sock, core, label=label, events=self.events,
                                  received_dir=str(self.args.received_dir),
                                  max_file_size=self.args.max_file_size,
                                  interrupted=self.interrupt.event)
        key = self.registry.add(Client(conn, fp, name, peer))
        # announced only once the console can pick it (and shutdown can say goodbye to it)
        self.log(f"client {label} connected from {peer}")
        if self.args.verbose or not self.args.headless:
            self.log(f"[{label}] verification code: {hs.code}")
        conn.start()
        if key is None:  # shutdown began meanwhile
            conn.close("server shutting down")
            return
        conn.closed.wait()
        self.registry.remove(key)
        conn.close()

    def _welcome(self, sock: socket.socket, core: SessionCore, peer: str, fp: str) -> bool:
        """The first record: Refused (not in --authorized-clients) or Welcome."""
        if self.authorized is not None and fp not in self.authorized:
            # logged, not recorded: strangers must not grow a file on our disk
            self.log(f"client {fp} from {peer} refused: not in {self.args.authorized_clients}")
            session.send_records(sock, core.seal(Refused(
                Reason.NOT_AUTHORIZED, f"this client ({fp}) is not authorised on this server"
            ), time.monotonic()))
            sock.shutdown(socket.SHUT_WR)
            return False
        self.record_client(fp, peer)
        session.send_records(sock, core.seal(Welcome(), time.monotonic()))
        sock.settimeout(None)
        return True

    def handshake(self, sock: socket.socket, peer: str):
        """Returns (ServerHandshake, client fingerprint), or None after logging why."""
        hs = ServerHandshake(self.identity, self.kem)
        deadline = time.monotonic() + self.args.handshake_timeout
        try:
            hs.consume_client_hello(bytes(session.read_frame(sock, deadline, MAX_HANDSHAKE)))
            session.send_frame(sock, hs.create_server_hello())
            info = hs.consume_client_auth(bytes(session.read_frame(sock, deadline, MAX_HANDSHAKE)))
            return hs, info.fingerprint
        except VersionMismatch as e:
            why, alert = str(e), Alert(AlertCode.BAD_VERSION, str(e))
        except AuthError as e:
            why, alert = f"authentication failed: {e}", Alert(AlertCode.AUTH_FAILED, str(e))
        except session.HandshakeTimeout:
            why = f"handshake not finished within {self.args.handshake_timeout:g} s"
            alert = Alert(AlertCode.TIMEOUT, "handshake timed out")
        except (session.ConnectionLost, PeerAlert) as e:
            why, alert = str(e), None
        except ProtocolError as e:
            kind = "" if isinstance(e, RemoteProtocolError) else "protocol error: "
            why, alert = f"{kind}{e}", Alert(AlertCode.BAD_MESSAGE, str(e)[:200])
        hs.fail()
        self.log(f"connection from {peer} closed: {neutralise(why)}")
        if alert is not None:
            refuse(sock, alert)
        return None

    def record_client(self, fp: str, peer: str) -> None:
        when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        with self.lock:
            line = self.known.record(fp, peer, when)
        if line:
            self.log(line)

    # shutting down ---------------------------------------------------------------------------
    def shutdown(self) -> None:
        clients, threads = self.registry.stop()
        if self.listener is not None:
            try:
                self.listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.listener.close()
        # goodbye to everyone first, then wait for all of them within one deadline
        for client in clients:
            client.conn.begin_close("server shutting down")
        deadline = time.monotonic() + SHUTDOWN_GRACE
        for client in clients:
            client.conn.finish_close(deadline)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def snapshot(self) -> list[Client]:
        return self.registry.snapshot()


def refuse(sock: socket.socket, alert: Alert) -> None:
    """Best-effort plaintext alert, then close; never blocks the caller for long."""
    try:
        sock.settimeout(LIMITS.refuse_timeout)
        session.send_frame(sock, alert.encode())
        sock.shutdown(socket.SHUT_WR)
    except (OSError, session.ConnectionLost):
        pass
    finally:
        sock.close()


# --- console ----------------------------------------------------------------------------------
MENU = "1) send text  2) send a JPG  3) list clients  4) quit"


def console(server: Server) -> None:
    from prompt_toolkit import PromptSession  # noqa: PLC0415
    from prompt_toolkit.patch_stdout import patch_stdout  # noqa: PLC0415

    ps = Prompt(PromptSession(), server.interrupt)
    with patch_stdout(raw=True):
        print(MENU)
        while True:
            try:
                choice = ps.prompt("> ").strip()
            except EOFError:
                return
            if choice in ("4", "q", "quit", "exit"):
                return
            if choice == "3":
                list_clients(server)
            elif choice in ("1", "2"):
                client = pick_client(server, ps)
                if client is not None:
                    (reply_text if choice == "1" else reply_jpg)(server, client, ps)
            elif choice:
                print(MENU)


class Prompt:
    """The console's prompts: an interrupt (SIGTERM; Ctrl-C is a key to
    prompt_toolkit) ends the one being shown; elsewhere see session.Interrupt."""

    def __init__(self, ps, interrupt: session.Interrupt) -> None:
        self._ps, self._interrupt = ps, interrupt

    def prompt(self, message: str) -> str:
        with self._interrupt.prompting():
            return self._ps.prompt(message)


def list_clients(server: Server) -> list[Client]:
    clients = server.snapshot()
    if not clients:
        print("no clients connected")
    for i, c in enumerate(clients, 1):
        print(f"  {i}) {c}")
    return clients


def pick_client(server: Server, ps) -> Client | None:
    clients = server.snapshot()
    if len(clients) == 1:
        return clients[0]
    clients = list_clients(server)
    if not clients:
        return None
    answer = ps.prompt("client number: ").strip()
    if answer.isdigit() and 0 < int(answer) <= len(clients):
        return clients[int(answer) - 1]
    print("no such client")
    return None


def reply_text(server: Server, client: Client, ps) -> None:
    text = ps.prompt("text: ")
    if not text:
        return
    try:
        client.conn.send_text(text)
        print("delivered")
    except (session.ConnectionLost, ProtocolError) as e:
        print(f"not delivered: {e}")


def reply_jpg(server: Server, client: Client, ps) -> None:
    session.send_jpg_menu(client.conn, server.args.assets_dir, server.args.max_file_size,
                          ps.prompt, strip=server.args.strip_metadata)


# --- main -----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (keystore.HomeError, StartupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except ProtocolError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before the signal handlers were in place
        print("interrupted", file=sys.stderr)
        return 130


def load_authorized(path: Path | None) -> dict[str, str] | None:
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise StartupError(f"cannot read authorized clients file {path}: "
                           f"{getattr(e, 'strerror', None) or e}") from e
    try:
        return parse_authorized_clients(text)
    except ValueError as e:
        raise StartupError(f"{path}: {e}") from e


def run(args) -> int:
    home = keystore.open_home(args.home or keystore.default_home())
    identity, created = keystore.load_identity(home)
    if args.show_identity:
        print(identity.fingerprint())
        return EXIT_OK
    authorized = load_authorized(args.authorized_clients)
    kem = session.kem_provider(args.kem_provider)
    try:
        Path(args.received_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StartupError(f"cannot create {args.received_dir}: {e.strerror}") from e
    for name in transfer.remove_stale_temps(args.received_dir):
        print(f"removed a partial file left by a crash: {Path(args.received_dir) / name}",
              flush=True)
    headless = args.headless or not sys.stdin.isatty()
    args.headless = headless

    server = Server(args, identity, home, kem, authorized)
    host, port = server.listen()
    if created:
        print(f"created identity in {home}", flush=True)
    print(f"listening on {host}:{port}", flush=True)
    print(f"identity {identity.fingerprint()}", flush=True)
    if authorized is not None:
        print(f"admitting only the {len(authorized)} client(s) in {args.authorized_clients}",
              flush=True)
    threading.Thread(target=server.accept_loop, daemon=True, name="accept").start()

    # SIGINT/SIGTERM only set a flag (a second one does not cut the shutdown short)
    stop = server.interrupt.install().event
    try:
        if headless:
            while not stop.wait(0.5):
                pass
        else:
            console(server)
    except KeyboardInterrupt:
        pass
    print("shutting down", flush=True)
    server.shutdown()
    print("bye", flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
