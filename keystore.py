"""The files under --home that both scripts share: the identity key pair,
known_hosts (client) and known_clients (server), kept with ssh's hygiene."""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

import crypt
from server_data import known_clients_line, parse_known_clients

ECDSA_FILE = "identity_ecdsa_p256.pem"
MLDSA_FILE = "identity_mldsa65.pem"
KNOWN_HOSTS = "known_hosts"
KNOWN_CLIENTS = "known_clients"


class HomeError(Exception):
    """A problem with the files under --home; the message says how to fix it."""


def default_home() -> Path:
    return Path(os.environ.get("QSOCKET_HOME") or Path.home() / ".qsocket")


def open_home(home: str | os.PathLike) -> Path:
    """Create the home dir 0700 if missing; refuse one others could write to."""
    path = Path(home).expanduser()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError as e:
        raise HomeError(f"cannot use home directory {path}: {e.strerror}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise HomeError(f"home {path} is not a directory")
    _check_owner(st, path, "home directory")
    if st.st_mode & 0o022:
        raise HomeError(f"home directory {path} is writable by group or others; "
                        f"fix it with: chmod 700 {path}")
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise HomeError(f"home directory {path} is not readable and writable by you")
    for name in (ECDSA_FILE, MLDSA_FILE, KNOWN_HOSTS, KNOWN_CLIENTS):
        # at start-up, not at first use: a client reads known_hosts mid-handshake
        try:
            st = (path / name).stat()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise HomeError(f"cannot use {path / name}: {e.strerror}") from e
        if name in (KNOWN_HOSTS, KNOWN_CLIENTS):
            _check_trust_file(st, path / name)
        else:
            _check_owner(st, path / name, "private key")
    return path


def _check_owner(st: os.stat_result, path: Path, what: str) -> None:
    """ssh's StrictModes: what another user owns, that user could have planted."""
    me = os.geteuid()
    if st.st_uid not in (me, 0):
        raise HomeError(f"{what} {path} is owned by uid {st.st_uid}, not by you (uid {me}) "
                        f"or root; fix it with: chown {_user_name(me)} {path}")


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _read_private(path: Path) -> bytes:
    try:
        st = path.stat()
    except OSError as e:
        raise HomeError(f"cannot read {path}: {e.strerror}") from e
    _check_owner(st, path, "private key")
    if st.st_mode & 0o077:
        raise HomeError(f"private key {path} is accessible by group or others "
                        f"(mode {stat.S_IMODE(st.st_mode):04o}); fix it with: chmod 600 {path}")
    try:
        return path.read_bytes()
    except OSError as e:
        raise HomeError(f"cannot read {path}: {e.strerror}") from e


def _write_new(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Create a file that must not exist yet, written whole before it is visible."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # fails rather than replace an existing key
    finally:
        tmp.unlink(missing_ok=True)


def load_identity(home: Path) -> tuple[crypt.Identity, bool]:
    """Load the hybrid identity, creating it on first run.  Returns (identity, created).

    A corrupt key is an error and is left untouched, never silently replaced:
    replacing it would change the fingerprint every peer has pinned.
    """
    ecdsa_path, mldsa_path = home / ECDSA_FILE, home / MLDSA_FILE
    have_ecdsa, have_mldsa = ecdsa_path.exists(), mldsa_path.exists()
    if not have_ecdsa and not have_mldsa:
        identity = crypt.Identity.generate()
        ecdsa_pem, mldsa_pem = identity.to_pem()
        try:
            _write_new(ecdsa_path, ecdsa_pem)
            _write_new(mldsa_path, mldsa_pem)
        except OSError as e:
            raise HomeError(f"cannot create identity in {home}: {e.strerror}") from e
        return identity, True
    if have_ecdsa and not have_mldsa:
        raise HomeError(
            f"{ecdsa_path} is an ECDSA-only identity (from an older QSocket 2); identities are "
            f"now ECDSA P-256 + ML-DSA-65. Move {ecdsa_path} away to create a new hybrid "
            f"identity (its fingerprint will change and peers must re-pin it)")
    if not have_ecdsa:
        raise HomeError(f"{ecdsa_path} is missing but {mldsa_path} exists; "
                        f"restore it or move {mldsa_path} away to create a new identity")
    ecdsa_pem, mldsa_pem = _read_private(ecdsa_path), _read_private(mldsa_path)
    try:
        return crypt.Identity.from_pem(ecdsa_pem, mldsa_pem), False
    except ValueError as e:
        raise HomeError(f"identity in {home} is corrupt: {e}; the files are left as they are "
                        f"(restore them, or move both away to create a new identity)") from e


def read_text(path: Path) -> str:
    """A trust file's text; a missing file is empty.  Like the home itself it must be
    ours (or root's) and writable by nobody else: it decides whom we trust."""
    try:
        with open(path, "rb") as f:
            _check_trust_file(os.fstat(f.fileno()), path)
            return f.read().decode("utf-8")
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as e:
        raise HomeError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from e


def _check_trust_file(st: os.stat_result, path: Path) -> None:
    _check_owner(st, path, "trust file")
    if st.st_mode & 0o022:
        raise HomeError(f"trust file {path} is writable by group or others "
                        f"(mode {stat.S_IMODE(st.st_mode):04o}); fix it with: chmod 600 {path}")


def append_line(path: Path, line: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            _check_trust_file(os.fstat(fd), path)
            f.write(line)
    except OSError as e:
        raise HomeError(f"cannot write {path}: {e.strerror}") from e


class KnownClients:
    """The server's known_clients record under --home: the fingerprints of every
    client seen, read once (re-reading a growing file would cost each handshake) and
    bounded (strangers must not grow it without end).  Not thread-safe: the server
    calls it under its own lock."""

    def __init__(self, home: Path, limit: int) -> None:
        self.path = home / KNOWN_CLIENTS
        self.limit = limit
        self.seen = parse_known_clients(read_text(self.path))
        self.full = False

    def __len__(self) -> int:
        return len(self.seen)

    def record(self, fp: str, peer: str, when: str) -> str:
        """Note a client; returns the line to log ("" when there is nothing to say).
        A failed write is a warning only: it is a record, not an access list, so a
        full disk or no free fd must not turn clients away (the next session retries)."""
        if fp in self.seen or self.full:
            return ""
        if len(self.seen) >= self.limit:
            self.full = True
            return (f"warning: {self.path} holds {self.limit} clients; new clients are "
                    f"admitted but no longer recorded (use --authorized-clients to "
                    f"admit only known ones)")
        try:
            append_line(self.path, known_clients_line(fp, peer, when))
        except HomeError as e:
            return f"warning: client {fp} not recorded: {e}"
        self.seen.add(fp)
        return f"new client {fp} recorded in {self.path}"
