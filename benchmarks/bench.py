#!/usr/bin/env python3
"""QSocket 2 benchmarks (DESIGN.md section 6), measured side by side in one run.

Prints one table and writes the same figures as JSON.  Every figure comes from
this run on this machine; on our noisy 2-core machines only ratios between rows
of one run mean anything.  Nothing here asserts a time.

    .venv/bin/python benchmarks/bench.py                  # full run (`make bench`)
    .venv/bin/python benchmarks/bench.py --quick --json /tmp/bench.json   # seconds

What each row runs:
- per-side limit: one core sealing 1 MiB records with the project's own
  crypt.RecordSender (AES-256-CTR + HMAC-SHA-256, fresh IV and MAC per record)
  plus SHA-256 of the same bytes; references: the raw `cryptography`/hashlib
  primitives, each half alone, and crypt.RecordReceiver.open.
- bulk: a JPEG-shaped file (FF D8 FF E0 + random bytes) through the real CLI over
  loopback.  client->server: `client.py --send-file` against a fresh
  `server.py --headless --port 0`, timed from process start to exit, and the
  transfer-only rate the client prints.  server->client: `server.py` with its
  console on a pseudo-terminal (the test harness's Tty) types "2" and the path, as a user would,
  to an interactive `client.py`; the rate is the one the server prints.
- scp: OpenSSH scp -c aes256-ctr -o MACs=hmac-sha2-256-etm@openssh.com of the
  same file to a private sshd on 127.0.0.1 (temporary host key, authorized key
  and config), interleaved with our runs.  "skipped: no sshd" without sshd.
- handshakes: latency of the two sans-I/O cores wired in memory (until the
  client has opened the sealed Welcome); and handshakes per second with 16
  client threads (the cores + session.send_frame/read_frame over TCP, each until
  Welcome) against one real server process.
- one `client.py --send-text` run, whole process, vs `ssh ... true`.
- peak RSS of each process during the big transfer vs the small one: the client
  from wait4() of exactly that process, the server from VmHWM in /proc/PID/status
  just before it is stopped (a fresh server for every transfer).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import getpass
import hashlib
import hmac
import json
import math
import os
import platform
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import cryptography  # noqa: E402
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes  # noqa: E402
from harness import JPEG_HEAD, Server, Tty, child_env, file_sha256, jpeg_of_size  # noqa: E402

import crypt  # noqa: E402
import session  # noqa: E402
from client_data import ClientHandshake  # noqa: E402
from protocol import FileData, Welcome  # noqa: E402
from server_data import ServerHandshake  # noqa: E402

PY = sys.executable
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
RECORD = 1 * MIB  # the record size DESIGN.md defines the per-side limit with
CONCURRENT_CLIENTS = 16
SKIP_NO_SSHD = "no sshd"
START_TIMEOUT = 30.0  # a process printing its first lines
TEXT_TIMEOUT = 60.0  # one --send-text run

FULL = dict(size=1 * GIB, small_size=16 * MIB, runs=3, handshakes=300, text_runs=10,
            limit_bytes=512 * MIB, pool=64 * MIB, batch_files=200, batch_size=200_000)
QUICK = dict(size=2 * MIB, small_size=256 * KIB, runs=1, handshakes=20, text_runs=2,
             limit_bytes=8 * MIB, pool=4 * MIB, batch_files=10, batch_size=20_000)

SENT_RX = re.compile(r"sent '[^'\r\n]*': (?P<bytes>\d+) bytes, SHA-256 (?P<sha>[0-9a-f]{64}), "
                     r"(?P<secs>[\d.]+) s")
SAVED_RX = re.compile(r"saved '[^'\r\n]*': (?P<bytes>\d+) bytes, SHA-256 (?P<sha>[0-9a-f]{64}), "
                      r"(?P<secs>[\d.]+) s")



class BenchError(Exception):
    """A measurement could not be made; the message says which and why."""


# --- statistics and formatting ---------------------------------------------------------
def median(xs) -> float:
    return float(statistics.median(xs))


def p99(xs) -> float:
    """Nearest-rank 99th percentile."""
    s = sorted(xs)
    return float(s[max(0, math.ceil(0.99 * len(s)) - 1)])


def mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6 if seconds > 0 else 0.0


def human(n: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} B"


def rnd(x: float, digits: int = 3) -> float:
    return float(f"{x:.{digits}g}") if abs(x) < 10 ** digits else float(round(x))


# --- child processes ----------------------------------------------------------------------
def _die_with_parent() -> None:
    """In the child: get SIGTERM if the benchmark dies, so nothing outlives it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def bench_env() -> dict:
    """The children run as on a user's machine: Python keeps the bytecode of the
    modules it imports (__pycache__, written by the first run), so a start is not a
    compile.  Some environments (CI images) turn that off; not for what we time."""
    env = child_env()
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


