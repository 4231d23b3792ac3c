"""`mailwarden test`: log in through a proxy built from a rendered config and send a message.

The "test configuration" button of the products that use this: it runs the real proxy
(`ProxyApp`) in this process on free loopback ports, with the configuration the sidecar
would get, and drives it with the standard library's clients the way an application
does. Each step is reported; a failure names the step and what the other side answered
(an IdP error code, an SMTP reply), never a token, secret or password.

Against a MailAccount, the operator's rendered Secret `<name>-proxy` is read with
`kubectl get secret -o json` and its keys are laid out in a temporary directory in place of
the sidecar's mount (`render.MOUNT_PATH`), so `*File` references resolve as in the pod.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import imaplib
import json
import poplib
import secrets
import shutil
import smtplib
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from email.message import EmailMessage
from pathlib import Path
from typing import TextIO

from mailwarden_operator.render import CONFIG_KEY, MOUNT_PATH, PASSWORD_KEY, USERNAME_KEY
from mailwarden_proxy.app import ProxyApp
from mailwarden_proxy.config.load import load_config, loads
from mailwarden_proxy.config.model import (
    Account,
    LocalTLS,
    MailProtocol,
    Metrics,
    ProxyConfig,
)
from mailwarden_proxy.diagnose import SetupError, pick_account
from mailwarden_proxy.tokens.base import TokenError

OK, FAIL = "✓", "✗"
# IMAP and POP3 first: a login there proves the token without sending anything
_ORDER = {MailProtocol.IMAP: 0, MailProtocol.POP3: 1, MailProtocol.SMTP: 2}


class TestSetupError(Exception):
    """The test could not start (no kubectl, no rendered Secret, no usable account)."""

    __test__ = False  # not a pytest class, despite the name


@dataclass(frozen=True)
class Target:
    config: ProxyConfig
    username: str
    password: str
    label: str  # for the report's first line


def _pick(config: ProxyConfig, username: str | None) -> tuple[Account, str]:
    try:
        return pick_account(config, username)
    except SetupError as exc:
        raise TestSetupError(str(exc)) from None


def target_from_file(path: Path, username: str | None) -> Target:
    config = load_config(path)
    account, username = _pick(config, username)
    # emailproxy files carry no local password: the first login's password becomes it,
    # so any fresh one works against a proxy that was just started
    password = (
        account.local_password.reveal() if account.local_password else secrets.token_urlsafe(18)
    )
    return Target(config, username, password, str(path))


def target_from_secret(data: Mapping[str, bytes], name: str, workdir: Path) -> Target:
    """The rendered Secret's keys as the sidecar sees them, under `workdir`."""
    for key in (CONFIG_KEY, PASSWORD_KEY):
        if key not in data:
            raise TestSetupError(f"Secret {name}-proxy has no key {key!r}: not rendered yet?")
    for key, value in data.items():
        path = workdir / key
        path.write_bytes(value)
        path.chmod(0o600)
    text = data[CONFIG_KEY].decode("utf-8").replace(MOUNT_PATH + "/", f"{workdir}/")
    config = loads(text, source=f"secret/{name}-proxy")
    username = data[USERNAME_KEY].decode() if USERNAME_KEY in data else None
    account, username = _pick(config, username)
    del account
    return Target(config, username, data[PASSWORD_KEY].decode(), f"mailaccount/{name}")


def fetch_secret(name: str, namespace: str | None, kubeconfig: str | None) -> dict[str, bytes]:
    """The data of Secret `<name>-proxy`, read with the user's kubectl."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise TestSetupError("kubectl not found on PATH (needed to read the rendered Secret)")
    cmd = [kubectl, *([f"--kubeconfig={kubeconfig}"] if kubeconfig else [])]
    cmd += ["get", "secret", f"{name}-proxy", "-o", "json"]
    if namespace:
        cmd += ["-n", namespace]
    # the user's own kubectl with fixed arguments; no shell
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)  # noqa: S603
    if proc.returncode != 0:
        raise TestSetupError(f"kubectl get secret {name}-proxy: {proc.stderr.strip()}")
    items = json.loads(proc.stdout).get("data") or {}
    return {k: base64.b64decode(v) for k, v in items.items()}


def for_test(config: ProxyConfig) -> ProxyConfig:
    """Free loopback ports, plain local side, no metrics endpoint: the test is about the
    upstream half (token, TLS, login), and must not clash with a proxy already running."""
    listeners = tuple(
        replace(
            lst,
            local_address="127.0.0.1",
            local_port=0,
            local_tls=LocalTLS.NONE,
            local_certificate=None,
            local_key=None,
        )
        for lst in config.listeners
    )
    return replace(config, listeners=listeners, metrics=Metrics(port=0))


def _reply(code: int, text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return f"{code} {' '.join(text.split())}"


class Report:
    """The steps printed so far, and whether all of them passed."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.ok = True

    def step(self, passed: bool, what: str, detail: str = "") -> bool:
        self.ok = self.ok and passed
        suffix = f": {detail}" if detail and not passed else (f" ({detail})" if detail else "")
        print(f"{OK if passed else FAIL} {what}{suffix}", file=self.out, flush=True)
        return passed


@dataclass(frozen=True)
class _Run:
    t: Target
    to: str | None
    sender: str
    timeout: float
    report: Report


