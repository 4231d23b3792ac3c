"""The cache store (`--cache-store PATH`): the newest refresh token of each account, on disk,
encrypted.

Identity providers may rotate refresh tokens (RFC 9700 §4.14): a refresh answers with a new
one and retires the old. Without this store a restarted proxy starts again from the token in
its configuration file, which the provider has retired by then.

* **Key.** A passphrase from `MAILWARDEN_CACHE_KEY` or `--cache-store-key-file`, never from
  the file or its directory. scrypt (n=2^15, r=8, p=3: ~0.2 s and 32 MiB, once at start)
  turns it into an AES-256-GCM key, with a random salt kept in the file.
* **File.** JSON: a header (format, version, KDF and salt) and the AES-GCM ciphertext of
  the entries, the header bound in as associated data, so a wrong key and any altered byte
  both fail authentication. Such a file is refused at start, never overwritten.
* **Seed rule.** Each entry keeps the sha256 of the configured refresh token it descends
  from (the seed), as the operator does (`render._refresh_token`). The stored token is used
  only while the configuration still holds that seed; a new token in the configuration
  (someone consented again) wins.
* **Writes.** Each rotation rewrites the file under a lock (rotations arrive from the token
  worker threads): a temporary file in the same directory, mode 0600, fsync, `os.replace`.
  A failed write is logged and the token stays in memory; the login that got it succeeds.

Entries of accounts no longer configured stay in the file until it is removed.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from mailwarden_proxy.secret import Secret

log = logging.getLogger(__name__)

KEY_ENV = "MAILWARDEN_CACHE_KEY"
KEY_FILE_FLAG = "--cache-store-key-file"
FORMAT = "mailwarden-token-cache"
VERSION = 1
# scrypt cost: one of OWASP's equivalent minimums (n=2^17 p=1 would take 128 MiB, which a
# small proxy shouldn't spend even briefly); ~0.2 s once per process, not per login or write
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 3
# an altered header must not make start-up allocate gigabytes (scrypt takes 128·r·n bytes)
_MAX_SCRYPT_N, _MAX_SCRYPT_R, _MAX_SCRYPT_P = 2**17, 8, 16
_SALT_BYTES = 16
_NONCE_BYTES = 12


class StoreError(Exception):
    """The cache store can't be used; the message names the file or the missing key."""


def seed_sha256(seed: Secret | None) -> str | None:
    return hashlib.sha256(seed.reveal().encode()).hexdigest() if seed else None


def passphrase_from(key_file: Path | None, environ: Mapping[str, str]) -> tuple[Secret, str]:
    """The passphrase and where it came from (for messages): the key file if given, else
    the environment."""
    if key_file is not None:
        try:
            text = key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeError) as exc:
            reason = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise StoreError(f"{KEY_FILE_FLAG} {key_file}: cannot read it: {reason}") from None
        if not text:
            raise StoreError(f"{KEY_FILE_FLAG} {key_file}: the file is empty")
        return Secret(text), f"{KEY_FILE_FLAG} {key_file}"
    value = environ.get(KEY_ENV, "")
    if not value:
        raise StoreError(
            f"a cache store needs a key: set {KEY_ENV} to a passphrase, or pass "
            f"{KEY_FILE_FLAG} PATH (a file holding one); it is never kept next to the store"
        )
    return Secret(value), KEY_ENV


@dataclass(frozen=True)
class Entry:
    refresh_token: Secret
    seed_sha256: str | None  # of the configured refresh token this one descends from
    updated_at: float