class Child:
    """A child process, timed from just before start to just after exit, reaped with
    wait4() so its own peak RSS (ru_maxrss) is known.  Output goes to a file."""

    running: set[Child] = set()

    def __init__(self, argv: list[str], log: Path, *, stdin=subprocess.DEVNULL) -> None:
        self.argv, self.log = argv, log
        self.rusage = None
        self.elapsed: float | None = None
        with open(log, "wb") as out:
            self.t0 = time.perf_counter()
            self.p = subprocess.Popen(argv, stdin=stdin, stdout=out, stderr=subprocess.STDOUT,
                                      cwd=ROOT, env=bench_env(), preexec_fn=_die_with_parent)
        Child.running.add(self)

    @property
    def pid(self) -> int:
        return self.p.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        """Exit code; BenchError (after killing it) if it runs longer than timeout."""
        if self.p.returncode is not None:
            return self.p.returncode
        fd = os.pidfd_open(self.p.pid)
        try:
            ready, _, _ = select.select([fd], [], [], timeout)
        finally:
            os.close(fd)
        if not ready:
            self.kill()
            raise BenchError(f"{self.name()} did not finish within {timeout:g} s; "
                             f"output:\n{self.output()[-2000:]}")
        _, status, self.rusage = os.wait4(self.p.pid, 0)
        self.elapsed = time.perf_counter() - self.t0
        self.p.returncode = os.waitstatus_to_exitcode(status)
        Child.running.discard(self)
        return self.p.returncode

    def peak_rss(self) -> int:
        """Bytes; ru_maxrss is in KiB on Linux."""
        return self.rusage.ru_maxrss * KIB

    def wait_for(self, rx: re.Pattern, timeout: float = START_TIMEOUT) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.output())
            if m:
                return m
            if self.p.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{self.name()}: no output matching {rx.pattern!r}; "
                                 f"output:\n{self.output()[-2000:]}")
            time.sleep(0.01)

    def kill(self) -> None:
        if self.p.returncode is None:
            self.p.kill()
            self.p.wait()
        Child.running.discard(self)

    def name(self) -> str:
        return " ".join(Path(a).name if a.startswith("/") else a for a in self.argv[:3])

    @classmethod
    def kill_all(cls) -> None:
        for child in list(cls.running):
            child.kill()


def vm_hwm(pid: int) -> int:
    """Peak resident set size of a running process, in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) * KIB


def cpu_seconds(pid: int) -> float:
    """utime + stime of a running process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the workspace: files, homes, the programs ----------------------------------------------
class Workspace:
    """One temporary directory for everything: the source files, both homes, the
    received dirs and scp's target all live on one filesystem."""

    def __init__(self, parent: str | None, args) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="qsocket-bench-", dir=parent))
        self.args = args

        def sub(name: str) -> Path:
            (self.root / name).mkdir(mode=0o700)
            return self.root / name

        self.src, self.assets, self.logs = sub("src"), sub("assets"), sub("logs")
        self.server_home, self.client_home = sub("server-home"), sub("client-home")
        self.server_received, self.client_received = sub("server-received"), sub("client-received")
        self.scp_received = sub("scp-received")
        self._logs = 0
        self.big = self.small = None
        self.sha: dict[Path, str] = {}

    def log(self, what: str) -> Path:
        self._logs += 1
        return self.logs / f"{self._logs:03d}-{what}.log"

    def make_sources(self) -> None:
        need = self.args.size + self.args.small_size
        fs = os.statvfs(self.root)
        if fs.f_bavail * fs.f_frsize < 2 * need + 256 * MIB:
            raise BenchError(f"not enough free space in {self.root.parent} for two copies of "
                             f"{human(need)}; use --tmp-dir")
        self.big = self.src / "bench.jpg"
        self.small = self.src / "bench-small.jpg"
        for path, size in ((self.big, self.args.size), (self.small, self.args.small_size)):
            self.sha[path] = file_sha256(jpeg_of_size(path, size))

    def clear_received(self) -> None:
        for d in (self.server_received, self.client_received, self.scp_received):
            for p in d.iterdir():
                p.unlink()

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # the programs (the test harness's, with its errors as ours)
    def server(self) -> Server:
        """`server.py --headless --port 0`, port and identity parsed."""
        with harness_errors("server.py --headless"):
            return Server(self.server_home, self.server_received, "--assets-dir", str(self.assets))

    def console(self) -> tuple[Tty, int, str]:
        """`server.py` with its console on a pseudo-terminal: (tty, port, fingerprint)."""
        with harness_errors("server console"):
            tty = Tty(str(ROOT / "server.py"), "--port", "0", "--home", str(self.server_home),
                      "--received-dir", str(self.server_received),
                      "--assets-dir", str(self.assets), preexec_fn=_die_with_parent)
            try:
                port = int(tty.expect_line(r"listening on \S+:(\d+)$", START_TIMEOUT)[1])
                fingerprint = tty.expect_line(r"identity (SHA256:\S+)$", START_TIMEOUT)[1]
            except BaseException:
                tty.kill()
                raise
        return tty, port, fingerprint

    def client(self, port: int, fingerprint: str, *args: str, what: str,
               stdin=subprocess.DEVNULL) -> Child:
        argv = [PY, str(ROOT / "client.py"), "--port", str(port), "--fingerprint", fingerprint,
                "--home", str(self.client_home), "--received-dir", str(self.client_received),
                "--assets-dir", str(self.assets), *args]
        return Child(argv, self.log(what), stdin=stdin)


@contextlib.contextmanager
def harness_errors(what: str):
    """The harness fails with AssertionError (it is the tests'); here that is a BenchError."""
    try:
        yield
    except AssertionError as e:
        raise BenchError(f"{what}: {e}") from None


# --- the private sshd ---------------------------------------------------------------------
SSHD_CONFIG = """\
ListenAddress 127.0.0.1
Port {port}
HostKey {dir}/ssh_host_ed25519_key
AuthorizedKeysFile {dir}/authorized_keys
PidFile {dir}/sshd.pid
AllowUsers {user}
PermitRootLogin yes
StrictModes no
UsePAM no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PrintMotd no
PrintLastLog no
Subsystem sftp internal-sftp
"""


