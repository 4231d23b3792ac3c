"""The error catalogue: every entry recognisable from what the provider really says, stable
reason codes, concrete fixes, and a reason for every failure (fallbacks)."""

from __future__ import annotations

import base64
import json
import re
import socket
import ssl

import pytest

from mailwarden_proxy.catalogue import (
    ENTRIES,
    Diagnosis,
    Entry,
    Stage,
    backoff_seconds,
    by_reason,
    decode_challenges,
    diagnose_connection,
    diagnose_reply,
    diagnose_token_error,
)
from mailwarden_proxy.protocols.session import FailureKind
from mailwarden_proxy.relay.diagnostics import Backoffs, diagnose

MAIL = (Stage.SMTP, Stage.IMAP, Stage.POP3, Stage.MAIL)
# entries that only the proxy picks by reason (nothing the provider says identifies them)
BY_REASON_ONLY = {"UnknownLocalUser", "LocalPasswordRejected", "LocalLoginRateLimited"}
FALLBACKS = {"TokenRequestFailed", "UpstreamRejectedToken", "UpstreamUnreachable"}


def _diagnose_match(entry: Entry, match: str) -> Diagnosis | None:
    """What the diagnose functions make of `match` as a provider would say it."""
    if entry.stage is Stage.TOKEN:
        if re.fullmatch(r"[a-z_]+", match):  # an OAuth error code
            return diagnose_token_error(match, "")
        return diagnose_token_error("invalid_request", f"{match}: something went wrong")
    if entry.stage in (Stage.CONNECT, Stage.TLS):
        return diagnose_connection(OSError(f"{match} (from the test)"))
    if entry.reason == "ServiceAccountAddressAsUsername":
        return diagnose_reply(entry.stage, "535 5.7.8 no", username=f"svc@proj.iam.{match}")
    stage = Stage.SMTP if entry.stage is Stage.MAIL else entry.stage
    prefix = "" if match[:1].isdigit() else "NO "
    return diagnose_reply(stage, f"{prefix}{match} and more text")


@pytest.mark.parametrize(
    ("entry", "match"),
    [(e, m) for e in ENTRIES for m in e.matches],
    ids=[f"{e.reason}:{m}" for e in ENTRIES for m in e.matches],
)
def test_every_match_reaches_its_entry(entry: Entry, match: str) -> None:
    found = _diagnose_match(entry, match)
    assert found is not None and found.reason == entry.reason


def test_every_entry_is_reachable() -> None:
    without = {e.reason for e in ENTRIES if not e.matches}
    assert without == BY_REASON_ONLY | FALLBACKS


def test_reason_codes_are_unique_camel_case_and_by_reason_finds_them() -> None:
    reasons = [e.reason for e in ENTRIES]
    assert len(reasons) == len(set(reasons))
    for entry in ENTRIES:
        assert re.fullmatch(r"(?:[A-Z][a-z0-9]+)+", entry.reason), entry.reason
        assert by_reason(entry.reason) is entry
    with pytest.raises(KeyError):
        by_reason("NoSuchReason")


def test_entries_are_complete() -> None:
    for entry in ENTRIES:
        assert entry.provider in {"microsoft", "google", "any"}
        assert entry.cause.strip() and entry.cause.rstrip().endswith("."), entry.reason
        assert len(entry.fix) >= 60, entry.reason  # a concrete step, not "check settings"
        assert all(m and m == m.strip() for m in entry.matches), entry.reason


def test_the_issue_list_is_covered() -> None:
    reasons = {e.reason for e in ENTRIES}
    expected_matches = [
        "535 5.7.139",
        "535 5.7.3",
        "530 5.7.57",
        "430 4.2.0 STOREDRV",
        "User is authenticated but not connected",
        "Request is throttled",
        "555 5.5.2",
        '"status":"400"',
        '"status":"401"',
        "Client is unauthorized to retrieve access tokens using this method",
        *(
            f"AADSTS{n}"
            for n in (7000215, 700016, 65001, 50076, 50079, 70043, 700082, 54005, 50126)
        ),
        *(f"AADSTS{n}" for n in (700024, 90002, 500011, 53003, 50034)),
    ]
    matches = {m for e in ENTRIES for m in e.matches}
    assert set(expected_matches) <= matches
    assert {"ServiceAccountAddressAsUsername", "UpstreamCertificateInvalid"} <= reasons
    assert "New-ServicePrincipal" in by_reason("MailboxNotGrantedToApp").fix
    assert "Enterprise applications" in by_reason("MailboxNotGrantedToApp").fix
    assert "Add-MailboxPermission" in by_reason("MailboxNotGrantedToApp").fix


# -- token errors ------------------------------------------------------------------------


def test_token_error_from_a_real_entra_description() -> None:
    found = diagnose_token_error(
        "invalid_client",
        "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the "
        "request is the client secret value, not the client secret ID",
    )
    assert (found.reason, found.provider_code) == ("InvalidClientSecret", "AADSTS7000215")
    assert not found.entry.temporary


