"""The pure half of `doctor`: step results, the lines they print, certificate and token
summaries.

Nothing here does I/O or reads the clock: `diagnose` runs the steps and passes `now` in;
failures come with the `catalogue`'s diagnosis, printed as reason, cause and fix.
Nothing printed here ever holds a token, a secret or a password: token summaries report
the length, expiry and claims of an access token, never its value.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import errno
import ipaddress
import json
import os
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from mailwarden_proxy.catalogue import Diagnosis

OK, FAIL, SKIP = "✓", "✗", "-"
_NAME_WIDTH = 15
_WRAP = 100  # columns for the hint's cause and fix


class Outcome(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"  # could not run: an earlier step failed


@dataclass(frozen=True)
class StepResult:
    name: str  # "DNS", "TCP", "TLS", "certificate", "token", "login", "NOOP", ...
    outcome: Outcome
    detail: str = ""
    hint: Diagnosis | None = None  # the catalogue's, for a failure

    @property
    def failed(self) -> bool:
        return self.outcome is Outcome.FAIL


def passed(name: str, detail: str = "") -> StepResult:
    return StepResult(name, Outcome.PASS, detail)


def failed(name: str, detail: str, hint: Diagnosis | None = None) -> StepResult:
    return StepResult(name, Outcome.FAIL, detail, hint)


def skipped(name: str, detail: str) -> StepResult:
    return StepResult(name, Outcome.SKIP, detail)


# -- lines ---------------------------------------------------------------------------------


def format_step(step: StepResult) -> list[str]:
    """`  ✓ TLS           TLSv1.3 ...` (a detail's further lines aligned under its first), and
    for a failure the hint's lines below it."""
    mark = {Outcome.PASS: OK, Outcome.FAIL: FAIL, Outcome.SKIP: SKIP}[step.outcome]
    first, *more = step.detail.split("\n")
    lines = [f"  {mark} {step.name:<{_NAME_WIDTH}}{first}".rstrip()]
    lines += [" " * (4 + _NAME_WIDTH) + line for line in more]
    if step.hint is not None:
        entry, indent = step.hint.entry, " " * 4
        who = f"{entry.provider} " if entry.provider != "any" else ""
        code = f", {who}code {step.hint.provider_code}" if step.hint.provider_code else ""
        temporary = "; may pass if tried again later" if entry.temporary else ""
        lines.append(f"{indent}reason: {entry.reason}{code}{temporary}")
        for label, text in (("cause:  ", entry.cause), ("fix:    ", entry.fix)):
            lines += textwrap.wrap(
                text,
                _WRAP,
                initial_indent=indent + label,
                subsequent_indent=indent + " " * len(label),
                break_on_hyphens=False,
            )
    return lines


def format_heading(protocol: str, host: str, port: int, tls: str) -> str:
    mode = {"implicit": "implicit TLS", "starttls": "STARTTLS", "none": "no TLS"}.get(tls, tls)
    return f"{protocol.upper()} {host}:{port} ({mode})"


def format_summary(results: Sequence[StepResult]) -> str:
    failures = [r for r in results if r.failed]
    checks = sum(1 for r in results if r.outcome is not Outcome.SKIP)
    if not failures:
        return f"result: pass ({checks} checks)"
    first = failures[0]
    return f"result: FAIL ({len(failures)} of {checks} checks failed; first: {first.name})"


def duration(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _when(moment: dt.datetime, now: dt.datetime) -> str:
    stamp = moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    left = (moment - now).total_seconds()
    if left < 0:
        return f"{stamp}, {_span(-left)} ago"
    return f"{stamp}, in {_span(left)}"


def _span(seconds: float) -> str:
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    if seconds < 2 * 86400:
        return f"{round(seconds / 3600)} h"
    return f"{round(seconds / 86400)} days"


# -- certificates --------------------------------------------------------------------------


@dataclass(frozen=True)
class CertSummary:
    subject: str
    issuer: str
    not_before: dt.datetime
    not_after: dt.datetime
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    self_signed: bool


def certificate_summary(der: bytes) -> CertSummary:
    """The parts of a DER certificate a user needs to recognise it; ValueError if unparseable."""
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns_names, ips = (), ()
    return CertSummary(
        subject=cert.subject.rfc4514_string() or "(empty)",
        issuer=cert.issuer.rfc4514_string() or "(empty)",
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        dns_names=dns_names,
        ip_addresses=ips,
        self_signed=cert.subject == cert.issuer,
    )


def _wildcard_match(pattern: str, host: str) -> bool:
    # RFC 6125 §6.4.3: a "*" only as the whole left-most label, matching exactly one label
    if not pattern.startswith("*."):
        return pattern == host
    first, _, rest = host.partition(".")
    return bool(first) and rest == pattern[2:] and "." in rest


def hostname_matches(summary: CertSummary, host: str) -> bool:
    """Whether `host` is one of the certificate's names (subject alternative names only, as
    TLS clients check today; an IP address must be an IP SAN)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        wanted = host.rstrip(".").lower()
        return any(_wildcard_match(n.rstrip(".").lower(), wanted) for n in summary.dns_names)
    return any(ipaddress.ip_address(ip) == address for ip in summary.ip_addresses)


def format_certificate(summary: CertSummary, now: dt.datetime, host: str) -> list[str]:
    """Subject, issuer, expiry, names and the host name check, one item a line."""
    names = [*summary.dns_names, *summary.ip_addresses]
    shown = ", ".join(names[:6]) + (f" (+{len(names) - 6})" if len(names) > 6 else "")
    verdict = "matches" if hostname_matches(summary, host) else "does NOT match"
    return [
        f"subject {summary.subject}",
        f"issuer  {summary.issuer}" + (" (self-signed)" if summary.self_signed else ""),
        f"expires {_when(summary.not_after, now)}",
        f"names   {shown or '(none)'}; {host} {verdict}",
    ]


def trust_source(ca_file: str | None) -> str:
    return f"{ca_file} + system store" if ca_file else "system store"


# -- transport failures --------------------------------------------------------------------

_REFUSED = {errno.ECONNREFUSED, errno.ECONNRESET}


def connect_failure(exc: OSError | TimeoutError, timeout: float) -> str:
    """A failed TCP connect in a few words."""
    if isinstance(exc, TimeoutError) or exc.errno == errno.ETIMEDOUT:
        return f"no answer within {timeout:g} s"
    # asyncio's own words ("Connect call failed ('10.0.0.1', 993)") repeat the address
    text = os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__
    return text.lower() if exc.errno in _REFUSED else text


# OpenSSL X509_V_ERR_* codes the ssl module reports in SSLCertVerificationError.verify_code
_NAME_CODES = {62, 64}  # hostname mismatch, IP address mismatch
_DATE_CODES = {9, 10}  # not yet valid, expired


def verify_failure(verify_code: int, verify_message: str) -> str:
    """OpenSSL's verdict on a certificate, said so that its kind is plain."""
    message = verify_message or "certificate verify failed"
    if verify_code in _NAME_CODES or verify_code in _DATE_CODES:
        return message
    return f"not trusted: {message}"


# -- tokens --------------------------------------------------------------------------------

_USER_CLAIMS = ("upn", "preferred_username", "unique_name", "email")
_APP_CLAIMS = ("app_displayname", "appid", "azp")  # app-only tokens name no user
_MAX_CLAIM = 120


def jwt_claims(value: str) -> dict[str, Any] | None:
    """The payload of a JWT access token, not verified (only for showing what it says);
    None for an opaque token (Google's `ya29.` tokens, say)."""
    parts = value.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


def _claim(value: Any) -> str:
    if isinstance(value, list):
        value = " ".join(str(v) for v in value)
    text = "".join(c if " " <= c <= "~" else "?" for c in str(value))
    return text if len(text) <= _MAX_CLAIM else text[: _MAX_CLAIM - 3] + "..."


def format_token(
    length: int, expires_at: float, now: dt.datetime, claims: dict[str, Any] | None
) -> str:
    """`1234 chars, expires ... ; aud ...; scp ...; roles ...; for user@...`."""
    expiry = dt.datetime.fromtimestamp(expires_at, dt.UTC)
    parts = [f"{length} chars, expires {_when(expiry, now)}"]
    if claims is None:
        parts.append("opaque (not a JWT)")
        return "; ".join(parts)
    for key in ("aud", "scp", "roles"):
        if claims.get(key):
            parts.append(f"{key} {_claim(claims[key])}")
    user = next((claims[k] for k in _USER_CLAIMS if claims.get(k)), None)
    app = next((claims[k] for k in _APP_CLAIMS if claims.get(k)), None)
    if user is not None:
        parts.append(f"for {_claim(user)}")
    elif app is not None:
        parts.append(f"app {_claim(app)}, no user (app-only)")
    return "; ".join(parts)


def count(n: int | str, noun: str) -> str:
    """`1 message`, `3 messages`."""
    return f"{n} {noun}" if str(n) == "1" else f"{n} {noun}s"


def printable(text: str, secrets: Iterable[str] = (), limit: int = 300) -> str:
    """Peer text fit for the report: "" if it holds a secret, printable ASCII, capped."""
    if any(secret and secret in text for secret in secrets):
        return "(withheld: the server's answer contained the credential)"
    shown = "".join(c if " " <= c <= "~" else " " if c in "\t\r\n" else "?" for c in text)
    flat = " ".join(shown.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
