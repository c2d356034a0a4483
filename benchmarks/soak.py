#!/usr/bin/env python3
"""A bounded soak of one headless server (issue 9; `make soak`, not part of `make test`).

For --seconds (default 120), against one `server.py --headless`:
- 50 honest clients (the real client handshake and session code, one thread each in
  this process) loop: connect, a few texts and JPGs to the server, goodbye.  Files go
  the other way too: the server runs with a small in-process pusher (see `serve`)
  that sends texts and JPGs to the honest clients through the server's own
  Connection objects, since the headless server has no console to type them;
- alongside: peers that never read (a tiny window, texts until the server's writer
  is stuck, then a goodbye or a flood), idle and trickling sockets, garbage, replayed
  ClientHellos and client.py processes killed with SIGKILL in the middle of a file.

At the end: every honest transfer bit-exact (each file on disk hashed against its
source), the server's thread count, open fds and RSS (from /proc/PID) back within a
small margin of their baseline, no traceback in its output, and the accept loop still
serving.  Prints the figures; exit 0 when all hold, 1 otherwise.

    .venv/bin/python benchmarks/soak.py                 # about 2 minutes
    .venv/bin/python benchmarks/soak.py --seconds 1800  # longer
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from harness import PY, Proc, child_env, counts, identity, jpeg_of_size, read_to_eof  # noqa: E402
from test_resources import raw_session, send_record  # noqa: E402

import client  # noqa: E402
import keystore  # noqa: E402
import session  # noqa: E402
import transfer  # noqa: E402
from client_data import ClientHandshake, known_hosts_line  # noqa: E402
from protocol import Bye, ProtocolError, Text, encode_frame  # noqa: E402

HONEST = 50
IDLE_THREADS = 6  # the server's main thread, accept loop and 4 pushers
RSS_MARGIN = 32 * 1024 * 1024  # bytes of RSS above the baseline still counted as "back"
HOSTILE_SOURCE = "127.0.0.2"  # loopback too; keeps attackers out of the honest address's count


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB$", status, re.M).group(1)) * 1024


def original_name(saved: str) -> str:
    """'photo (3).jpg' -> 'photo.jpg': the receiver's way of never overwriting."""
    return re.sub(r" \(\d+\)(\.jpg)$", r"\1", saved)


# --- the server side: server.py plus a pusher -----------------------------------------
def serve(push_dir: Path, honest_fps: Path, server_argv: list[str]) -> int:
    """server.main with four threads that push texts and JPGs to honest clients."""
    import server  # noqa: PLC0415

    listen = server.Server.listen

    def listen_and_push(self):
        for n in range(4):
            threading.Thread(target=push, args=(self, push_dir, honest_fps, n), daemon=True,
                             name=f"pusher {n}").start()
        return listen(self)

    server.Server.listen = listen_and_push
    return server.main(server_argv)


def push(srv, push_dir: Path, honest_fps: Path, n: int) -> None:
    rng = random.Random(n)
    files = sorted(push_dir.glob("*.jpg"))
    honest = set(honest_fps.read_text().split())
    while True:
        time.sleep(0.02)  # pacing, not synchronisation
        clients = [c for c in srv.snapshot() if c.fingerprint in honest]
        if not clients:
            continue
        c = rng.choice(clients)
        try:
            if rng.random() < 0.5:
                c.conn.send_text(f"push {n}")
                srv.log("soak: pushed a text")
            else:
                r = c.conn.send_file(str(rng.choice(files)))
                srv.log(f"soak: pushed {r.name} {r.sha256.hex()}")
        except (session.ConnectionLost, ProtocolError, transfer.Rejected):
            pass  # the client said goodbye meanwhile: not a transfer it completed


