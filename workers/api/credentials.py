"""Who may call the API, as which project, with which role (docs/adr/0006).

One JSON document, the file ``DBAAS_API_CREDENTIALS_FILE`` or the text
``DBAAS_API_CREDENTIALS``::

    {"users":  [{"name": "alice", "password": "scrypt$16384$8$1$<salt>$<hash>",
                 "project": "demo", "admin": false}],
     "tokens": [{"name": "ci", "sha256": "<hex digest of the token>", "project": "demo",
                 "admin": false}]}

A user authenticates with HTTP basic, a token with ``X-Auth-Token``; both act for their
project, and ``admin`` ones for any project (and may list all of them). Only hashes are
kept: ``manage.py credentials add-user|add-token`` writes an entry and prints its secret
once. The file is read again whenever it changes, so adding or revoking needs no restart.

Standard library only.
"""

import base64
import fcntl
import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from dbaas.files import write_atomically

log = logging.getLogger(__name__)

# The project is a path segment of every URL: a plain, short name (Keystone's ids fit).
PROJECT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
# ~45 ms and 16 MB per hash: costly to guess offline. Verified passwords are remembered
# (``_verified``), so a client sending basic auth with every request pays it once.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
MAX_VERIFIED = 4096


class CredentialError(ValueError):
    """The credentials document cannot be used."""


@dataclass(frozen=True)
class Caller:
    """Who a request comes from."""
    name: str
    project: str
    admin: bool


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt)}${b64(digest)}"


def password_matches(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        expected = base64.b64decode(digest)
        if scheme != "scrypt":
            return False
        computed = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n),
                                  r=int(r), p=int(p), dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(computed, expected)


def token_digest(token: str) -> str:
    """Tokens are long random strings: a plain SHA-256 is enough to keep them unreadable."""
    return hashlib.sha256(token.encode()).hexdigest()


class Credentials:
    """A parsed credentials document."""

    def __init__(self, document):
        if not isinstance(document, dict) or set(document) - {"users", "tokens"}:
            raise CredentialError('expected an object with "users" and "tokens" lists')
        self.users: dict[str, tuple[str, Caller]] = {}
        self.tokens: dict[str, Caller] = {}
        for entry in _entries(document, "users"):
            caller = _caller(entry, entry.get("name"))
            if not isinstance(entry.get("password"), str) or not entry["password"].startswith("scrypt$"):
                raise CredentialError(f"user {caller.name}: password must be a scrypt hash "
                                      "(manage.py credentials add-user writes one)")
            if caller.name in self.users:
                raise CredentialError(f"{caller.name} appears twice")
            self.users[caller.name] = (entry["password"], caller)
        for entry in _entries(document, "tokens"):
            caller = _caller(entry, entry.get("name"))
            digest = entry.get("sha256")
            if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
                raise CredentialError(f"token {caller.name}: sha256 must be the token's hex SHA-256 digest")
            if caller.name in self.users or any(t.name == caller.name for t in self.tokens.values()):
                raise CredentialError(f"{caller.name} appears twice")
            self.tokens[digest] = caller


