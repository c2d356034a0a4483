"""Several files in one go (issue 15): --send-file with many paths and directories,
pipelined within the window; one line per file; exit 5 at the end if any was not
delivered; both directions at once; a receiver killed and a sender interrupted
mid-batch."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import test_metadata
from conftest import PY, ROOT, Env, Proc, child_env, files_in, handshake_pair, jpeg_of_size
from test_local_safety import _receiving_fds

import crypt
import session
import transfer

N = 200
SIZE = 200_000


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def photos(directory: Path, n: int, size: int = SIZE, prefix: str = "p") -> list[Path]:
    return [jpeg_of_size(directory / f"{prefix}{i:03d}.jpg", size + i) for i in range(n)]


def test_a_directory_of_200_photos_arrives_bit_exact_with_one_line_each(env: Env):
    srv = env.server()
    sent = photos(env.assets, N)
    (env.assets / "notes.txt").write_text("not a photo")
    r = env.client("--port", str(srv.port), "--accept-new-host", "--send-file", str(env.assets),
                   timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"skipped: {env.assets / 'notes.txt'} (not a JPG)"
    assert [line.split(":")[0] for line in lines[1:]] == [f"sent '{p.name}'" for p in sent]
    srv.wait_for(rf"\] received '{sent[-1].name}': ")
    assert files_in(env.server_received) == [p.name for p in sent]
    for p in sent:
        assert sha(env.server_received / p.name) == sha(p), p.name


def test_one_refusal_amid_successes_gets_its_line_and_exit_5_at_the_end(env: Env):
    srv = env.server("--max-file-size", "60000")
    small = photos(env.assets, 3, 20_000, "s")
    big = jpeg_of_size(env.assets / "big.jpg", 70_000)
    r = env.client("--port", str(srv.port), "--accept-new-host", "--max-file-size", "100000",
                   "--send-file", str(small[0]), str(big), str(small[1]), "--send-text", "after",
                   "--send-file", str(small[2]))
    assert r.returncode == 5, (r.stdout, r.stderr)
    assert [line.split(":")[0] for line in r.stdout.splitlines()] == [
        "sent 's000.jpg'", "sent 's001.jpg'", "delivered", "sent 's002.jpg'"]
    assert [line for line in r.stderr.splitlines() if line.startswith("error")] == [
        f"error: file not delivered: {big}: rejected by peer: 70000 bytes exceeds the "
        f"receiver's limit of 60000"]
    srv.wait_for(r"\] received 's002.jpg': ")
    assert files_in(env.server_received) == ["s000.jpg", "s001.jpg", "s002.jpg"]


def test_several_paths_after_one_send_file_keep_their_order_with_texts(env: Env):
    srv = env.server()
    a, b, c = photos(env.assets, 3, 5_000)
    r = env.client("--port", str(srv.port), "--accept-new-host", "--send-text", "one",
                   "--send-file", str(c), str(a), "--send-text", "two", "--send-file", str(b))
    assert r.returncode == 0, r.stderr
    assert [line.split(":")[0] for line in r.stdout.splitlines()] == [
        "delivered", f"sent '{c.name}'", f"sent '{a.name}'", "delivered", f"sent '{b.name}'"]
    out = [m.group(1) for m in (srv.wait_for(rf"\] (one|received '{c.name}'|received "
                                             rf"'{a.name}'|two|received '{b.name}')")
                                for _ in range(5))]
    assert out == ["one", f"received '{c.name}'", f"received '{a.name}'", "two",
                   f"received '{b.name}'"]


class Quiet(session.Events):
    def out(self, line: str) -> None:
        pass


@contextlib.contextmanager
def wired(client_dir: Path, server_dir: Path, *, client_events: session.Events | None = None,
          server_events: session.Events | None = None, **server_kw):
    """A client and a server Connection after a real handshake, over a socketpair, in
    process (files both ways; the receiving side's events can be watched); closed at
    the end."""
    pair = handshake_pair()
    a, b = socket.socketpair()
    client = session.Connection(a, crypt.record_pair(pair.client.keys, crypt.Role.CLIENT),
                                label="server", events=client_events or Quiet(),
                                received_dir=str(client_dir)).start()
    server = session.Connection(b, crypt.record_pair(pair.server.keys, crypt.Role.SERVER),
                                label="client", events=server_events or Quiet(),
                                received_dir=str(server_dir), **server_kw).start()
    try:
        yield client, server
    finally:
        client.close(timeout=5)
        server.close(timeout=5)


def test_200_files_both_directions_at_once_bit_exact(tmp_path: Path):
    """Client and server push 200 files each at the same time over one session."""
    dirs = {k: tmp_path / k for k in ("up", "down", "client-received", "server-received")}
    for d in dirs.values():
        d.mkdir()
    with wired(dirs["client-received"], dirs["server-received"]) as (client, server):
        up, down = photos(dirs["up"], N, 20_000, "u"), photos(dirs["down"], N, 20_000, "d")
        results = {}
        pusher = threading.Thread(target=lambda: results.setdefault(
            "down", server.send_files([str(p) for p in down])))
        pusher.start()
        results["up"] = client.send_files([str(p) for p in up])
        pusher.join(120)
        for direction, sent, received in (("up", up, "server-received"),
                                          ("down", down, "client-received")):
            outcomes = results[direction]
            assert [o.name for o in outcomes] == [p.name for p in sent], direction
            assert files_in(dirs[received]) == [p.name for p in sent]
            for p, o in zip(sent, outcomes, strict=True):
                assert o.sha256.hex() == sha(p) == sha(dirs[received] / p.name)


class RecordedBar:
    def __init__(self, log: list, total: int, desc: str, files: int) -> None:
        self.log = log
        log.append(("progress", total, desc, files))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int) -> None:
        self.log.append(("update", n))

    def file_done(self, unsent: int = 0) -> None:
        self.log.append(("file_done", unsent))

    def close(self) -> None:
        self.log.append(("close",))


class Recording(Quiet):
    """What a console would be told: every bar the session asks for and its calls."""

    def __init__(self) -> None:
        self.log: list = []

    def progress(self, total: int, desc: str, files: int = 0):
        return RecordedBar(self.log, total, desc, files)


def test_a_batch_has_one_bar_for_all_its_files_and_a_single_file_its_own(tmp_path: Path):
    received = tmp_path / "received"
    received.mkdir()
    events = Recording()
    with wired(tmp_path, received, client_events=events, max_file_size=100_000) as (sender, _):
        ok = photos(tmp_path, 3, 20_000)
        too_big = jpeg_of_size(tmp_path / "big.jpg", 150_000)  # the receiver refuses it
        missing = tmp_path / "missing.jpg"  # refused here, before any offer
        paths = [ok[0], too_big, ok[1], missing, ok[2]]
        outcomes = sender.send_files([str(p) for p in paths])
        assert [type(o).__name__ for o in outcomes] == \
            ["FileResult", "Rejected", "FileResult", "Rejected", "FileResult"]
        assert files_in(received) == [p.name for p in ok]
        sizes = [p.stat().st_size for p in ok]
        log = events.log
        # one bar, for all five, asked for before anything moved; closed last
        assert log[0] == ("progress", sum(sizes) + 150_000, "sending photos", 5)
        assert [e for e in log if e[0] == "progress"] == [log[0]]
        assert log[-1] == ("close",) and log.count(("close",)) == 1
        # the bytes of the three that went, and each file's end: the refused ones
        # take back what they will not send
        assert sum(e[1] for e in log if e[0] == "update") == sum(sizes)
        assert sorted(e[1] for e in log if e[0] == "file_done") == [0, 0, 0, 0, 150_000]

        # one file alone: its own bar, named after it, no file count
        events.log.clear()
        sender.send_files([str(ok[0])])
        assert events.log[0] == ("progress", sizes[0], "sending p000.jpg", 0)
        assert events.log[-1] == ("close",)
        assert [e[0] for e in events.log[1:-1]] == ["update"]


class SavedLog(Quiet):
    def __init__(self, log: list) -> None:
        self.log = log

    def file_saved(self, conn, path: str, result) -> None:
        self.log.append(("saved", Path(path).name))


def test_each_file_is_in_a_flushed_directory_before_it_is_reported_saved(tmp_path: Path,
                                                                          monkeypatch):
    """Durability of a batch (DESIGN 3.8): every file's link is followed by an fsync
    of the directory before the receiver says saved (and then sends FileSaved)."""
    received = tmp_path / "received"
    received.mkdir()
    log: list = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        real_fsync(fd)
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))

    def link(src, dst, **kw) -> None:
        real_link(src, dst, **kw)
        log.append(("link", Path(dst).name))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    (tmp_path / "out").mkdir()
    sent = photos(tmp_path / "out", 8, 20_000)
    with wired(tmp_path, received, server_events=SavedLog(log)) as (sender, _):
        outcomes = sender.send_files([str(p) for p in sent])
    assert [o.name for o in outcomes] == [p.name for p in sent]
    directory = ("fsync", str(received))
    for p in sent:
        linked, saved = log.index(("link", p.name)), log.index(("saved", p.name))
        assert directory in log[linked:saved], (p.name, log)


def test_files_whose_directory_cannot_be_flushed_fail_and_do_not_stay(tmp_path: Path,
                                                                        monkeypatch):
    received = tmp_path / "received"
    received.mkdir()

    def flush_dir(directory) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(session.transfer, "flush_dir", flush_dir)
    (tmp_path / "out").mkdir()
    sent = photos(tmp_path / "out", 3, 20_000)
    with wired(tmp_path, received) as (sender, _):
        outcomes = sender.send_files([str(p) for p in sent])
    assert [o.detail for o in outcomes] == \
        ["peer could not save it: cannot flush the directory: Input/output error"] * 3
    assert files_in(received) == []  # linked, not durable: removed again


class UnwritableLog(Quiet):
    """A receiver whose line for the second saved file cannot be written (its
    standard output full, say)."""

    def __init__(self) -> None:
        self.saved: list[str] = []

    def file_saved(self, conn, path: str, result) -> None:
        if len(self.saved) == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.saved.append(Path(path).name)


class Failures(Quiet):
    def __init__(self) -> None:
        self.failed: list = []

    def file_failed(self, conn, name: str, why: str) -> None:
        self.failed.append((name, why))


class FailingReads:
    """An outgoing file whose reads fail (EIO), as a dying disk's would."""

    def __init__(self, f) -> None:
        self._f = f

    def __enter__(self) -> FailingReads:
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()

    def fileno(self) -> int:
        return self._f.fileno()

    def readinto(self, view) -> int:
        raise OSError(errno.EIO, "Input/output error")


class GrowsWhileRead(FailingReads):
    """An outgoing file that someone appends to while it is read (a copy still going)."""

    def __init__(self, f, path: Path) -> None:
        super().__init__(f)
        self._path = path

    def readinto(self, view) -> int:
        n = self._f.readinto(view)
        with open(self._path, "ab") as more:
            more.write(b"more")
        return n


@pytest.mark.parametrize("how, why", [("gone", "No such file or directory"),
                                      ("unreadable", "Input/output error"),
                                      ("a-fifo-now", "not a regular file")])
def test_a_checked_file_that_cannot_be_read_at_its_turn_is_cancelled_and_the_rest_arrive(
        tmp_path: Path, monkeypatch, how: str, why: str):
    """A file checked at its offer that is gone (or cannot be read) when its stream
    begins is cancelled, the receiver keeps nothing of it, and the files after it are
    delivered."""
    received = tmp_path / "received"
    received.mkdir()
    (tmp_path / "out").mkdir()
    sent = photos(tmp_path / "out", 3, 20_000)
    checked = [transfer.check_outgoing(p) for p in sent]
    if how == "gone":
        sent[1].unlink()
    elif how == "a-fifo-now":  # its open would wait for a writer, and Ctrl-C with it
        sent[1].unlink()
        os.mkfifo(sent[1])
    else:
        real = transfer.open_outgoing
        monkeypatch.setattr(transfer, "open_outgoing", lambda out: (
            FailingReads(real(out)) if out.path == sent[1] else real(out)))
    events = Failures()
    with wired(tmp_path, received, server_events=events) as (sender, _):
        outcomes = sender.send_files(checked)
        assert sender.send_text("after") is None  # the session goes on
    assert [o.name for o in (outcomes[0], outcomes[2])] == ["p000.jpg", "p002.jpg"]
    assert isinstance(outcomes[1], transfer.Rejected)
    assert outcomes[1].detail == f"{sent[1]}: {why}"
    assert events.failed == [("p001.jpg", "sender cancelled: sender cannot read the file")]
    assert files_in(received) == ["p000.jpg", "p002.jpg"]
    for p in (sent[0], sent[2]):
        assert sha(received / p.name) == sha(p)


def jpeg_with_location(path: Path) -> Path:
    return test_metadata.photo(path)


def plain_photo(path: Path) -> Path:
    """A real photo, one --strip-metadata can plan (its EXIF carries a location)."""
    return test_metadata.photo(path, everything=False, size=(32, 24))


@pytest.mark.parametrize("how", ["grown", "replaced", "stripped-then-replaced",
                                 "replaced-same-size", "edited-mtime-kept", "grown-while-sent"])
def test_a_file_changed_after_its_check_is_cancelled_not_sent_as_another(
        tmp_path: Path, monkeypatch, how: str):
    """A file is checked (and, with --strip-metadata, planned) at its offer and streamed
    later: if it grew, was replaced or edited by then (or while it streams), the sender
    cancels it rather than send a cut copy, or the old strip plan over new bytes with a
    location in them."""
    received = tmp_path / "received"
    received.mkdir()
    a, b = plain_photo(tmp_path / "out" / "a.jpg"), plain_photo(tmp_path / "out" / "b.jpg")
    checked = transfer.check_outgoing(a)
    strip = how == "stripped-then-replaced"
    if strip:
        checked = session.stripped_outgoing(checked)
    if how == "grown":
        with open(a, "ab") as f:
            f.write(b"rest of the photo")
    elif how in ("replaced", "stripped-then-replaced"):
        os.replace(jpeg_with_location(tmp_path / "new" / a.name), a)
    elif how == "replaced-same-size":  # another file (inode) of the same size
        data = bytearray(a.read_bytes())
        data[-3] ^= 0xFF
        (tmp_path / "other.jpg").write_bytes(data)
        os.replace(tmp_path / "other.jpg", a)
    elif how == "edited-mtime-kept":  # in place, same size, mtime set back (touch -r)
        st = a.stat()
        with open(a, "r+b") as f:
            f.seek(st.st_size - 3)
            f.write(b"\0")
        os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        real = transfer.open_outgoing
        monkeypatch.setattr(transfer, "open_outgoing", lambda out: (
            GrowsWhileRead(real(out), a) if out.path == a else real(out)))
    when = "while sending" if how == "grown-while-sent" else "since it was checked"
    events = Failures()
    with wired(tmp_path, received, server_events=events) as (sender, _):
        outcomes = sender.send_files([checked, b], strip=strip)
    assert isinstance(outcomes[0], transfer.Rejected)
    assert outcomes[0].detail == f"{a} changed {when}"
    assert outcomes[1].name == b.name
    assert events.failed == [(a.name, "sender cancelled: file changed after its check")]
    assert files_in(received) == [b.name]  # what was sent of it (stripped or not), whole
    assert sha(received / b.name) == outcomes[1].sha256.hex()


def test_a_strip_plan_is_made_only_for_the_file_that_was_checked(tmp_path: Path):
    a = plain_photo(tmp_path / "a.jpg")
    checked = transfer.check_outgoing(a)
    assert session.stripped_outgoing(checked).pieces  # the file as checked is planned
    os.replace(jpeg_with_location(tmp_path / "new" / a.name), a)
    with pytest.raises(transfer.Rejected, match="changed since it was checked"):
        session.stripped_outgoing(checked)


def test_a_menu_pick_goes_only_as_the_file_it_was_when_its_metadata_was_decided(
        tmp_path: Path, capsys):
    """The menu decides each picked photo's metadata when it is picked (and asks when
    one carries a location): a photo re-saved with a location while the user answers
    about the next one is not sent as is, unasked."""
    from PIL import Image

    assets = tmp_path / "assets"
    assets.mkdir()
    plain = io.BytesIO()
    Image.new("RGB", (16, 16)).save(plain, "JPEG")
    (assets / "1.jpg").write_bytes(plain.getvalue())  # nothing to ask about
    test_metadata.photo(assets / "2.jpg")  # carries a location: the menu asks

    def prompt(question: str) -> str:
        if question.startswith("number or path"):
            return "all"
        # asked about 2.jpg: meanwhile 1.jpg is re-saved with a location
        os.replace(test_metadata.photo(tmp_path / "new" / "1.jpg"), assets / "1.jpg")
        return "1"  # 2.jpg without metadata

    choices = session.choose_jpgs(assets, transfer.DEFAULT_MAX_FILE_SIZE, prompt)
    assert [(out.name, strip, note) for out, strip, note in choices] == [
        ("1.jpg", False, ""), ("2.jpg", True, "without metadata")]
    received = tmp_path / "received"
    received.mkdir()
    with wired(tmp_path, received) as (sender, _):
        assert session.send_jpg_batch(sender, choices, transfer.DEFAULT_MAX_FILE_SIZE) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2:] == [lines[-2], f"not sent: 1.jpg: {assets / '1.jpg'} changed since it "
                                     f"was checked"]
    assert lines[-2].startswith("sent 1 of 2 photos: ")
    assert files_in(received) == ["2.jpg"]
    assert session.metadata_note(received / "2.jpg") == "no metadata"


