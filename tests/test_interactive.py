"""The menus of client.py and server.py driven through a real pseudo-terminal
(pexpect), as a user would: type at the prompt, read what the terminal shows.

prompt_toolkit paints its prompts with cursor movements and erases them to print
incoming lines above, so the raw pty stream is not a list of lines.  `Screen` is
a one-line-at-a-time terminal model: it turns the stream into the lines a user
would see scroll by, plus a "prompt shown" event whenever prompt_toolkit finishes
a paint (it shows the cursor again).  Tests wait on those, never on sleeps.

The children get TERM=xterm (under TERM=dumb or none prompt_toolkit would fall back
to another UI than users get) and, from conftest.child_env, PROMPT_TOOLKIT_NO_CPR=1:
pexpect is no terminal emulator and never answers the cursor position request
ESC[6n, so prompt_toolkit would wait for it and then print "WARNING: your terminal
doesn't support cursor position requests (CPR)".  wcwidth comes with prompt_toolkit.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from conftest import Env, files_in, make_jpeg
from harness import Tty

import session

TIMEOUT = 20.0
CLIENT_MENU = "1) send text  2) send a JPG  3) quit"
SERVER_MENU = "1) send text  2) send a JPG  3) list clients  4) quit"
TRUST_QUESTION = "Are you sure you want to trust it (yes/no/[fingerprint])?"
FP = r"SHA256:[A-Za-z0-9+/]{43}"
CODE = r"\d{4}-\d{4}-\d{4}"


def handle(fp: str, number: int = 1) -> str:
    """How the console names a client (issue 11): its number and 6 fingerprint characters."""
    return re.escape(f"#{number} {fp.removeprefix('SHA256:')[:6]}")


def assert_clean(tty: Tty) -> None:
    out = tty.text()
    assert "Traceback" not in out, out
    assert "cursor position" not in out.lower(), out  # prompt_toolkit's CPR warning


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- fixtures ------------------------------------------------------------------------------
class Terminals:
    """Per-test terminals over the conftest Env directories."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.server_assets = env.root / "server-assets"
        self.server_assets.mkdir()
        self.ttys: list[Tty] = []

    def spawn(self, script: str, *args: str) -> Tty:
        tty = Tty(script, *args)
        self.ttys.append(tty)
        return tty

    def console(self, *extra: str) -> tuple[Tty, int, str]:
        """server.py with its console (stdin is the pty, so not headless)."""
        e = self.env
        srv = self.spawn("server.py", "--port", "0", "--home", str(e.server_home),
                         "--assets-dir", str(self.server_assets),
                         "--received-dir", str(e.server_received), *extra)
        port = int(srv.expect_line(r"^listening on 127\.0\.0\.1:(\d+)$").group(1))
        fingerprint = srv.expect_line(rf"^identity ({FP})$").group(1)
        srv.expect_line(f"^{re.escape(SERVER_MENU)}$")
        srv.expect_prompt(">")
        return srv, port, fingerprint

    def client(self, port: int, *extra: str, home: Path | None = None,
               received: Path | None = None) -> Tty:
        e = self.env
        return self.spawn("client.py", "--port", str(port), "--home", str(home or e.client_home),
                          "--assets-dir", str(e.assets),
                          "--received-dir", str(received or e.client_received), *extra)

    def connected_client(self, port: int, *extra: str, **kw) -> tuple[Tty, str]:
        """A client that trusts the server on first use; returns it and its code."""
        cli = self.client(port, "--accept-new-host", *extra, **kw)
        code = cli.expect_line(rf"^verification code: ({CODE})  \(compare").group(1)
        cli.expect_line(f"^{re.escape(CLIENT_MENU)}$")
        cli.expect_prompt(">")
        return cli, code

    def client_fingerprint(self, home: Path | None = None) -> str:
        r = self.env.client("--show-identity", home=home)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()


@pytest.fixture
def terms(env: Env):
    terminals = Terminals(env)
    yield terminals
    for tty in terminals.ttys:
        tty.kill()


