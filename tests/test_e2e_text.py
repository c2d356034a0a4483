"""End to end with real processes on 127.0.0.1: batch text and known_hosts pinning."""

from __future__ import annotations

import socket

from conftest import Env, Relay


def test_batch_text_delivered_and_printed_by_server(env: Env):
    srv = env.server()
    r = env.client("--port", str(srv.port), "--accept-new-host", "--send-text", "hello, server")
    assert r.returncode == 0, r.stderr
    assert "delivered: hello, server" in r.stdout
    line = srv.wait_for(r"\] hello, server$").string
    client_fp = env.client("--show-identity").stdout.strip()
    assert line == f"[{client_fp}] hello, server"
    # the key log is off by default (this was test_keylog_is_off_by_default)
    assert "QSOCKET_KEYLOGFILE" not in r.stderr
    assert list(env.root.glob("*.log")) == []


def test_unknown_host_in_batch_mode_is_refused_and_nothing_delivered(env: Env):
    srv = env.server()
    r = env.client("--port", str(srv.port), "--send-text", "must not arrive")
    assert r.returncode == 4
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: unknown server [127.0.0.1]:{srv.port} offered fingerprint {srv.fingerprint}; "
        f"compare it with the 'identity' line the server printed at start-up, and only if "
        f"they match pass it with --fingerprint (or use --accept-new-host)")
    srv.wait_for(r"closed: peer refused: authentication failed")
    assert "must not arrive" not in srv.output()
    assert not (env.client_home / "known_hosts").exists()


def test_accept_new_host_pins_and_later_runs_need_no_flag(env: Env):
    srv = env.server()
    first = env.client("--port", str(srv.port), "--accept-new-host", "--send-text", "one")
    assert first.returncode == 0, first.stderr
    pinned = (env.client_home / "known_hosts").read_text()
    assert pinned == f"[127.0.0.1]:{srv.port} {srv.fingerprint}\n"
    second = env.client("--port", str(srv.port), "--send-text", "two")
    assert second.returncode == 0, second.stderr
    srv.wait_for(r"\] two$")


def test_changed_server_identity_is_refused_with_both_fingerprints(env: Env, tmp_path):
    srv = env.server()
    assert env.client("--port", str(srv.port), "--accept-new-host",
                      "--send-text", "x").returncode == 0
    old_fp, port = srv.fingerprint, srv.port
    assert srv.stop() == 0
    # another identity on the same host:port
    other = env.server_home.parent / "other-home"
    from conftest import Server
    impostor = Server(other, env.server_received, "--port", str(port))
    env._servers.append(impostor)
    assert impostor.port == port and impostor.fingerprint != old_fp
    r = env.client("--port", str(port), "--send-text", "secret")
    assert r.returncode == 4
    assert old_fp in r.stderr and impostor.fingerprint in r.stderr
    assert "SERVER IDENTIFICATION HAS CHANGED" in r.stderr
    assert f"remove line 1 of {env.client_home / 'known_hosts'}" in r.stderr
    assert "secret" not in impostor.output()


