"""SMTP workloads with smtplib: what a legacy application really runs."""

from __future__ import annotations

import smtplib
import ssl
import time

from bench.clients.token import xoauth2
from bench.paths import Endpoint

TIMEOUT = 60.0
RECIPIENT = "rcpt@example.test"


def message(size: int) -> bytes:
    header = f"From: bench@example.test\r\nTo: {RECIPIENT}\r\nSubject: bench\r\n\r\n".encode()
    line = b"x" * 78 + b"\r\n"
    body = line * ((size - len(header)) // len(line) + 1)
    return header + body


def _connect(endpoint: Endpoint) -> smtplib.SMTP:
    client = smtplib.SMTP(endpoint.host, endpoint.port, timeout=TIMEOUT)
    client.ehlo("bench.example.test")
    if endpoint.direct:
        if endpoint.tls == "starttls":
            client.starttls(context=ssl.create_default_context(cafile=endpoint.ca_path))
            client.ehlo("bench.example.test")
        assert endpoint.token is not None
        initial = xoauth2(endpoint.username, endpoint.token).decode()
        code, reply = client.docmd("AUTH", f"XOAUTH2 {initial}")
        if code != 235:
            raise smtplib.SMTPAuthenticationError(code, reply)
    else:
        assert endpoint.password is not None
        client.login(endpoint.username, endpoint.password)
    return client


def one_per_connection(endpoint: Endpoint, count: int, size: int) -> float:
    """`count` messages, each on its own connection (connect, EHLO, AUTH, send, QUIT);
    returns seconds."""
    content = message(size)
    started = time.perf_counter()
    for _ in range(count):
        client = _connect(endpoint)
        client.sendmail(endpoint.username, [RECIPIENT], content)
        client.quit()
    return time.perf_counter() - started


def many_on_one_connection(endpoint: Endpoint, count: int, size: int) -> float:
    """`count` messages on one authenticated connection; returns seconds (login included)."""
    content = message(size)
    started = time.perf_counter()
    client = _connect(endpoint)
    for _ in range(count):
        client.sendmail(endpoint.username, [RECIPIENT], content)
    client.quit()
    return time.perf_counter() - started