def assets_listed(tty: Tty, count: int) -> dict[str, str]:
    """The numbered JPG list a menu prints: {name: number}."""
    return {name: number for name, (number, _) in assets_carrying(tty, count).items()}


def assets_carrying(tty: Tty, count: int) -> dict[str, tuple[str, str]]:
    """The numbered JPG list with what each photo carries: {name: (number, carries)},
    carries "" when the line names nothing after the size."""
    listed = {}
    for _ in range(count):
        m = tty.expect_line(r"^  (\d+)\) (.+?) \((\d+(?:\.\d)? (?:B|KiB|MiB))\)(?: — (.+))?$")
        listed[m.group(2)] = (m.group(1), m.group(4) or "")
    return listed


# --- 1. text both ways ------------------------------------------------------------------------
def test_text_from_client_menu_and_reply_from_server_console(terms: Terminals):
    srv, port, _ = terms.console()
    client_fp = terms.client_fingerprint()
    cli, _ = terms.connected_client(port)
    srv.expect_line(rf"^client {handle(client_fp)} connected from 127\.0\.0\.1:\d+$")
    srv.expect_line(rf"^\[{handle(client_fp)}\] fingerprint {re.escape(client_fp)}$")

    # the user sends a text from the client menu
    cli.type("1")
    cli.answer("text to server> ", "hello from the client — ünïcode ✓")
    cli.expect_line("^delivered$")
    srv.expect_line(rf"^\[{handle(client_fp)}\] hello from the client — ünïcode ✓$")

    # the operator replies from the console: 1 = send text (one client: no pick)
    srv.type("1")
    srv.answer("text to #1> ", "hi back, from the operator")
    srv.expect_line("^delivered$")
    cli.expect_line(r"^\[server\] hi back, from the operator$")
    srv.answer("text to #1> ", "")  # an empty line: back to the menu

    cli.answer("text to server> ", "")
    cli.expect_prompt(">")
    cli.type("3")
    assert cli.wait_exit() == 0
    srv.expect_line(rf"^\[{handle(client_fp)}\] peer said goodbye \(client done\)$")
    for tty in (cli, srv):
        assert_clean(tty)