@pytest.fixture(params=[True, False], ids=["O_TMPFILE", "named-fallback"])
def unnamed(request, monkeypatch) -> bool:
    """Both ways a receiver keeps an incoming file: unnamed, or a named temp file."""
    monkeypatch.setattr(session.transfer, "USE_O_TMPFILE", request.param)
    return request.param


def received_and_sent(tmp_path: Path, n: int) -> tuple[Path, list[Path]]:
    """An empty directory to receive into, and n photos of 20 kB to send."""
    received = tmp_path / "received"
    received.mkdir()
    (tmp_path / "out").mkdir()
    return received, photos(tmp_path / "out", n, 20_000)


def send_until_internal_error(sender: session.Connection, sent: list[Path]) -> list:
    """send_files, cut short by the receiver's internal error; the (index, outcome)
    pairs it reported."""
    reported: list = []
    with pytest.raises(session.ConnectionLost, match="^peer reported an error: internal "
                                                     "error$"):
        sender.send_files([str(p) for p in sent],
                          report=lambda i, outcome: reported.append((i, outcome)))
    return reported


def left_behind(receiver: session.Connection, received: Path) -> tuple:
    """What a finished session must not leave: files it still tracks, descriptors
    open into the received directory."""
    return dict(receiver._in._files), _receiving_fds(os.getpid(), received)