def test_connection_refused_exits_3_with_one_error_line(env: Env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connection refused
        r = env.client("--port", str(port), "--send-text", "x")
    assert r.returncode == 3
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot connect to 127.0.0.1:{port}: Connection refused"]
    assert "Traceback" not in r.stderr


# --- key log: an independent decryption of a capture ------------------------------------
def test_keylog_lets_an_independent_tool_decrypt_a_capture(env: Env):
    import struct

    from conftest import child_env

    import crypt
    from protocol import Text, decode_message

    srv = env.server()
    relay = Relay(srv.port)
    keylog = env.root / "keys.log"
    r = env.client("--port", str(relay.port), "--accept-new-host",
                   "--send-text", "read me from the capture",
                   env=child_env(QSOCKET_KEYLOGFILE=str(keylog)))
    assert r.returncode == 0, r.stderr
    assert f"warning: QSOCKET_KEYLOGFILE is set: writing this session's traffic keys to " \
           f"{keylog}" in r.stderr
    assert relay.finished.wait(10)
    assert oct(keylog.stat().st_mode & 0o777) == "0o600"

    # the key log: label, client random, key
    keys = {}
    for line in keylog.read_text().splitlines():
        label, client_random, key = line.split()
        keys[label] = bytes.fromhex(key)
    # frames: ClientHello, ClientAuth (sealed), then records client->server from seq 0
    frames, data = [], bytes(relay.c2s)
    while data:
        (n,) = struct.unpack(">I", data[:4])
        frames.append(data[4:4 + n])
        data = data[4 + n:]
    assert client_random == frames[0][7:39].hex()  # type, magic, version, then the random
    # the logged traffic secret gives the epoch keys (docs/PROTOCOL.md section 7), so a
    # tool can follow the session through key updates; epoch 0 is also logged as keys
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

    secret = keys["QSOCKET2_CLIENT_TRAFFIC_SECRET"]
    for part, n in (("ENC", 32), ("MAC", 32), ("IV", 8)):
        label = f"QSocket2 v2 traffic {part.lower()}".encode()
        assert HKDFExpand(hashes.SHA256(), n, label).derive(secret) == \
            keys[f"QSOCKET2_CLIENT_TRAFFIC_{part}"]
    receiver = crypt.RecordReceiver(crypt.DIRECTION_C2S, keys["QSOCKET2_CLIENT_TRAFFIC_ENC"],
                                    keys["QSOCKET2_CLIENT_TRAFFIC_MAC"],
                                    keys["QSOCKET2_CLIENT_TRAFFIC_IV"])
    first = decode_message(*receiver.open(frames[2]))
    assert isinstance(first, Text) and first.text == "read me from the capture"
    assert b"read me" not in bytes(relay.c2s)  # and it was not in the clear on the wire
    # protocol version 2: the client's identity never travels in the clear
    import keystore

    client_id, created = keystore.load_identity(keystore.open_home(env.client_home))
    assert not created
    assert client_id.public.ecdsa not in bytes(relay.c2s)
    assert client_id.public.mldsa[:64] not in bytes(relay.c2s)


# --- errors the user causes: one error line, no traceback -------------------------------
def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def test_usage_errors_get_one_error_line_and_exit_2(env: Env):
    import subprocess

    from conftest import PY, ROOT, child_env

    def run(*argv):
        return subprocess.run([PY, *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=30, env=child_env(), stdin=subprocess.DEVNULL)

    bad_port = run("client.py", "--port", "70000")
    assert bad_port.returncode == 2
    assert bad_port.stderr == "error: argument -p/--port: port 70000 is outside 1-65535 " \
                              "(see --help)\n"
    unknown = run("server.py", "--bogus")
    assert unknown.returncode == 2
    assert unknown.stderr == "error: unrecognized arguments: --bogus (see --help)\n"
    home_is_file = env.root / "not-a-dir"
    home_is_file.write_text("x")
    r = run("client.py", "--home", str(home_is_file), "--show-identity")
    assert r.returncode == 1
    assert _one_error_line(r.stderr).startswith(f"error: cannot use home directory {home_is_file}")


def test_server_port_in_use_is_one_error_line(env: Env):
    import subprocess

    from conftest import PY, ROOT, child_env

    srv = env.server()
    r = subprocess.run([PY, "server.py", "--headless", "--port", str(srv.port),
                        "--home", str(env.server_home)], cwd=ROOT, capture_output=True,
                       text=True, timeout=30, env=child_env(), stdin=subprocess.DEVNULL)
    assert r.returncode == 1
    assert _one_error_line(r.stderr) == \
        f"error: cannot listen on 127.0.0.1:{srv.port}: Address already in use"


def test_an_unwritable_keylog_warns_and_the_session_goes_on(env: Env):
    from conftest import child_env

    srv = env.server()
    bad = env.root / "no-such-dir" / "keys.log"
    r = env.client("--port", str(srv.port), "--accept-new-host", "--send-text", "still fine",
                   env=child_env(QSOCKET_KEYLOGFILE=str(bad)))
    assert r.returncode == 0, r.stderr
    assert f"warning: cannot write the key log {bad}: No such file or directory" in r.stderr
    assert "Traceback" not in r.stderr
    srv.wait_for(r"\] still fine$")