# --- 2. JPGs through the menus ---------------------------------------------------------------
def test_jpgs_both_ways_through_the_menus_are_bit_exact(terms: Terminals, tmp_path: Path):
    env = terms.env
    # server assets: a multi-chunk photo with a Unicode name and spaces, and a .JPG
    big = make_jpeg(terms.server_assets / "Ünïcode café ☕ photo.jpg", (1200, 900), noise=True,
                    quality=95)
    assert big.stat().st_size > (1 << 20)  # more than one 1 MiB chunk
    shout = make_jpeg(terms.server_assets / "ZEBRA.JPG", (64, 48), exif=True)
    (terms.server_assets / "notes.txt").write_text("not a JPG")
    # client assets, and one file elsewhere that the user types the path of
    holiday = make_jpeg(env.assets / "my holiday ñ 写真.jpeg", (320, 200), noise=True)
    plain = make_jpeg(env.assets / "plain.jpg", progressive=True)
    elsewhere = make_jpeg(tmp_path / "other dir" / "Straße Ω.JPG", (200, 150), noise=True)

    srv, port, _ = terms.console()
    client_fp = terms.client_fingerprint()
    cli, _ = terms.connected_client(port)
    srv.expect_line(rf"^client {handle(client_fp)} connected")

    # server -> client: console option 2, pick each asset by its number
    for source in (big, shout):
        srv.expect_prompt(">")
        srv.type("2")
        carrying = assets_carrying(srv, 2)
        assert carrying == {shout.name: ("1", "camera make/model"), big.name: ("2", "")}
        listed = {name: number for name, (number, _) in carrying.items()}
        srv.answer("number or path: ", listed[source.name])
        digest = sha256(source)
        sent = srv.expect_line(r"^sent '(.+)': (\d+) bytes, SHA-256 ([0-9a-f]{64}), ")
        assert sent.groups() == (source.name, str(source.stat().st_size), digest)
        cli.expect_line(rf"^\[server\] receiving {re.escape(repr(source.name))} \(")
        saved = cli.expect_line(r"^\[server\] saved '(.+)': (\d+) bytes, "
                                r"SHA-256 ([0-9a-f]{64}), .* at (.+)$")
        assert saved.group(1, 2, 3) == (source.name, str(source.stat().st_size), digest)
        received = Path(saved.group(4))
        assert received == env.client_received / source.name
        assert sha256(received) == digest
    assert files_in(env.client_received) == sorted([big.name, shout.name])

    # client -> server: client option 2, by number from assets/, then by typed path
    for source, pick in ((holiday, "number"), (plain, "number"), (elsewhere, "path")):
        cli.expect_prompt(">")
        cli.type("2")
        listed = assets_listed(cli, 2)
        assert set(listed) == {holiday.name, plain.name}
        cli.answer("number or path: ", listed[source.name] if pick == "number" else str(source))
        digest = sha256(source)
        sent = cli.expect_line(r"^sent '(.+)': (\d+) bytes, SHA-256 ([0-9a-f]{64}), ")
        assert sent.groups() == (source.name, str(source.stat().st_size), digest)
        got = srv.expect_line(rf"^\[{handle(client_fp)}\] received '(.+)': (\d+) bytes, "
                              rf"SHA-256 ([0-9a-f]{{64}}), .*, saved at (.+)$")
        assert got.group(1, 2, 3) == (source.name, str(source.stat().st_size), digest)
        received = Path(got.group(4))
        assert received == env.server_received / source.name
        assert sha256(received) == digest
    assert files_in(env.server_received) == sorted([holiday.name, plain.name, elsewhere.name])

    # a typed path that is not a JPEG is refused locally, and the menu carries on
    cli.expect_prompt(">")
    cli.type("2")
    assets_listed(cli, 2)
    cli.answer("number or path: ", str(terms.server_assets / "notes.txt"))
    cli.expect_line(r"^not sent: .*notes\.txt: not a \.jpg/\.jpeg file$")
    cli.expect_prompt(">")
    cli.type("3")
    assert cli.wait_exit() == 0
    assert files_in(env.server_received) == sorted([holiday.name, plain.name, elsewhere.name])
    for tty in (cli, srv):
        assert_clean(tty)


# --- 3. Ctrl-C on either side -------------------------------------------------------------------
def test_ctrl_c_on_the_client_menu_says_goodbye(terms: Terminals):
    srv, port, _ = terms.console()
    client_fp = terms.client_fingerprint()
    cli, _ = terms.connected_client(port)
    srv.expect_line(rf"^client {handle(client_fp)} connected")

    cli.ctrl_c()
    assert cli.wait_exit() == 130
    assert cli.lines("^interrupted: saying goodbye$")
    assert_clean(cli)
    srv.expect_line(rf"^\[{handle(client_fp)}\] peer said goodbye \(client interrupted\)$")
    # the console is still usable and the client is gone from it
    srv.expect_prompt(">")
    srv.type("3")
    srv.expect_line("^no clients connected$")
    srv.expect_prompt(">")
    srv.type("4")
    assert srv.wait_exit() == 0
    assert_clean(srv)


def test_ctrl_c_on_the_server_console_tells_the_client(terms: Terminals):
    srv, port, _ = terms.console()
    client_fp = terms.client_fingerprint()
    cli, _ = terms.connected_client(port)
    srv.expect_line(rf"^client {handle(client_fp)} connected")
    srv.expect_prompt(">")

    # with a client connected the first Ctrl-C only says so (issue 11), the second quits
    srv.ctrl_c()
    srv.expect_line("^1 client connected: press Ctrl-C again to quit$")
    srv.expect_prompt(">")
    srv.ctrl_c()
    srv.expect_line("^shutting down$")
    srv.expect_line("^bye$")
    assert srv.wait_exit() == 0
    assert_clean(srv)
    cli.expect_line(r"^server: peer said goodbye \(server shutting down\)$")
    assert cli.wait_exit() == 0
    assert_clean(cli)


