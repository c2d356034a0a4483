"""The client's terminal is safe too (DESIGN.md section 3.9, the server-to-client direction).

A crafted server, built from the sans-I/O core, sends the real client.py escape
sequences, a bidi override and ANSI colours in a text, a file name, a refusal
after the handshake and an alert before it; the client must print them escaped,
in batch output and on the interactive console (a real pty) alike.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import socket
import threading

from conftest import LINE_TIMEOUT, Env, files_in, identity
from test_interactive import CLIENT_MENU, Tty, assert_clean

import session
from protocol import (
    Alert,
    AlertCode,
    Bye,
    Delivered,
    FileAccept,
    FileData,
    FileEnd,
    FileOffer,
    FileSaved,
    Reason,
    Refused,
    Text,
    Welcome,
    decode_message,
)
from server_data import ServerHandshake

HOSTILE = "\x1b]0;pwned\x07\u202e\x1b[31mred\x1b[0m"
SHOWN = "\\x1b]0;pwned\\x07\\u202e\\x1b[31mred\\x1b[0m"
HOSTILE_NAME = "\x1b[32mgreen\x07\u202egpj.jpg"
SHOWN_NAME = "\\x1b[32mgreen\\x07\\u202egpj.jpg"
RAW = ("\x1b", "\x07", "\u202e")


class CraftedServer:
    """Accepts one client and, depending on `mode`, refuses it in plaintext ("alert"),
    refuses it after the handshake ("refused"), or welcomes it and sends a hostile
    text and a file with a hostile name before acknowledging the client's own text
    ("session"), or after acknowledging the client's first text ("after-text")."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.data = b"\xff\xd8\xff\xe0" + os.urandom(5000)
        self.received: list = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            sock, _ = self.listener.accept()
            with sock:
                sock.settimeout(LINE_TIMEOUT)
                self._serve(sock)
        except BaseException as e:  # reported by join()
            self.error = e

    def _serve(self, sock: socket.socket) -> None:
        hs = ServerHandshake(identity("server"))
        hs.consume_client_hello(bytes(session.read_frame(sock)))
        if self.mode == "alert":
            session.send_frame(sock, Alert(AlertCode.BUSY, HOSTILE).encode())
            return
        session.send_frame(sock, hs.create_server_hello())
        hs.consume_client_auth(bytes(session.read_frame(sock)))
        sender, receiver = hs.records()

        def send(msg) -> None:
            session.send_pieces(sock, sender.seal(msg.TYPE, msg.encode()))

        if self.mode == "refused":
            send(Refused(Reason.NOT_AUTHORIZED, HOSTILE))
            return
        session.send_pieces(sock, sender.seal(Welcome.TYPE, b""))
        if self.mode == "session":
            send(Text(1, HOSTILE))
            send(FileOffer(1, len(self.data), HOSTILE_NAME))
        pending = None  # the client's text, acknowledged once everything above is shown
        synced = False
        while True:
            msg = decode_message(*receiver.open(session.read_frame(sock)))
            self.received.append(msg)
            if self.mode == "after-text" and isinstance(msg, Text):
                # a person at the menu: wait until the menu is shown and used
                self.mode = "session"
                send(Delivered(msg.msg_id))
                send(Text(1, HOSTILE))
                send(FileOffer(1, len(self.data), HOSTILE_NAME))
            elif isinstance(msg, FileAccept):
                send(FileData(1, self.data))
                send(FileEnd(1, hashlib.sha256(self.data).digest()))
            elif isinstance(msg, FileSaved):
                send(Text(2, "sync"))  # its Delivered comes after the file's lines
            elif msg == Delivered(2):
                synced = True
            elif isinstance(msg, Text):
                pending = msg.msg_id
            elif isinstance(msg, Bye):
                return
            if synced and pending is not None:
                send(Delivered(pending))
                pending = None

    def join(self) -> None:
        self.thread.join(LINE_TIMEOUT)
        self.listener.close()
        assert not self.thread.is_alive(), "crafted server did not finish"
        if self.error is not None:
            raise self.error


def run_client(env: Env, mode: str):
    srv = CraftedServer(mode)
    try:
        r = env.client("--port", str(srv.port), "--fingerprint", identity("server").fingerprint(),
                       "--send-text", "hello")
    finally:
        srv.join()
    for raw in RAW:
        assert raw not in r.stdout + r.stderr, f"raw {raw!r} reached the client's terminal"
    return srv, r


def test_server_text_and_file_name_are_neutralised_on_the_client(env: Env):
    srv, r = run_client(env, "session")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert f"[server] {SHOWN}" in lines
    assert any(line.startswith(f"[server] receiving '{SHOWN_NAME}' (") for line in lines), lines
    saved = files_in(env.client_received)
    assert len(saved) == 1 and not any(raw in saved[0] for raw in RAW)
    assert (env.client_received / saved[0]).read_bytes() == srv.data
    assert any(line.startswith("[server] saved '") for line in lines), lines
    assert "delivered: hello" in lines
    assert Text(1, "hello") in srv.received


def test_server_refusal_reasons_are_neutralised_on_the_client(env: Env):
    _, r = run_client(env, "refused")
    assert r.returncode == 4, r.stderr
    assert r.stderr.splitlines()[-1] == "error: server refused this client: " + SHOWN


def test_an_alerts_unauthenticated_text_never_reaches_the_client_terminal(env: Env):
    # protocol v2: a plaintext Alert is shown by its code's meaning only
    _, r = run_client(env, "alert")
    assert r.returncode == 3, r.stderr
    assert r.stderr.splitlines()[-1] == "error: server refused the connection: server busy"
    assert not any(raw in r.stderr for raw in RAW) and "pwned" not in r.stderr


def test_server_text_and_file_name_are_neutralised_on_the_interactive_console(env: Env):
    srv = CraftedServer("after-text")
    tty = Tty("client.py", "--port", str(srv.port), "--home", str(env.client_home),
              "--assets-dir", str(env.assets), "--received-dir", str(env.client_received),
              "--fingerprint", identity("server").fingerprint())
    raw = io.StringIO()
    tty.child.logfile_read = raw  # everything the client wrote to its terminal
    try:
        tty.expect_line(f"^{re.escape(CLIENT_MENU)}$")
        tty.answer(">", "1")
        tty.answer("text to server>", "hello")  # issue 11: the text prompt stays
        # the server's lines (one reader thread, in order); "delivered" may come between
        tty.expect_line(f"^{re.escape(f'[server] {SHOWN}')}$")
        tty.expect_line(rf"^\[server\] receiving '{re.escape(SHOWN_NAME)}' \(")
        tty.expect_line(r"^\[server\] sync$")  # after the file's lines
        tty.answer("text to server>", "")  # an empty line: back to the menu
        tty.answer(">", "3")
        assert tty.wait_exit() == 0
        assert tty.lines("^delivered$")
    finally:
        tty.kill()
        srv.join()
    assert_clean(tty)
    # prompt_toolkit paints with escape sequences of its own: look for the server's
    for hostile in ("\x1b]0;pwned", "\x07", "\u202e", "\x1b[31mred", "\x1b[32mgreen"):
        assert hostile not in raw.getvalue(), f"raw {hostile!r} reached the client's terminal"
    assert len(files_in(env.client_received)) == 1
