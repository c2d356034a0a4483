"""The consoles as a person sees them (issue 11): client.py and server.py run in an
80x24 pseudo-terminal and everything they write is rendered by a terminal emulator
(pyte), so the assertions are about the rows on the screen, not about the byte
stream.  Tests poll the rendered screen until a condition holds (generous
deadlines), never sleep.  A transfer is kept "running" by stopping its sender with
SIGSTOP once the receiver shows it, and resumed with SIGCONT.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import time
from pathlib import Path

import pexpect
import pyte
import pytest
from conftest import PY, ROOT, Env, Proc, child_env, files_in, make_jpeg

COLS, ROWS = 80, 24
TIMEOUT = 30.0
FP = r"SHA256:[A-Za-z0-9+/]{43}"
CODE = r"\d{4}-\d{4}-\d{4}"
BIG = 256 << 20  # bytes: seconds of transfer, and the sender is paused anyway
STATUS = re.compile(r"^(receiving|sending) \S.* +\d+%  [\d.]+ (?:B|KiB|MiB|GiB) of ")


class Term:
    """One program in an 80x24 pty, rendered by pyte (with the rows that scrolled off)."""

    def __init__(self, script: str, *args: str) -> None:
        env = child_env(TERM="xterm", LANG="C.UTF-8")
        for var in ("COLUMNS", "LINES", "LC_ALL", "NO_COLOR"):
            env.pop(var, None)
        self.child = pexpect.spawn(PY, [script, *args], cwd=str(ROOT), env=env,
                                   dimensions=(ROWS, COLS), timeout=TIMEOUT, encoding="utf-8",
                                   codec_errors="replace")
        self.screen = pyte.HistoryScreen(COLS, ROWS, history=1000)
        self.stream = pyte.Stream(self.screen)
        self.eof = False

    def _read(self, timeout: float) -> None:
        try:
            self.stream.feed(self.child.read_nonblocking(65536, timeout=max(timeout, 0.01)))
            self._rows = self._scrolled = None
        except pexpect.TIMEOUT:
            pass
        except pexpect.EOF:
            self.eof = True

    _rows = _scrolled = None  # rendered once per read

    def rows(self) -> list[str]:
        """What the screen shows now, row by row (trailing blanks removed)."""
        if self._rows is None:
            self._rows = [row.rstrip() for row in self.screen.display]
        return self._rows

    def scrolled(self) -> list[str]:
        """The rows that scrolled off the top, then the screen."""
        if self._scrolled is None:
            self._scrolled = ["".join(line[x].data for x in range(COLS)).rstrip()
                              for line in self.screen.history.top] + self.rows()
        return self._scrolled

    def until(self, what: str, found, timeout: float = TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            self._read(0.05)
            hit = found()
            if hit:
                return hit
            if time.monotonic() > deadline or self.eof:
                raise AssertionError(f"{what} not on the screen within {timeout:g} s"
                                     f"{' (program ended)' if self.eof else ''}:\n"
                                     + "\n".join(self.scrolled()[-60:]))

    def row(self, pattern: str, timeout: float = TIMEOUT) -> re.Match:
        """A row (on the screen or scrolled off) matching pattern in full."""
        rx = re.compile(pattern)
        return self.until(repr(pattern), lambda: next(
            (m for r in self.scrolled() for m in [rx.fullmatch(r)] if m), None), timeout)

    def lines(self) -> list[str]:
        """Every row, and every run of a full-width row with the rows after it (a line
        that wrapped; one exactly 80 wide did not, so both readings are offered)."""
        rows = self.scrolled()
        out = list(rows)
        for i, r in enumerate(rows):
            joined = r
            for nxt in rows[i + 1:]:
                if len(joined) % COLS:
                    break
                joined += nxt
                out.append(joined)
        return out

    def line(self, pattern: str, timeout: float = TIMEOUT) -> re.Match:
        """A logical line (wrapped rows joined) matching pattern in full."""
        rx = re.compile(pattern)
        return self.until(repr(pattern), lambda: next(
            (m for r in self.lines() for m in [rx.fullmatch(r)] if m), None), timeout)

    def shows(self, pattern: str, timeout: float = TIMEOUT) -> re.Match:
        """A row on the current screen matching pattern in full."""
        rx = re.compile(pattern)
        return self.until(repr(pattern), lambda: next(
            (m for r in self.rows() for m in [rx.fullmatch(r)] if m), None), timeout)

    def cursor_row(self) -> str:
        return self.rows()[self.screen.cursor.y]

    def at_prompt(self, prompt: str, typed: str = "", timeout: float = TIMEOUT) -> None:
        """The cursor's row is exactly `prompt` + `typed`, the cursor after it."""
        want = (prompt + typed).rstrip()
        self.until(f"the prompt {want!r}",
                   lambda: self.cursor_row() == want
                   and self.screen.cursor.x == len(prompt + typed), timeout)

    def type(self, text: str, enter: bool = True) -> None:
        self.child.send(text + ("\r" if enter else ""))

    def answer(self, prompt: str, text: str) -> None:
        self.at_prompt(prompt)
        self.type(text)

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        self.until("the end of output", lambda: self.eof, timeout)
        deadline = time.monotonic() + timeout
        while self.child.isalive():
            assert time.monotonic() < deadline
            time.sleep(0.02)  # reaping a process whose pty is closed, not synchronising
        return self.child.exitstatus if self.child.signalstatus is None \
            else -self.child.signalstatus

    def kill(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)
        self.child.close(force=True)


