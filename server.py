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
from console import Cancelled, Console, Transfers
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
    p.add_argument("-p", "--port", type=session.listen_port, default=5555,
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
    transfers: Transfers | None = None  # the console's status line, when there is one
    recent: session.Connection | None = None  # the client that last wrote or was picked

    def text(self, conn, text):
        self.recent = conn
        super().text(conn, text)

    def progress(self, total, desc, files=0):
        if self.transfers is not None:
            return self.transfers.progress(total, desc, files)
        return super().progress(total, desc, files)

    def file_saved(self, conn, path, result):
        self.out(f"[{conn.label}] {result.summary('received')} ({result.metadata}), "
                 f"saved at {neutralise(path)}")

    def closed(self, conn, why):
        vanished = conn.close_info is not None and conn.close_info.kind is CloseKind.PEER_VANISHED
        self.out(f"[{conn.label}] {'disconnected' if vanished else why}")


class Client:
    """A connected, authenticated client as the console sees it."""

    def __init__(self, conn: session.Connection, fp: str, name: str, addr: str,
                 number: int = 0) -> None:
        self.conn, self.fingerprint, self.name, self.addr = conn, fp, name, addr
        self.number = number

    def __str__(self) -> str:
        return f"{self.name + ' ' if self.name else ''}{self.fingerprint} ({self.addr})"


HANDLE_FP = 6  # fingerprint characters in a handle: enough to tell a few clients apart


def handle(number: int, fp: str, name: str) -> str:
    """A client's short name for this session, in every line about it: its
    --authorized-clients name, else its number and a fingerprint prefix (#2 5kDLxQ)."""
    return neutralise(name) if name else f"#{number} {fp.removeprefix('SHA256:')[:HANDLE_FP]}"


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
            client.number = self._next
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


class Visit:
    """One accepted connection on its own thread, from the handshake to the end of its
    session: the handshake (its per-source count given back the moment it ends), then
    Welcome or Refused, then the session, in the Registry while it runs.  Its
    --max-clients slot is released only once the session's threads ended."""

    def __init__(self, server: Server, sock: socket.socket, peer: str, source: str) -> None:
        self.server, self.sock, self.peer, self.source = server, sock, peer, source
        self.handshake_ended = False

    def serve(self) -> None:
        srv, sock = self.server, self.sock
        try:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                result = self.handshake()
            finally:
                self.end_handshake()
            if result is not None:
                self.run_session(*result)
        except Exception as e:  # a bad peer must never take the server down
            srv.log(f"connection from {self.peer} closed: internal error: {e!r}")
        finally:
            session.shut_down(sock)
            sock.close()
            # the slot is free only now: run_session returned once the session's threads ended
            srv.admission.release_slot()
            with srv.lock:
                srv.registry.threads.discard(threading.current_thread())

    def end_handshake(self) -> None:
        """Once: a session (or a closed connection) is no startup."""
        if not self.handshake_ended:
            self.handshake_ended = True
            self.server.admission.end_handshake(self.source)

    def handshake(self) -> tuple[ServerHandshake, str] | None:
        """(ServerHandshake, client fingerprint), or None after logging why; a failed
        one ends its handshake first, so that when its line is logged the address may
        start another handshake."""
        srv, sock = self.server, self.sock
        hs = ServerHandshake(srv.identity, srv.kem)
        deadline = time.monotonic() + srv.args.handshake_timeout
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
            why = f"handshake not finished within {srv.args.handshake_timeout:g} s"
            alert = Alert(AlertCode.TIMEOUT, "handshake timed out")
        except (session.ConnectionLost, PeerAlert) as e:
            why, alert = str(e), None
        except ProtocolError as e:
            kind = "" if isinstance(e, RemoteProtocolError) else "protocol error: "
            why, alert = f"{kind}{e}", Alert(AlertCode.BAD_MESSAGE, str(e)[:200])
        hs.fail()
        self.end_handshake()
        srv.log(f"connection from {self.peer} closed: {neutralise(why)}")
        if alert is not None:
            refuse(sock, alert)
        return None

    def run_session(self, hs: ServerHandshake, fp: str) -> None:
        """After the handshake: admit or refuse, then the session until it ends."""
        srv, args, peer = self.server, self.server.args, self.peer
        core = SessionCore(hs.records(), client=False)  # its first record: Welcome or Refused
        if not self.welcome(core, fp):
            return
        session.write_keylog(hs.client_random, hs.keys)
        name = (srv.authorized or {}).get(fp, "")
        label = f"{name} {fp}" if name else fp
        conn = session.Connection(self.sock, core, label=label, events=srv.events,
                                  received_dir=str(args.received_dir),
                                  max_file_size=args.max_file_size,
                                  interrupted=srv.interrupt.event)
        client = Client(conn, fp, name, peer)
        key = srv.registry.add(client)
        if key is not None and not args.headless:  # the log keeps full fingerprints
            conn.label = label = handle(key, fp, name)
        # announced only once the console can pick it (and shutdown can say goodbye to it)
        srv.log(f"client {label} connected from {peer}")
        if not args.headless:
            srv.log(f"[{label}] fingerprint {fp}")
        if args.verbose or not args.headless:
            srv.log(f"[{label}] verification code: {hs.code}")
        try:
            conn.start()
            if key is None:  # shutdown began meanwhile
                conn.close("server shutting down")
                return
            conn.closed.wait()
        finally:  # also when the session could not start: it leaves the registry
            if key is not None:
                srv.registry.remove(key)
        conn.close()

    def welcome(self, core: SessionCore, fp: str) -> bool:
        """The first record: Refused (not in --authorized-clients) or Welcome."""
        srv, sock, peer = self.server, self.sock, self.peer
        if srv.authorized is not None and fp not in srv.authorized:
            # logged, not recorded: strangers must not grow a file on our disk
            srv.log(f"client {fp} from {peer} refused: not in {srv.args.authorized_clients}")
            session.send_records(sock, core.seal(Refused(
                Reason.NOT_AUTHORIZED, f"this client ({fp}) is not authorised on this server"
            ), time.monotonic()))
            sock.shutdown(socket.SHUT_WR)
            return False
        srv.record_client(fp, peer)
        session.send_records(sock, core.seal(Welcome(), time.monotonic()))
        sock.settimeout(None)
        return True


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
        t = threading.Thread(target=Visit(self, sock, peer, source).serve, daemon=True,
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
    transfers = Transfers()
    server.events.transfers = transfers  # progress in the status line, not in the output
    ui = Console(server.interrupt, transfers)
    with ui.patched_stdout():
        print(MENU)
        warned = False  # the first Ctrl-C with clients connected only says so
        while True:
            try:
                choice = ui.prompt("> ", menu=True).strip()
            except KeyboardInterrupt:
                count = len(server.snapshot())
                if server.interrupt.event.is_set() or warned or not count:
                    raise
                warned = True
                print(f"{count} client{'s' if count > 1 else ''} connected: press Ctrl-C "
                      f"again to quit")
                continue
            warned = False
            if choice in ("4", "q", "quit", "exit"):
                return
            try:
                if choice == "3":
                    list_clients(server)
                elif choice in ("1", "2"):
                    targets = pick_clients(server, ui)
                    if targets:
                        (reply_text if choice == "1" else reply_jpg)(server, targets, ui)
                elif choice:
                    print(MENU)
            except Cancelled:
                pass  # back to the menu


def default_client(server: Server) -> Client | None:
    """Where a reply goes without asking: the only client, else the one last picked
    or that last wrote (whichever was later), while it is connected."""
    clients = server.snapshot()
    if len(clients) == 1:
        return clients[0]
    recent = server.events.recent
    return next((c for c in clients if c.conn is recent), None)


def list_clients(server: Server) -> list[Client]:
    """Each client on two lines that fit 80 columns: number, handle, address, then
    its full fingerprint."""
    clients = server.snapshot()
    if not clients:
        print("no clients connected")
    default = default_client(server) if len(clients) > 1 else None
    for c in clients:
        mark = "  (default)" if c is default else ""
        print(f"  {c.number}) {c.conn.label}  {c.addr}{mark}\n       {c.fingerprint}")
    return clients


def pick_clients(server: Server, ui: Console) -> list[Client]:
    """The clients to send to: the only one, else asked (a number or `all`; Enter
    takes the default the prompt names)."""
    clients = server.snapshot()
    if len(clients) == 1:
        return clients
    list_clients(server)
    if not clients:
        return []
    default = default_client(server)
    hint = f" [{short(default)}]" if default else ""
    answer = ui.prompt(f"client number or all{hint}: ").strip().lstrip("#")
    if not answer:
        return [default] if default else []
    if answer.lower() == "all":
        return server.snapshot()
    picked = next((c for c in clients if answer.isdigit() and c.number == int(answer)), None)
    if picked is None:
        print(f"no client number {answer} (list clients: 3)")
        return []
    server.events.recent = picked.conn
    return [picked]


def short(client: Client) -> str:
    """The client in a prompt: its authorised name, else its number."""
    return client.name or f"#{client.number}"


def reply_text(server: Server, targets: list[Client], ui: Console) -> None:
    """A text prompt that stays: every Enter sends, an empty line or Esc leaves."""
    to = short(targets[0]) if len(targets) == 1 else "all"
    while True:
        text = ui.prompt(f"text to {to}> ")
        if not text:
            return
        for client in targets:
            who = f"{client.conn.label}: " if len(targets) > 1 else ""
            try:
                client.conn.send_text(text)
                print(f"{who}delivered")
            except (session.ConnectionLost, ProtocolError) as e:
                print(f"{who}not delivered: {e}")
        targets = [c for c in targets if not c.conn.closed.is_set()]
        if not targets:
            return


def reply_jpg(server: Server, targets: list[Client], ui: Console) -> None:
    choices = session.choose_jpgs(server.args.assets_dir, server.args.max_file_size, ui.prompt,
                                  strip=server.args.strip_metadata)
    if choices is None:
        return
    for client in targets:
        who = f"{client.conn.label}: " if len(targets) > 1 else ""
        if len(choices) == 1:
            session.send_jpg(client.conn, *choices[0], server.args.max_file_size, busy=ui.busy,
                             who=who)
        else:  # several photos picked (1,3-5 or all): one pipelined batch
            session.send_jpg_batch(client.conn, choices, server.args.max_file_size,
                                   busy=ui.busy, who=who)


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
