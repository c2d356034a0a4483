"""What the scripts do with local files and the process's own signals (issue 9,
items 5-9): the key log, --home ownership, interrupts mid-transfer, partial files
after a crash, and flag values checked before anything else happens."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from conftest import Env, child_env

from transfer import TEMP_NAME

NOBODY = 65534
KEYLOG = "QSOCKET_KEYLOGFILE"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


def _complaints(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("error:", "warning:"))]


# --- 5. the key log goes only into a private regular file of ours ------------------------
def _keylog_case(env: Env, case: str):
    """Make the key log path for `case`; returns (path, what must stay as it is, why)."""
    path = env.root / "keys.log"
    if case == "symlink":
        target = env.root / "target.txt"
        target.write_text("precious\n")
        target.chmod(0o600)
        path.symlink_to(target)
        return path, target, f"it is a symbolic link; set {KEYLOG} to a regular file"
    if case == "world-readable":
        path.write_text("old lines\n")
        path.chmod(0o644)
        return path, path, ("it is accessible by group or others (mode 0644); "
                            f"fix it with: chmod 600 {path}")
    if case == "other-owner":
        path.write_text("old lines\n")
        path.chmod(0o600)
        os.chown(path, NOBODY, NOBODY)
        return path, path, (f"it is owned by uid {NOBODY}, not by you (uid {os.geteuid()}); "
                            f"remove it or set {KEYLOG} to another path")
    if case == "fifo":
        os.mkfifo(path, 0o600)
        return path, None, f"it is not a regular file; set {KEYLOG} to one"
    if case == "directory":
        path.mkdir(mode=0o700)
        return path, None, f"it is not a regular file; set {KEYLOG} to one"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["symlink", "world-readable", pytest.param(
    "other-owner", marks=needs_root), "fifo", "directory"])
def test_an_unsafe_keylog_is_refused_untouched_and_the_session_goes_on(env: Env, case: str):
    path, kept, why = _keylog_case(env, case)
    before = kept.read_bytes() if kept else None
    mode_before = os.lstat(path).st_mode
    srv = env.server()
    r = env.client("--port", str(srv.port), "--accept-new-host", "--send-text", "still here",
                   env=child_env(QSOCKET_KEYLOGFILE=str(path)))
    assert r.returncode == 0, r.stderr
    assert "delivered: still here" in r.stdout
    srv.wait_for(r"\] still here$")
    assert _complaints(r.stderr) == [f"error: not writing the key log {path}: {why}"]
    assert os.lstat(path).st_mode == mode_before
    if kept is not None:
        assert kept.read_bytes() == before
    if case == "symlink":
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600


def test_a_private_keylog_of_ours_is_appended_to(env: Env):
    path = env.root / "keys.log"
    path.write_text("earlier session\n")
    path.chmod(0o600)
    srv = env.server()
    r = env.client("--port", str(srv.port), "--accept-new-host", "--send-text", "x",
                   env=child_env(QSOCKET_KEYLOGFILE=str(path)))
    assert r.returncode == 0, r.stderr
    lines = path.read_text().splitlines()
    assert lines[0] == "earlier session"
    assert [line.split()[0] for line in lines[1:]] == [
        "QSOCKET2_CLIENT_TRAFFIC_SECRET", "QSOCKET2_SERVER_TRAFFIC_SECRET",
        "QSOCKET2_CLIENT_TRAFFIC_ENC", "QSOCKET2_CLIENT_TRAFFIC_MAC", "QSOCKET2_CLIENT_TRAFFIC_IV",
        "QSOCKET2_SERVER_TRAFFIC_ENC", "QSOCKET2_SERVER_TRAFFIC_MAC", "QSOCKET2_SERVER_TRAFFIC_IV"]


# --- 6. --home and the files in it must be ours (or root's), as ssh's StrictModes -------
def _run_script(script: str, home, *args: str):
    import subprocess

    from conftest import PY, ROOT

    return subprocess.run([PY, script, "--home", str(home), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=child_env(),
                          stdin=subprocess.DEVNULL)


@needs_root
@pytest.mark.parametrize("script", ["client.py", "server.py"])
@pytest.mark.parametrize("owned", ["home", "identity_ecdsa_p256.pem", "identity_mldsa65.pem",
                                   "known_hosts", "known_clients"])
def test_a_home_or_home_file_owned_by_another_user_is_refused(env: Env, script: str,
                                                             owned: str):
    home = env.root / "home"
    assert _run_script(script, home, "--show-identity").returncode == 0
    for name in ("known_hosts", "known_clients"):
        (home / name).write_text("")
        (home / name).chmod(0o600)
    target = home if owned == "home" else home / owned
    before = {p.name: p.read_bytes() for p in home.iterdir()}
    os.chown(target, NOBODY, NOBODY)
    r = _run_script(script, home, "--show-identity")
    what = {"home": "home directory", "known_hosts": "trust file",
            "known_clients": "trust file"}.get(owned, "private key")
    assert r.returncode == 1, r
    assert r.stdout == ""
    assert _complaints(r.stderr) == [
        f"error: {what} {target} is owned by uid {NOBODY}, not by you (uid 0) or root; "
        f"fix it with: chown root {target}"]
    assert "Traceback" not in r.stderr
    assert {p.name: p.read_bytes() for p in home.iterdir()} == before  # nothing created


@needs_root
def test_a_known_hosts_pin_planted_by_another_user_is_refused_before_connecting(env: Env):
    srv = env.server()
    assert env.client("--show-identity").returncode == 0
    known_hosts = env.client_home / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{srv.port} {srv.fingerprint}\n")
    os.chown(known_hosts, NOBODY, NOBODY)
    r = env.client("--port", str(srv.port), "--send-text", "must not go")
    assert r.returncode == 1, r
    assert _complaints(r.stderr) == [
        f"error: trust file {known_hosts} is owned by uid {NOBODY}, not by you (uid 0) or "
        f"root; fix it with: chown root {known_hosts}"]
    assert "connection from" not in srv.output()  # refused before connecting


def test_a_group_writable_trust_file_is_refused(env: Env):
    assert env.client("--show-identity").returncode == 0
    known_hosts = env.client_home / "known_hosts"
    known_hosts.write_text("")
    known_hosts.chmod(0o664)
    r = env.client("--port", "1", "--send-text", "x")
    assert r.returncode == 1, r
    assert _complaints(r.stderr) == [
        f"error: trust file {known_hosts} is writable by group or others (mode 0664); "
        f"fix it with: chmod 600 {known_hosts}"]



# --- 9. every flag value is checked up front: one error line, exit 2 ------------------------
LONG_LABEL = "a" * 64
HOST_RULE = "(an IP address, or dot-separated labels of 1-63 letters, digits, '-' or '_')"
FP_RULE = "(expected SHA256: and 43 base64 characters, as the other side's --show-identity " \
          "prints it)"
TIMEOUT_RULE = "(seconds: a number above 0, at most 3600)"
BAD_FLAGS = [
    ("client.py", ["--host", f"{LONG_LABEL}.example", "--send-text", "x"],
     f"argument --host: invalid host name '{LONG_LABEL}.example' {HOST_RULE}"),
    ("server.py", ["--host", LONG_LABEL],
     f"argument --host: invalid host name '{LONG_LABEL}' {HOST_RULE}"),
    ("client.py", ["--host", "\u00df" * 70, "--send-text", "x"],
     f"argument --host: invalid host name '{'ß' * 70}' {HOST_RULE}"),
    ("client.py", ["--host", "a..b", "--send-text", "x"],
     f"argument --host: invalid host name 'a..b' {HOST_RULE}"),
    ("client.py", ["--host", "bad host", "--send-text", "x"],
     f"argument --host: invalid host name 'bad host' {HOST_RULE}"),
    ("server.py", ["--host", ""], f"argument --host: invalid host name '' {HOST_RULE}"),
    ("server.py", ["--handshake-timeout", "nan"],
     f"argument --handshake-timeout: invalid timeout 'nan' {TIMEOUT_RULE}"),
    ("server.py", ["--handshake-timeout", "inf"],
     f"argument --handshake-timeout: invalid timeout 'inf' {TIMEOUT_RULE}"),
    ("server.py", ["--handshake-timeout", "0"],
     f"argument --handshake-timeout: invalid timeout '0' {TIMEOUT_RULE}"),
    ("server.py", ["--handshake-timeout", "-1"],
     f"argument --handshake-timeout: invalid timeout '-1' {TIMEOUT_RULE}"),
    ("server.py", ["--handshake-timeout", "1e300"],
     f"argument --handshake-timeout: invalid timeout '1e300' {TIMEOUT_RULE}"),
    ("client.py", ["--fingerprint", "garbage", "--send-text", "x"],
     f"argument --fingerprint: invalid fingerprint 'garbage' {FP_RULE}"),
    ("client.py", ["--fingerprint", "SHA256:" + "A" * 42, "--send-text", "x"],
     f"argument --fingerprint: invalid fingerprint 'SHA256:{'A' * 42}' {FP_RULE}"),
    ("client.py", ["--fingerprint", "A" * 42 + "B", "--send-text", "x"],  # not canonical
     f"argument --fingerprint: invalid fingerprint '{'A' * 42}B' {FP_RULE}"),
    ("client.py", ["--max-file-size", "1_000", "--send-text", "x"],
     "argument --max-file-size: invalid size '1_000' (bytes)"),
    ("server.py", ["--max-file-size", "-1"], "argument --max-file-size: size must not be negative"),
    ("server.py", ["--max-file-size", str(1 << 64)],
     f"argument --max-file-size: size {1 << 64} is above the protocol's limit of "
     f"{(1 << 64) - 1} bytes"),
    ("client.py", ["--port", "\u0668\u0660", "--send-text", "x"],  # Arabic-Indic "80"
     "argument -p/--port: invalid port '\u0668\u0660'"),
    ("server.py", ["--port", "65536"], "argument -p/--port: port 65536 is outside 0-65535"),
    ("server.py", ["--max-clients", "0"], "argument --max-clients: 0 is not at least 1"),
    ("server.py", ["--max-clients", "many"], "argument --max-clients: invalid number 'many'"),
]


@pytest.mark.parametrize(("script", "args", "message"), BAD_FLAGS,
                         ids=[f"{s}-{' '.join(a)[:40]}" for s, a, _ in BAD_FLAGS])
def test_a_bad_flag_value_is_one_usage_error(env: Env, script: str, args: list[str],
                                             message: str):
    home = env.root / "home"
    r = _run_script(script, home, "--port", "0" if script == "server.py" else "1", *args)
    assert (r.returncode, r.stderr, r.stdout) == (2, f"error: {message} (see --help)\n", "")
    assert not home.exists()  # refused before anything else happened


@pytest.mark.parametrize("fp", ["SHA256:{}", "{}", "  SHA256:{}  "])
def test_a_well_formed_fingerprint_is_accepted_with_or_without_prefix(env: Env, fp: str):
    srv = env.server()
    r = env.client("--port", str(srv.port), "--fingerprint", fp.format(srv.fingerprint[7:]),
                   "--send-text", "pinned")
    assert r.returncode == 0, r.stderr
    assert (env.client_home / "known_hosts").read_text() == \
        f"[127.0.0.1]:{srv.port} {srv.fingerprint}\n"


def test_a_host_name_that_does_not_resolve_is_still_a_connect_error(env: Env):
    r = env.client("--host", "no-such-host.invalid", "--port", "1", "--send-text", "x")
    assert r.returncode == 3, r
    assert _complaints(r.stderr)[-1].startswith(
        "error: cannot connect to no-such-host.invalid:1: ")
    assert "Traceback" not in r.stderr


def test_an_internationalised_host_name_is_accepted(env: Env):
    r = env.client("--host", "b\u00fccher.invalid", "--port", "1", "--send-text", "x")
    assert r.returncode == 3, r  # valid, so it gets as far as the lookup
    assert _complaints(r.stderr)[-1].startswith("error: cannot connect to b\u00fccher.invalid:1: ")


# --- 8. nothing partial survives a crash -------------------------------------------------
def _stale(directory, name: str = ".qsocket-abcdefgh.part", data: bytes = b"\xff\xd8\xffpart"):
    path = directory / name
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def test_start_up_clean_up_removes_only_unlocked_temp_files_of_ours(tmp_path):
    import fcntl

    import transfer

    stale = _stale(tmp_path, ".qsocket-stale001.part")
    held = _stale(tmp_path, ".qsocket-held0001.part")
    theirs = _stale(tmp_path, ".qsocket-theirs01.part")
    os.chown(theirs, NOBODY, NOBODY)
    target = _stale(tmp_path, "precious.jpg", b"keep me")
    (tmp_path / ".qsocket-symlink1.part").symlink_to(target)
    for name in (".qsocket-x.part", ".qsocket-abcdefgh.partial", "photo.jpg",
                 ".qsocket-ABCDEFGH.part"):
        _stale(tmp_path, name)
    fd = os.open(held, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a live receiver holds its temp file
        assert transfer.remove_stale_temps(tmp_path) == [".qsocket-stale001.part"]
        assert not stale.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([
            ".qsocket-held0001.part", ".qsocket-theirs01.part", ".qsocket-symlink1.part",
            "precious.jpg", ".qsocket-x.part", ".qsocket-abcdefgh.partial", "photo.jpg",
            ".qsocket-ABCDEFGH.part"])
        assert target.read_bytes() == b"keep me"
    finally:
        os.close(fd)
    assert transfer.remove_stale_temps(tmp_path) == [".qsocket-held0001.part"]  # unlocked now


def test_a_live_fallback_temp_file_survives_a_clean_up_and_is_saved(tmp_path, monkeypatch):
    import hashlib

    import transfer

    monkeypatch.setattr(transfer, "USE_O_TMPFILE", False)
    data = b"\xff\xd8\xff" + os.urandom(10000)
    inc = transfer.IncomingFile(tmp_path, "photo.jpg", len(data))
    inc.write(data[:5000])
    assert transfer.remove_stale_temps(tmp_path) == []  # locked by us: a live transfer
    inc.write(data[5000:])
    assert inc.finish(hashlib.sha256(data).digest())[0] == "photo.jpg"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.jpg"]
    assert (tmp_path / "photo.jpg").read_bytes() == data


def test_a_clean_up_between_creating_and_locking_the_temp_file_is_survived(tmp_path,
                                                                          monkeypatch):
    import hashlib
    import tempfile

    import transfer

    monkeypatch.setattr(transfer, "USE_O_TMPFILE", False)
    real_mkstemp, made = tempfile.mkstemp, []

    def mkstemp(**kw):  # another process's start-up clean-up runs right after creation
        fd, path = real_mkstemp(**kw)
        made.append(path)
        if len(made) == 1:
            assert transfer.remove_stale_temps(tmp_path) == [os.path.basename(path)]
        return fd, path

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)  # the module transfer imports
    data = b"\xff\xd8\xff" + os.urandom(5000)
    inc = transfer.IncomingFile(tmp_path, "photo.jpg", len(data))
    assert len(made) == 2 and inc.temp == Path(made[1])
    inc.write(data)
    assert inc.finish(hashlib.sha256(data).digest())[0] == "photo.jpg"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.jpg"]


def _server_without_o_tmpfile(env: Env):
    """A headless server whose transfer module has no O_TMPFILE (as on a filesystem
    without it), started through runpy so server.py itself is unchanged."""
    from conftest import PY, Proc

    code = ("import runpy, sys, transfer; transfer.USE_O_TMPFILE = False; "
            "sys.argv = ['server.py'] + sys.argv[1:]; runpy.run_path('server.py', "
            "run_name='__main__')")
    return Proc([PY, "-c", code, "--headless", "--port", "0", "--home", str(env.server_home),
                 "--received-dir", str(env.server_received)])


def _receiving_fds(pid: int, directory) -> list[int]:
    """Sizes of the files under `directory` that process pid holds open for writing."""
    sizes = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith(f"{directory}/"):
                sizes.append(os.stat(f"/proc/{pid}/fd/{fd}").st_size)
        except OSError:
            continue  # closed meanwhile
    return sizes


@pytest.mark.parametrize("unnamed", [True, False], ids=["O_TMPFILE", "named-fallback"])
def test_a_receiver_killed_mid_transfer_leaves_no_file(env: Env, unnamed: bool):
    import signal
    import subprocess
    import time

    from conftest import PY, ROOT, Server, files_in

    srv = env.server() if unnamed else _server_without_o_tmpfile(env)
    if not unnamed:
        env._servers.append(srv)
        srv.port = int(srv.wait_for(r"^listening on [\d.]+:(\d+)$").group(1))
    big = env.assets / "big.jpg"
    with open(big, "wb") as f:  # 200 MiB, sparse: a JPEG start then zeros
        f.write(b"\xff\xd8\xff\xe0")
        f.truncate(200 << 20)
    client = subprocess.Popen(
        [PY, "client.py", "--home", str(env.client_home), "--received-dir",
         str(env.client_received), "--port", str(srv.port), "--accept-new-host",
         "--send-file", str(big)], cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=child_env())
    try:
        srv.wait_for(r"\] receiving 'big\.jpg' \(200\.0 MiB\)$")
        # mid-transfer: the receiver has written a first MiB; then the sender is frozen
        # so the transfer cannot complete before the kill lands
        deadline = time.monotonic() + 30
        while not any(size >= 1 << 20 for size in _receiving_fds(srv.p.pid,
                                                                  env.server_received)):
            assert time.monotonic() < deadline, srv.output()
            time.sleep(0.01)  # polling a state, not waiting a fixed time
        client.send_signal(signal.SIGSTOP)
        srv.p.kill()
        srv.p.wait(10)
    finally:
        client.send_signal(signal.SIGCONT)
        client.kill()
        client.wait(10)
    names = files_in(env.server_received)
    if unnamed:
        assert names == []  # the unnamed file went with the process
        return
    assert len(names) == 1 and TEMP_NAME.fullmatch(names[0]), names  # the fallback's
    again = Server(env.server_home, env.server_received)
    env._servers.append(again)
    assert f"removed a partial file left by a crash: {env.server_received / names[0]}" in \
        again.output()
    assert files_in(env.server_received) == []


# --- 7. an interrupt never desynchronises the record stream -------------------------------
def test_an_exception_inside_seal_uses_up_no_sequence_number(monkeypatch):
    from conftest import handshake_pair

    from protocol import Bye, FileData, decode_message

    p = handshake_pair()
    sender, receiver = p.client.records()[0], p.server.records()[1]
    first = sender.seal(FileData.TYPE, FileData(1, b"a" * 100).encode())
    real = sender._ctr  # the layer's AES-CTR context, set to each record's IV in turn

    class Interrupted:  # payload encryption cut short by Ctrl-C, the context left mid-stream
        reset_nonce = real.reset_nonce
        update = real.update

        def update_into(self, data, out):
            real.update_into(data[:10], out)
            raise KeyboardInterrupt

    sender._ctr = Interrupted()
    with pytest.raises(KeyboardInterrupt):
        sender.seal(FileData.TYPE, FileData(1, b"b" * 100).encode(), memoryview(bytearray(200)))
    assert sender.seq == 1
    sender._ctr = real
    bye = sender.seal(Bye.TYPE, Bye("client interrupted").encode())
    assert sender.seq == 2
    for frame, expected in ((first, FileData(1, b"a" * 100)), (bye, Bye("client interrupted"))):
        body = b"".join(bytes(piece) for piece in frame)[4:]
        assert decode_message(*receiver.open(body)) == expected


def _big_sparse_jpeg(path, size: int = 400 << 20):
    with open(path, "wb") as f:  # a JPEG start, then zeros (sparse: no disk, fast to read)
        f.write(b"\xff\xd8\xff\xe0")
        f.truncate(size)
    return path


def _wait_received(pid: int, directory, at_least: int, proc_output) -> None:
    import time

    deadline = time.monotonic() + 60
    while not any(size >= at_least for size in _receiving_fds(pid, directory)):
        assert time.monotonic() < deadline, proc_output()
        time.sleep(0.002)  # polling a state, not waiting a fixed time


def _interrupt_at_this_moment(pid: int, sig: int) -> None:
    """Freeze the process wherever it is, queue the signal, let it go on: the signal
    is then handled at whatever point the process had reached."""
    import signal

    os.kill(pid, signal.SIGSTOP)
    os.kill(pid, sig)
    os.kill(pid, signal.SIGCONT)


MOMENTS = [(0, "SIGINT"), (1, "SIGTERM"), (2, "SIGINT"), (3, "SIGTERM"), (5, "SIGINT"),
           (8, "SIGTERM"), (13, "SIGINT"), (20, "SIGTERM"), (32, "SIGINT"), (45, "SIGTERM"),
           (70, "SIGINT"), (100, "SIGTERM")]  # MiB on the receiver's disk


def test_interrupting_a_client_mid_file_always_ends_with_a_goodbye(env: Env):
    import re
    import signal
    import subprocess

    from conftest import PY, ROOT, files_in

    srv = env.server()
    assert env.client("--port", str(srv.port), "--accept-new-host", "--send-text",
                      "pinned").returncode == 0
    # that session's last line first: on a busy server it may come after the client exited
    srv.wait_for(r"\] peer said goodbye \(client done\)$")
    big = _big_sparse_jpeg(env.assets / "big.jpg")
    for mib, name in MOMENTS:
        client = subprocess.Popen(
            [PY, "client.py", "--home", str(env.client_home), "--received-dir",
             str(env.client_received), "--port", str(srv.port), "--send-file", str(big)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            stdin=subprocess.DEVNULL, env=child_env())
        try:
            srv.wait_for(r"\] receiving 'big\.jpg' \(400\.0 MiB\)$")
            _wait_received(srv.p.pid, env.server_received, mib << 20, srv.output)
            _interrupt_at_this_moment(client.pid, getattr(signal, name))
            out, err = client.communicate(timeout=60)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
        why = srv.wait_for(r"\] (peer said goodbye.*|connection closed: .*|peer disconnected)$")
        assert why.group(1) == "peer said goodbye (client interrupted)", (mib, name, why.string)
        assert (client.returncode, _complaints(err)) == (130, []), (mib, name, err)
        assert "interrupted: saying goodbye" in err
        assert "Traceback" not in err
        assert files_in(env.server_received) == [], (mib, name)
    assert not re.search("failed to decrypt|Traceback| saved at ", srv.output())


CONSOLE_MOMENTS = [(0, "SIGTERM"), (1, "SIGINT"), (2, "SIGTERM"), (5, "SIGINT"), (12, "SIGTERM"),
                   (25, "SIGINT"), (40, "SIGTERM"), (60, "SIGINT")]  # MiB received


def test_interrupting_the_server_console_mid_file_always_ends_with_a_goodbye(env: Env):
    import re
    import signal

    from conftest import files_in
    from test_interactive import Terminals, assert_clean

    terms = Terminals(env)
    _big_sparse_jpeg(terms.server_assets / "big.jpg")
    for mib, name in CONSOLE_MOMENTS:
        try:
            srv, port, _ = terms.console()
            cli, _ = terms.connected_client(port)
            srv.expect_line(r"^client .* connected from ")
            srv.expect_prompt(">")
            srv.type("2")
            srv.answer("number or path: ", "1")
            cli.expect_line(r"^\[server\] receiving 'big\.jpg' \(400\.0 MiB\)$")
            _wait_received(cli.child.pid, env.client_received, mib << 20, cli.text)
            _interrupt_at_this_moment(srv.child.pid, getattr(signal, name))
            assert srv.wait_exit() == 0, (mib, name, srv.text())
            assert srv.lines(r"^\s*shutting down$") and srv.lines("^bye$"), srv.text()
            assert cli.wait_exit() == 0, (mib, name, cli.text())
            assert cli.lines(r"^server: peer said goodbye \(server shutting down\)$"), \
                (mib, name, cli.text())
            assert not re.search("failed to decrypt|saved at", cli.text() + srv.text())
            for tty in (cli, srv):
                assert_clean(tty)
            assert files_in(env.client_received) == [], (mib, name)
        finally:
            for tty in terms.ttys:
                tty.kill()
            terms.ttys.clear()


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_interrupting_a_headless_receiver_mid_file_ends_with_a_goodbye(env: Env, name: str):
    import signal
    import subprocess

    from conftest import PY, ROOT, files_in

    srv = env.server()
    assert env.client("--port", str(srv.port), "--accept-new-host", "--send-text",
                      "pinned").returncode == 0
    big = _big_sparse_jpeg(env.assets / "big.jpg")
    client = subprocess.Popen(
        [PY, "client.py", "--home", str(env.client_home), "--received-dir",
         str(env.client_received), "--port", str(srv.port), "--send-file", str(big)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL, env=child_env())
    try:
        srv.wait_for(r"\] receiving 'big\.jpg' \(400\.0 MiB\)$")
        _wait_received(srv.p.pid, env.server_received, 5 << 20, srv.output)
        _interrupt_at_this_moment(srv.p.pid, getattr(signal, name))
        assert srv.p.wait(30) == 0
        out, err = client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert (client.returncode, _complaints(err)) == (5, [
        "error: file not delivered: peer said goodbye (server shutting down)"]), err
    assert files_in(env.server_received) == []
    assert "failed to decrypt" not in srv.output() + err


def test_sigterm_at_a_prompt_ends_either_console_at_once_with_a_goodbye(env: Env):
    import re
    import signal

    from test_interactive import Terminals, assert_clean

    terms = Terminals(env)
    try:
        srv, port, _ = terms.console()
        client_fp = terms.client_fingerprint()
        cli, _ = terms.connected_client(port)
        short = re.escape(f"#1 {client_fp.removeprefix('SHA256:')[:6]}")  # issue 11's handle
        srv.expect_line(rf"^client {short} connected")
        cli.wait_idle()
        os.kill(cli.child.pid, signal.SIGTERM)  # at the client's menu prompt
        assert cli.wait_exit() == 130
        assert cli.lines("^interrupted: saying goodbye$")
        srv.expect_line(rf"^\[{short}\] peer said goodbye \(client interrupted\)$")
        srv.expect_prompt(">")
        srv.wait_idle()
        os.kill(srv.child.pid, signal.SIGTERM)  # at the server's menu prompt
        assert srv.wait_exit() == 0
        assert srv.lines(r"^\s*shutting down$") and srv.lines("^bye$")
        for tty in (cli, srv):
            assert_clean(tty)
    finally:
        for tty in terms.ttys:
            tty.kill()



def test_sigterm_at_a_plain_input_prompt_ends_the_client_with_a_goodbye(env: Env):
    import signal
    import subprocess

    from conftest import PY, ROOT

    srv = env.server()
    cli = subprocess.Popen(  # stdin a pipe that stays open: the menu waits in input()
        [PY, "client.py", "--home", str(env.client_home), "--received-dir",
         str(env.client_received), "--port", str(srv.port), "--accept-new-host"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=child_env())
    try:
        lines = []
        while (line := cli.stdout.readline()) and line != "1) send text  2) send a JPG  3) quit\n":
            lines.append(line)
        assert line, lines
        cli.send_signal(signal.SIGTERM)
        out, _ = cli.communicate(timeout=20)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert cli.returncode == 130, out
    assert "interrupted: saying goodbye" in out
    srv.wait_for(r"\] peer said goodbye \(client interrupted\)$")


@pytest.mark.parametrize("err", ["EOPNOTSUPP", "EISDIR", "EINVAL"])
def test_a_filesystem_without_o_tmpfile_gets_the_locked_named_fallback(tmp_path, monkeypatch,
                                                                      err: str):
    import errno
    import fcntl
    import hashlib

    import transfer

    real_open = os.open

    def no_tmpfile(path, flags, *a, **kw):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(getattr(errno, err), os.strerror(getattr(errno, err)))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(transfer.os, "open", no_tmpfile)
    data = b"\xff\xd8\xff" + os.urandom(5000)
    inc = transfer.IncomingFile(tmp_path, "photo.jpg", len(data))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 1 and TEMP_NAME.fullmatch(names[0])
    other = real_open(tmp_path / names[0], os.O_RDONLY)
    try:  # held under an exclusive lock by the receiver
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(other)
    inc.write(data)
    assert inc.finish(hashlib.sha256(data).digest())[0] == "photo.jpg"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.jpg"]


def test_an_unexpected_o_tmpfile_error_is_a_disk_error_not_a_silent_fallback(tmp_path,
                                                                            monkeypatch):
    import errno

    import transfer

    real_open = os.open

    def no_space(path, flags, *a, **kw):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(transfer.os, "open", no_space)
    with pytest.raises(transfer.Rejected) as e:
        transfer.IncomingFile(tmp_path, "photo.jpg", 100)
    assert e.value.detail == "not enough disk space on the receiver"
    assert list(tmp_path.iterdir()) == []


def test_a_signal_outside_a_prompt_only_sets_the_flag():
    """The handler raises nothing while records may be sealed: it only sets the flag."""
    import signal

    import session

    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        interrupt = session.Interrupt().install()
        try:  # the handler runs here, in this (main) thread
            signal.raise_signal(signal.SIGTERM)
        except KeyboardInterrupt:
            pytest.fail("the signal handler raised outside a prompt")
        assert interrupt.event.is_set()
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])
