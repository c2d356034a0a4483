#!/usr/bin/env python3
"""QSocket 2 client: quantum-safe, end-to-end encrypted chat and JPG transfer.

Interactive menu by default; batch mode with --send-text / --send-file.
"""

from __future__ import annotations

import argparse
import gc
import socket
import sys
import time
from pathlib import Path

import crypt
import keystore
import session
import transfer
from client_data import (
    ClientHandshake,
    Trust,
    check_host,
    known_hosts_line,
    normalise_fingerprint,
)
from console import Cancelled, Console, Transfers
from limits import LIMITS
from protocol import (
    ALERT_MEANING,
    MAX_HANDSHAKE,
    MAX_TEXT,
    VERSION,
    Alert,
    AlertCode,
    AuthError,
    PeerAlert,
    ProtocolError,
    Reason,
    RemoteProtocolError,
    VersionMismatch,
    neutralise,
)
from session_core import CloseKind, SessionCore, WasRefused

__version__ = "2.0.0"

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONNECT, EXIT_AUTH, EXIT_UNDELIVERED = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED = 130
CONNECT_TIMEOUT = LIMITS.connect_timeout
HANDSHAKE_TIMEOUT = LIMITS.handshake_timeout
ALERT_EXIT = {AlertCode.BUSY: EXIT_CONNECT, AlertCode.TIMEOUT: EXIT_CONNECT,
              AlertCode.AUTH_FAILED: EXIT_AUTH, AlertCode.BAD_VERSION: EXIT_CONNECT}
# one exit code and one message for a version mismatch, whichever side notices it
VERSION_MESSAGE = f"the server speaks another protocol version (this client speaks {VERSION})"


