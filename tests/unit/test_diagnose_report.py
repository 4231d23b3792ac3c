"""The pure half of `doctor`: step lines, hints, certificate and token summaries."""

from __future__ import annotations

import base64
import datetime as dt
import errno
import json
from pathlib import Path

import pytest
from cryptography import x509

from mailwarden_proxy import catalogue
from mailwarden_proxy.config.model import MailProtocol, UpstreamTLS
from mailwarden_proxy.demo.tlsca import LocalCA
from mailwarden_proxy.diagnose import SetupError, pick_account
from mailwarden_proxy.diagnose_report import (
    CertSummary,
    certificate_summary,
    connect_failure,
    failed,
    format_certificate,
    format_heading,
    format_step,
    format_summary,
    format_token,
    hostname_matches,
    jwt_claims,
    passed,
    printable,
    skipped,
    verify_failure,
)
from tests.integration.proxyconf import app_account, config, listener

NOW = dt.datetime(2026, 11, 22, 3, 0, tzinfo=dt.UTC)


def _jwt(claims: dict[str, object]) -> str:
    def part(data: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2lnbmF0dXJl"


def test_a_passing_step_is_one_line_and_details_align() -> None:
    assert format_step(passed("DNS", "mail.example → 192.0.2.1")) == [
        "  ✓ DNS            mail.example → 192.0.2.1"
    ]
    assert format_step(passed("token", "first\nsecond")) == [
        "  ✓ token          first",
        "                   second",
    ]
    assert format_step(skipped("login", "no token")) == ["  - login          no token"]


def test_a_failure_carries_the_catalogue_entry() -> None:
    diagnosis = catalogue.diagnose_reply(
        catalogue.Stage.SMTP,
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication"
        " is disabled for the Tenant.",
    )
    assert diagnosis is not None
    lines = format_step(failed("login", "XOAUTH2 as a@b: 535 5.7.139 ...", diagnosis))
    entry = diagnosis.entry
    assert lines[0] == "  ✗ login          XOAUTH2 as a@b: 535 5.7.139 ..."
    assert lines[1] == f"    reason: {entry.reason}, microsoft code 535 5.7.139"
    assert all(len(line) <= 100 for line in lines[1:])
    text = " ".join(" ".join(line.split()) for line in lines[2:])
    assert text == f"cause: {entry.cause} fix: {entry.fix}"


def test_a_temporary_failure_says_so() -> None:
    diagnosis = catalogue.diagnose_token_error("timeout", "")
    assert diagnosis.entry.temporary
    assert "may pass if tried again later" in format_step(failed("token", "x", diagnosis))[1]


def test_summary_and_heading() -> None:
    ok = [passed("DNS"), passed("TCP")]
    assert format_summary(ok) == "result: pass (2 checks)"
    broken = [passed("DNS"), failed("TCP", "refused"), skipped("login", "no token")]
    assert format_summary(broken) == "result: FAIL (1 of 2 checks failed; first: TCP)"
    assert format_heading("imap", "h", 993, "implicit") == "IMAP h:993 (implicit TLS)"
    assert format_heading("smtp", "h", 587, "starttls") == "SMTP h:587 (STARTTLS)"


def test_connect_failures_in_words() -> None:
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    assert connect_failure(refused, 5) == "connection refused"
    assert connect_failure(TimeoutError(), 5) == "no answer within 5 s"
    assert connect_failure(OSError(errno.EHOSTUNREACH, "No route to host"), 5) == (
        "No route to host"
    )


def test_verify_failures_name_their_kind() -> None:
    assert verify_failure(20, "unable to get local issuer certificate") == (
        "not trusted: unable to get local issuer certificate"
    )
    text = "Hostname mismatch, certificate is not valid for 'x'."
    assert verify_failure(62, text) == text
    assert verify_failure(10, "certificate has expired") == "certificate has expired"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return LocalCA(tmp_path_factory.mktemp("ca"))


def _der(path: Path) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(Encoding.DER)


def test_certificate_summary_and_hostname_check(ca: LocalCA) -> None:
    cert = ca.issue("mail", hosts=("mail.example.com", "*.example.org", "192.0.2.7"))
    summary = certificate_summary(_der(cert.cert_path))
    assert summary.subject == "CN=mail"
    assert summary.issuer == "CN=mailwarden test CA"
    assert summary.dns_names == ("mail.example.com", "*.example.org")
    assert summary.ip_addresses == ("192.0.2.7",)
    assert not summary.self_signed
    for host in ("mail.example.com", "MAIL.example.com.", "imap.example.org", "192.0.2.7"):
        assert hostname_matches(summary, host), host
    for host in ("example.org", "a.b.example.org", "other.example.com", "192.0.2.8"):
        assert not hostname_matches(summary, host), host
    lines = format_certificate(summary, summary.not_after - dt.timedelta(days=3), "x.example")
    assert lines[0] == "subject CN=mail"
    assert lines[1] == "issuer  CN=mailwarden test CA"
    assert lines[2].startswith("expires ") and lines[2].endswith(", in 3 days")
    assert lines[3] == (
        "names   mail.example.com, *.example.org, 192.0.2.7; x.example does NOT match"
    )


def test_an_expired_certificate_says_how_long_ago() -> None:
    summary = CertSummary("CN=a", "CN=a", NOW, NOW - dt.timedelta(hours=5), (), (), True)
    lines = format_certificate(summary, NOW, "a")
    assert lines[1] == "issuer  CN=a (self-signed)"
    assert lines[2] == "expires 2026-11-21 22:00 UTC, 5 h ago"
    assert lines[3] == "names   (none); a does NOT match"


def test_token_summary_shows_claims_never_the_token() -> None:
    token = _jwt(
        {
            "aud": "https://outlook.office365.com",
            "roles": ["IMAP.AccessAsApp", "SMTP.SendAsApp"],
            "upn": "box@contoso.com",
        }
    )
    claims = jwt_claims(token)
    text = format_token(len(token), NOW.timestamp() + 3600, NOW, claims)
    assert text == (
        f"{len(token)} chars, expires 2026-11-22 04:00 UTC, in 60 min; "
        "aud https://outlook.office365.com; roles IMAP.AccessAsApp SMTP.SendAsApp; "
        "for box@contoso.com"
    )
    assert token not in text
    app_only = jwt_claims(_jwt({"aud": "x", "roles": ["SMTP.SendAsApp"], "appid": "1234"}))
    assert format_token(9, NOW.timestamp(), NOW, app_only).endswith(
        "; aud x; roles SMTP.SendAsApp; app 1234, no user (app-only)"
    )
    opaque = format_token(40, NOW.timestamp() - 60, NOW, jwt_claims("ya29.a0AfH6SM"))
    assert opaque == "40 chars, expires 2026-11-22 02:59 UTC, 1 min ago; opaque (not a JWT)"
    assert jwt_claims("a.!!!.c") is None


def test_printable_withholds_text_with_a_secret() -> None:
    assert printable("535 5.7.8 bad\r\n\x00x") == "535 5.7.8 bad ?x"
    assert printable("token=abc123 echoed", ["abc123"]).startswith("(withheld")
    assert len(printable("x" * 1000)) == 300


def test_pick_account(tmp_path: Path) -> None:
    class _FakeIdP:
        ca_path = tmp_path / "ca.pem"

        def register_client(self, *_: object) -> None:
            pass

        def token_url(self, tenant: str) -> str:
            return f"https://127.0.0.1:1/{tenant}/oauth2/v2.0/token"

    idp = _FakeIdP()
    lst = listener("SMTP-1", MailProtocol.SMTP, 25, UpstreamTLS.STARTTLS, tmp_path)
    one = config([lst], [app_account(idp, "a@x.example")])  # type: ignore[arg-type]
    assert pick_account(one, None)[1] == "a@x.example"
    assert pick_account(one, "A@x.example")[1] == "A@x.example"
    with pytest.raises(SetupError, match="no account"):
        pick_account(one, "b@x.example")
    two = config([lst], [app_account(idp, "a@x.example"), app_account(idp, "b@x.example")])  # type: ignore[arg-type]
    with pytest.raises(SetupError, match="pass --username"):
        pick_account(two, None)