def _entries(document: dict, key: str) -> list[dict]:
    entries = document.get(key, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise CredentialError(f'"{key}" must be a list of objects')
    return entries


def _caller(entry: dict, name) -> Caller:
    if not (isinstance(name, str) and NAME.fullmatch(name)):
        raise CredentialError(f"bad name {str(name)[:64]!r}: letters, digits and _.@- only")
    project = entry.get("project")
    if not (isinstance(project, str) and PROJECT_ID.fullmatch(project)):
        raise CredentialError(f"{name}: bad project {str(project)[:64]!r}: letters, digits and _.- only")
    if not isinstance(entry.get("admin", False), bool):
        raise CredentialError(f"{name}: admin must be true or false")
    return Caller(name, project, entry.get("admin", False))


def parse(text: str) -> Credentials:
    try:
        return Credentials(json.loads(text))
    except json.JSONDecodeError as exc:
        raise CredentialError(f"not JSON: {exc}") from None


class Store:
    """The credentials in force: ``text`` when given, else the file, read again when it
    changes. A change that does not parse is logged and the last good version stays; a
    removed file refuses everyone."""

    def __init__(self, path: str, text: str = ""):
        self._lock = threading.Lock()
        self._verified: dict[bytes, bool] = {}
        self._stamp = None
        self._credentials = Credentials({})
        self.path = None if text else Path(path)
        if text:
            self._credentials = parse(text)
        elif self.path.exists():
            self._stamp = self._stamp_now()
            try:
                self._credentials = parse(self.path.read_text())
            except CredentialError as exc:
                raise CredentialError(f"{self.path}: {exc}") from None
        else:
            log.warning("no credentials file at %s: every request will be refused", self.path)

    def _stamp_now(self):
        status = self.path.stat()
        return status.st_ino, status.st_mtime_ns, status.st_size

    def _reload(self) -> None:
        try:
            stamp = self._stamp_now()
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp:
            return
        self._stamp = stamp
        if stamp is None:
            log.warning("%s was removed: every request will be refused", self.path)
            self._credentials = Credentials({})
            return
        try:
            self._credentials = parse(self.path.read_text())
        except (CredentialError, OSError) as exc:
            log.error("%s changed but cannot be used (%s): keeping the previous version", self.path, exc)

    def current(self) -> Credentials:
        if self.path is not None:
            with self._lock:
                self._reload()
        return self._credentials

    def by_token(self, token: str) -> Caller | None:
        return self.current().tokens.get(token_digest(token))

    def by_password(self, name: str, password: str) -> Caller | None:
        entry = self.current().users.get(name)
        if entry is None:
            return None
        stored, caller = entry
        key = hashlib.sha256(f"{name}\0{password}\0{stored}".encode()).digest()
        matches = self._verified.get(key)
        if matches is None:
            matches = password_matches(password, stored)
            if len(self._verified) >= MAX_VERIFIED:
                self._verified.clear()
            self._verified[key] = matches
        return caller if matches else None


# --- what the operator runs (manage.py credentials …) ---------------------------------------

def add(path: str, kind: str, name: str, project: str, admin: bool = False,
        secret: str | None = None) -> str:
    """Add a user (``kind`` "user") or token ("token") to the file, in place of one of the
    same name; the secret, generated unless given."""
    secret = secret or secrets.token_urlsafe(24 if kind == "user" else 32)
    entry = {"name": name, "project": project, "admin": admin}
    if kind == "user":
        entry["password"] = hash_password(secret)
    else:
        entry["sha256"] = token_digest(secret)
    key = "users" if kind == "user" else "tokens"
    with _editing(path) as document:
        _drop(document, name)
        document.setdefault(key, []).append(entry)
    return secret


def remove(path: str, name: str) -> None:
    with _editing(path) as document:
        if not _drop(document, name):
            raise CredentialError(f"no user or token named {name!r}")


def entries(path: str) -> list[dict]:
    """Every user and token, without their secrets."""
    document = json.loads(Path(path).read_text()) if Path(path).exists() else {}
    Credentials(document)
    return [{"kind": kind, "name": e["name"], "project": e["project"], "admin": e.get("admin", False)}
            for key, kind in (("users", "user"), ("tokens", "token")) for e in document.get(key, [])]


def _drop(document: dict, name: str) -> bool:
    found = False
    for key in ("users", "tokens"):
        kept = [e for e in document.get(key, []) if e.get("name") != name]
        found |= len(kept) != len(document.get(key, []))
        document[key] = kept
    return found


@contextmanager
def _editing(path: str) -> Iterator[dict]:
    """The file's document, to change in place; written back whole if still valid. One
    editor at a time, so that two adds at once do not lose one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        document = json.loads(path.read_text()) if path.exists() else {"users": [], "tokens": []}
        Credentials(document)
        yield document
        Credentials(document)
        write_atomically(path, json.dumps(document, indent=2) + "\n", mode=0o600)