# --- honest clients ------------------------------------------------------------------
class Soak:
    def __init__(self, root: Path, seconds: float) -> None:
        self.root, self.seconds = root, seconds
        self.stop = threading.Event()
        self.pid = 0  # the server's
        self.lock = threading.Lock()
        self.stats = {"sessions": 0, "texts up": 0, "files up": 0, "files down": 0,
                      "bytes up": 0, "bytes down": 0, "hostile connections": 0,
                      "killed clients": 0}
        self.failures: list[str] = []
        self.assets = root / "assets"
        self.push_dir = root / "push"
        self.received = root / "server-received"
        self.sources: dict[str, str] = {}  # name: SHA-256 of every file either side sends
        rng = random.Random(0)
        for i in range(12):
            size = rng.choice([2_000, 30_000, 200_000, 1_500_000])
            for d, prefix in ((self.assets, "up"), (self.push_dir, "down")):
                p = jpeg_of_size(d / f"{prefix}-{i:02d}.jpg", size + i)
                self.sources[p.name] = sha(p)
        self.big = jpeg_of_size(root / "big" / "big.jpg", 8_000_000)
        self.sources[self.big.name] = sha(self.big)

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.stats[key] += n

    def fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)

    def honest(self, n: int, port: int, fp: str, *, once: bool = False) -> bool:
        """Sessions until the soak stops (or one); True when the last one succeeded."""
        home = keystore.open_home(self.root / f"honest-{n}")
        recv = self.root / f"honest-{n}-received"
        recv.mkdir(exist_ok=True)
        args = client.build_parser().parse_args(
            ["--port", str(port), "--home", str(home), "--fingerprint", fp,
             "--received-dir", str(recv)])
        ident, _ = keystore.load_identity(home)
        kem = session.kem_provider("auto")
        rng = random.Random(n)
        assets = sorted(self.assets.glob("*.jpg"))
        while once or not self.stop.is_set():
            try:
                ok = False
                hs, sock, records = client.connect_and_handshake(args, ident, kem, home, None)
                conn = session.Connection(sock, records, label=f"honest {n}",
                                          events=HonestEvents(self, n),
                                          received_dir=str(recv)).start()
                self.count("sessions")
                try:
                    for i in range(rng.randint(2, 10)):
                        if rng.random() < 0.5:
                            conn.send_text(f"honest {n} says {i}")
                            self.count("texts up")
                        else:
                            self.send_file(conn, rng.choice(assets))
                finally:
                    conn.close("done")
                ok = True
            except (client.Fatal, session.ConnectionLost, ProtocolError,
                    transfer.Rejected, OSError) as e:
                self.fail(f"honest client {n}: {e}")
                time.sleep(0.5)
            if once:
                break
        return ok

    def send_file(self, conn, path: Path) -> None:
        r = conn.send_file(str(path))
        saved = self.received / r.name
        if r.sha256.hex() != self.sources[path.name] or sha(saved) != self.sources[path.name]:
            self.fail(f"{saved} differs from {path}")
        saved.unlink()
        self.count("files up")
        self.count("bytes up", r.size)


class HonestEvents(session.Events):
    def __init__(self, soak: Soak, n: int) -> None:
        self.soak, self.n = soak, n

    def out(self, line: str) -> None:
        pass

    def file_saved(self, conn, path: str, result) -> None:
        p = Path(path)
        expected = self.soak.sources.get(original_name(p.name))
        if expected is None or sha(p) != expected:
            self.soak.fail(f"honest client {self.n} received {p.name}, not bit-exact")
        p.unlink()
        self.soak.count("files down")
        self.soak.count("bytes down", result.size)


# --- hostile peers ---------------------------------------------------------------------
def never_reader(soak: Soak, port: int, n: int) -> None:
    rng = random.Random(100 + n)
    while not soak.stop.is_set():
        sock, sender = raw_session(port, f"never-reads-{n}", rcvbuf=1024, source=HOSTILE_SOURCE)
        soak.count("hostile connections")
        try:
            for i in range(rng.randint(500, 3000)):  # enough to fill the server's queue
                send_record(sock, sender, Text(i, "never read"))
                if i % 50 == 49:
                    time.sleep(0.01)
            if rng.random() < 0.5:
                send_record(sock, sender, Bye("not reading"))
                soak.stop.wait(5)  # hold the socket open after the goodbye
            else:
                sock.settimeout(10)
                for i in range(100_000):  # flood until the server gives up on us
                    send_record(sock, sender, Text(i, ""))
        except OSError:
            pass
        finally:
            sock.close()


