"""The cache store (`tokens.store`): encryption, refusals, the seed rule, atomic 0600 writes,
concurrent rotations, and the provider factory that uses it. Real files, real crypto.

Every token here carries the leak-scan marker (tests/fixtures/secrets_scan.py): a token in
a log line or an error text fails the session, and the tests check their own logs too.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailwarden_proxy.config.model import Account, Flow, OAuth2, ProviderKind
from mailwarden_proxy.demo.idp_grants import SECRET_MARKER
from mailwarden_proxy.secret import Secret
from mailwarden_proxy.tokens.factory import stored_provider_factory
from mailwarden_proxy.tokens.generic import GenericProvider
from mailwarden_proxy.tokens.store import KEY_ENV, StoreError, TokenStore, passphrase_from

KEY = Secret(f"{SECRET_MARKER}-cache-passphrase")
OTHER_KEY = Secret(f"{SECRET_MARKER}-not-the-passphrase")
SEED = Secret(f"{SECRET_MARKER}-seed-refresh-token")
ROTATED = Secret(f"{SECRET_MARKER}-rotated-refresh-token")
USER = "box@example.org"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "tokens.store"


@pytest.fixture(autouse=True)
def _no_secret_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG, "mailwarden_proxy")
    yield
    assert SECRET_MARKER not in caplog.text


def test_round_trip_keeps_tokens_encrypted(path: Path) -> None:
    store = TokenStore.open(path, KEY)
    assert path.is_file(), "created at start, so an unwritable place is found at once"
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert store.remember(USER, ROTATED, seed=SEED)

    raw = path.read_bytes()
    assert SECRET_MARKER.encode() not in raw
    assert USER.encode() not in raw  # account names are inside the ciphertext too
    for secret in (ROTATED, SEED, KEY):
        assert base64.b64encode(secret.reveal().encode())[:20] not in raw

    reopened = TokenStore.open(path, KEY)
    assert reopened.accounts() == [USER]
    assert reopened.initial(USER, SEED) == ROTATED


def test_file_mode_is_0600_whatever_the_umask(path: Path) -> None:
    old = os.umask(0)
    try:
        store = TokenStore.open(path, KEY)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        store.remember(USER, ROTATED, seed=SEED)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_wrong_key_is_refused_and_the_file_kept(path: Path) -> None:
    TokenStore.open(path, KEY).remember(USER, ROTATED, seed=SEED)
    before = path.read_bytes()
    with pytest.raises(StoreError) as refused:
        TokenStore.open(path, OTHER_KEY, key_source=KEY_ENV)
    message = str(refused.value)
    assert str(path) in message and KEY_ENV in message
    assert "remove" in message and "right key" in message
    assert SECRET_MARKER not in message
    assert path.read_bytes() == before


@pytest.mark.parametrize("where", ["ciphertext", "nonce", "salt", "cost"])
def test_tampering_is_refused(path: Path, where: str) -> None:
    TokenStore.open(path, KEY).remember(USER, ROTATED, seed=SEED)
    doc = json.loads(path.read_bytes())
    if where == "cost":
        doc["kdf"]["n"] //= 2
    else:
        field = doc["kdf"] if where == "salt" else doc
        data = bytearray(base64.b64decode(field[where]))
        data[len(data) // 2] ^= 1
        field[where] = base64.b64encode(bytes(data)).decode()
    path.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="cannot decrypt") as refused:
        TokenStore.open(path, KEY)
    assert str(path) in str(refused.value)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"[]",
        b'{"format": "something else"}',
        b'{"format": "mailwarden-token-cache"}',
    ],
)
def test_a_file_that_is_not_a_store_is_refused(path: Path, content: bytes) -> None:
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(StoreError, match="not a mailwarden cache store") as refused:
        TokenStore.open(path, KEY)
    assert str(path) in str(refused.value)
    assert path.read_bytes() == content


def test_an_absurd_cost_in_the_header_is_refused_before_deriving(path: Path) -> None:
    TokenStore.open(path, KEY)
    doc = json.loads(path.read_bytes())
    doc["kdf"]["n"] = 2**30
    path.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="not a mailwarden cache store"):
        TokenStore.open(path, KEY)


def test_stored_token_wins_while_the_configured_seed_is_unchanged(path: Path) -> None:
    TokenStore.open(path, KEY).remember(USER, ROTATED, seed=SEED)
    store = TokenStore.open(path, KEY)
    assert store.initial(USER, Secret(SEED.reveal())) == ROTATED
    assert store.initial("other@example.org", SEED) is SEED  # no entry: the configuration


def test_a_new_configured_token_wins_over_the_store(path: Path) -> None:
    TokenStore.open(path, KEY).remember(USER, ROTATED, seed=SEED)
    reconsented = Secret(f"{SECRET_MARKER}-after-a-new-consent")
    store = TokenStore.open(path, KEY)
    assert store.initial(USER, reconsented) is reconsented
    assert store.initial(USER, None) is None  # the token was taken out of the configuration


def test_a_token_without_seed_is_used_while_none_is_configured(path: Path) -> None:
    """Device code: the first token came from a sign-in, not from the configuration."""
    TokenStore.open(path, KEY).remember(USER, ROTATED, seed=None)
    store = TokenStore.open(path, KEY)
    assert store.initial(USER, None) == ROTATED
    assert store.initial(USER, SEED) is SEED


def test_writes_replace_the_file_whole(path: Path) -> None:
    """A reader never sees a half-written file: each write is a new inode renamed over."""
    store = TokenStore.open(path, KEY)
    stop = threading.Event()
    torn: list[str] = []

    def read() -> None:
        while not stop.is_set():
            try:
                doc = json.loads(path.read_bytes())
                assert doc["format"] == "mailwarden-token-cache" and doc["ciphertext"]
            except Exception as exc:
                torn.append(type(exc).__name__)

    reader = threading.Thread(target=read)
    reader.start()
    inodes = set()
    try:
        for i in range(200):
            store.remember(USER, Secret(f"{SECRET_MARKER}-{i}"), seed=SEED)
            inodes.add(path.stat().st_ino)
    finally:
        stop.set()
        reader.join()
    assert torn == []
    assert len(inodes) > 1
    assert os.listdir(path.parent) == [path.name]  # no temporary file left behind
    assert TokenStore.open(path, KEY).initial(USER, SEED) == Secret(f"{SECRET_MARKER}-199")


def test_a_failed_write_is_logged_and_the_token_kept_in_memory(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = TokenStore.open(path, KEY)
    before = path.read_bytes()
    # the directory becomes a file: every write fails, even as root
    moved = path.parent.with_name("moved")
    path.parent.rename(moved)
    path.parent.write_text("in the way")
    assert store.remember(USER, ROTATED, seed=SEED) is False
    assert f"could not write the cache store {path}" in caplog.text
    assert store.initial(USER, SEED) == ROTATED
    assert (moved / path.name).read_bytes() == before


def test_concurrent_rotations_all_land(path: Path) -> None:
    store = TokenStore.open(path, KEY)
    accounts = [f"box{n}@example.org" for n in range(8)]
    rounds = 15
    barrier = threading.Barrier(len(accounts))
    failures: list[BaseException] = []

    def rotate(account: str) -> None:
        try:
            barrier.wait()
            for i in range(rounds):
                assert store.remember(account, Secret(f"{SECRET_MARKER}-{account}-{i}"), seed=SEED)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=rotate, args=(a,)) for a in accounts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert os.listdir(path.parent) == [path.name]
    reopened = TokenStore.open(path, KEY)
    assert reopened.accounts() == sorted(accounts)
    for account in accounts:
        last = Secret(f"{SECRET_MARKER}-{account}-{rounds - 1}")
        assert reopened.initial(account, SEED) == last


def test_the_key_comes_from_the_environment_or_a_key_file(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as missing:
        passphrase_from(None, {})
    assert KEY_ENV in str(missing.value) and "--cache-store-key-file" in str(missing.value)
    passphrase, source = passphrase_from(None, {KEY_ENV: KEY.reveal()})
    assert passphrase == KEY and source == KEY_ENV

    key_file = tmp_path / "cache.key"
    key_file.write_text(KEY.reveal() + "\n")
    passphrase, source = passphrase_from(key_file, {KEY_ENV: OTHER_KEY.reveal()})
    assert passphrase == KEY and str(key_file) in source  # the flag wins
    key_file.write_text("\n")
    with pytest.raises(StoreError, match="empty"):
        passphrase_from(key_file, {})
    with pytest.raises(StoreError, match="cannot read"):
        passphrase_from(tmp_path / "missing.key", {})


def _refresh_account(seed: Secret | None) -> Account:
    oauth2 = OAuth2(
        ProviderKind.GENERIC,
        Flow.REFRESH_TOKEN,
        "https://idp.invalid/token",
        "cid",
        refresh_token=seed,
    )
    return Account(USER, oauth2)


def test_providers_start_from_the_stored_token_and_store_rotations(path: Path) -> None:
    store = TokenStore.open(path, KEY)
    make = stored_provider_factory(store)
    account = _refresh_account(SEED)

    first = make(account)
    assert isinstance(first, GenericProvider)
    assert first.refresh_token.current is SEED
    first.refresh_token.update(ROTATED.reveal())  # what a token answer with a new one does
    first.close()

    # a restart: same configuration, the stored descendant is used
    second = stored_provider_factory(TokenStore.open(path, KEY))(account)
    assert isinstance(second, GenericProvider)
    assert second.refresh_token.current == ROTATED
    second.close()

    # the user consented again and put the new token in the configuration
    reconsented = Secret(f"{SECRET_MARKER}-after-a-new-consent")
    third = stored_provider_factory(TokenStore.open(path, KEY))(_refresh_account(reconsented))
    assert isinstance(third, GenericProvider)
    assert third.refresh_token.current is reconsented
    third.close()