class Fatal(Exception):
    """An error that ends the client with a given exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# --- command line -------------------------------------------------------------------
class Ordered(argparse.Action):
    """--send-text and --send-file keep their relative order in one list."""

    def __call__(self, parser, namespace, value, option_string=None):
        if option_string == "--send-text" and value == "":
            # an empty text cancels at the interactive prompt; batch does not send one
            parser.error("--send-text needs a text (it was empty)")
        items = list(getattr(namespace, "batch", None) or [])
        if option_string == "--send-text":
            items.append(("text", value))
        else:  # one or more paths: files, or directories (expanded by expand_batch)
            items += [("file", path) for path in value]
        namespace.batch = items


def build_parser() -> session.Parser:
    p = session.Parser(
        prog="client.py",
        description="QSocket 2 client: end-to-end encrypted chat and JPG transfer with a "
                    "hybrid ECDH P-256 + ML-KEM-1024 key exchange and ECDSA + ML-DSA-65 "
                    "identities.  Without --send-text/--send-file it opens an interactive menu.",
        epilog="exit codes: 0 ok, 1 other error, 2 usage, 3 cannot connect, server busy or "
               "another protocol version, "
               "4 authentication failed (bad proof, unknown or changed host key, not authorised), "
               "5 a text or file was not delivered, 130 interrupted",
    )
    p.add_argument("--host", type=session.host_name, default="127.0.0.1",
                   help="server address (default 127.0.0.1)")
    p.add_argument("-p", "--port", type=session.port_number, default=5555,
                   help="server port (default 5555)")
    p.add_argument("--send-text", action=Ordered, metavar="TEXT", dest="batch_text",
                   help="batch mode: send TEXT and wait for delivery (repeatable)")
    p.add_argument("--send-file", action=Ordered, metavar="PATH", dest="batch_file", nargs="+",
                   help="batch mode: send the JPGs at PATH... (a directory: its JPGs, sorted "
                        "by name) pipelined, each confirmed saved by the server with a "
                        "matching SHA-256; one line per file (repeatable, in order with "
                        "--send-text)")
    p.add_argument("--accept-new-host", action="store_true",
                   help="trust and record an unknown server (first contact) without asking")
    p.add_argument("--fingerprint", type=session.fingerprint, metavar="FP",
                   help="expect this server fingerprint (SHA256:...); recorded when it matches")
    session.add_common_arguments(p, "client", __version__)
    return p


# --- the user's side of events -----------------------------------------------------------
class ClientEvents(session.Events):
    transfers: Transfers | None = None  # the console's status line, when there is one

    def progress(self, total, desc, files=0):
        if self.transfers is not None:
            return self.transfers.progress(total, desc, files)
        return super().progress(total, desc, files)

    def text(self, conn, text):
        self.out(f"[server] {neutralise(text)}")

    def closed(self, conn, why):
        vanished = conn.close_info is not None and conn.close_info.kind is CloseKind.PEER_VANISHED
        self.out("server disconnected" if vanished else f"server: {why}")


# --- connecting and the handshake ---------------------------------------------------------
def connect(args) -> socket.socket:
    try:
        sock = socket.create_connection((args.host, args.port), timeout=CONNECT_TIMEOUT)
    except OSError as e:
        raise Fatal(EXIT_CONNECT, f"cannot connect to {args.host}:{args.port}: "
                                  f"{e.strerror or e}") from e
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def handshake(args, sock, identity, kem, home: Path, ask) -> tuple:
    """Run the handshake; returns (ClientHandshake, the session's SessionCore, welcomed).
    Fatal on any failure."""
    hs = ClientHandshake(identity, kem)
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT
    try:
        session.send_frame(sock, hs.create_client_hello())
        info = hs.consume_server_hello(bytes(session.read_frame(sock, deadline, MAX_HANDSHAKE)))
        try:
            decide_trust(args, home, info.fingerprint, ask)
        except Fatal:
            tell_server(sock, Alert(AlertCode.AUTH_FAILED, "client does not trust this server"))
            raise
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT  # a person may have been asked
        session.send_frame(sock, hs.create_client_auth())
        core = SessionCore(hs.records(), client=True)
        welcome = first_record(core, session.read_frame(sock, deadline))
        sock.settimeout(None)
    except PeerAlert as e:
        code = ALERT_EXIT.get(e.alert.code, EXIT_ERROR)
        if e.alert.code == AlertCode.BAD_VERSION:
            raise Fatal(code, VERSION_MESSAGE) from None
        # the alert's free text is unauthenticated: show only what its code means
        raise Fatal(code, f"server refused the connection: {ALERT_MEANING[e.alert.code]}") \
            from None
    except VersionMismatch:
        tell_server(sock, Alert(AlertCode.BAD_VERSION, f"client speaks version {VERSION}"))
        raise Fatal(ALERT_EXIT[AlertCode.BAD_VERSION], VERSION_MESSAGE) from None
    except AuthError as e:
        tell_server(sock, Alert(AlertCode.AUTH_FAILED, str(e)))
        raise Fatal(EXIT_AUTH, f"authentication failed: {e}") from e
    except RemoteProtocolError as e:
        tell_server(sock, Alert(AlertCode.BAD_MESSAGE, str(e)))
        raise Fatal(EXIT_AUTH, f"handshake failed: {e}") from e
    except session.ConnectionLost as e:
        raise Fatal(EXIT_CONNECT, f"handshake with {args.host}:{args.port} failed: {e}") from e
    if isinstance(welcome, WasRefused):
        code = EXIT_CONNECT if welcome.reason == Reason.BUSY else EXIT_AUTH
        raise Fatal(code, f"server refused this client: {neutralise(welcome.detail)}")
    session.write_keylog(hs.random, hs.keys)
    return hs, core


CHANGED_WARNING = """\
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@    WARNING: SERVER IDENTIFICATION HAS CHANGED!             @
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!
Someone could be eavesdropping on you right now (man-in-the-middle attack)!
It is also possible that the server's identity has just been changed.
The server {key} offered:
    {offered}
but {path}:{line} pins:
    {expected}
If you are sure the change is legitimate, remove line {line} of {path}
and connect again to pin the new identity."""


def first_record(core: SessionCore, body: bytes):
    """The core's Welcomed or WasRefused for the sealed first record (Welcome or
    Refused); or the server's plaintext Alert when it rejected our ClientAuth.  A
    genuine record always verifies, so trying the record first and the alert second
    is unambiguous.  Anything else (a record that does not open and is no Alert,
    another message type, a malformed Welcome or Refused) is one
    case: the client closes without sending anything and exits 4."""
    try:
        msg = core.open_record(body)
    except AuthError:
        try:
            alert = Alert.decode(bytes(body))
        except RemoteProtocolError:
            raise bad_first_record("it does not verify") from None
        raise PeerAlert(alert) from None
    except RemoteProtocolError as e:
        raise bad_first_record(str(e)) from None
    try:
        [event] = core.receive(msg)  # the core: Welcome or Refused, nothing else
    except RemoteProtocolError as e:
        raise bad_first_record(str(e)) from None
    return event


def bad_first_record(why: str) -> Fatal:
    return Fatal(EXIT_AUTH, f"handshake failed: bad first record from the server: {why}")


def tell_server(sock, alert: Alert) -> None:
    try:
        session.send_frame(sock, alert.encode())
    except session.ConnectionLost:
        pass


def decide_trust(args, home: Path, offered: str, ask) -> None:
    """known_hosts TOFU as ssh: known -> go; changed -> refuse; unknown -> flag/ask."""
    path = home / keystore.KNOWN_HOSTS
    try:
        result = check_host(keystore.read_text(path), args.host, args.port, offered)
    except ValueError as e:
        raise Fatal(EXIT_AUTH, f"{path}: {e}; fix or remove that line") from e
    key = f"[{args.host}]:{args.port}"
    expected = normalise_fingerprint(args.fingerprint) if args.fingerprint else None
    if expected is not None and expected != offered:
        # an explicit expectation is checked always, pinned or not
        raise Fatal(EXIT_AUTH, f"server {key} offered {offered}, not the expected {expected}")
    if result.trust is Trust.KNOWN:
        return
    if result.trust is Trust.CHANGED:
        print(CHANGED_WARNING.format(key=key, offered=offered, path=path, line=result.line,
                                     expected=result.expected), file=sys.stderr)
        raise Fatal(EXIT_AUTH, f"server identity for {key} has changed: expected "
                               f"{result.expected}, offered {offered}")
    if expected is None and not args.accept_new_host:
        if ask is None:
            raise Fatal(EXIT_AUTH, f"unknown server {key} offered fingerprint {offered}; "
                                   f"compare it with the 'identity' line the server printed "
                                   f"at start-up, and only if they match pass it with "
                                   f"--fingerprint (or use --accept-new-host)")
        if not ask(key, offered):
            raise Fatal(EXIT_AUTH, "server not trusted; nothing recorded")
    keystore.append_line(path, known_hosts_line(args.host, args.port, offered))
    print(f"recorded {key} {offered} in {path}", file=sys.stderr)


def ask_user(key: str, offered: str) -> bool:
    """Interactive first contact, as ssh: yes / no / paste the expected fingerprint."""
    print(f"The authenticity of server {key} can't be established.\n"
          f"Its fingerprint is {offered}.")
    while True:
        try:
            answer = input("Are you sure you want to trust it (yes/no/[fingerprint])? ").strip()
        except EOFError:
            print()  # the error goes on its own line, not after the question
            return False
        if answer.lower() == "yes":
            return True
        if answer.lower() in ("no", ""):
            return False
        if answer.startswith("SHA256:") or len(answer) == 43:
            if normalise_fingerprint(answer) == offered:
                return True
            print("The fingerprint you pasted does not match the server's.")
            return False
        print("Please type 'yes', 'no' or the fingerprint.")


def connect_and_handshake(args, identity, kem, home: Path, ask):
    """Connect and authenticate.  If the user took longer to answer the first-contact
    question than the server waits for a handshake, connect once more: the answer
    is recorded by then, so the second attempt needs no question."""
    asked = []

    def ask_once(key, offered):
        asked.append(key)
        return ask(key, offered)

    for attempt in (1, 2):
        sock = connect(args)
        try:
            hs, core = handshake(args, sock, identity, kem, home,
                                 ask_once if ask else None)
            return hs, sock, core
        except Fatal as e:
            sock.close()
            if not (attempt == 1 and asked and e.code == EXIT_CONNECT):
                raise
            print("the server closed the connection while you decided; reconnecting",
                  file=sys.stderr)
    raise AssertionError("unreachable")


# --- batch and interactive modes --------------------------------------------------------------
def run_batch(conn: session.Connection, batch, max_size: int, strip: bool = False) -> int:
    """Texts and files in the order given; consecutive files go as one pipelined
    batch.  One line per text and per file; exit 5 at the end if any was not
    delivered.  A lost session (or an interrupt) still reports every file."""
    code = EXIT_OK
    several = sum(kind == "file" for kind, _ in batch) > 1  # lines then name their file
    for kind, value in group_batch(batch):
        if kind == "text":
            try:
                conn.send_text(value)
            except session.ConnectionLost as e:
                print(f"error: text not delivered: {e}", file=sys.stderr)
                return EXIT_UNDELIVERED
            print(f"delivered: {neutralise(value)}", flush=True)
            continue

        def report(index: int, outcome, paths=value) -> None:
            if isinstance(outcome, session.NotDelivered) and outcome.interrupted:
                print(f"not delivered (interrupted): {neutralise(str(paths[index]))}",
                      file=sys.stderr, flush=True)
            elif isinstance(outcome, transfer.Rejected):
                where = f"{neutralise(str(paths[index]))}: " if several else ""
                print(f"error: file not delivered: {where}{neutralise(outcome.detail)}",
                      file=sys.stderr, flush=True)
            else:
                print(outcome.summary("sent", Path(paths[index]).name), flush=True)

        try:
            outcomes = conn.send_files(value, max_size, strip=strip, report=report)
        except session.ConnectionLost:
            return EXIT_UNDELIVERED  # every file was reported, the lost ones with why
        if any(isinstance(o, transfer.Rejected) for o in outcomes):
            code = EXIT_UNDELIVERED
    return code


def group_batch(batch: list) -> list:
    """("text", TEXT) items as they are; each run of consecutive files as one
    ("files", [path, ...]) item."""
    grouped: list = []
    for kind, value in batch:
        if kind == "file" and grouped and grouped[-1][0] == "files":
            grouped[-1][1].append(value)
        elif kind == "file":
            grouped.append(("files", [value]))
        else:
            grouped.append((kind, value))
    return grouped


def expand_batch(batch: list) -> list:
    """A directory given to --send-file stands for its JPGs, sorted by name; what
    else it holds is listed as skipped."""
    out = []
    for kind, value in batch:
        if kind != "file" or not Path(value).is_dir():
            out.append((kind, value))
            continue
        jpgs = [path for path, _ in transfer.list_assets(value)]
        sent = set(jpgs)  # a set: a list here made a big folder cost n² comparisons
        for entry in sorted(Path(value).iterdir(), key=lambda e: e.name.lower()):
            if entry not in sent:
                print(f"skipped: {neutralise(str(entry))} (not a JPG)", flush=True)
        if not jpgs:  # refused before connecting, as a file that cannot be sent
            raise Fatal(EXIT_UNDELIVERED, f"file not sent: {value}: a directory with no JPGs")
        out += [("file", str(path)) for path in jpgs]
    return out


MENU = "1) send text  2) send a JPG  3) quit"


def run_interactive(conn: session.Connection, args, interrupt: session.Interrupt) -> int:
    transfers = Transfers()
    ui = Console(interrupt, transfers)
    if not ui.tty:
        return menu_loop(conn, args, ui)
    conn.events.transfers = transfers  # progress in the status line, not in the output
    with ui.patched_stdout():
        return menu_loop(conn, args, ui)


def menu_loop(conn: session.Connection, args, ui: Console) -> int:
    """The menu; a peer hang-up ends whichever prompt is shown."""
    def ask(message: str) -> str:
        return ui.prompt(message, closed=conn.closed)

    print(MENU)
    while not conn.closed.is_set():
        choice = ui.prompt("> ", menu=True, closed=conn.closed).strip()
        if conn.closed.is_set():
            break
        try:
            if choice in ("1", "text"):
                text_loop(conn, ask)
            elif choice in ("2", "jpg", "file"):
                session.send_jpg_menu(conn, args.assets_dir, args.max_file_size, ask,
                                      strip=args.strip_metadata, busy=ui.busy)
            elif choice in ("3", "q", "quit", "exit"):
                return EXIT_OK
            elif choice:
                print(MENU)
        except Cancelled:
            pass  # back to the menu
    return EXIT_OK if conn.close_info is not None and conn.close_info.clean else EXIT_ERROR


def text_loop(conn: session.Connection, ask) -> None:
    """A text prompt that stays: every Enter sends, an empty line or Esc leaves."""
    while True:
        text = ask("text to server> ")
        if not text or conn.closed.is_set():
            return
        try:
            conn.send_text(text)
            print("delivered")
        except (session.ConnectionLost, ProtocolError) as e:
            print(f"not delivered: {e}")
            return


# --- main -------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except Fatal as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except keystore.HomeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def run(args) -> int:
    """The client from start to end, one named step after the other."""
    home, identity = open_identity(args)
    if args.show_identity:
        print(identity.fingerprint())
        return EXIT_OK
    try:
        kem = session.kem_provider(args.kem_provider)
    except ProtocolError as e:
        raise Fatal(EXIT_USAGE, str(e)) from e
    batch = expand_batch(getattr(args, "batch", None) or [])
    interactive = not batch
    ask = ask_user if interactive and sys.stdin.isatty() else None
    refuse_batch_locally(batch, args)
    prepare_received_dir(args.received_dir)
    hs, sock, core = connect_and_handshake(args, identity, kem, home, ask)
    if args.verbose or interactive:
        announce(args, hs)
    # from here on SIGINT and SIGTERM only set a flag that the session acts on
    # between records (see session.Interrupt): goodbye to the server, exit 130
    interrupt = session.Interrupt()
    conn = session.Connection(sock, core, label="server", events=ClientEvents(),
                              received_dir=str(args.received_dir),
                              max_file_size=args.max_file_size,
                              interrupted=interrupt.event)
    interrupt.install()
    conn.start()
    return run_session(conn, args, batch, interrupt)


def open_identity(args) -> tuple[Path, crypt.Identity]:
    home = keystore.open_home(args.home or keystore.default_home())
    identity, created = keystore.load_identity(home)
    if created and not args.show_identity:
        print(f"created identity {identity.fingerprint()} in {home}", file=sys.stderr)
    return home, identity


def refuse_batch_locally(batch: list, args) -> None:
    """What --send-text/--send-file could never deliver fails before connecting."""
    for kind, value in batch:
        if kind == "text" and len(value.encode("utf-8")) > MAX_TEXT:
            raise Fatal(EXIT_UNDELIVERED, f"text not sent: longer than {MAX_TEXT} bytes")
        if kind == "file":
            try:
                out = transfer.check_outgoing(value, args.max_file_size)
                if args.strip_metadata:  # a photo we cannot strip is not sent as is
                    session.stripped_outgoing(out)
            except transfer.Rejected as e:
                raise Fatal(EXIT_UNDELIVERED, f"file not sent: {e.detail}") from e


def prepare_received_dir(received_dir) -> None:
    try:
        Path(received_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Fatal(EXIT_ERROR, f"cannot create {received_dir}: {e.strerror}") from e
    for name in transfer.remove_stale_temps(received_dir):
        print(f"removed a partial file left by a crash: {Path(received_dir) / name}",
              file=sys.stderr)


def announce(args, hs) -> None:
    print(f"connected to {args.host}:{args.port}, server {hs.server.fingerprint}")
    # one 80-column line: it is read aloud and compared with the server's
    print(f"verification code: {hs.code}  (compare with the server's)")


def run_session(conn: session.Connection, args, batch: list, interrupt: session.Interrupt
                ) -> int:
    """The batch or the menu; then goodbye in every case.  The exit code."""
    code = EXIT_INTERRUPTED
    try:
        if batch:
            code = run_batch(conn, batch, args.max_file_size, args.strip_metadata)
        else:
            code = run_interactive(conn, args, interrupt)
    except KeyboardInterrupt:
        print("interrupted: saying goodbye", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except ProtocolError as e:
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_ERROR
    finally:
        reason, kind = GOODBYE.get(code, ("client gave up", CloseKind.LOCAL_SHUTDOWN))
        conn.close(reason, kind=kind)
    return code


GOODBYE = {EXIT_OK: ("client done", CloseKind.LOCAL_SHUTDOWN),
           EXIT_INTERRUPTED: ("client interrupted", CloseKind.INTERRUPTED)}


if __name__ == "__main__":
    code = main()
    # Exit would next collect and free, one by one, the ~20,000 objects our imports made,
    # which the OS frees at once anyway: ~15 ms of every run (measured, issue 15).  Frozen,
    # the collector leaves them alone; stdout is still flushed and threads still joined.
    gc.freeze()
    sys.exit(code)