class TokenStore:
    """The newest refresh token per account username, in one encrypted file."""

    def __init__(
        self, path: Path, key: bytes, kdf: dict[str, Any], entries: dict[str, Entry]
    ) -> None:
        self.path = path
        self._aead = AESGCM(key)
        self._kdf = kdf
        self._entries = entries
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, passphrase: Secret, *, key_source: str = KEY_ENV) -> TokenStore:
        """Read `path` (created, with its directory, if missing). StoreError for a file that
        can't be read, isn't a store, or doesn't decrypt with the passphrase."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raw = None
        except OSError as exc:
            raise StoreError(f"cache store {path}: cannot read it: {exc.strerror}") from None
        if raw is None:
            kdf = {"name": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}
            kdf["salt"] = base64.b64encode(os.urandom(_SALT_BYTES)).decode()
            store = cls(path, _derive(passphrase, kdf), kdf, {})
            try:
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                store._write_locked()
            except OSError as exc:
                raise StoreError(f"cache store {path}: cannot create it: {exc.strerror}") from None
            log.info("created the cache store %s", path)
            return store
        header, nonce, ciphertext = _parse(path, raw)
        kdf = header["kdf"]
        key = _derive(passphrase, kdf)
        try:
            plain = AESGCM(key).decrypt(nonce, ciphertext, _associated_data(header))
        except InvalidTag:
            raise StoreError(
                f"cache store {path}: cannot decrypt it with the key from {key_source}: the key "
                f"is not the one it was written with, or the file was altered. Start with the "
                f"right key, or remove {path} to start from the refresh tokens in the "
                f"configuration"
            ) from None
        return cls(path, key, kdf, _entries(path, plain))

    def initial(self, account: str, configured: Secret | None) -> Secret | None:
        """The refresh token `account` starts with: the stored one while `configured` is
        still the seed it descends from, else `configured`."""
        with self._lock:
            entry = self._entries.get(account)
        if entry is None:
            return configured
        if entry.seed_sha256 != seed_sha256(configured):
            log.info(
                "%s: the refresh token in the configuration changed; it replaces the one in "
                "the cache store %s",
                account,
                self.path,
            )
            return configured
        log.info("%s: using the newest refresh token from the cache store %s", account, self.path)
        return entry.refresh_token

    def remember(self, account: str, token: Secret, *, seed: Secret | None) -> bool:
        """Keep `token` as `account`'s newest, descended from the configured `seed`; False
        (logged) if the file couldn't be written: the token stays in memory."""
        entry = Entry(token, seed_sha256(seed), time.time())
        with self._lock:
            self._entries[account] = entry
            try:
                self._write_locked()
            except OSError as exc:
                log.warning(
                    "could not write the cache store %s (%s); the new refresh token of %s is "
                    "kept in memory only, and is lost at restart",
                    self.path,
                    exc.strerror or type(exc).__name__,
                    account,
                )
                return False
        return True

    def accounts(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def _write_locked(self) -> None:
        header = {"format": FORMAT, "version": VERSION, "kdf": self._kdf}
        plain = json.dumps(
            {
                "accounts": {
                    name: {
                        "refreshToken": e.refresh_token.reveal(),
                        "seedSha256": e.seed_sha256,
                        "updatedAt": e.updated_at,
                    }
                    for name, e in self._entries.items()
                }
            }
        ).encode()
        nonce = os.urandom(_NONCE_BYTES)  # random 96-bit nonces: fine for 2^32 writes a key
        ciphertext = self._aead.encrypt(nonce, plain, _associated_data(header))
        document = {
            **header,
            "nonce": base64.b64encode(nonce).decode(),
            "ciphertext": base64.b64encode(ciphertext).decode(),
        }
        _replace_atomically(self.path, json.dumps(document, indent=1).encode() + b"\n")


def _derive(passphrase: Secret, kdf: dict[str, Any]) -> bytes:
    return Scrypt(
        salt=base64.b64decode(kdf["salt"]), length=32, n=kdf["n"], r=kdf["r"], p=kdf["p"]
    ).derive(passphrase.reveal().encode())


def _associated_data(header: dict[str, Any]) -> bytes:
    """The header as authenticated by AES-GCM: altering the salt or costs fails too."""
    fields = {"format": header["format"], "version": header["version"], "kdf": header["kdf"]}
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def _parse(path: Path, raw: bytes) -> tuple[dict[str, Any], bytes, bytes]:
    """Header, nonce and ciphertext; StoreError for anything that isn't a store we wrote."""
    damaged = StoreError(
        f"cache store {path}: not a mailwarden cache store, or damaged; remove it to start "
        f"from the refresh tokens in the configuration"
    )
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise damaged
        if type(doc.get("version")) is not int:
            raise damaged
        if doc["version"] != VERSION:
            raise StoreError(
                f"cache store {path}: version {doc.get('version')!r} is not {VERSION}; it was "
                f"written by another mailwarden release"
            )
        kdf = doc["kdf"]
        costs = [kdf[k] for k in ("n", "r", "p")]
        if kdf.get("name") != "scrypt" or not all(type(c) is int and c > 0 for c in costs):
            raise damaged
        n = kdf["n"]
        too_costly = n > _MAX_SCRYPT_N or kdf["r"] > _MAX_SCRYPT_R or kdf["p"] > _MAX_SCRYPT_P
        if n < 2 or n & (n - 1) or too_costly:
            raise damaged
        base64.b64decode(kdf["salt"], validate=True)
        nonce = base64.b64decode(doc["nonce"], validate=True)
        ciphertext = base64.b64decode(doc["ciphertext"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise damaged from None
    if len(nonce) != _NONCE_BYTES:
        raise damaged
    return doc, nonce, ciphertext


def _entries(path: Path, plain: bytes) -> dict[str, Entry]:
    # authenticated, so written by us; still, a bug must not surface as a KeyError
    try:
        accounts = json.loads(plain)["accounts"]
        return {
            str(name): Entry(
                Secret(str(e["refreshToken"])), e.get("seedSha256"), float(e["updatedAt"])
            )
            for name, e in accounts.items()
        }
    except (ValueError, KeyError, TypeError, AttributeError):
        raise StoreError(f"cache store {path}: unexpected content; remove it") from None


def _replace_atomically(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, whole; a crash leaves no half file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o600)  # mkstemp's default, said explicitly
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # the rename itself must reach the disk too, or a crash may bring back the old file
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