def test_a_failure_while_finishing_a_file_ends_the_session_and_the_sender_is_told(
        tmp_path: Path, monkeypatch, unnamed):
    """An unexpected error on a finisher thread (here: the second file's saved line
    cannot be written) ends the session as one on the reader thread does: the
    sender gets the Error at once and reports every file still unanswered as not
    delivered, instead of waiting (SAVED_TIMEOUT, 600 s) for replies that never come.
    Nothing partial stays, and nothing stays open."""
    monkeypatch.setattr(session, "SAVED_TIMEOUT", 60.0)  # what a stuck sender would wait
    received, sent = received_and_sent(tmp_path, 3)
    log = UnwritableLog()
    with wired(tmp_path, received, server_events=log) as (sender, receiver):
        reported = send_until_internal_error(sender, sent)
        assert receiver.closed.wait(10)
        assert receiver.close_info.kind is session.CloseKind.INTERNAL_ERROR
        assert receiver.close_reason == ("connection closed: internal error: "
                                         "OSError(28, 'No space left on device')")
    assert log.saved == [sent[0].name]
    assert [i for i, _ in reported] == [0, 1, 2]
    assert isinstance(reported[0][1], session.FileResult)
    assert reported[0][1].name == sent[0].name
    assert [type(o) for _, o in reported[1:]] == [session.NotDelivered] * 2
    assert [o.detail for _, o in reported[1:]] == ["peer reported an error: internal error"] * 2
    # the first two were linked and flushed before the error; the third, if it had ended,
    # is either finished all the same or not there: whole files only, no temp file left
    names = files_in(received)
    assert names in ([p.name for p in sent[:2]], [p.name for p in sent])
    assert all(sha(received / p.name) == sha(p) for p in sent[:len(names)])
    assert left_behind(receiver, received) == ({}, [])