def test_ctrl_c_on_the_server_while_the_client_is_typing(terms: Terminals):
    """The client sits in its "text:" prompt: the goodbye still ends it cleanly."""
    srv, port, _ = terms.console()
    cli, _ = terms.connected_client(port)
    srv.expect_line(r"^client .* connected")
    cli.type("1")
    cli.expect_prompt("text to server> ")
    srv.expect_prompt(">")
    srv.ctrl_c()
    srv.expect_line("^1 client connected: press Ctrl-C again to quit$")
    srv.expect_prompt(">")
    srv.ctrl_c()
    assert srv.wait_exit() == 0
    cli.expect_line(r"^server: peer said goodbye \(server shutting down\)$")
    assert cli.wait_exit() == 0
    for tty in (cli, srv):
        assert_clean(tty)


# --- 4. trust on first use, answered at the terminal ------------------------------------------
def other_fingerprint(terms: Terminals) -> str:
    return terms.client_fingerprint(home=terms.env.root / "someone-else")


@pytest.mark.parametrize("answer", ["no", "yes", "right fingerprint", "wrong fingerprint",
                                    "ctrl-c"])
def test_first_contact_question(terms: Terminals, answer: str):
    env = terms.env
    srv = env.server("--assets-dir", str(terms.server_assets))  # headless (stdin not a tty)
    key = f"[127.0.0.1]:{srv.port}"
    known_hosts = env.client_home / "known_hosts"
    typed = {"no": "no", "yes": "yes", "right fingerprint": srv.fingerprint,
             "wrong fingerprint": other_fingerprint(terms), "ctrl-c": None}[answer]
    assert typed != srv.fingerprint or answer == "right fingerprint"

    cli = terms.client(srv.port)
    cli.expect_line(rf"^The authenticity of server {re.escape(key)} can't be established\.$")
    cli.expect_line(rf"^Its fingerprint is {re.escape(srv.fingerprint)}\.$")
    cli.expect_prompt(TRUST_QUESTION)
    if typed is None:
        cli.ctrl_c()  # the question is a plain input(): the tty turns ^C into SIGINT
    else:
        cli.type(typed)

    if answer == "ctrl-c":
        cli.expect_line(rf"^{re.escape(TRUST_QUESTION)} \^Cinterrupted$")  # the tty echoes ^C
        assert cli.wait_exit() == 130
        assert not known_hosts.exists() or known_hosts.read_text() == ""
        srv.wait_for(r"^connection from 127\.0\.0\.1:\d+ closed: ")
        assert "connected from" not in srv.output()
    elif answer in ("no", "wrong fingerprint"):
        if answer == "wrong fingerprint":
            cli.expect_line("^The fingerprint you pasted does not match the server's\\.$")
        cli.expect_line(r"^error: server not trusted; nothing recorded$")
        assert cli.wait_exit() == 4
        assert not known_hosts.exists() or known_hosts.read_text() == ""
        srv.wait_for(r"closed: peer refused: authentication failed")
        assert "connected from" not in srv.output()
    else:
        cli.expect_line(rf"^recorded {re.escape(key)} {re.escape(srv.fingerprint)} in "
                        rf"{re.escape(str(known_hosts))}$")
        cli.expect_line(rf"^connected to 127\.0\.0\.1:{srv.port}, server "
                        rf"{re.escape(srv.fingerprint)}$")
        assert known_hosts.read_text() == f"{key} {srv.fingerprint}\n"
        cli.expect_prompt(">")
        cli.type("3")
        assert cli.wait_exit() == 0
        srv.wait_for(r"^client SHA256:\S+ connected from")
        # pinned now: a later run needs neither a question nor a flag
        again = env.client("--port", str(srv.port), "--send-text", "pinned")
        assert again.returncode == 0, again.stderr
        assert "authenticity" not in again.stdout + again.stderr
        srv.wait_for(r"\] pinned$")
    assert_clean(cli)


