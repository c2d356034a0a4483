"""Identities and trust: key hygiene, --show-identity, pinning, MITM, authorised clients."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
from conftest import Env, Relay, Server

import keystore


def fp_of(env: Env, home: Path) -> str:
    r = env.client("--show-identity", home=home)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


# --- key files ---------------------------------------------------------------------
def test_fresh_home_is_created_0700_with_0600_keys(env: Env):
    fp = fp_of(env, env.client_home)
    assert re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", fp)
    assert stat.S_IMODE(env.client_home.stat().st_mode) == 0o700
    for name in (keystore.ECDSA_FILE, keystore.MLDSA_FILE):
        assert stat.S_IMODE((env.client_home / name).stat().st_mode) == 0o600
    assert fp_of(env, env.client_home) == fp  # stable across runs


def test_show_identity_matches_what_the_server_announces(env: Env):
    r = env.client("--show-identity", home=env.server_home)  # same key format on both sides
    srv = env.server()
    assert r.stdout.strip() == srv.fingerprint


def test_private_key_readable_by_others_is_refused(env: Env):
    fp_of(env, env.client_home)
    key = env.client_home / keystore.ECDSA_FILE
    key.chmod(0o644)
    r = env.client("--show-identity")
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"error: private key {key} is accessible by group or others (mode 0644); "
        f"fix it with: chmod 600 {key}"]


def test_world_writable_home_is_refused(env: Env):
    fp_of(env, env.client_home)
    env.client_home.chmod(0o777)
    r = env.client("--show-identity")
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"error: home directory {env.client_home} is writable by group or others; "
        f"fix it with: chmod 700 {env.client_home}"]


def test_corrupt_key_is_an_error_and_the_file_is_untouched(env: Env):
    fp_of(env, env.client_home)
    key = env.client_home / keystore.MLDSA_FILE
    corrupt = key.read_bytes()[:40]
    key.write_bytes(corrupt)
    r = env.client("--show-identity")
    assert r.returncode == 1
    assert r.stderr.startswith(f"error: identity in {env.client_home} is corrupt")
    assert "Traceback" not in r.stderr
    assert key.read_bytes() == corrupt


def test_ecdsa_only_identity_is_refused_not_taken_as_hybrid(env: Env):
    fp_of(env, env.client_home)
    (env.client_home / keystore.MLDSA_FILE).unlink()
    r = env.client("--show-identity")
    assert r.returncode == 1
    assert "is an ECDSA-only identity" in r.stderr
    assert not (env.client_home / keystore.MLDSA_FILE).exists()


# --- pinning ----------------------------------------------------------------------------
def test_fingerprint_flag_pins_and_wrong_fingerprint_is_refused(env: Env):
    srv = env.server()
    other = fp_of(env, env.root / "someone-else")
    bad = env.client("--port", str(srv.port), "--fingerprint", other, "--send-text", "no")
    assert bad.returncode == 4
    assert f"offered {srv.fingerprint}, not the expected {other}" in bad.stderr
    assert not (env.client_home / "known_hosts").exists()
    good = env.client("--port", str(srv.port), "--fingerprint", srv.fingerprint,
                      "--send-text", "yes")
    assert good.returncode == 0, good.stderr
    assert (env.client_home / "known_hosts").read_text() == \
        f"[127.0.0.1]:{srv.port} {srv.fingerprint}\n"
    srv.wait_for(r"\] yes$")
    assert "] no" not in srv.output()


def test_man_in_the_middle_on_the_pinned_port_is_refused(env: Env):
    real = env.server()
    port = real.port
    assert env.client("--port", str(port), "--accept-new-host",
                      "--send-text", "pin").returncode == 0
    assert real.stop() == 0
    # an attacker now answers on the pinned host:port and relays to its own server
    attacker = Server(env.root / "attacker-home", env.root / "attacker-received")
    env._servers.append(attacker)
    relay = Relay(attacker.port, listen_port=port)
    try:
        r = env.client("--port", str(port), "--send-text", "secret")
    finally:
        relay.close()
    assert r.returncode == 4
    assert real.fingerprint in r.stderr and attacker.fingerprint in r.stderr
    assert "secret" not in attacker.output()
    assert os.listdir(env.root / "attacker-received") == []


# --- client admission -----------------------------------------------------------------
def test_authorized_clients_admits_listed_with_name_and_refuses_others(env: Env):
    alice = fp_of(env, env.client_home)
    mallory_home = env.root / "mallory"
    fp_of(env, mallory_home)
    allowed = env.root / "authorized"
    allowed.write_text(f"# who may connect\n\n{alice} alice laptop  # desk\n"
                       "   # indented comment\n")
    srv = env.server("--authorized-clients", str(allowed))
    srv.wait_for(r"admitting only the 1 client")
    ok = env.client("--port", str(srv.port), "--accept-new-host", "--send-text", "hi from alice")
    assert ok.returncode == 0, ok.stderr
    srv.wait_for(rf"^\[alice laptop {re.escape(alice)}\] hi from alice$")
    no = env.client("--port", str(srv.port), "--accept-new-host",
                    "--send-text", "hi from mallory", home=mallory_home)
    assert no.returncode == 4
    mallory = fp_of(env, mallory_home)
    assert f"error: server refused this client: this client ({mallory}) is not authorised " \
           f"on this server" in no.stderr
    srv.wait_for(rf"client {re.escape(mallory)} from .* refused: not in")
    assert "hi from mallory" not in srv.output()


@pytest.mark.parametrize("problem", ["missing", "unreadable", "malformed"])
def test_bad_authorized_clients_file_is_a_startup_error(env: Env, problem: str):
    path = env.root / "authorized"
    if problem == "unreadable":
        path.mkdir()  # a directory cannot be read as a file, even by root
    elif problem == "malformed":
        path.write_text("not-a-fingerprint bob\n")
    import subprocess

    from conftest import PY, ROOT, child_env

    r = subprocess.run([PY, "server.py", "--headless", "--port", "0", "--home",
                        str(env.server_home), "--authorized-clients", str(path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=30, env=child_env(),
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 1
    errors = r.stderr.splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ")
    assert str(path) in errors[0]
    assert "listening on" not in r.stdout


def test_server_records_known_clients(env: Env):
    srv = env.server()
    alice = fp_of(env, env.client_home)
    for _ in range(2):
        assert env.client("--port", str(srv.port), "--accept-new-host",
                          "--send-text", "x").returncode == 0
    lines = (env.server_home / "known_clients").read_text().splitlines()
    assert len(lines) == 1
    fp, when, addr = lines[0].split()
    assert fp == alice
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", when)
    assert addr.startswith("127.0.0.1:")
    srv.wait_for(rf"new client {re.escape(alice)} recorded")


def test_verification_code_equal_on_both_sides_and_new_each_session(env: Env):
    srv = env.server("-v")
    codes = []
    for _ in range(2):
        r = env.client("--port", str(srv.port), "--accept-new-host", "-v", "--send-text", "v")
        assert r.returncode == 0, r.stderr
        client_code = re.search(r"verification code: (\d{4}-\d{4}-\d{4})", r.stdout).group(1)
        server_code = srv.wait_for(r"verification code: (\d{4}-\d{4}-\d{4})").group(1)
        assert client_code == server_code
        codes.append(client_code)
    assert codes[0] != codes[1]


def test_fingerprint_flag_is_checked_even_when_the_host_is_pinned(env: Env):
    """An explicit --fingerprint is an expectation: a pin made earlier (say, by an
    --accept-new-host run that met an attacker) must not silently override it."""
    srv = env.server()
    assert env.client("--port", str(srv.port), "--accept-new-host",
                      "--send-text", "pin").returncode == 0
    expected = fp_of(env, env.root / "the-real-server")
    r = env.client("--port", str(srv.port), "--fingerprint", expected, "--send-text", "no")
    assert r.returncode == 4
    assert f"error: server [127.0.0.1]:{srv.port} offered {srv.fingerprint}, not the " \
           f"expected {expected}" in r.stderr
    assert "] no" not in srv.output()


@pytest.mark.parametrize("content", ["", "# nobody yet\n\n   # still nobody\n"],
                         ids=["empty", "comment-only"])
def test_an_authorized_clients_file_listing_nobody_refuses_everyone(env: Env, content: str):
    """An empty list is a list: it admits no one (not "no list, admit all")."""
    allowed = env.root / "authorized"
    allowed.write_text(content)
    srv = env.server("--authorized-clients", str(allowed))
    srv.wait_for(r"admitting only the 0 client\(s\)")
    r = env.client("--port", str(srv.port), "--accept-new-host", "--send-text", "let me in")
    assert r.returncode == 4, r.stderr
    fp = fp_of(env, env.client_home)
    assert f"error: server refused this client: this client ({fp}) is not authorised " \
           f"on this server" in r.stderr
    srv.wait_for(rf"client {re.escape(fp)} from .* refused: not in")
    assert "let me in" not in srv.output()
    assert "delivered" not in r.stdout


def near_misses(fp: str) -> dict[str, str]:
    """Fingerprints a careless comparison could take for `fp`: each must be CHANGED."""
    body = fp[len("SHA256:"):]
    last = "A" if body[-1] != "A" else "B"
    return {
        "last character": fp[:-1] + last,
        "case only": "SHA256:" + body.swapcase(),
        "a prefix": fp[:-1],
    }


@pytest.mark.parametrize("kind", ["last character", "case only", "a prefix"])
def test_a_pin_that_differs_only_slightly_is_a_changed_key_end_to_end(env: Env, kind: str):
    srv = env.server()
    relay = Relay(srv.port)
    key = f"[127.0.0.1]:{relay.port}"
    pinned = near_misses(srv.fingerprint)[kind]
    (env.client_home).mkdir(mode=0o700)
    (env.client_home / "known_hosts").write_text(f"{key} {pinned}\n")
    try:
        r = env.client("--port", str(relay.port), "--send-text", "near miss")
    finally:
        relay.close()
    assert r.returncode == 4, r.stderr
    assert "WARNING: SERVER IDENTIFICATION HAS CHANGED!" in r.stderr
    assert f"error: server identity for {key} has changed: expected {pinned}, " \
           f"offered {srv.fingerprint}" in r.stderr
    assert (env.client_home / "known_hosts").read_text() == f"{key} {pinned}\n"
    assert "near miss" not in srv.output()
