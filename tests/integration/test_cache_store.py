"""`mailwarden-proxy --cache-store`: a rotated refresh token survives a restart.

The local identity provider retires a refresh token when it is used and hands out a new
one (`single_use_refresh_tokens`, as Microsoft does for public clients). The real proxy
command runs as users run it, is stopped with SIGTERM and started again:

* without a cache store the restarted proxy only has the retired token of its
  configuration file: `invalid_grant`, logins refused, and nothing was written anywhere;
* with one, it starts from the newest token and logs in; a new token put into the
  configuration (a new consent) wins over the stored one;
* a missing key and a wrong key stop it at start with a message, the store left alone.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailwarden_proxy.config.model import MailProtocol, ProxyConfig, UpstreamTLS
from mailwarden_proxy.config.render import to_native
from mailwarden_proxy.demo.idp import LocalIdP
from mailwarden_proxy.demo.idp_grants import SECRET_MARKER
from mailwarden_proxy.demo.smtpd import LocalSubmissionServer
from mailwarden_proxy.secret import Secret
from mailwarden_proxy.tokens.base import PermanentTokenError
from mailwarden_proxy.tokens.factory import provider_for
from tests.integration.proxyconf import LOCAL_PASSWORD, config, listener, refresh_account

PROXY = [sys.executable, "-m", "mailwarden_proxy.cli"]
USER = "rotating@example.com"
CACHE_KEY = f"{SECRET_MARKER}-cache-store-passphrase"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Proxy:
    """The `mailwarden-proxy` command in a subprocess; `stop()` returns its stderr."""

    def __init__(self, config_path: Path, port: int, *args: str, key: str | None = None):
        # msal would prefer REQUESTS_CA_BUNDLE over the account's caFile (DESIGN.md)
        env = {k: v for k, v in os.environ.items() if k not in ("REQUESTS_CA_BUNDLE",)}
        env.pop("MAILWARDEN_CACHE_KEY", None)
        if key is not None:
            env["MAILWARDEN_CACHE_KEY"] = key
        command = [*PROXY, "--config", str(config_path), "--watch-interval", "0", *args]
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE, env=env)
        self.port = port

    def wait_ready(self, timeout: float = 20) -> Proxy:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"proxy exited early: {self.stop()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"port {self.port} never opened: {self.stop()}")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stderr is not None
        stderr = self.proc.stderr.read().decode()
        self.proc.stderr.close()
        print(stderr)  # shown by pytest when the test fails
        return stderr


def send(port: int, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as smtp:
        smtp.login(USER, LOCAL_PASSWORD)
        body = f"Subject: {subject}\r\n\r\nhi\r\n".encode()
        assert smtp.sendmail(USER, ["rcpt@example.org"], body) == {}


def write_config(path: Path, cfg: ProxyConfig) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_native(cfg, mask=False), sort_keys=False))


@pytest.fixture
def setup(
    idp: LocalIdP, make_submission_server: Any, tmp_path: Path
) -> tuple[Path, ProxyConfig, LocalSubmissionServer, int]:
    """A configuration directory holding only the configuration, for one refresh-token
    account (Microsoft, through msal) behind an SMTP listener."""
    assert idp.single_use_refresh_tokens
    submission: LocalSubmissionServer = make_submission_server("starttls")
    port = _free_port()
    lst = listener(
        "SMTP-store", MailProtocol.SMTP, submission.port, UpstreamTLS.STARTTLS, idp.ca_path
    )
    cfg = config([replace(lst, local_port=port)], [refresh_account(idp, USER)])
    path = tmp_path / "conf" / "proxy.yaml"
    write_config(path, cfg)
    return path, cfg, submission, port


def test_without_a_cache_store_a_restart_is_left_with_the_retired_token(
    idp: LocalIdP, setup: tuple[Path, ProxyConfig, LocalSubmissionServer, int]
) -> None:
    path, _, submission, port = setup
    proxy = Proxy(path, port).wait_ready()
    try:
        send(port, "before restart")  # the refresh retires the configured token
    finally:
        proxy.stop()
    assert idp.request_count("refresh_token") == 1
    assert os.listdir(path.parent) == [path.name]  # a read-only mount would do

    proxy = Proxy(path, port).wait_ready()
    try:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            send(port, "never sent")
    finally:
        stderr = proxy.stop()
    assert refused.value.smtp_code == 535
    assert "invalid_grant" in stderr
    assert [m.subject for m in submission.messages] == ["before restart"]
    assert os.listdir(path.parent) == [path.name]


def test_with_a_cache_store_the_newest_token_survives_restarts(
    idp: LocalIdP,
    setup: tuple[Path, ProxyConfig, LocalSubmissionServer, int],
    tmp_path: Path,
) -> None:
    path, cfg, submission, port = setup
    store = tmp_path / "state" / "tokens.store"  # a directory the proxy creates
    flag = ("--cache-store", str(store))
    for round_ in (1, 2, 3):
        proxy = Proxy(path, port, *flag, key=CACHE_KEY).wait_ready()
        try:
            send(port, f"round {round_}")
        finally:
            stderr = proxy.stop()
        assert idp.request_count("refresh_token") == round_
        assert "invalid_grant" not in stderr
    assert "using the newest refresh token from the cache store" in stderr
    assert [m.subject for m in submission.wait_for_messages(3)] == [
        "round 1",
        "round 2",
        "round 3",
    ]
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    assert SECRET_MARKER.encode() not in store.read_bytes()
    assert os.listdir(path.parent) == [path.name]  # nothing next to the configuration

    # a new consent: the user puts a fresh refresh token into the configuration; it wins
    # over the stored one (which still works, so the proof is that the new one is spent)
    fresh = idp.issue_refresh_token(USER, cfg.accounts[0].oauth2.client_id)
    account = cfg.accounts[0]
    account = replace(account, oauth2=replace(account.oauth2, refresh_token=Secret(fresh)))
    write_config(path, replace(cfg, accounts=(account,)))
    proxy = Proxy(path, port, *flag, key=CACHE_KEY).wait_ready()
    try:
        send(port, "after a new consent")
    finally:
        stderr = proxy.stop()
    assert "the refresh token in the configuration changed" in stderr
    with pytest.raises(PermanentTokenError) as retired:
        provider_for(account, timeout=5).fetch(USER)
    assert retired.value.code == "invalid_grant"

    # and that token's descendant is what the next start uses
    proxy = Proxy(path, port, *flag, key=CACHE_KEY).wait_ready()
    try:
        send(port, "after another restart")
    finally:
        proxy.stop()


def test_start_up_refuses_a_missing_or_wrong_key(
    setup: tuple[Path, ProxyConfig, LocalSubmissionServer, int], tmp_path: Path
) -> None:
    path, _, _, port = setup
    store = tmp_path / "state" / "tokens.store"
    flag = ("--cache-store", str(store))

    keyless = Proxy(path, port, *flag)
    assert keyless.proc.wait(timeout=20) == 2
    stderr = keyless.stop()
    assert "MAILWARDEN_CACHE_KEY" in stderr and "--cache-store-key-file" in stderr
    assert not store.exists()

    key_file = tmp_path / "keys" / "cache.key"
    key_file.parent.mkdir()
    key_file.write_text(CACHE_KEY + "\n")
    proxy = Proxy(path, port, *flag, "--cache-store-key-file", str(key_file)).wait_ready()
    proxy.stop()
    written = store.read_bytes()

    wrong = Proxy(path, port, *flag, key=f"{SECRET_MARKER}-wrong-passphrase")
    assert wrong.proc.wait(timeout=20) == 2
    stderr = wrong.stop()
    assert f"cache store {store}: cannot decrypt it" in stderr
    assert "MAILWARDEN_CACHE_KEY" in stderr and "remove" in stderr
    assert "Traceback" not in stderr
    assert store.read_bytes() == written
