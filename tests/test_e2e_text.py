"""End to end with real processes on 127.0.0.1: batch text and known_hosts pinning."""

from __future__ import annotations

import socket

from conftest import Env, files_in


def test_batch_text_delivered_and_printed_by_server(env: Env):
    srv = env.server()
    r = env.client("--port", str(srv.port), "--accept-new-host", "--send-text", "hello, server")
    assert r.returncode == 0, r.stderr
    assert "delivered: hello, server" in r.stdout
    line = srv.wait_for(r"\] hello, server$").string
    client_fp = env.client("--show-identity").stdout.strip()
    assert line == f"[{client_fp}] hello, server"


def test_unknown_host_in_batch_mode_is_refused_and_nothing_delivered(env: Env):
    srv = env.server()
    r = env.client("--port", str(srv.port), "--send-text", "must not arrive")
    assert r.returncode == 4
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: unknown server [127.0.0.1]:{srv.port} with fingerprint {srv.fingerprint}; "
        f"verify it, then use --fingerprint {srv.fingerprint} (or --accept-new-host)")
    srv.wait_for(r"closed: peer refused: client does not trust this server")
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
    assert files_in(env.server_received) == []