# --- 5. the verification code matches, per client ---------------------------------------------
def test_verification_codes_match_the_console_per_client(terms: Terminals):
    env = terms.env
    srv, port, _ = terms.console()
    homes = [env.client_home, env.root / "client-b-home"]
    fps = [terms.client_fingerprint(h) for h in homes]
    assert fps[0] != fps[1]
    clients, codes = [], []
    for i, home in enumerate(homes):
        cli, code = terms.connected_client(port, home=home, received=env.root / f"recv-{i}")
        clients.append(cli)
        codes.append(code)
        srv.expect_line(rf"^client {handle(fps[i], i + 1)} connected")
        shown = srv.expect_line(rf"^\[{handle(fps[i], i + 1)}\] verification code: ({CODE})$")
        assert shown.group(1) == code
    assert codes[0] != codes[1]  # fresh keys per session

    # with two clients the console asks which one; reply to the second
    srv.expect_prompt(">")
    srv.type("1")
    listed = {}
    for i in range(2):
        m = srv.expect_line(rf"^  (\d)\) {handle(fps[i], i + 1)}  127\.0\.0\.1:\d+$")
        f = srv.expect_line(rf"^       ({FP})$")
        listed[f.group(1)] = m.group(1)
    assert set(listed) == set(fps)
    srv.answer("client number or all: ", listed[fps[1]])
    srv.answer("text to #2> ", "only for B")
    srv.expect_line("^delivered$")
    clients[1].expect_line(r"^\[server\] only for B$")
    srv.answer("text to #2> ", "")
    for cli in clients:
        cli.expect_prompt(">")
        cli.type("3")
        assert cli.wait_exit() == 0
        assert_clean(cli)
    assert not clients[0].lines("only for B")
    srv.expect_prompt(">")
    srv.type("4")
    assert srv.wait_exit() == 0
    assert_clean(srv)


# --- photo metadata (issue 13) -------------------------------------------------------------------
EVERYTHING = ("GPS location, camera serial, camera make/model, thumbnail, other EXIF, XMP, IPTC, "
              "comment")
LISTED_EVERYTHING = "GPS location, camera serial, camera make/model and 5 more"
LOCATION_QUESTION = "send 1) without metadata  2) as is [1]: "
CONSENT_QUESTION = "send it as is? [y/N] "