def idle_or_trickle(soak: Soak, port: int, trickle: bool) -> None:
    hello = encode_frame(ClientHandshake(identity("trickler")).create_client_hello())
    while not soak.stop.is_set():
        with socket.socket() as s:
            s.bind((HOSTILE_SOURCE, 0))
            s.connect(("127.0.0.1", port))
            soak.count("hostile connections")
            if trickle:
                for i in range(len(hello)):
                    if soak.stop.wait(0.5):
                        break
                    try:
                        s.send(hello[i:i + 1])
                    except OSError:
                        break
            read_to_eof(s, 30)


def garbage_and_replays(soak: Soak, port: int) -> None:
    rng = random.Random(7)
    hello = encode_frame(ClientHandshake(identity("replayer")).create_client_hello())
    while not soak.stop.wait(0.02):
        with socket.socket() as s:
            s.bind((HOSTILE_SOURCE, 0))
            s.settimeout(10)
            try:
                s.connect(("127.0.0.1", port))
                soak.count("hostile connections")
                s.sendall(hello if rng.random() < 0.5 else rng.randbytes(rng.randint(1, 5000)))
                s.recv(65536)  # the ServerHello or an alert; then we hang up
            except OSError:
                pass


def killer(soak: Soak, port: int, fp: str) -> None:
    rng = random.Random(9)
    home = soak.root / "killed-client"
    while not soak.stop.is_set():
        p = subprocess.Popen(
            [PY, "client.py", "--port", str(port), "--home", str(home), "--fingerprint", fp,
             "--received-dir", str(soak.root / "killed-received"),
             "--send-file", str(soak.big)],
            cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        soak.stop.wait(rng.uniform(0.5, 3.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        soak.count("killed clients")
        # a file is visible only once complete: whatever the kill left must be whole
        for f in soak.received.glob("big*.jpg"):
            if sha(f) != soak.sources[soak.big.name]:
                soak.fail(f"{f} is partial after a client was killed")
            f.unlink()


# --- the run ---------------------------------------------------------------------------------
def wait_for_counts(pid: int, want, timeout: float) -> tuple[int, int]:
    """Poll /proc until the counts satisfy `want` (a predicate), or the timeout."""
    deadline = time.monotonic() + timeout
    while not want(now := counts(pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return now


def load(soak: Soak, port: int, fp: str, seconds: float, peak: list[int]) -> list[str]:
    """Every kind of peer at once for `seconds`; returns the names of load threads that
    did not stop."""
    soak.stop.clear()
    threads = [threading.Thread(target=soak.honest, args=(n, port, fp), daemon=True,
                                name=f"honest {n}") for n in range(HONEST)]
    threads += [threading.Thread(target=never_reader, args=(soak, port, n), daemon=True,
                                 name=f"never reads {n}") for n in range(3)]
    threads += [threading.Thread(target=idle_or_trickle, args=(soak, port, t), daemon=True,
                                 name="trickle" if t else "idle")
                for t in (False, False, True, True)]
    threads += [threading.Thread(target=garbage_and_replays, args=(soak, port), daemon=True,
                                 name="garbage and replays"),
                threading.Thread(target=killer, args=(soak, port, fp), daemon=True,
                                 name="killer")]
    started = time.monotonic()
    for t in threads:
        t.start()
    while not soak.stop.wait(min(5.0, seconds)):
        peak[:] = [max(a, b) for a, b in zip(peak, (*counts(soak.pid), rss(soak.pid)),
                                             strict=True)]
        if time.monotonic() - started >= seconds:
            soak.stop.set()
    for t in threads:
        t.join(60)
    return [t.name for t in threads if t.is_alive()]


def settle(soak: Soak) -> tuple[int, int, int]:
    """(threads, fds, RSS) once nobody is connected any more."""
    wait_for_counts(soak.pid, lambda c: c[0] == IDLE_THREADS, 60)
    threads, fds = wait_for_counts(soak.pid, lambda c: False, 1)  # settled
    return threads, fds, rss(soak.pid)


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def run(root: Path, seconds: float) -> int:
    soak = Soak(root, seconds)
    homes = [keystore.open_home(root / f"honest-{n}") for n in range(HONEST)]
    # identities first, so that the pusher knows who is honest
    fps = root / "honest-fingerprints"
    fps.write_text("".join(keystore.load_identity(h)[0].fingerprint() + "\n" for h in homes))
    srv = Proc([PY, str(Path(__file__).resolve()), "--serve", str(soak.push_dir), str(fps),
                "--", "--headless", "--port", "0", "--home", str(root / "server-home"),
                "--received-dir", str(soak.received), "--max-clients", "200",
                "--max-startups-per-source", "64", "--handshake-timeout", "5"])
    port = int(srv.wait_for(r"^listening on [\d.]+:(\d+)$").group(1))
    fp = srv.wait_for(r"^identity (SHA256:\S+)$").group(1)
    for h in homes:  # pinned, as after a first contact
        (h / keystore.KNOWN_HOSTS).write_text(known_hosts_line("127.0.0.1", port, fp))
    soak.pid = srv.p.pid
    peak = [0, 0, 0]
    try:
        cold = settle(soak)
        # a warm-up under the full load first: the baseline is the idle server after it,
        # so that what the allocator keeps from the peak is not counted as a leak
        warm_up = min(20.0, seconds / 4)
        stuck = load(soak, port, fp, warm_up, peak)
        base = settle(soak)
        print(f"baseline after a {warm_up:g} s warm-up: {base[0]} threads (main, accept "
              f"loop, 4 pushers), {base[1]} fds, RSS {mib(base[2])} (cold start: "
              f"{mib(cold[2])})", flush=True)
        stuck += load(soak, port, fp, seconds - warm_up, peak)
        after = settle(soak)
        still_serving = soak.honest(0, port, fp, once=True)
    finally:
        code = srv.stop()
    out = srv.output()
    pushed = sum(line.startswith("soak: pushed ") and line != "soak: pushed a text"
                 for line in out.splitlines())
    leftovers = sorted(p.name for p in soak.received.iterdir()) if soak.received.exists() else []
    # a killed client's file that had ended before the kill is saved whole, maybe after the
    # killer looked (the server finishes what ended): that one is no partial file
    whole = [n for n in leftovers if n.startswith("big") and
             sha(soak.received / n) == soak.sources[soak.big.name]]
    leftovers = [n for n in leftovers if n not in whole]

    s = soak.stats
    print(f"ran {seconds:g} s: {s['sessions']} honest sessions, {s['texts up']} texts and "
          f"{s['files up']} files ({mib(s['bytes up'])}) client->server, {s['files down']} "
          f"files ({mib(s['bytes down'])}) server->client ({pushed} confirmed by the server), "
          f"{s['hostile connections']} hostile connections, {s['killed clients']} clients "
          f"killed mid-transfer")
    print(f"peak: {peak[0]} threads, {peak[1]} fds, RSS {mib(peak[2])}")
    print(f"after: {after[0]} threads, {after[1]} fds, RSS {mib(after[2])} "
          f"(baseline {base[0]}, {base[1]}, {mib(base[2])})")
    checks = {
        "every honest transfer completed and bit-exact": not soak.failures,
        "threads and fds back to baseline": after[:2] == base[:2],
        f"RSS within {mib(RSS_MARGIN)} of baseline": after[2] <= base[2] + RSS_MARGIN,
        "no traceback in the server output": "Traceback" not in out,
        "accept loop serving at the end": still_serving,
        "server exited 0 on SIGINT": code == 0,
        "nothing left in the received dir (no partial file)": not leftovers,
        "every load thread stopped": not stuck,
        "files the server saw confirmed were all received": pushed <= s["files down"],
    }
    for what, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
    for f in soak.failures[:20]:
        print(f"  failure: {f}")
    if leftovers:
        print(f"  left in {soak.received}: {leftovers[:10]}")
    if whole:
        print(f"  saved whole after its client was killed: {whole}")
    if "Traceback" in out:  # the first one, whole: it is what to fix
        lines = out.splitlines()
        at = next(i for i, line in enumerate(lines) if "Traceback" in line)
        print("  the server's first traceback, with the line before it:",
              *lines[max(0, at - 1):at + 40], sep="\n    ")
    return 0 if all(checks.values()) else 1


def main() -> int:
    if sys.argv[1:2] == ["--serve"]:  # the server process: python soak.py --serve PUSH FPS -- ...
        return serve(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[5:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=120.0, help="length of the load (default 120)")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="qsocket-soak-"))
    try:
        return run(root, args.seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
