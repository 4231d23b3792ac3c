"""The fuzz targets: one function per core side and per configuration loader.

Each takes the fuzzer's bytes and returns normally, or raises: `checks.Violation` when a
rule is broken, anything else when the code under test crashed. Nothing here imports
atheris, so the targets also run under plain Python (`fuzz.run --replay FILE`).

A core target reads its input as a small script, so the fuzzer can reach the login
states instead of stalling at the greeting:

    byte 0      options: bit 0 upstream STARTTLS, 1 local STARTTLS, 2 client TLS already
                active, 3 small max_line (128), 4 small max_literal (32), 5 run a cooperative
                upstream prelude first (the client is greeted before the script starts)
    then ops    op byte % 12, then its operand:
                0-2  raw bytes to the fuzzed side: length byte, bytes
                3    raw bytes to the fuzzed side: 2-byte length, bytes
                4    raw bytes to the other side: length byte, bytes
                5    a plausible client line: index byte
                6    a plausible upstream answer to the proxy's last command: index byte
                7    answer the outstanding Authenticate / NeedFreshToken: choice byte
                     (see `Checker.answer`)
                8    the client closes;  9  the upstream closes
                10   an oversized run to the fuzzed side: size byte (KiB - 1), filler byte
                11   an answer out of turn (must be refused with RuntimeError)

The `_client` targets fuzz the client side, the `_upstream` targets the upstream side;
they differ only in which side the raw ops feed, so one corpus format serves both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from typing import Literal

from fuzz.checks import PROTOCOLS, Checker, Protocol, Violation
from mailwarden_proxy.config import common, emailproxy
from mailwarden_proxy.config.errors import ConfigError
from mailwarden_proxy.config.load import describe, detect_format, loads
from mailwarden_proxy.config.model import ProxyConfig
from mailwarden_proxy.protocols.session import SendClient
from mailwarden_proxy.secret import Secret

Side = Literal["client", "upstream"]

RAW, RAW_LONG, RAW_OTHER, CLIENT_LINE, UPSTREAM_ANSWER, ANSWER = 0, 3, 4, 5, 6, 7
CLIENT_CLOSE, UPSTREAM_CLOSE, OVERSIZE, OUT_OF_TURN = 8, 9, 10, 11
OPS = 12

STARTTLS, LOCAL_STARTTLS, TLS_ACTIVE, SMALL_LINE, SMALL_LITERAL, PRELUDE = (
    1 << n for n in range(6)
)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def byte(self) -> int | None:
        if self.pos >= len(self.data):
            return None
        self.pos += 1
        return self.data[self.pos - 1]

    def take(self, count: int) -> bytes:
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk


def new_checker(protocol: Protocol, options: int) -> Checker:
    return Checker.create(
        protocol,
        starttls=bool(options & STARTTLS),
        local_starttls=bool(options & LOCAL_STARTTLS),
        tls_active=bool(options & TLS_ACTIVE),
        max_line=128 if options & SMALL_LINE else 1024,
        max_literal=32 if options & SMALL_LITERAL else 256,
    )


def cooperative_prelude(checker: Checker) -> None:
    """Play a well-behaved upstream (first answer each time) until the client is greeted."""
    for _ in range(8):
        if checker.finished or any(isinstance(a, SendClient) for a in checker.actions):
            return
        answers = checker.protocol.upstream_answers(checker.last_sent_upstream())
        if not answers:
            return
        checker.upstream(answers[0])


def run_core(protocol: Protocol, fuzzed: Side, data: bytes) -> Checker:
    script = _Reader(data)
    options = script.byte() or 0
    checker = new_checker(protocol, options)
    if options & PRELUDE:
        cooperative_prelude(checker)
    send_fuzzed = checker.client if fuzzed == "client" else checker.upstream
    send_other = checker.upstream if fuzzed == "client" else checker.client
    while (op := script.byte()) is not None:
        op %= OPS
        if op <= 2:
            send_fuzzed(script.take(script.byte() or 0))
        elif op == RAW_LONG:
            size = int.from_bytes(script.take(2).ljust(2, b"\0"), "big")
            send_fuzzed(script.take(size))
        elif op == RAW_OTHER:
            send_other(script.take(script.byte() or 0))
        elif op == CLIENT_LINE:
            lines = protocol.client_lines
            checker.client(lines[(script.byte() or 0) % len(lines)])
        elif op == UPSTREAM_ANSWER:
            answers = protocol.upstream_answers(checker.last_sent_upstream())
            if answers:
                checker.upstream(answers[(script.byte() or 0) % len(answers)])
        elif op == ANSWER:
            checker.answer(script.byte() or 0)
        elif op == CLIENT_CLOSE:
            checker.client_closed()
        elif op == UPSTREAM_CLOSE:
            checker.upstream_closed()
        elif op == OVERSIZE:
            kib, filler = (script.byte() or 0) + 1, script.take(1) or b"A"
            send_fuzzed(filler * (kib * 1024))
        else:
            checker.answer_out_of_turn()
    # the session always ends: afterwards the core must stay silent
    checker.client_closed()
    checker.client(b"a NOOP\r\n")
    checker.upstream(b"* OK\r\n")
    if not checker.finished:
        raise Violation("the session did not end when the client closed")
    return checker


# -- configuration loaders -------------------------------------------------------------------

SERVICE_ACCOUNT_KEY = json.dumps(
    {"type": "service_account", "private_key": "k", "client_email": "sa@example.com"}
)


def _fake_read_text_file(path: str, field: str, *, source: str) -> str:
    """Secret files without touching the disk: a fuzzed path like /dev/zero must not hang
    the fuzzer. Names decide the outcome, as files would."""
    if "missing" in path or not path:
        raise ConfigError(field, f"cannot read {path!r}: No such file or directory", source=source)
    if "empty" in path:
        return ""
    if path.endswith(".json"):
        return SERVICE_ACCOUNT_KEY
    return "secret-from-" + path


@contextlib.contextmanager
def hermetic_config() -> Iterator[None]:
    """Loader runs without reading secret files and without logging warnings."""
    original = common.read_text_file
    common.read_text_file = _fake_read_text_file
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        common.read_text_file = original
        logging.disable(logging.NOTSET)


def check_loaded(load: Callable[[], ProxyConfig]) -> ProxyConfig | ConfigError:
    """The rule for loaders: a validated config, or ConfigError naming a field."""
    try:
        config = load()
    except ConfigError as exc:
        if not exc.field.strip() or not exc.message.strip():
            raise Violation(f"ConfigError without a field or message: {exc!r}") from exc
        return exc
    # The effective configuration is always printable, and says nothing about secrets:
    # other secret values (same presence) must give the very same text.
    if describe(config) != describe(_other_secrets(config)):
        raise Violation("describe() depends on a secret's value")
    return config


def _other(value: Secret | None) -> Secret | None:
    return None if value is None else Secret("other-secret-value")


def _other_secrets(config: ProxyConfig) -> ProxyConfig:
    accounts = []
    for account in config.accounts:
        o = account.oauth2
        oauth2 = dataclasses.replace(
            o,
            client_secret=_other(o.client_secret),
            service_account_key=_other(o.service_account_key),
            refresh_token=_other(o.refresh_token),
            password=_other(o.password),
        )
        local = _other(account.local_password)
        accounts.append(dataclasses.replace(account, local_password=local, oauth2=oauth2))
    return dataclasses.replace(config, accounts=tuple(accounts))


def decode(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def config_native(data: bytes) -> None:
    text = decode(data)
    if detect_format(text) != "native":
        return
    check_loaded(lambda: loads(text, source="fuzz.yaml"))


def config_emailproxy(data: bytes) -> None:
    text = decode(data)
    check_loaded(lambda: emailproxy.from_text(text, source="fuzz.config"))


def _core_target(protocol: str, side: Side) -> Callable[[bytes], None]:
    def target(data: bytes) -> None:
        run_core(PROTOCOLS[protocol], side, data)

    return target


TARGETS: dict[str, Callable[[bytes], None]] = {
    **{
        f"{name}_{side}": _core_target(name, side)
        for name in ("imap", "smtp", "pop3")
        for side in ("client", "upstream")
    },
    "config_native": config_native,
    "config_emailproxy": config_emailproxy,
}