def broken_photo(path: Path) -> Path:
    """A file that starts like a JPEG whose first segment is longer than the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xe0\xff\xff" + bytes(range(256)) * 8)
    return path


BROKEN_WHY = ("cannot read the metadata of 'broken.jpg' (segment FFE0 at byte 2 has a bad "
              "length): it may carry a location, and it cannot be sent without its metadata")


def test_client_menu_names_what_photos_carry_and_asks_before_a_location_leaves(
        terms: Terminals, tmp_path: Path):
    from test_metadata import photo, stripped_bytes

    env = terms.env
    holiday = photo(env.assets / "holiday.jpg")
    plain = make_jpeg(env.assets / "plain.jpg", (40, 30), noise=True)
    broken = broken_photo(tmp_path / "elsewhere" / "broken.jpg")
    stripped = stripped_bytes(holiday)
    srv, port, _ = terms.console()
    client_fp = terms.client_fingerprint()
    cli, _ = terms.connected_client(port)
    srv.expect_line(rf"^client {handle(client_fp)} connected")
    received = (rf"^\[{handle(client_fp)}\] received '(.+)': (\d+) bytes, "
                r"SHA-256 ([0-9a-f]{64})")

    # the photo with a location: the menu says so, asks, and Enter means without metadata
    for answer, sent_bytes, note, carries, saved_as in (
            ("", stripped, "without metadata", "no metadata", "holiday.jpg"),
            ("2", holiday.read_bytes(), "as is", f"carries {EVERYTHING}", "holiday (1).jpg")):
        cli.expect_prompt(">")
        cli.type("2")
        assert assets_carrying(cli, 2) == {"holiday.jpg": ("1", LISTED_EVERYTHING),
                                           "plain.jpg": ("2", "")}
        cli.answer("number or path: ", "1")
        cli.expect_line(f"^'holiday.jpg' carries {re.escape(EVERYTHING)}$")
        cli.answer(LOCATION_QUESTION, answer)
        digest = hashlib.sha256(sent_bytes).hexdigest()
        sent = cli.expect_line(r"^sent '(.+)': (\d+) bytes, SHA-256 ([0-9a-f]{64}), "
                               r"\d+\.\d\d s(?:, [\d.]+ (?:KiB|MiB|GiB)/s)?, "
                               rf"{note}(?:, saved as '(.+)')?$")
        # the name as sent, and the name as saved when the receiver had to rename it
        assert sent.groups() == ("holiday.jpg", str(len(sent_bytes)), digest,
                                 None if saved_as == "holiday.jpg" else saved_as)
        got = srv.expect_line(received + rf", .* \({re.escape(carries)}\), saved at (.+)$")
        assert got.groups() == (saved_as, str(len(sent_bytes)), digest,
                                str(env.server_received / saved_as))
        assert (env.server_received / saved_as).read_bytes() == sent_bytes

    # a photo without a location goes as is without a question, as before
    cli.expect_prompt(">")
    cli.type("2")
    assets_carrying(cli, 2)
    cli.answer("number or path: ", "2")
    cli.expect_line(rf"^sent 'plain\.jpg': {plain.stat().st_size} bytes, SHA-256 "
                    rf"{sha256(plain)}, \d+\.\d\d s(?:, [\d.]+ (?:KiB|MiB|GiB)/s)?$")
    srv.expect_line(received + r", .* \(no metadata\), saved at ")

    # a photo whose metadata cannot be read: without --strip-metadata it goes as is,
    # and the menu says so
    cli.expect_prompt(">")
    cli.type("2")
    assets_carrying(cli, 2)
    cli.answer("number or path: ", str(broken))
    cli.expect_line(r"^cannot read the metadata of 'broken\.jpg' \(segment FFE0 at byte 2 has "
                    r"a bad length\); sending it as is$")
    cli.expect_line(rf"^sent 'broken\.jpg': {broken.stat().st_size} bytes, SHA-256 "
                    rf"{sha256(broken)}, \d+\.\d\d s(?:, [\d.]+ (?:KiB|MiB|GiB)/s)?, as is$")
    srv.expect_line(received + r", .* \(metadata not readable\), saved at ")
    cli.expect_prompt(">")
    cli.type("3")
    assert cli.wait_exit() == 0
    assert files_in(env.server_received) == ["broken.jpg", "holiday (1).jpg", "holiday.jpg",
                                             "plain.jpg"]
    for tty in (cli, srv):
        assert_clean(tty)


def test_server_console_with_strip_metadata_sends_photos_without_it(terms: Terminals):
    from test_metadata import photo, stripped_bytes

    env = terms.env
    holiday = photo(terms.server_assets / "holiday.jpg")
    broken = broken_photo(terms.server_assets / "broken.jpg")
    stripped = stripped_bytes(holiday)
    srv, port, _ = terms.console("--strip-metadata")
    cli, _ = terms.connected_client(port)
    srv.expect_line(r"^client .* connected")
    saved = (r"^\[server\] saved '(.+)': (\d+) bytes, SHA-256 ([0-9a-f]{64}), "
             r"\d+\.\d\d s(?:, [\d.]+ (?:KiB|MiB|GiB)/s)? \((.+)\) at (.+)$")

    # with the flag: no question, the photo goes without its metadata
    srv.expect_prompt(">")
    srv.type("2")
    assert assets_carrying(srv, 2) == {"broken.jpg": ("1", "metadata not readable"),
                                       "holiday.jpg": ("2", LISTED_EVERYTHING)}
    srv.answer("number or path: ", "2")
    digest = hashlib.sha256(stripped).hexdigest()
    sent = srv.expect_line(r"^sent 'holiday\.jpg': (\d+) bytes, SHA-256 ([0-9a-f]{64}), "
                           r"\d+\.\d\d s(?:, [\d.]+ (?:KiB|MiB|GiB)/s)?, without metadata$")
    assert sent.groups() == (str(len(stripped)), digest)
    got = cli.expect_line(saved)
    assert got.groups() == ("holiday.jpg", str(len(stripped)), digest, "no metadata",
                            str(env.client_received / "holiday.jpg"))
    assert (env.client_received / "holiday.jpg").read_bytes() == stripped

    # one it cannot strip: Enter (no) keeps it; it goes as is only after a yes
    srv.expect_prompt(">")
    srv.type("2")
    assets_carrying(srv, 2)
    srv.answer("number or path: ", "1")
    srv.expect_line(f"^{re.escape(BROKEN_WHY)}$")
    srv.answer(CONSENT_QUESTION, "")
    srv.expect_line("^not sent$")
    srv.expect_prompt(">")
    srv.type("2")
    assets_carrying(srv, 2)
    srv.answer("number or path: ", "1")
    srv.expect_line(f"^{re.escape(BROKEN_WHY)}$")
    srv.answer(CONSENT_QUESTION, "y")
    srv.expect_line(rf"^sent 'broken\.jpg': {broken.stat().st_size} bytes, SHA-256 "
                    rf"{sha256(broken)}, \d+\.\d\d s(?:, [\d.]+ (?:KiB|MiB|GiB)/s)?, as is$")
    got = cli.expect_line(saved)
    assert got.group(1, 4) == ("broken.jpg", "metadata not readable")
    assert (env.client_received / "broken.jpg").read_bytes() == broken.read_bytes()
    srv.expect_prompt(">")
    srv.type("4")
    assert srv.wait_exit() == 0
    for tty in (cli, srv):
        assert_clean(tty)


# --- several photos in one pick (issue 15) ------------------------------------------------------
def test_a_menu_pick_of_a_list_and_ranges_sends_exactly_those(terms: Terminals):
    env = terms.env
    photos = [make_jpeg(env.assets / f"photo {i}.jpg", (40 + i, 30), noise=True)
              for i in range(1, 8)]
    srv, port, _ = terms.console()
    client_fp = terms.client_fingerprint()
    cli, _ = terms.connected_client(port)
    srv.expect_line(rf"^client {handle(client_fp)} connected")
    cli.type("2")
    listed = assets_listed(cli, 7)
    assert listed == {p.name: str(i) for i, p in enumerate(photos, 1)}
    cli.answer("number or path: ", "2,4-6")
    picked = [photos[i - 1] for i in (2, 4, 5, 6)]
    total = sum(p.stat().st_size for p in picked)
    cli.expect_line(rf"^sent 4 of 4 photos: {re.escape(session.human_size(total))} in ")
    for p in picked:
        got = srv.expect_line(rf"^\[{handle(client_fp)}\] received '(.+)': (\d+) bytes, "
                              rf"SHA-256 ([0-9a-f]{{64}}), .*, saved at (.+)$")
        assert got.group(1, 2, 3) == (p.name, str(p.stat().st_size), sha256(p))
        assert sha256(Path(got.group(4))) == sha256(p)
    assert files_in(env.server_received) == sorted(p.name for p in picked)
    # a number that is not on the list sends nothing
    cli.expect_prompt(">")
    cli.type("2")
    assets_listed(cli, 7)
    cli.answer("number or path: ", "1,9")
    cli.expect_line(r"^not sent: no photo number 9 \(the list has 1-7\)$")
    cli.expect_prompt(">")
    cli.type("3")
    assert cli.wait_exit() == 0
    assert files_in(env.server_received) == sorted(p.name for p in picked)
    assert_clean(cli)


def test_parse_picks():
    assert session.parse_picks("all", 3) == [1, 2, 3]
    assert session.parse_picks("2,4-6", 7) == [2, 4, 5, 6]
    assert session.parse_picks(" 3 - 4 , 1 , 3 ", 5) == [3, 4, 1]
    assert session.parse_picks("3", 5) is None  # one number: the single pick
    assert session.parse_picks("photos/a.jpg", 5) is None  # a path
    with pytest.raises(ValueError, match=r"no photo number 5-6 \(the list has 1-5\)"):
        session.parse_picks("1,5-6", 5)
    with pytest.raises(ValueError, match="no photo number 4-2"):
        session.parse_picks("4-2", 5)