def handle(fp: str, number: int) -> str:
    return re.escape(f"#{number} {fp.removeprefix('SHA256:')[:6]}")


def assert_no_mixed_rows(term: Term) -> None:
    """Every row that shows progress is a status row and nothing else."""
    for r in term.scrolled():
        if re.search(r"\d+%|MiB of|/s\]", r) and not r.startswith(("sent ", "saved ", "[")):
            assert STATUS.match(r), f"a row mixes progress with something else: {r!r}"
    assert "Traceback" not in "\n".join(term.scrolled())


def big_jpeg(path: Path, size: int = BIG) -> Path:
    """A sparse file that starts like a JPEG: fast to make and to read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0")
        f.truncate(size)
    return path


class Rig:
    def __init__(self, env: Env) -> None:
        self.env = env
        self.server_assets = env.root / "server-assets"
        self.server_assets.mkdir()
        self.terms: list[Term] = []
        self.procs: list[Proc] = []

    def console(self, *extra: str) -> tuple[Term, int]:
        e = self.env
        srv = Term("server.py", "-p", "0", "--home", str(e.server_home),
                   "--assets-dir", str(self.server_assets),
                   "--received-dir", str(e.server_received), *extra)
        self.terms.append(srv)
        port = int(srv.row(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        srv.at_prompt("> ")
        return srv, port

    def client_home(self, i: int) -> Path:
        return self.env.client_home if i == 0 else self.env.root / f"client-{i}-home"

    def fingerprint(self, i: int) -> str:
        r = self.env.client("--show-identity", home=self.client_home(i))
        return r.stdout.strip()

    def client(self, port: int, i: int = 0) -> Term:
        e = self.env
        cli = Term("client.py", "-p", str(port), "--accept-new-host",
                   "--home", str(self.client_home(i)), "--assets-dir", str(e.assets),
                   "--received-dir", str(e.root / f"received-{i}"))
        self.terms.append(cli)
        cli.row(rf"verification code: {CODE}  \(compare with the server's\)")
        cli.at_prompt("> ")
        return cli

    def batch(self, port: int, i: int, *args: str) -> Proc:
        e = self.env
        p = Proc([PY, "client.py", "--port", str(port), "--accept-new-host",
                  "--home", str(self.client_home(i)), "--received-dir", str(e.client_received),
                  *args])
        self.procs.append(p)
        return p


@pytest.fixture
def rig(env: Env):
    r = Rig(env)
    yield r
    for p in r.procs:
        if p.p.poll() is None:
            p.p.send_signal(signal.SIGCONT)
            p.p.kill()
        p.stop()
    for t in r.terms:
        t.kill()


def status_rows(term: Term) -> list[str]:
    return [r for r in term.rows() if STATUS.match(r)]


# --- a receive in progress on the server console ----------------------------------------
def test_server_screen_during_a_receive_keeps_texts_and_the_typed_line_intact(rig: Rig):
    srv, port = rig.console()
    big = big_jpeg(rig.env.assets / "big.jpg")
    fps = [rig.fingerprint(0), rig.fingerprint(1)]

    sender = rig.batch(port, 0, "--send-file", str(big))
    srv.row(rf"client {handle(fps[0], 1)} connected from 127\.0\.0\.1:\d+")
    srv.shows(r"receiving big\.jpg +\d+%.*")
    os.kill(sender.p.pid, signal.SIGSTOP)  # the transfer stays "running" from here on
    srv.row(rf"\[{handle(fps[0], 1)}\] receiving 'big\.jpg' \(256\.0 MiB\)")

    # the operator starts typing at the menu; the line stays as typed
    srv.type("half a thought", enter=False)
    srv.at_prompt("> ", "half a thought")

    # a second client connects and writes 40 characters: each line fits one row
    message = "forty characters of text, exactly here.."
    assert len(message) == 40
    talker = rig.batch(port, 1, "--send-text", message)
    assert talker.p.wait(TIMEOUT) == 0
    srv.row(rf"client {handle(fps[1], 2)} connected from 127\.0\.0\.1:\d+")
    srv.row(rf"\[{handle(fps[1], 2)}\] fingerprint {re.escape(fps[1])}")
    srv.row(rf"\[{handle(fps[1], 2)}\] verification code: {CODE}")
    srv.row(rf"\[{handle(fps[1], 2)}\] {re.escape(message)}")
    srv.at_prompt("> ", "half a thought")
    assert len(status_rows(srv)) == 1, srv.rows()
    assert_no_mixed_rows(srv)

    # resumed: the status row goes, one summary line comes, the typed line is still there
    os.kill(sender.p.pid, signal.SIGCONT)
    srv.line(rf"\[{handle(fps[0], 1)}\] received 'big\.jpg': {BIG} bytes, SHA-256 [0-9a-f]{{64}}"
             r".*", timeout=90)
    srv.until("no status row", lambda: not status_rows(srv))
    srv.at_prompt("> ", "half a thought")
    assert sender.p.wait(TIMEOUT) == 0
    assert_no_mixed_rows(srv)
    # the typed line is still the operator's: Enter runs it (not a choice: the menu again)
    menu = "1) send text  2) send a JPG  3) list clients  4) quit"
    before = srv.scrolled().count(menu)
    srv.type("")
    srv.until("the menu again", lambda: srv.scrolled().count(menu) == before + 1)


# --- the client console: typing while a file arrives, and a receive cut short --------------
def test_client_screen_while_receiving_and_when_the_sender_dies(rig: Rig):
    srv, port = rig.console()
    big_jpeg(rig.server_assets / "big.jpg")
    cli = rig.client(port)
    srv.type("2")
    srv.answer("number or path: ", "1")
    cli.shows(r"receiving big\.jpg +\d+%.*")
    os.kill(srv.child.pid, signal.SIGSTOP)  # the sender stops mid-file
    cli.row(r"\[server\] receiving 'big\.jpg' \(256\.0 MiB\)")
    cli.type("typing while it arrives", enter=False)
    cli.at_prompt("> ", "typing while it arrives")
    assert len(status_rows(cli)) == 1
    assert_no_mixed_rows(cli)

    # the server dies mid-file: the client says what was lost, and saved nothing
    os.kill(srv.child.pid, signal.SIGKILL)
    m = cli.line(r"\[server\] receiving 'big\.jpg' aborted after ([\d.]+ (?:B|KiB|MiB)): "
                 r"(.+); nothing saved")
    # what the kernel makes of a killed peer: EOF (between or within frames) or a reset
    assert m.group(2) in ("peer disconnected", "connection closed in the middle of a frame",
                          "connection lost: Connection reset by peer"), m.group(2)
    cli.row(r"server disconnected|server: .*")
    assert cli.wait_exit() == 1
    assert files_in(rig.env.root / "received-0") == []
    assert_no_mixed_rows(cli)


def test_headless_log_reports_an_aborted_receive(rig: Rig):
    srv = rig.env.server()
    big = big_jpeg(rig.env.assets / "big.jpg")
    sender = rig.batch(srv.port, 0, "--send-file", str(big))
    srv.wait_for(r"\] receiving 'big\.jpg' \(256\.0 MiB\)$")
    os.kill(sender.p.pid, signal.SIGKILL)
    srv.wait_for(r"^\[SHA256:\S+\] receiving 'big\.jpg' aborted after [\d.]+ (?:B|KiB|MiB): "
                 r".+; nothing saved$")
    assert files_in(rig.env.server_received) == []


# --- `all` --------------------------------------------------------------------------------------
def test_all_reaches_three_clients_with_a_result_for_each(rig: Rig):
    srv, port = rig.console()
    photo = make_jpeg(rig.server_assets / "group.jpg", (120, 90), noise=True)
    clients = []
    for i in range(3):
        clients.append(rig.client(port, i))
        srv.row(rf"client #{i + 1} \S{{6}} connected from 127\.0\.0\.1:\d+")
    fps = [rig.fingerprint(i) for i in range(3)]

    srv.type("1")
    for i in range(3):
        srv.row(rf"  {i + 1}\) {handle(fps[i], i + 1)}  127\.0\.0\.1:\d+")
        srv.row(rf"       {re.escape(fps[i])}")
    srv.answer("client number or all: ", "all")
    srv.answer("text to all> ", "hello everyone")
    for i in range(3):
        srv.row(rf"{handle(fps[i], i + 1)}: delivered")
        clients[i].row(r"\[server\] hello everyone")
    srv.answer("text to all> ", "")  # back to the menu

    srv.answer("> ", "2")
    srv.answer("client number or all: ", "all")
    srv.answer("number or path: ", "1")
    digest = hashlib.sha256(photo.read_bytes()).hexdigest()
    for i in range(3):
        srv.line(rf"{handle(fps[i], i + 1)}: sent 'group\.jpg': {photo.stat().st_size} bytes, "
                rf"SHA-256 {digest}.*")
        clients[i].line(r"\[server\] saved 'group\.jpg': .*")
        saved = rig.env.root / f"received-{i}" / "group.jpg"
        assert hashlib.sha256(saved.read_bytes()).hexdigest() == digest
    for t in [srv, *clients]:
        assert_no_mixed_rows(t)


# --- Ctrl-C, Esc and Ctrl-D at sub-prompts ----------------------------------------------------
def test_ctrl_c_at_a_sub_prompt_returns_to_the_menu_with_the_clients_connected(rig: Rig):
    srv, port = rig.console()
    clients = [rig.client(port, 0), rig.client(port, 1)]
    srv.row(r"client #2 \S{6} connected from .*")

    # server: Ctrl-C at "client number", Esc at the text prompt, Ctrl-D at the photo prompt
    srv.type("1")
    srv.at_prompt("client number or all: ")
    srv.child.sendcontrol("c")
    srv.at_prompt("> ")
    srv.type("1")
    srv.answer("client number or all: ", "2")
    srv.at_prompt("text to #2> ")
    srv.child.send("\x1b")
    srv.at_prompt("> ")
    srv.type("2")
    srv.answer("client number or all [#2]: ", "")  # #2 was picked last: the default
    srv.at_prompt("number or path: ")
    srv.child.sendcontrol("d")
    srv.at_prompt("> ")
    srv.type("3")
    srv.row(r"  1\) #1 \S{6}  127\.0\.0\.1:\d+")
    srv.row(r"  2\) #2 \S{6}  127\.0\.0\.1:\d+  \(default\)")

    # client: Ctrl-C at the text prompt, then the menu still sends
    cli = clients[0]
    cli.type("1")
    cli.at_prompt("text to server> ")
    cli.type("never sent", enter=False)
    cli.child.sendcontrol("c")
    cli.at_prompt("> ")
    cli.type("1")
    cli.answer("text to server> ", "still here")
    cli.row("delivered")
    cli.answer("text to server> ", "another one, same prompt")
    srv.row(r"\[#1 \S{6}\] another one, same prompt")
    assert not [r for r in srv.scrolled() if "never sent" in r]
    assert all(c.child.isalive() for c in clients)
    # every row the server printed about clients fits the screen: nothing wrapped
    for r in srv.scrolled():
        if r.startswith(("client #", "[#", "  1)", "  2)")):
            assert len(r) <= COLS
    srv.child.sendcontrol("c")  # at the menu with clients: first it says so
    srv.row("2 clients connected: press Ctrl-C again to quit")
    srv.child.sendcontrol("c")
    assert srv.wait_exit() == 0
    for c in clients:
        c.row(r"server: peer said goodbye \(server shutting down\)")


# --- small things ------------------------------------------------------------------------------
def test_empty_send_text_is_a_usage_error(env: Env):
    r = env.client("-p", "9", "--send-text", "")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: --send-text needs a text (it was empty) (see --help)"


def test_batch_summaries_for_a_renamed_tiny_file(env: Env):
    srv = env.server()
    tiny = env.assets / "tiny.jpg"
    tiny.write_bytes(b"\xff\xd8\xff\xe0" + b"x" * 12)
    outputs = []
    for _ in range(2):
        r = env.client("-p", str(srv.port), "--accept-new-host", "--send-file", str(tiny))
        assert r.returncode == 0, r.stderr
        outputs.append(r.stdout.strip().splitlines()[-1])
    digest = hashlib.sha256(tiny.read_bytes()).hexdigest()
    # a speed only when there is one to show: never "0.0 MB/s"
    first = rf"sent 'tiny\.jpg': 16 bytes, SHA-256 {digest}, \d+\.\d\d s" \
            r"(?:, (?!0\.0 )\d+\.\d (?:KiB|MiB|GiB)/s)?"
    assert re.fullmatch(first, outputs[0]), outputs[0]
    assert re.fullmatch(first + r", saved as 'tiny \(1\)\.jpg'", outputs[1]), outputs[1]


def test_a_number_outside_the_photo_list_says_so(rig: Rig):
    make_jpeg(rig.env.assets / "only.jpg")
    srv, port = rig.console()
    cli = rig.client(port)
    cli.type("2")
    cli.answer("number or path: ", "9")
    cli.row(r"not sent: no photo number 9 \(the list has 1-1\)")
    cli.at_prompt("> ")


# --- several photos from one menu pick: one status row for the batch -----------------------
def test_a_pick_of_several_photos_has_one_status_row_for_the_batch(rig: Rig):
    srv, port = rig.console()
    names = ["a.jpg", "b.jpg", "c.jpg"]
    for name in names:
        big_jpeg(rig.env.assets / name, 8 << 20)
    cli = rig.client(port)
    os.kill(srv.child.pid, signal.SIGSTOP)  # the receiver answers nothing until resumed
    cli.type("2")
    cli.answer("number or path: ", "all")
    # waiting for the first accept: the batch's row, no file's own
    cli.shows(r"sending photos 0/3    0%  0 B of 24\.0 MiB.*")
    assert status_rows(cli) == [r for r in cli.rows() if r.startswith("sending photos 0/3 ")]
    assert len(status_rows(cli)) == 1
    assert_no_mixed_rows(cli)
    os.kill(srv.child.pid, signal.SIGCONT)
    cli.line(r"sent 3 of 3 photos: 24\.0 MiB in \d+\.\d\d s(, [\d.]+ (KiB|MiB|GiB)/s)?")
    cli.until("no status row", lambda: not status_rows(cli))
    cli.at_prompt("> ")
    assert_no_mixed_rows(cli)
    assert files_in(rig.env.server_received) == names