def find_sshd() -> str | None:
    found = shutil.which("sshd") or shutil.which("sshd", path="/usr/sbin:/usr/local/sbin:/sbin")
    tools = all(shutil.which(t) for t in ("ssh", "scp", "ssh-keygen"))
    return os.path.abspath(found) if found and tools else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sshd:
    """sshd -D on 127.0.0.1:<free port> with its own keys and config; stop() always."""

    def __init__(self, ws: Workspace, binary: str) -> None:
        self.dir = ws.root / "sshd"
        self.dir.mkdir(mode=0o700)
        self.user = getpass.getuser()
        self.port = free_port()
        self.ws = ws
        for name in ("ssh_host_ed25519_key", "id_ed25519"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "qsocket-bench",
                            "-f", str(self.dir / name)], check=True, stdin=subprocess.DEVNULL)
        shutil.copy(self.dir / "id_ed25519.pub", self.dir / "authorized_keys")
        host_pub = (self.dir / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        (self.dir / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {' '.join(host_pub)}\n")
        (self.dir / "sshd_config").write_text(SSHD_CONFIG.format(port=self.port, dir=self.dir,
                                                                 user=self.user))
        if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
            # sshd refuses to start without its privilege-separation directory, which
            # the service manager normally creates at boot
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.proc = Child([binary, "-D", "-e", "-f", str(self.dir / "sshd_config")],
                          ws.log("sshd"))
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.p.poll() is not None or time.monotonic() > deadline:
                    out = self.proc.output().strip()
                    self.stop()
                    raise BenchError(f"sshd did not start: {out[-300:]}") from None
                time.sleep(0.02)

    def ssh_options(self) -> list[str]:
        return ["-F", "/dev/null", "-i", str(self.dir / "id_ed25519"),
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", f"UserKnownHostsFile={self.dir / 'known_hosts'}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
                "-o", "LogLevel=ERROR"]

    def scp(self, src: Path, dest: Path) -> Child:
        return Child(["scp", "-q", "-c", "aes256-ctr", "-o", "MACs=hmac-sha2-256-etm@openssh.com",
                      *self.ssh_options(), "-P", str(self.port), str(src),
                      f"{self.user}@127.0.0.1:{dest}"], self.ws.log("scp"))

    def scp_many(self, srcs: list[Path], dest: Path) -> Child:
        return Child(["scp", "-q", "-c", "aes256-ctr", "-o", "MACs=hmac-sha2-256-etm@openssh.com",
                      *self.ssh_options(), "-P", str(self.port), *map(str, srcs),
                      f"{self.user}@127.0.0.1:{dest}/"], self.ws.log("scp-batch"))

    def ssh_true(self) -> Child:
        return Child(["ssh", *self.ssh_options(), "-p", str(self.port),
                      f"{self.user}@127.0.0.1", "true"], self.ws.log("ssh"))

    def stop(self) -> None:
        if self.proc.p.returncode is None:
            self.proc.p.terminate()
            try:
                self.proc.wait(10)
            except BenchError:
                pass


# --- per-side limit ------------------------------------------------------------------------
def session_keys() -> crypt.SessionKeys:
    return crypt.derive_keys(os.urandom(32), os.urandom(32), os.urandom(32))


def record_size() -> int:
    """1 MiB, or the protocol's chunk if that is smaller (a record must fit a frame)."""
    from protocol import CHUNK_SIZE

    return min(RECORD, CHUNK_SIZE)


def _chunks(pool: memoryview, total: int, size: int):
    off = 0
    for _ in range(total // size):
        if off + size > len(pool):
            off = 0
        yield pool[off:off + size]
        off += size


def rate_record_sender(pool: memoryview, total: int) -> float:
    """The real sender's per-byte work: crypt.RecordSender.seal + the file's SHA-256."""
    sender, _ = crypt.record_pair(session_keys(), crypt.Role.CLIENT)
    size = record_size()
    h = hashlib.sha256()
    t0 = time.perf_counter()
    for chunk in _chunks(pool, total, size):
        h.update(chunk)
        sender.seal(FileData.TYPE, chunk)
    h.digest()
    return mbps(total // size * size, time.perf_counter() - t0)


def _frame_body(pieces) -> bytes:
    frame = b"".join(pieces) if isinstance(pieces, (list, tuple)) else bytes(pieces)
    return frame[4:]  # without the length prefix, as read_frame returns it


def rate_record_receiver(pool: memoryview, total: int) -> float:
    """The real receiver's per-byte work: crypt.RecordReceiver.open + SHA-256."""
    keys = session_keys()
    sender, _ = crypt.record_pair(keys, crypt.Role.CLIENT)
    size = record_size()
    bodies = [_frame_body(sender.seal(FileData.TYPE, c))
              for c in _chunks(pool, len(pool) // size * size, size)]
    h = hashlib.sha256()
    done = 0
    t0 = time.perf_counter()
    while done < total:
        _, receiver = crypt.record_pair(keys, crypt.Role.SERVER)  # sequence numbers start again
        for body in bodies:
            _, payload = receiver.open(body)
            h.update(payload)
            done += len(payload) + 1
            if done >= total:
                break
    h.digest()
    return mbps(done, time.perf_counter() - t0)


def rate_raw(pool: memoryview, total: int, *, crypto: bool = True, sha: bool = True) -> float:
    """The same work with the primitives alone: a fresh CTR context and IV and a
    fresh HMAC per 1 MiB record, encrypting into a preallocated buffer."""
    aes = algorithms.AES(os.urandom(32))
    base_mac = hmac.new(os.urandom(32), digestmod=hashlib.sha256)
    out = bytearray(RECORD + 15)
    out_view = memoryview(out)
    h = hashlib.sha256()
    t0 = time.perf_counter()
    for seq, chunk in enumerate(_chunks(pool, total, RECORD)):
        if sha:
            h.update(chunk)
        if crypto:
            iv = seq.to_bytes(8, "big") + bytes(8)
            n = Cipher(aes, modes.CTR(iv)).encryptor().update_into(chunk, out)
            mac = base_mac.copy()
            mac.update(iv)
            mac.update(out_view[:n])
            mac.digest()
    h.digest()
    return mbps(total // RECORD * RECORD, time.perf_counter() - t0)


def measure_limits(bench: Bench, rows: dict) -> None:
    note("per-side limit")
    args = bench.args
    pool = memoryview(os.urandom(args.pool))
    total = args.limit_bytes
    variants = {
        "limit": lambda: rate_record_sender(pool, total),
        "limit_raw": lambda: rate_raw(pool, total),
        "crypto_raw": lambda: rate_raw(pool, total, sha=False),
        "sha256_raw": lambda: rate_raw(pool, total, crypto=False),
        "limit_receiver": lambda: rate_record_receiver(pool, total),
    }
    results = {k: [] for k in variants}
    for _ in range(args.runs):  # interleaved, so drift hits every variant alike
        for key, fn in variants.items():
            results[key].append(fn())
    for key, xs in results.items():
        rows[key]["values"] = {"best_mbps": rnd(max(xs), 4), "median_mbps": rnd(median(xs), 4)}


# --- bulk transfers ---------------------------------------------------------------------------
def transfer_timeout(size: int) -> float:
    return 120.0 + size / (20 * 1e6)  # generous: 20 MB/s is far below anything seen


def run_c2s(ws: Workspace, src: Path) -> dict:
    """client.py --send-file against a fresh headless server."""
    srv = ws.server()
    try:
        cl = ws.client(srv.port, srv.fingerprint, "--send-file", str(src), what="c2s-client")
        code = cl.wait(transfer_timeout(src.stat().st_size))
        out = cl.output()
        m = SENT_RX.search(out)
        if code != 0 or m is None:
            raise BenchError(f"client.py --send-file exited {code}:\n{out[-2000:]}")
        check_digest(ws, src, m)
        server_rss = vm_hwm(srv.pid)
    finally:
        srv.stop()
    ws.clear_received()
    size = src.stat().st_size
    return {"process_s": cl.elapsed, "process_mbps": mbps(size, cl.elapsed),
            "transfer_s": float(m["secs"]),
            "transfer_mbps": mbps(int(m["bytes"]), float(m["secs"])),
            "client_rss": cl.peak_rss(), "server_rss": server_rss}


def run_s2c(ws: Workspace, src: Path) -> dict:
    """The server console on a pty sends `src` to an interactive client.py."""
    size = src.stat().st_size
    srv, port, fingerprint = ws.console()
    cl = None
    try:
        with harness_errors("server console"):
            cl = ws.client(port, fingerprint, what="s2c-client", stdin=subprocess.PIPE)
            srv.expect_line(r"client .+ connected from", START_TIMEOUT)  # a handle: #1 xxxxxx
            srv.expect_prompt(">", START_TIMEOUT)
            srv.type("2")  # menu: send a JPG (the only client is picked)
            srv.answer("number or path: ", str(src))
            t0 = time.perf_counter()
            m = srv.expect_line(SENT_RX.pattern, timeout=transfer_timeout(size))
            observed = time.perf_counter() - t0
        check_digest(ws, src, m)
        saved = cl.wait_for(SAVED_RX, timeout=30)
        server_rss = vm_hwm(srv.child.pid)
        cl.p.stdin.write(b"3\n")  # client menu: quit
        cl.p.stdin.close()
        code = cl.wait(30)
        if code != 0:
            raise BenchError(f"interactive client.py exited {code}:\n{cl.output()[-2000:]}")
        with harness_errors("server console"):
            srv.expect_prompt(">", START_TIMEOUT)
            srv.type("4")  # menu: quit
            srv.wait_exit(15)
    finally:
        srv.kill()
        if cl is not None:
            cl.kill()
    ws.clear_received()
    # from bytes and seconds: the summaries print speeds in binary units (issue 11)
    return {"transfer_s": float(m["secs"]),
            "transfer_mbps": mbps(int(m["bytes"]), float(m["secs"])),
            "receiver_mbps": mbps(int(saved["bytes"]), float(saved["secs"])),
            "observed_mbps": mbps(size, observed),
            "client_rss": cl.peak_rss(), "server_rss": server_rss}


def check_digest(ws: Workspace, src: Path, m: re.Match) -> None:
    if int(m["bytes"]) != src.stat().st_size or m["sha"] != ws.sha[src]:
        raise BenchError(f"transfer of {src.name} reported {m['bytes']} bytes, SHA-256 "
                         f"{m['sha']}; expected {src.stat().st_size}, {ws.sha[src]}")


def run_scp(ws: Workspace, sshd: Sshd, src: Path) -> dict:
    dest = ws.scp_received / src.name
    size = src.stat().st_size
    p = sshd.scp(src, dest)
    code = p.wait(transfer_timeout(size))
    if code != 0 or not dest.exists() or dest.stat().st_size != size:
        raise BenchError(f"scp exited {code}:\n{p.output()[-2000:]}")
    ws.clear_received()
    return {"process_s": p.elapsed, "process_mbps": mbps(size, p.elapsed)}


def measure_bulk(bench: Bench, rows: dict) -> None:
    ws, args, sshd = bench.ws, bench.args, bench.sshd
    c2s, s2c, scp, small = [], [], [], []
    for i in range(args.runs):  # interleaved: ours, theirs, ours, theirs...
        note(f"bulk run {i + 1}/{args.runs}: client->server")
        c2s.append(run_c2s(ws, ws.big))
        note(f"bulk run {i + 1}/{args.runs}: server->client")
        s2c.append(run_s2c(ws, ws.big))
        if sshd is not None:
            note(f"bulk run {i + 1}/{args.runs}: scp")
            scp.append(run_scp(ws, sshd, ws.big))
        note(f"small run {i + 1}/{args.runs}")
        small.append((run_c2s(ws, ws.small), run_s2c(ws, ws.small)))
    big = list(zip(c2s, s2c, strict=True))

    limit = rows["limit"]["values"]["best_mbps"]

    def rate_row(key: str, runs: list[dict], field: str) -> None:
        xs = [r[field] for r in runs]
        rows[key]["values"] = {"best_mbps": rnd(max(xs), 4), "median_mbps": rnd(median(xs), 4),
                               "ratio_best_to_limit": rnd(max(xs) / limit),
                               "ratio_median_to_limit": rnd(median(xs) / limit)}

    rate_row("bulk_c2s_process", c2s, "process_mbps")
    rows["bulk_c2s_process"]["values"]["median_seconds"] = rnd(median(r["process_s"] for r in c2s))
    rate_row("bulk_c2s_transfer", c2s, "transfer_mbps")
    rate_row("bulk_s2c_transfer", s2c, "transfer_mbps")
    s2c_values = rows["bulk_s2c_transfer"]["values"]
    s2c_values["median_receiver_mbps"] = rnd(median(r["receiver_mbps"] for r in s2c), 4)
    s2c_values["median_observed_mbps"] = rnd(median(r["observed_mbps"] for r in s2c), 4)

    if sshd is None:
        rows["scp"]["skipped"] = SKIP_NO_SSHD
    else:
        xs = [r["process_mbps"] for r in scp]
        theirs = median(xs)
        rows["scp"]["values"] = {
            "best_mbps": rnd(max(xs), 4), "median_mbps": rnd(theirs, 4),
            "ours_c2s_process_vs_scp": rnd(median(r["process_mbps"] for r in c2s) / theirs),
            "ours_c2s_transfer_vs_scp": rnd(median(r["transfer_mbps"] for r in c2s) / theirs),
            "ours_s2c_transfer_vs_scp": rnd(median(r["transfer_mbps"] for r in s2c) / theirs),
        }

    for key, direction in (("rss_c2s", 0), ("rss_s2c", 1)):
        values = {}
        for side in ("server", "client"):
            b = max(runs[direction][f"{side}_rss"] for runs in big)
            s = max(runs[direction][f"{side}_rss"] for runs in small)
            values[f"{side}_small_mib"] = rnd(s / MIB)
            values[f"{side}_big_mib"] = rnd(b / MIB)
            values[f"{side}_ratio"] = rnd(b / s)
        rows[key]["values"] = values


# --- handshakes ----------------------------------------------------------------------------
def handshake_in_memory(cid: crypt.Identity, sid: crypt.Identity) -> tuple[float, float]:
    """One handshake between the two cores, until the client has opened Welcome.
    Returns (client seconds, server seconds); the client waits for both."""
    clock = time.perf_counter
    t0 = clock()
    c = ClientHandshake(cid)
    hello = c.create_client_hello()
    t1 = clock()
    s = ServerHandshake(sid)
    s.consume_client_hello(hello)
    server_hello = s.create_server_hello()
    t2 = clock()
    c.consume_server_hello(server_hello)
    auth = c.create_client_auth()
    client_records = c.records()
    t3 = clock()
    s.consume_client_auth(auth)
    welcome = _frame_body(s.records()[0].seal(Welcome.TYPE, Welcome().encode()))
    t4 = clock()
    msg_type, _ = client_records[1].open(welcome)
    t5 = clock()
    if msg_type != Welcome.TYPE:
        raise BenchError(f"in-memory handshake ended with message type {msg_type}")
    return (t1 - t0) + (t3 - t2) + (t5 - t4), (t2 - t1) + (t4 - t3)


def measure_batch(bench: Bench, rows: dict) -> None:
    """N photos of S bytes in one batch (`--send-file DIR`, pipelined), client.py start to
    exit against a running headless server, and one scp of the same files, interleaved."""
    ws, args, sshd = bench.ws, bench.args, bench.sshd
    n, size = args.batch_files, args.batch_size
    src = ws.src / "batch"
    src.mkdir(exist_ok=True)
    files = [jpeg_of_size(src / f"photo{i:03d}.jpg", size) for i in range(n)]
    ours, theirs = [], []
    srv = ws.server()
    try:
        for i in range(args.runs):
            note(f"batch run {i + 1}/{args.runs}: {n} x {human(size)}, ours")
            cl = ws.client(srv.port, srv.fingerprint, "--send-file", str(src), what="batch")
            code = cl.wait(transfer_timeout(n * size))
            sent = SENT_RX.findall(cl.output())
            if code != 0 or len(sent) != n:
                raise BenchError(f"client.py --send-file DIR exited {code}:\n"
                                 f"{cl.output()[-2000:]}")
            ours.append(cl.elapsed)
            srv.wait_for(rf"\] received '{files[-1].name}': ")
            ws.clear_received()
            if sshd is not None:
                note(f"batch run {i + 1}/{args.runs}: scp")
                p = sshd.scp_many(files, ws.scp_received)
                if p.wait(transfer_timeout(n * size)) != 0 or \
                        len(list(ws.scp_received.iterdir())) != n:
                    raise BenchError(f"scp exited {p.wait(1)}:\n{p.output()[-2000:]}")
                theirs.append(p.elapsed)
                ws.clear_received()
    finally:
        srv.stop()
    values = {"files": n, "file_bytes": size, "median_s": rnd(median(ours)),
              "best_s": rnd(min(ours)), "files_per_s": rnd(n / median(ours), 1)}
    if theirs:
        values |= {"scp_median_s": rnd(median(theirs)),
                   "ours_vs_scp": rnd(median(theirs) / median(ours))}
    rows["batch"]["values"] = values


def batch_text(v: dict) -> str:
    scp = (f"; scp {v['scp_median_s']:g} s: ours {v['ours_vs_scp']:.2f}x as fast"
           if "ours_vs_scp" in v else "; no sshd for scp")
    return f"median {v['median_s']:g} s ({v['files_per_s']:g} files/s){scp}"


def measure_handshake_latency(bench: Bench, rows: dict) -> None:
    note("handshake latency (in-process)")
    args = bench.args
    cid, sid = crypt.Identity.generate(), crypt.Identity.generate()
    for _ in range(min(10, args.handshakes)):
        handshake_in_memory(cid, sid)  # warm-up
    client, server, total = [], [], []
    for _ in range(args.handshakes):
        c, s = handshake_in_memory(cid, sid)
        client.append(c)
        server.append(s)
        total.append(c + s)
    ms = 1e3
    rows["handshake_latency"]["values"] = {
        "median_ms": rnd(median(total) * ms), "p99_ms": rnd(p99(total) * ms),
        "client_median_ms": rnd(median(client) * ms), "server_median_ms": rnd(median(server) * ms),
        "count": len(total)}


def handshake_over_tcp(identity: crypt.Identity, port: int) -> None:
    """The client's half through a real socket, framed as client.py does, until Welcome."""
    deadline = time.monotonic() + 60
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hs = ClientHandshake(identity)
        session.send_frame(sock, hs.create_client_hello())
        hs.consume_server_hello(bytes(session.read_frame(sock, deadline)))
        session.send_frame(sock, hs.create_client_auth())
        msg_type, _ = hs.records()[1].open(session.read_frame(sock, deadline))
        if msg_type != Welcome.TYPE:
            raise BenchError(f"server answered the handshake with message type {msg_type}")


def measure_handshake_rate(bench: Bench, rows: dict) -> None:
    note(f"{CONCURRENT_CLIENTS} concurrent clients")
    ws, args = bench.ws, bench.args
    per_client = max(1, args.handshakes // CONCURRENT_CLIENTS)
    identities = [crypt.Identity.generate() for _ in range(CONCURRENT_CLIENTS)]
    srv = ws.server()
    done = [0] * CONCURRENT_CLIENTS
    errors: list[str] = []
    start = threading.Barrier(CONCURRENT_CLIENTS + 1)

    def worker(i: int) -> None:
        start.wait()
        for _ in range(per_client):
            try:
                handshake_over_tcp(identities[i], srv.port)
                done[i] += 1
            except Exception as e:  # counted, reported; the rate is of completed ones
                errors.append(f"{type(e).__name__}: {e}")

    try:
        handshake_over_tcp(identities[0], srv.port)  # warm-up; also records a client
        threads = [threading.Thread(target=worker, args=(i,), daemon=True)
                   for i in range(CONCURRENT_CLIENTS)]
        for t in threads:
            t.start()
        cpu0, own0 = cpu_seconds(srv.pid), time.process_time()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join(300)
        wall = time.perf_counter() - t0
        cpu1, own1 = cpu_seconds(srv.pid), time.process_time()
    finally:
        srv.stop()
    completed = sum(done)
    if completed == 0:
        raise BenchError(f"no concurrent handshake completed: {errors[:3]}")
    rows["handshake_rate"]["values"] = {
        "per_second": rnd(completed / wall), "completed": completed,
        "attempted": per_client * CONCURRENT_CLIENTS, "errors": len(errors),
        "server_cpu_ms_per_handshake": rnd((cpu1 - cpu0) * 1e3 / completed),
        "clients_cpu_ms_per_handshake": rnd((own1 - own0) * 1e3 / completed)}
    if errors:
        rows["handshake_rate"]["errors_sample"] = sorted(set(errors))[:3]


# --- one message, whole process -------------------------------------------------------------
def measure_send_text(bench: Bench, rows: dict) -> None:
    note("one --send-text, whole process")
    ws, args, sshd = bench.ws, bench.args, bench.sshd
    srv = ws.server()
    ours, theirs, bare, imports = [], [], [], []

    def one_text() -> float:
        cl = ws.client(srv.port, srv.fingerprint, "--send-text", "benchmark", what="text")
        code = cl.wait(TEXT_TIMEOUT)
        if code != 0 or "delivered: benchmark" not in cl.output():
            raise BenchError(f"client.py --send-text exited {code}:\n{cl.output()[-2000:]}")
        return cl.elapsed

    def one_ssh() -> float:
        p = sshd.ssh_true()
        code = p.wait(TEXT_TIMEOUT)
        if code != 0:
            raise BenchError(f"ssh ... true exited {code}:\n{p.output()[-2000:]}")
        return p.elapsed

    def one_plain(argv: list[str], what: str) -> float:
        p = Child(argv, ws.log(what))
        p.wait(TEXT_TIMEOUT)
        return p.elapsed

    try:
        one_text()  # warm-up: pins the server in known_hosts, warms the page cache
        if sshd is not None:
            one_ssh()
        for _ in range(args.text_runs):  # interleaved
            ours.append(one_text())
            if sshd is not None:
                theirs.append(one_ssh())
            bare.append(one_plain([PY, "-c", "pass"], "python"))
            imports.append(one_plain([PY, str(ROOT / "client.py"), "--version"], "version"))
    finally:
        srv.stop()
    ms = 1e3
    rows["send_text"]["values"] = {
        "median_ms": rnd(median(ours) * ms), "best_ms": rnd(min(ours) * ms),
        "python_startup_median_ms": rnd(median(bare) * ms),
        "client_version_median_ms": rnd(median(imports) * ms)}
    if sshd is None:
        rows["ssh_true"]["skipped"] = SKIP_NO_SSHD
    else:
        rows["ssh_true"]["values"] = {
            "median_ms": rnd(median(theirs) * ms), "best_ms": rnd(min(theirs) * ms),
            "send_text_vs_ssh": rnd(median(ours) / median(theirs))}


# --- the table ------------------------------------------------------------------------------
@dataclass
class Bench:
    """What every measurement gets: the options, the workspace, the private sshd or None."""

    args: argparse.Namespace
    ws: Workspace
    sshd: Sshd | None = None


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table and one entry of the JSON, in one place.

    `label` may name {size}, {small} and {clients}.  `measure(bench, rows)` fills the
    row's "values" (one measurement fills several rows, so that its runs interleave;
    each runs once, in the order the rows first name it).  `result(values)` is the
    table's text; `verdict(values, rows)` judges the medians against `target`: True,
    False, or None when there is nothing to judge."""

    id: str
    label: str
    target: str
    measure: Callable[[Bench, dict], None]
    result: Callable[[dict], str]
    verdict: Callable[[dict, dict], bool | None] = lambda values, rows: None


def rate_text(v: dict) -> str:
    return f"best {v['best_mbps']:g} MB/s, median {v['median_mbps']:g} MB/s"


def bulk_text(v: dict) -> str:
    return (f"best {v['best_mbps']:g} MB/s ({v['ratio_best_to_limit']:.2f}x), "
            f"median {v['median_mbps']:g} MB/s ({v['ratio_median_to_limit']:.2f}x limit)")


def scp_text(v: dict) -> str:
    return (f"best {v['best_mbps']:g}, median {v['median_mbps']:g} MB/s; ours/scp "
            f"c->s {v['ours_c2s_process_vs_scp']:.2f}x (transfer only "
            f"{v['ours_c2s_transfer_vs_scp']:.2f}x), s->c {v['ours_s2c_transfer_vs_scp']:.2f}x")


def latency_text(v: dict) -> str:
    return (f"median {v['median_ms']:g} ms, p99 {v['p99_ms']:g} ms (client "
            f"{v['client_median_ms']:g} + server {v['server_median_ms']:g}; n={v['count']})")


def handshake_rate_text(v: dict) -> str:
    return (f"{v['per_second']:g}/s ({v['completed']}/{v['attempted']} done; server CPU "
            f"{v['server_cpu_ms_per_handshake']:g} ms each)")


def send_text_text(v: dict) -> str:
    return (f"median {v['median_ms']:g} ms, best {v['best_ms']:g} ms (python -c pass "
            f"{v['python_startup_median_ms']:g}, client.py --version "
            f"{v['client_version_median_ms']:g})")


def ssh_true_text(v: dict) -> str:
    return (f"median {v['median_ms']:g} ms, best {v['best_ms']:g} ms; "
            f"send-text/ssh {v['send_text_vs_ssh']:.2f}x")


def rss_text(v: dict) -> str:
    return "; ".join(f"{side} {v[f'{side}_small_mib']:g} -> {v[f'{side}_big_mib']:g} MiB "
                     f"({v[f'{side}_ratio']:.2f}x)" for side in ("server", "client"))


def half_the_limit(v: dict, rows: dict) -> bool:
    return v["ratio_median_to_limit"] >= 0.5


def rss_flat(v: dict, rows: dict) -> bool:
    return v["server_ratio"] <= 1.2 and v["client_ratio"] <= 1.2


def faster_than_ssh(v: dict, rows: dict) -> bool | None:
    ssh = rows["ssh_true"].get("values")
    return None if ssh is None else v["median_ms"] < ssh["median_ms"]


# Table order; tests/test_bench.py checks every row is printed and in the JSON.
ROWS = (
    Row("limit", "per-side limit: crypt.RecordSender 1 MiB records + SHA-256, 1 core",
        "reference (DESIGN: ~690 MB/s)", measure_limits, rate_text),
    Row("limit_raw", "  ref: raw AES-256-CTR + HMAC-SHA-256 + SHA-256, 1 core", "",
        measure_limits, rate_text),
    Row("crypto_raw", "  ref: raw AES-256-CTR + HMAC-SHA-256 only", "(DESIGN: ~1.2 GB/s)",
        measure_limits, rate_text),
    Row("sha256_raw", "  ref: SHA-256 only", "", measure_limits, rate_text),
    Row("limit_receiver", "  ref: crypt.RecordReceiver.open 1 MiB + SHA-256", "",
        measure_limits, rate_text),
    Row("bulk_c2s_process", "bulk client->server {size}, client.py start to exit",
        ">= 0.5x limit", measure_bulk, bulk_text, half_the_limit),
    Row("bulk_c2s_transfer", "bulk client->server, transfer only (client's summary)",
        ">= 0.5x limit", measure_bulk, bulk_text, half_the_limit),
    Row("bulk_s2c_transfer", "bulk server->client, server console on a pty (its summary)",
        ">= 0.5x limit", measure_bulk, bulk_text, half_the_limit),
    Row("scp", "OpenSSH scp {size} aes256-ctr + hmac-sha2-256-etm, start to exit",
        "ours >= 1.5x scp (aim 2x)", measure_bulk, scp_text,
        lambda v, rows: v["ours_c2s_process_vs_scp"] >= 1.5),
    Row("batch", "batch 200 x 200 kB (quick 10 x 20 kB) --send-file DIR vs one scp, to exit",
        ">= 2x scp", measure_batch, batch_text,
        lambda v, rows: v["ours_vs_scp"] >= 2 if "ours_vs_scp" in v else None),
    Row("handshake_latency", "handshake latency, in-process cores, hybrid identities",
        "median <= 5 ms", measure_handshake_latency, latency_text,
        lambda v, rows: v["median_ms"] <= 5),
    Row("handshake_rate", "handshakes/s, {clients} concurrent clients, 1 server", ">= 200/s",
        measure_handshake_rate, handshake_rate_text, lambda v, rows: v["per_second"] >= 200),
    Row("send_text", "client.py --send-text, one message, whole process", "< ssh host true",
        measure_send_text, send_text_text, faster_than_ssh),
    Row("ssh_true", "ssh -p PORT user@127.0.0.1 true, whole process", "(reference)",
        measure_send_text, ssh_true_text),
    Row("rss_c2s", "peak RSS client->server, {size} vs {small}", "<= 1.2x", measure_bulk,
        rss_text, rss_flat),
    Row("rss_s2c", "peak RSS server->client, {size} vs {small}", "<= 1.2x", measure_bulk,
        rss_text, rss_flat),
)
ROW_IDS = tuple(row.id for row in ROWS)


def new_rows(size: int, small: int) -> dict:
    """The JSON rows, before any values: {id: {"id", "label", "target"}}."""
    names = {"size": human(size), "small": human(small), "clients": CONCURRENT_CLIENTS}
    return {row.id: {"id": row.id, "label": row.label.format(**names), "target": row.target}
            for row in ROWS}


def result_text(row: Row, data: dict) -> str:
    if "skipped" in data:
        return f"skipped: {data['skipped']}"
    v = data.get("values")
    return "not measured" if v is None else row.result(v)


def verdict(row: Row, rows: dict) -> str:
    """yes/NO against DESIGN.md's target, judged on medians; blank without one."""
    v = rows[row.id].get("values")
    ok = None if v is None else row.verdict(v, rows)
    return "" if ok is None else "yes" if ok else "NO"


def print_table(rows: dict, meta: dict) -> None:
    print(f"QSocket 2 benchmark, {meta['started']}: {meta['cpus']} CPUs, {meta['platform']}, "
          f"Python {meta['python']}, cryptography {meta['cryptography']}, "
          f"{meta['openssh'] or 'no OpenSSH'}; bulk {human(meta['size'])} x {meta['runs']} runs"
          f"{' (quick)' if meta['quick'] else ''}")
    table = [("row", "result", "target", "met")]
    for row in ROWS:
        data = rows[row.id]
        table.append((data["label"], result_text(row, data), data["target"], verdict(row, rows)))
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    for i, r in enumerate(table):
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip())
        if i == 0:
            print("-" * (sum(widths) + 10))


def note(text: str) -> None:
    print(f"... {text}", file=sys.stderr, flush=True)


def openssh_version() -> str | None:
    try:
        r = subprocess.run(["ssh", "-V"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (r.stderr or r.stdout).strip().split(",")[0] or None


# --- main -----------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="QSocket 2 benchmarks (DESIGN.md section 6): "
                                "prints a table and writes the same figures as JSON.")
    p.add_argument("--size", type=int, help="bulk file size in bytes (default 1 GiB)")
    p.add_argument("--small-size", type=int,
                   help="small file for the RSS comparison, bytes (default 16 MiB)")
    p.add_argument("--runs", type=int, help="runs of each bulk transfer (default 3)")
    p.add_argument("--handshakes", type=int, help="in-process handshakes (default 300)")
    p.add_argument("--text-runs", type=int, help="--send-text / ssh true runs (default 10)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and counts: checks that every row runs, in seconds")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "bench.json",
                   help="where to write the figures (default benchmarks/results/bench.json)")
    p.add_argument("--no-ssh", action="store_true",
                   help="skip the OpenSSH rows as if sshd were not installed")
    p.add_argument("--tmp-dir", help="parent of the temporary directory (default $TMPDIR)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for key in ("size", "small_size", "runs", "handshakes", "text_runs"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.size < len(JPEG_HEAD) or args.small_size < len(JPEG_HEAD):
        p.error("file sizes must be at least 4 bytes")
    args.limit_bytes = max(RECORD, min(args.limit_bytes, max(args.size, 8 * MIB)))
    return args


def run(args, ws: Workspace, rows: dict) -> None:
    note(f"source files: {human(args.size)} and {human(args.small_size)} in {ws.root}")
    ws.make_sources()
    bench = Bench(args, ws)
    binary = None if args.no_ssh else find_sshd()
    try:
        if binary is not None:
            note(f"private sshd ({binary})")
            bench.sshd = Sshd(ws, binary)
        for measure in dict.fromkeys(row.measure for row in ROWS):  # once each, in row order
            measure(bench, rows)
    finally:
        if bench.sshd is not None:
            bench.sshd.stop()


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(),
            "platform": platform.platform(terse=True), "python": platform.python_version(),
            "cryptography": cryptography.__version__, "openssh": openssh_version(),
            "sshd": None if args.no_ssh else find_sshd(), "quick": args.quick, "size": args.size,
            "small_size": args.small_size, "runs": args.runs, "handshakes": args.handshakes,
            "text_runs": args.text_runs, "limit_bytes": args.limit_bytes,
            "record_size": record_size(),
            "bytecode": "cached: the children run without PYTHONDONTWRITEBYTECODE, as a user's",
            "ratio_basis": "bulk ratios divide by the limit row's best_mbps; scp and ssh ratios "
                           "are ours over theirs, medians"}
    rows = new_rows(args.size, args.small_size)
    ws = Workspace(args.tmp_dir, args)
    t0 = time.perf_counter()
    try:
        run(args, ws, rows)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        Child.kill_all()
        ws.cleanup()
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    print_table(rows, meta)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": [rows[k] for k in ROW_IDS]},
                                    indent=2) + "\n")
    print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