def _smtp(port: int, r: _Run) -> None:
    t, to, sender, timeout, report = r.t, r.to or "", r.sender, r.timeout, r.report
    try:
        client = smtplib.SMTP("127.0.0.1", port, timeout=timeout)
    except OSError as exc:
        report.step(False, "SMTP connect", str(exc))
        return
    with client:
        try:
            client.login(t.username, t.password)
        except smtplib.SMTPResponseException as exc:
            report.step(False, "SMTP login", _reply(exc.smtp_code, exc.smtp_error))
            return
        except (smtplib.SMTPException, OSError) as exc:
            report.step(False, "SMTP login", str(exc) or type(exc).__name__)
            return
        report.step(True, "SMTP login")
        msg = EmailMessage()
        msg["From"], msg["To"] = sender, to
        msg["Subject"] = "mailwarden test message"
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        msg.set_content(f"Sent by `mailwarden test` for {t.label} at {stamp}.\n")
        try:
            client.send_message(msg, from_addr=sender, to_addrs=[to])
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = next(iter(exc.recipients.values()))
            report.step(False, "message accepted by upstream", _reply(code, text))
        except smtplib.SMTPResponseException as exc:
            report.step(
                False, "message accepted by upstream", _reply(exc.smtp_code, exc.smtp_error)
            )
        except (smtplib.SMTPException, OSError) as exc:
            report.step(False, "message accepted by upstream", str(exc) or type(exc).__name__)
        else:
            report.step(True, "message accepted by upstream", f"to {to}")


def _imap(port: int, r: _Run) -> None:
    t, timeout, report = r.t, r.timeout, r.report
    try:
        client = imaplib.IMAP4("127.0.0.1", port, timeout=timeout)
        try:
            client.login(t.username, t.password)
        finally:
            with contextlib.suppress(imaplib.IMAP4.error, OSError):
                client.logout()  # the login outcome is what is being reported
    except (imaplib.IMAP4.error, OSError) as exc:
        report.step(False, "IMAP login", str(exc).removeprefix("b'").removesuffix("'"))
        return
    report.step(True, "IMAP login")


def _pop3(port: int, r: _Run) -> None:
    t, timeout, report = r.t, r.timeout, r.report
    try:
        client = poplib.POP3("127.0.0.1", port, timeout=timeout)
        try:
            client.user(t.username)
            client.pass_(t.password)
        finally:
            with contextlib.suppress(poplib.error_proto, OSError):
                client.quit()
    except (poplib.error_proto, OSError) as exc:
        text = exc.args[0] if exc.args else exc
        detail = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
        report.step(False, "POP3 login", detail)
        return
    report.step(True, "POP3 login")


def _expiry(expires_at: float) -> str:
    when = dt.datetime.fromtimestamp(expires_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    minutes = max(0, round((expires_at - time.time()) / 60))
    return f"expires {when}, in {minutes} min"


_CHECKS: dict[MailProtocol, Callable[[int, _Run], None]] = {
    MailProtocol.IMAP: _imap,
    MailProtocol.POP3: _pop3,
    MailProtocol.SMTP: _smtp,
}


async def _run(r: _Run) -> None:
    config = for_test(r.t.config)
    account, _ = _pick(config, r.t.username)
    app = ProxyApp(config)
    await app.start()
    try:
        try:
            async with asyncio.timeout(r.timeout):
                token = await app.tokens.get(account, r.t.username)
        except TokenError as exc:
            r.report.step(False, "token acquired", str(exc))
            return
        except TimeoutError:
            r.report.step(False, "token acquired", f"no answer from the IdP in {r.timeout:g} s")
            return
        r.report.step(True, "token acquired", _expiry(token.expires_at))
        for listener in sorted(config.listeners, key=lambda lst: _ORDER[lst.protocol]):
            port = app.server.bound_port(listener.name)
            await asyncio.to_thread(_CHECKS[listener.protocol], port, r)
    finally:
        await app.stop(0)


def run_test(t: Target, to: str | None, sender: str | None, timeout: float, out: TextIO) -> bool:
    """Run every step against `t`; True when all passed."""
    if to is None and any(lst.protocol is MailProtocol.SMTP for lst in t.config.listeners):
        raise TestSetupError("--to is required: the configuration has an SMTP listener")
    upstreams = ", ".join(
        f"{lst.protocol} → {lst.upstream.host}:{lst.upstream.port}" for lst in t.config.listeners
    )
    print(f"testing {t.label} as {t.username} ({upstreams})", file=out, flush=True)
    report = Report(out)
    asyncio.run(_run(_Run(t, to, sender or t.username, timeout, report)))
    return report.ok


def load_target(
    config_path: Path | None,
    mailaccount: str | None,
    *,
    namespace: str | None,
    kubeconfig: str | None,
    username: str | None,
    workdir: Path,
) -> Target:
    if config_path is not None:
        return target_from_file(config_path, username)
    assert mailaccount is not None
    return target_from_secret(
        fetch_secret(mailaccount, namespace, kubeconfig), mailaccount, workdir
    )


def main_test(
    config_path: Path | None,
    mailaccount: str | None,
    *,
    namespace: str | None,
    kubeconfig: str | None,
    username: str | None,
    to: str | None,
    sender: str | None,
    timeout: float,
    out: TextIO,
) -> int:
    with tempfile.TemporaryDirectory(prefix="mailwarden-test-") as tmp:
        target = load_target(
            config_path,
            mailaccount,
            namespace=namespace,
            kubeconfig=kubeconfig,
            username=username,
            workdir=Path(tmp),
        )
        return 0 if run_test(target, to, sender, timeout, out) else 1