def test_the_aadsts_number_beats_the_oauth_code() -> None:
    found = diagnose_token_error("invalid_grant", "AADSTS70043: The refresh token has expired")
    assert found.reason == "RefreshTokenExpired"
    # an AADSTS number the catalogue doesn't know: the OAuth code's entry, the number kept
    unknown = diagnose_token_error("invalid_grant", "AADSTS70000: The grant is invalid")
    assert (unknown.reason, unknown.provider_code) == ("InvalidGrant", "AADSTS70000")
    # whole numbers only: AADSTS700161 is not AADSTS700016
    assert diagnose_token_error("x_y", "AADSTS700161: z").reason == "TokenRequestFailed"


def test_code_words_in_a_description_do_not_match() -> None:
    # "connection" and "timeout" are mailwarden's own codes, not words to search for
    found = diagnose_token_error("access_denied", "the connection timeout policy says no")
    assert found.reason == "TokenRequestFailed"


def test_google_token_errors() -> None:
    dwd = diagnose_token_error(
        "unauthorized_client",
        "Client is unauthorized to retrieve access tokens using this method, or client not "
        "authorized for any of the scopes requested.",
    )
    assert (dwd.reason, dwd.provider_code) == ("GoogleDelegationMissing", "unauthorized_client")
    assert "Domain Wide Delegation" in dwd.entry.fix
    expired = diagnose_token_error("invalid_grant", "Token has been expired or revoked.")
    assert expired.reason == "GoogleRefreshTokenExpired"
    as_user = diagnose_token_error(
        "invalid_grant", "Invalid email or User ID", username="bot@proj.iam.gserviceaccount.com"
    )
    assert as_user.reason == "ServiceAccountAddressAsUsername"


@pytest.mark.parametrize(
    ("code", "reason", "temporary"),
    [
        ("timeout", "IdentityProviderUnavailable", True),
        ("connection", "IdentityProviderUnavailable", True),
        ("server_error", "IdentityProviderUnavailable", True),
        ("http_503", "IdentityProviderUnavailable", True),
        ("tls", "IdentityProviderTlsFailed", True),
        ("http_418", "TokenRequestFailed", False),
        ("something_new", "TokenRequestFailed", False),
    ],
)
def test_token_fallbacks(code: str, reason: str, temporary: bool) -> None:
    found = diagnose_token_error(code, "")
    assert (found.reason, found.entry.temporary, found.provider_code) == (reason, temporary, code)


def test_a_temporary_failure_is_not_blamed_on_the_username() -> None:
    found = diagnose_token_error("timeout", "", username="bot@p.iam.gserviceaccount.com")
    assert found.reason == "IdentityProviderUnavailable"


# -- mail server replies -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "reply", "reason", "code"),
    [
        (
            Stage.SMTP,
            "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for "
            "the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.",
            "SmtpAuthDisabled",
            "535 5.7.139",
        ),
        (
            Stage.SMTP,
            "535 5.7.139 Authentication unsuccessful, user is locked by your organization's "
            "security defaults policy. Contact your administrator.",
            "SmtpAuthBlockedByPolicy",
            "535 5.7.139",
        ),
        (Stage.SMTP, "535 5.7.3 Authentication unsuccessful", "SmtpAuthUnsuccessful", None),
        (
            Stage.SMTP,
            "430 4.2.0 STOREDRV; mailbox logon failure; Cannot open mailbox",
            "MailboxNotGrantedToApp",
            "430 4.2.0",
        ),
        (Stage.SMTP, "555-5.5.2 Syntax error, command line too long", "SmtpLineTooLong", None),
        (Stage.IMAP, "BAD User is authenticated but not connected.", None, None),
        (Stage.IMAP, "NO AUTHENTICATE failed.", "ImapAuthenticateFailed", None),
        (
            Stage.POP3,
            "-ERR Logon failure: unknown user name or bad password.",
            "Pop3LogonFailure",
            None,
        ),
        (
            Stage.IMAP,
            "NO [ALERT] Your account is not enabled for IMAP use. Please visit your Gmail "
            "settings page and enable your account for IMAP access. (Failure)",
            "GmailProtocolDisabled",
            None,
        ),
        (Stage.SMTP, "454 4.7.0 Too many login attempts, please try again later.", None, None),
        (Stage.IMAP, "NO [UNAVAILABLE] Temporary failure", "UpstreamTemporaryFailure", None),
        (Stage.SMTP, "451 4.3.0 Something unusual", "UpstreamTemporaryFailure", "451 4.3.0"),
        (Stage.POP3, "-ERR no idea", "UpstreamRejectedToken", "-ERR no idea"),
    ],
)
def test_replies(stage: Stage, reply: str, reason: str | None, code: str | None) -> None:
    found = diagnose_reply(stage, reply)
    assert found is not None
    if reason is not None:
        assert found.reason == reason
    if code is not None:
        assert found.provider_code == code