class ClosedUnwritable(Quiet):
    def closed(self, conn, why: str) -> None:
        raise OSError(errno.EPIPE, os.strerror(errno.EPIPE))


@pytest.mark.parametrize("closed_line", ["written", "unwritable"])
def test_no_thread_for_the_finishers_ends_the_session_and_the_sender_is_told(
        tmp_path: Path, monkeypatch, unnamed, closed_line):
    """The disk thread hands each ended file to the finishers; when their threads
    cannot start (the process is out of threads) the session ends with an internal
    error at once, and the disk thread lives on to give back the buffers it holds,
    even when the line that says the session closed cannot be written either.  The
    ended files are not saved, and nothing of them stays."""
    monkeypatch.setattr(session, "SAVED_TIMEOUT", 60.0)  # what a stuck sender would wait

    def no_threads(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(session.IncomingFile, "_finishers", no_threads)
    received, sent = received_and_sent(tmp_path, 2)
    events = ClosedUnwritable() if closed_line == "unwritable" else Quiet()
    with wired(tmp_path, received, server_events=events) as (sender, receiver):
        reported = send_until_internal_error(sender, sent)
        assert receiver.closed.wait(10)
        assert receiver.close_reason == ("connection closed: internal error: "
                                         "RuntimeError(\"can't start new thread\")")
    # the reader has ended (and stopped the disk thread): every buffer came back
    assert not receiver._reader.is_alive()
    assert receiver._in.free.qsize() == session.DATA_IN_FLIGHT + 1
    assert [(i, type(o), o.detail) for i, o in reported] == [
        (i, session.NotDelivered, "peer reported an error: internal error") for i in (0, 1)]
    assert files_in(received) == []
    assert left_behind(receiver, received) == ({}, [])


def test_a_close_begun_by_a_thread_the_end_wakes_does_not_hide_why_it_ended(tmp_path: Path):
    """Whether the session says why it ended is decided before `closed` wakes anyone:
    the server's session thread, woken by it, begins its own close at once, and the
    line must still be said (once)."""
    said: list[str] = []

    class Said(Quiet):
        def closed(self, conn, why: str) -> None:
            said.append(why)

    with wired(tmp_path, tmp_path, server_events=Said()) as (_, receiver):
        real_set = receiver.closed.set

        def set_and_begin_close() -> None:  # the woken thread runs first
            real_set()
            receiver._closing = True

        receiver.closed.set = set_and_begin_close
        end = session.Close(session.CloseKind.INTERNAL_ERROR, session.Side.LOCAL,
                            "connection closed: internal error: RuntimeError('x')")
        receiver._end(end)
        receiver._end(end)  # a second end (another thread's) changes nothing
    assert said == ["connection closed: internal error: RuntimeError('x')"]


def test_a_send_that_finds_the_session_over_says_why(tmp_path: Path, monkeypatch):
    """The peer's goodbye has been read and the reader is still cleaning up (held
    here) when a send finds the session over: it says why, not "connection closed"."""
    entered, release = threading.Event(), threading.Event()
    real_aborted = session.IncomingFile.aborted

    def held(self, close) -> None:
        entered.set()
        release.wait(30)
        real_aborted(self, close)

    monkeypatch.setattr(session.IncomingFile, "aborted", held)
    with wired(tmp_path, tmp_path) as (client, server):
        try:
            server.begin_close("bye now")
            assert entered.wait(10)  # the client's reader read the goodbye
            with pytest.raises(session.ConnectionLost, match=r"^peer said goodbye \(bye now\)$"):
                client.send_text("too late")
        finally:
            release.set()


def test_an_ended_session_unmaps_its_receive_buffers(tmp_path: Path):
    """A session's plaintext buffers (one MiB each) are unmapped when it ends, not
    when the collector gets round to its reference cycles."""
    received, sent = received_and_sent(tmp_path, 2)
    with wired(tmp_path, received) as (sender, receiver):
        sender.send_files([str(p) for p in sent])
        buffers = receiver._in._buffers
        assert not any(b._map.closed for b in buffers)
    assert len(buffers) == session.DATA_IN_FLIGHT + 1
    assert all(b._map.closed for b in buffers)
    assert files_in(received) == [p.name for p in sent]


def test_a_clean_up_that_fails_still_ends_the_session(tmp_path: Path, monkeypatch):
    """The reader's clean-up at the end (abort the incoming files, stop the disk
    thread, unmap the buffers) raises: the session still ends, and the error is not
    hidden (it reaches threading.excepthook, which prints it)."""
    def cannot(self, close) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(session.IncomingFile, "aborted", cannot)
    unhandled: list = []
    monkeypatch.setattr(threading, "excepthook", unhandled.append)
    with wired(tmp_path, tmp_path) as (client, server):
        server.begin_close("bye now")
        assert client.closed.wait(10)
        assert client.close_reason == "peer said goodbye (bye now)"
    assert [(a.thread.name, type(a.exc_value)) for a in unhandled] == [
        ("reader server", OSError), ("reader client", OSError)]


# --- cut short -----------------------------------------------------------------------------
def _batch(env: Env) -> tuple[list[Path], Path, Path]:
    """Two small photos, a big sparse one (400 MiB of zeros after a JPEG start), a small one."""
    small = photos(env.assets, 3, 30_000, "s")
    big = env.assets / "s002-big.jpg"
    with open(big, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0")
        f.truncate(400 << 20)
    last = env.assets / "s003.jpg"
    small[2].rename(last)
    return small[:2], big, last


def _client(env: Env, port: int, *paths: Path) -> Proc:
    return Proc([PY, "client.py", "--home", str(env.client_home), "--received-dir",
                 str(env.client_received), "--port", str(port), "--accept-new-host",
                 "--send-file", *map(str, paths)], env=child_env(), cwd=ROOT)


def _wait_receiving(pid: int, directory: Path, at_least: int, output) -> None:
    deadline = time.monotonic() + 60
    while not any(size >= at_least for size in _receiving_fds(pid, directory)):
        assert time.monotonic() < deadline, output()
        time.sleep(0.002)  # polling a state, not waiting a fixed time


def test_the_receiver_killed_mid_batch_leaves_the_saved_files_and_nothing_partial(env: Env):
    srv = env.server()
    done, big, last = _batch(env)
    client = _client(env, srv.port, *done, big, last)
    try:
        for p in done:
            client.wait_for(rf"^sent '{p.name}': ")
        _wait_receiving(srv.pid, env.server_received, 8 << 20, srv.output)
        os.kill(srv.pid, signal.SIGKILL)
        assert client.p.wait(60) == 5, client.output()
    finally:
        client.stop()
    out = client.output()
    assert f"error: file not delivered: {big}: " in out
    assert f"error: file not delivered: {last}: " in out
    # the two confirmed files are there whole; the big one and the last left nothing
    assert files_in(env.server_received) == [p.name for p in done]
    for p in done:
        assert sha(env.server_received / p.name) == sha(p)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_the_sender_interrupted_mid_batch_says_which_files_were_delivered(env: Env, sig: str):
    srv = env.server()
    done, big, last = _batch(env)
    client = _client(env, srv.port, *done, big, last)
    try:
        for p in done:
            client.wait_for(rf"^sent '{p.name}': ")
        _wait_receiving(srv.pid, env.server_received, 8 << 20, srv.output)
        os.kill(client.pid, getattr(signal, sig))
        assert client.p.wait(60) == 130, client.output()
    finally:
        client.stop()
    lines = client.output().splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("sent ")] == [
        f"sent '{p.name}'" for p in done]
    assert f"not delivered (interrupted): {big}" in lines
    assert f"not delivered (interrupted): {last}" in lines
    assert not [line for line in lines if line.startswith("error:")], lines
    srv.wait_for(r"\] peer said goodbye \(client interrupted\)$")
    assert files_in(env.server_received) == [p.name for p in done]
