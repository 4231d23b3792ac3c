"""The `mailwarden-proxy` command as users run it: --check, demo, SIGHUP reload, SIGTERM drain."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailwarden_proxy.config.model import MailProtocol, Metrics, ProxyConfig, UpstreamTLS
from mailwarden_proxy.config.render import to_native
from mailwarden_proxy.demo.idp import LocalIdP
from mailwarden_proxy.demo.smtpd import LocalSubmissionServer
from mailwarden_proxy.demo.tlsca import LocalCA
from tests.integration.proxyconf import LOCAL_PASSWORD, app_account, config, listener

EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "examples"
PROXY = [sys.executable, "-m", "mailwarden_proxy.cli"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"proxy exited early: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"port {port} never opened")


def _login_once_loaded(port: int, user: str, failure: str, timeout: float = 10) -> None:
    """Log in as `user`, retrying until the proxy has loaded the account that has it."""
    deadline = time.monotonic() + timeout
    while True:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            try:
                client.login(user, LOCAL_PASSWORD)
                return
            except smtplib.SMTPAuthenticationError:
                assert time.monotonic() < deadline, failure
                time.sleep(0.1)


def _write(path: Path, cfg: ProxyConfig) -> None:
    path.write_text(yaml.safe_dump(to_native(cfg, mask=False), sort_keys=False))


@pytest.mark.skipif(not EXAMPLES.is_dir(), reason="../shared/examples not beside the checkout")
def test_check_accepts_the_deployment_guide_example() -> None:
    result = subprocess.run(
        [*PROXY, "--config", str(EXAMPLES / "emailproxy-office365.config"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "outlook.office365.com" in result.stdout
    assert "smtp.office365.com" in result.stdout
    assert "CLIENT_SECRET" not in result.stdout  # the secret's value is masked
    assert "****" in result.stdout


@pytest.mark.skipif(not EXAMPLES.is_dir(), reason="../shared/examples not beside the checkout")
def test_check_refuses_the_published_example_naming_token_url() -> None:
    result = subprocess.run(
        [
            *PROXY,
            "--config",
            str(EXAMPLES / "emailproxy-office365-as-published.config"),
            "--check",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "token_url" in result.stderr
    assert "SMPT.Send" in result.stderr  # the misspelt scope is warned about
    assert "Traceback" not in result.stderr


def test_demo_runs_end_to_end() -> None:
    result = subprocess.run(
        [*PROXY, "demo"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo succeeded" in result.stdout
    assert "token requests to the identity provider: 1" in result.stdout


@pytest.fixture
def smtpd(idp: LocalIdP, local_ca: LocalCA) -> Iterator[Any]:
    with LocalSubmissionServer(idp.is_valid, tls="starttls", cert=local_ca.issue("smtpd")) as s:
        yield s


def _proxy_config(idp: LocalIdP, local_ca: LocalCA, smtpd: Any, port: int) -> ProxyConfig:
    lst = listener(
        "SMTP-cli", MailProtocol.SMTP, smtpd.port, UpstreamTLS.STARTTLS, local_ca.ca_path
    )
    cfg = config([replace(lst, local_port=port)], [app_account(idp, "a@example.com")])
    return replace(cfg, metrics=Metrics(port=_free_port()))


def test_sighup_reloads_without_dropping_sessions_and_sigterm_drains(
    idp: LocalIdP, local_ca: LocalCA, smtpd: Any, tmp_path: Path
) -> None:
    port = _free_port()
    cfg = _proxy_config(idp, local_ca, smtpd, port)
    path = tmp_path / "proxy.yaml"
    _write(path, cfg)
    env = {k: v for k, v in os.environ.items() if k != "REQUESTS_CA_BUNDLE"}
    proc = subprocess.Popen([*PROXY, "--config", str(path), "--drain-seconds", "20"],
                            stderr=subprocess.PIPE, env=env)  # fmt: skip
    try:
        _wait_for_port(port, proc)
        live = smtplib.SMTP("127.0.0.1", port, timeout=10)
        live.login("a@example.com", LOCAL_PASSWORD)

        # add an account and reload: the open session keeps working
        _write(path, replace(cfg, accounts=(*cfg.accounts, app_account(idp, "b@example.com"))))
        proc.send_signal(signal.SIGHUP)
        _login_once_loaded(port, "b@example.com", "reload never applied")
        live.sendmail("a@example.com", ["x@example.com"], b"Subject: after reload\r\n\r\nhi\r\n")

        # a broken file is refused; the running configuration stays
        path.write_text("version: 1\nlisteners: [\n")
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.login("b@example.com", LOCAL_PASSWORD)

        # SIGTERM: no new connections, the live session may finish
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        live.sendmail("a@example.com", ["x@example.com"], b"Subject: while draining\r\n\r\nhi\r\n")
        live.quit()
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        proc.wait()
        print(stderr)  # shown by pytest when the test fails
    assert [m.subject for m in smtpd.messages] == ["after reload", "while draining"]
    assert LOCAL_PASSWORD not in stderr
    assert "reload refused" in stderr


def test_a_changed_config_file_is_picked_up_without_a_signal(
    idp: LocalIdP, local_ca: LocalCA, smtpd: Any, tmp_path: Path
) -> None:
    """In a pod the config is a mounted Secret the kubelet swaps; nobody sends SIGHUP."""
    port = _free_port()
    cfg = _proxy_config(idp, local_ca, smtpd, port)
    path = tmp_path / "proxy.yaml"
    _write(path, cfg)
    proc = subprocess.Popen(
        [*PROXY, "--config", str(path), "--watch-interval", "0.2"], stderr=subprocess.PIPE
    )
    try:
        _wait_for_port(port, proc)
        staged = tmp_path / "proxy.yaml.new"
        _write(staged, replace(cfg, accounts=(*cfg.accounts, app_account(idp, "c@example.com"))))
        staged.rename(path)  # an atomic swap, as the kubelet does with ..data
        _login_once_loaded(port, "c@example.com", "the changed file was never loaded")
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        print(stderr)
    assert "configuration file changed; reloading" in stderr