def test_throttling_reply_and_its_backoff() -> None:
    reply = "BAD Request is throttled. Suggested Backoff Time: 155000 milliseconds"
    found = diagnose_reply(Stage.IMAP, reply)
    assert found is not None and found.reason == "Throttled" and found.entry.temporary
    assert backoff_seconds(reply) == 155.0
    assert backoff_seconds("BAD Request is throttled.") is None


def _challenge(payload: dict[str, str], spaced: bool = False) -> str:
    text = json.dumps(payload) if spaced else json.dumps(payload, separators=(",", ":"))
    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize("spaced", [False, True])
def test_google_error_challenge_base64_or_decoded(spaced: bool) -> None:
    payload = {"status": "400", "schemes": "Bearer", "scope": "https://mail.google.com/"}
    for reply in (
        f"334 {_challenge(payload, spaced)}",
        f"535-5.7.8 Username and Password not accepted. {json.dumps(payload)}",
    ):
        found = diagnose_reply(Stage.SMTP, reply)
        assert found is not None and found.reason == "GoogleTokenNotForUser", reply
        assert "status 400" in found.provider_code
    raw = json.dumps({"status": "401", "schemes": "bearer"})
    found = diagnose_reply(Stage.IMAP, f"NO [AUTHENTICATIONFAILED] Authentication failed. {raw}")
    assert found is not None and found.reason == "TokenRejected"
    assert found.provider_code.startswith("NO [AUTHENTICATIONFAILED]")


def test_service_account_address_as_login_name() -> None:
    challenge = json.dumps({"status": "400"})
    found = diagnose_reply(
        Stage.IMAP, f"NO Invalid credentials {challenge}", username="x@p.iam.gserviceaccount.com"
    )
    assert found is not None and found.reason == "ServiceAccountAddressAsUsername"


def test_success_and_empty_replies_are_no_failure() -> None:
    for reply in ("235 2.7.0 Accepted", "334 ", "+OK logged in", "OK done", "", "  "):
        assert diagnose_reply(Stage.SMTP, reply) is None, reply


def test_a_protocol_entry_is_found_on_another_protocol() -> None:
    found = diagnose_reply(Stage.POP3, "-ERR User is authenticated but not connected.")
    assert found is not None and found.reason == "AuthenticatedButNotConnected"


def test_garbage_never_raises() -> None:
    for reply in ("535 " + "A" * 5000, "{" * 300, "+ " + "eyJ" * 40, "\x00\xff{}", "535"):
        assert diagnose_reply(Stage.SMTP, reply) is not None
    assert decode_challenges("no challenge here") == "no challenge here"


# -- connections -------------------------------------------------------------------------


def test_connection_failures() -> None:
    dns = diagnose_connection(socket.gaierror(-2, "Name or service not known"))
    assert (dns.reason, dns.provider_code) == ("UpstreamHostNotFound", "gaierror")
    refused = diagnose_connection(ConnectionRefusedError(111, "Connect call failed"))
    assert refused.reason == "UpstreamConnectionRefused"
    assert diagnose_connection(TimeoutError()).reason == "UpstreamConnectTimeout"
    cert = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify")
    assert diagnose_connection(cert).reason == "UpstreamCertificateInvalid"
    assert diagnose_connection(ssl.SSLError(1, "[SSL] other")).reason == "UpstreamTlsFailed"
    assert diagnose_connection(OSError("strange")).reason == "UpstreamUnreachable"


# -- the relay's use of it -----------------------------------------------------------------


def test_relay_diagnosis_of_core_failures() -> None:
    def of(kind: FailureKind, detail: str = "", known: bool = True) -> str:
        return diagnose(
            kind, detail, stage=Stage.IMAP, known_user=known, upstream_user="a@b"
        ).reason

    assert of(FailureKind.LOCAL_CREDENTIALS) == "LocalPasswordRejected"
    assert of(FailureKind.LOCAL_CREDENTIALS, known=False) == "UnknownLocalUser"
    assert of(FailureKind.TOKEN_UNAVAILABLE, "temporary") == "IdentityProviderUnavailable"
    assert of(FailureKind.NOT_CONNECTED, "User is authenticated but not connected.") == (
        "AuthenticatedButNotConnected"
    )
    assert of(FailureKind.UPSTREAM_ERROR, "upstream closed the connection") == (
        "UpstreamConnectionLost"
    )
    assert of(FailureKind.UPSTREAM_ERROR, "") == "UpstreamConnectionLost"


def test_backoffs() -> None:
    backoffs = Backoffs()
    assert backoffs.remaining("a", 0.0) == 0.0
    backoffs.hold("a", 2.0, now=10.0)
    backoffs.hold("a", 1.0, now=10.5)  # a shorter wait never shortens the first
    assert backoffs.remaining("a", 11.0) == pytest.approx(1.0)
    assert backoffs.remaining("b", 11.0) == 0.0
    assert backoffs.remaining("a", 12.0) == 0.0 and "a" not in backoffs.until
    backoffs.hold("c", 10**9, now=0.0)  # capped
    assert backoffs.remaining("c", 0.0) <= 900.0
