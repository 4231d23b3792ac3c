"""`mailwarden-proxy --diagnose` against real peers: the local IdP, the aiosmtpd submission
server, Dovecot (IMAP, POP3), and the failures a user meets (an unresolvable host, a closed
port, a certificate for another name or from an unknown CA, the IdP refusing the client,
the mail server refusing the token). The command runs as a user runs it, in a subprocess.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from mailwarden_proxy.config.model import (
    MailProtocol,
    Mechanism,
    ProxyConfig,
    UpstreamTLS,
)
from mailwarden_proxy.config.render import to_native
from mailwarden_proxy.demo.idp import LocalIdP
from mailwarden_proxy.demo.smtpd import LocalSubmissionServer
from mailwarden_proxy.demo.tlsca import LocalCA
from tests.fixtures.dovecot import DovecotServer
from tests.fixtures.mailservers import SubmissionFactory
from tests.integration.proxyconf import (
    LOCAL_PASSWORD,
    app_account,
    config,
    listener,
    refresh_account,
)

ROOT = Path(__file__).resolve().parents[2]
USER = "app@example.com"


def diagnose(
    cfg: ProxyConfig, tmp_path: Path, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    path = write_native(cfg, tmp_path / "proxy.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "mailwarden_proxy.cli", "--config", str(path), "--diagnose",
         "--timeout", "5", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    assert_no_secrets(cfg, proc.stdout + proc.stderr)
    return proc


def write_native(cfg: ProxyConfig, path: Path) -> Path:
    ports = iter(range(1025, 1100))  # a native file names local ports; never bound here
    cfg = replace(
        cfg, listeners=tuple(replace(lst, local_port=next(ports)) for lst in cfg.listeners)
    )
    path.write_text(yaml.safe_dump(to_native(cfg, mask=False), sort_keys=False))
    return path


def assert_no_secrets(cfg: ProxyConfig, output: str) -> None:
    for account in cfg.accounts:
        secret = account.oauth2.client_secret
        assert secret is None or secret.reveal() not in output
    assert LOCAL_PASSWORD not in output
    assert "eyJ" not in output  # no JWT (the local IdP's access tokens are JWTs)


def lines_of(output: str) -> list[str]:
    """The lines, with runs of blanks as one (the columns are not under test)."""
    return [" ".join(line.split()) for line in output.splitlines()]


def step(output: str, name: str) -> str:
    """The first line of step `name` ("✓ TLS ..." / "✗ TLS ...")."""
    found = [
        ln for ln in lines_of(output) if ln[:1] in "✓✗-" and f"{ln[2:]} ".startswith(f"{name} ")
    ]
    assert found, f"no step {name!r} in:\n{output}"
    return found[0]


def smtp_config(idp: LocalIdP, smtpd: LocalSubmissionServer, ca: Path, **kw: object) -> ProxyConfig:
    lst = listener("SMTP-1025", MailProtocol.SMTP, smtpd.port, UpstreamTLS.STARTTLS, ca)
    return config([lst], [app_account(idp, USER, **kw)])  # type: ignore[arg-type]


# -- all green ------------------------------------------------------------------------------


def test_smtp_all_steps_pass(
    idp: LocalIdP, submission_server: LocalSubmissionServer, local_ca: LocalCA, tmp_path: Path
) -> None:
    proc = diagnose(smtp_config(idp, submission_server, local_ca.ca_path), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert lines_of(out)[0].endswith(f"as {USER}: microsoft, clientCredentials, XOAUTH2")
    assert lines_of(out)[1] == f"SMTP 127.0.0.1:{submission_server.port} (STARTTLS)"
    names = ["DNS", "TCP", "greeting", "TLS", "certificate", "token", "login", "MAIL FROM", "RSET"]
    steps = [ln for ln in lines_of(out) if ln[:1] in "✓✗-"]
    assert [step(out, name) for name in names] == steps
    assert all(ln.startswith("✓") for ln in lines_of(out) if ln[:1] in "✓✗-")
    assert "STARTTLS offered" in step(out, "greeting")
    assert "subject CN=submission-server" in out and "issuer  CN=mailwarden test CA" in out
    assert "expires 20" in out and "127.0.0.1 matches" in out
    assert f"trusted: chains to {local_ca.ca_path} + system store" in out
    assert "chars, expires" in out  # the token's length and expiry, never its value
    assert step(out, "MAIL FROM").endswith(f"<{USER}>: 250 2.1.0 OK")
    assert lines_of(out)[-1] == "result: pass (9 checks)"
    [attempt] = submission_server.attempts
    assert attempt.mechanism == "XOAUTH2" and attempt.outcome == "accepted"
    assert not attempt.initial_response  # the token after the 334, as the proxy sends it
    assert submission_server.messages == []  # MAIL FROM + RSET sends nothing
    assert idp.request_count("client_credentials") == 1


@pytest.mark.dovecot
def test_imap_pop3_and_smtp_all_pass_with_one_token(
    idp: LocalIdP,
    dovecot: DovecotServer,
    submission_server: LocalSubmissionServer,
    local_ca: LocalCA,
    tmp_path: Path,
) -> None:
    host, ca = dovecot.host, dovecot.ca_path
    listeners = [
        listener("SMTP-1025", MailProtocol.SMTP, submission_server.port, UpstreamTLS.STARTTLS,
                 local_ca.ca_path),
        listener("IMAP-1143", MailProtocol.IMAP, dovecot.imaps_port, UpstreamTLS.IMPLICIT, ca,
                 host=host),
        listener("POP-1110", MailProtocol.POP3, dovecot.pop3_port, UpstreamTLS.STARTTLS, ca,
                 host=host),
    ]  # fmt: skip
    account = app_account(idp, USER, mechanism=Mechanism.OAUTHBEARER)
    dovecot.reset_mail()
    dovecot.deliver(USER, b"Subject: hello\r\n\r\nbody\r\n")
    proc = diagnose(config(listeners, [account]), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    headings = [ln.split()[0] for ln in lines_of(out) if ln.split()[0] in {"IMAP", "POP3", "SMTP"}]
    assert headings == ["IMAP", "POP3", "SMTP"]  # a login there proves the token, no mail sent
    assert step(out, "login") == "✓ login OAUTHBEARER as app@example.com: OK Logged in"
    assert step(out, "NOOP").startswith("✓")
    assert step(out, "EXAMINE INBOX") == "✓ EXAMINE INBOX 1 message"
    assert step(out, "STAT") == "✓ STAT 1 message, 24 bytes"
    assert lines_of(out).count("✓ token the one above") == 2
    assert idp.request_count("client_credentials") == 1
    assert lines_of(out)[-1].startswith("result: pass")


# -- reaching the server --------------------------------------------------------------------


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_unresolvable_host_fails_at_dns_with_the_hint(
    idp: LocalIdP, local_ca: LocalCA, tmp_path: Path
) -> None:
    lst = listener("SMTP-1025", MailProtocol.SMTP, 587, UpstreamTLS.STARTTLS, local_ca.ca_path,
                   host="no-such-host.invalid")  # fmt: skip
    proc = diagnose(config([lst], [app_account(idp, USER)]), tmp_path)
    assert proc.returncode == 1
    out = proc.stdout
    assert step(out, "DNS").startswith("✗ DNS no-such-host.invalid: ")
    assert "reason: UpstreamHostNotFound" in out
    assert "fix:" in out
    assert "TCP" not in out and "token" not in out
    assert idp.request_count() == 0
    assert lines_of(out)[-1].startswith("result: FAIL (1 of 1 checks failed; first: DNS)")


def test_closed_port_fails_at_tcp(idp: LocalIdP, local_ca: LocalCA, tmp_path: Path) -> None:
    port = _unused_port()
    lst = listener("IMAP-1143", MailProtocol.IMAP, port, UpstreamTLS.IMPLICIT, local_ca.ca_path)
    proc = diagnose(config([lst], [app_account(idp, USER)]), tmp_path)
    assert proc.returncode == 1
    assert step(proc.stdout, "TCP") == f"✗ TCP 127.0.0.1:{port}: connection refused"
    assert "reason: UpstreamConnectionRefused" in proc.stdout


def test_implicit_tls_against_a_starttls_port(
    idp: LocalIdP, submission_server: LocalSubmissionServer, local_ca: LocalCA, tmp_path: Path
) -> None:
    lst = listener("SMTP-1025", MailProtocol.SMTP, submission_server.port, UpstreamTLS.IMPLICIT,
                   local_ca.ca_path)  # fmt: skip
    proc = diagnose(config([lst], [app_account(idp, USER)]), tmp_path)
    assert proc.returncode == 1
    assert step(proc.stdout, "TLS").startswith("✗ TLS")
    assert "reason: TlsModeMismatch" in proc.stdout


def test_starttls_against_an_implicit_tls_port(
    idp: LocalIdP, make_submission_server: SubmissionFactory, local_ca: LocalCA, tmp_path: Path
) -> None:
    server = make_submission_server("implicit")
    lst = listener("SMTP-1025", MailProtocol.SMTP, server.port, UpstreamTLS.STARTTLS,
                   local_ca.ca_path)  # fmt: skip
    proc = diagnose(config([lst], [app_account(idp, USER)]), tmp_path, "--timeout", "1")
    assert proc.returncode == 1
    assert step(proc.stdout, "greeting") == "✗ greeting no answer within 1 s"
    assert "reason: TlsModeMismatch" in proc.stdout


@pytest.mark.parametrize("problem", ["wrong-name", "unknown-ca"])
def test_certificate_refused_shows_what_the_server_presents(
    problem: str, idp: LocalIdP, local_ca: LocalCA, tmp_path: Path
) -> None:
    if problem == "wrong-name":
        cert = local_ca.issue("elsewhere", hosts=("mail.elsewhere.example",))
    else:
        cert = LocalCA(tmp_path / "other-ca", name="some other CA").issue("rogue")
    with LocalSubmissionServer(idp.is_valid, tls="implicit", cert=cert).start() as server:
        lst = listener("SMTP-1025", MailProtocol.SMTP, server.port, UpstreamTLS.IMPLICIT,
                       local_ca.ca_path)  # fmt: skip
        proc = diagnose(config([lst], [app_account(idp, USER)]), tmp_path)
        assert server.auth_attempts == 0
    out = proc.stdout
    assert proc.returncode == 1, out
    assert step(out, "TLS").startswith("✓ TLS TLSv1.3 (the handshake works")
    assert step(out, "certificate").startswith("✗ certificate")
    if problem == "wrong-name":
        assert "IP address mismatch" in step(out, "certificate")
        assert "subject CN=elsewhere" in out
        assert "names   mail.elsewhere.example; 127.0.0.1 does NOT match" in out
    else:
        assert "not trusted: unable to get local issuer certificate" in out
        assert "issuer  CN=some other CA" in out and "127.0.0.1 matches" in out
    assert f"(verified against {local_ca.ca_path} + system store)" in out
    assert "reason: UpstreamCertificateInvalid" in out
    assert "token" not in out and idp.request_count() == 0


# -- the identity provider and the mail server say no ------------------------------------------


def test_idp_refusing_the_client(
    idp: LocalIdP, submission_server: LocalSubmissionServer, local_ca: LocalCA, tmp_path: Path
) -> None:
    idp.set_failure("invalid_client")
    cfg = smtp_config(idp, submission_server, local_ca.ca_path)
    proc = diagnose(cfg, tmp_path)  # also asserts that the client secret is not printed
    out = proc.stdout
    assert proc.returncode == 1, out
    assert step(out, "certificate").startswith("✓")  # the transport steps still ran
    assert step(out, "token").startswith("✗ token 127.0.0.1: invalid_client: AADSTS7000215")
    assert "reason: InvalidClientSecret, microsoft code AADSTS7000215" in out
    assert step(out, "login") == "- login no token"
    assert submission_server.auth_attempts == 0


def test_mail_server_refusing_the_token(
    idp: LocalIdP, submission_server: LocalSubmissionServer, local_ca: LocalCA, tmp_path: Path
) -> None:
    submission_server.reject_next_tokens(1)
    proc = diagnose(smtp_config(idp, submission_server, local_ca.ca_path), tmp_path)
    out = proc.stdout
    assert proc.returncode == 1, out
    login = step(out, "login")
    assert login.startswith("✗ login XOAUTH2 as app@example.com: 535 5.7.8 ")
    assert '"status":"401"' in login  # the decoded error challenge
    assert "reason: TokenRejected" in out
    [attempt] = submission_server.attempts
    assert attempt.outcome == "rejected" and attempt.error_response == b""
    assert "MAIL FROM" not in out


def test_follow_up_refusal_gets_its_hint(
    idp: LocalIdP, submission_server: LocalSubmissionServer, local_ca: LocalCA, tmp_path: Path
) -> None:
    submission_server.script_reply("MAIL", "530 5.7.57 Client not authenticated to send mail")
    proc = diagnose(smtp_config(idp, submission_server, local_ca.ca_path), tmp_path)
    out = proc.stdout
    assert proc.returncode == 1, out
    assert step(out, "login").startswith("✓")
    assert step(out, "MAIL FROM").startswith(f"✗ MAIL FROM <{USER}>: 530 5.7.57")
    assert "reason: NotAuthenticatedToSend" in out


@pytest.mark.dovecot
def test_dovecot_refusing_a_token_for_another_user(
    idp: LocalIdP, dovecot: DovecotServer, tmp_path: Path
) -> None:
    lst = listener("IMAP-1143", MailProtocol.IMAP, dovecot.imap_port, UpstreamTLS.STARTTLS,
                   dovecot.ca_path, host=dovecot.host)  # fmt: skip
    account = refresh_account(idp, "someone-else@example.com")
    account = replace(account, upstream_username=USER)
    proc = diagnose(config([lst], [account]), tmp_path, "--username", "someone-else@example.com")
    out = proc.stdout
    assert proc.returncode == 1, out
    assert "STARTTLS offered" in step(out, "greeting")
    assert step(out, "login").startswith(f"✗ login XOAUTH2 as {USER}: NO ")
    assert "reason: TokenRejected, code NO " in out


def test_a_host_name_is_resolved_and_every_address_tried(
    idp: LocalIdP, submission_server: LocalSubmissionServer, local_ca: LocalCA, tmp_path: Path
) -> None:
    addresses = {info[4][0] for info in socket.getaddrinfo("localhost", 1, type=socket.SOCK_STREAM)}
    lst = listener("SMTP-1025", MailProtocol.SMTP, submission_server.port, UpstreamTLS.STARTTLS,
                   local_ca.ca_path, host="localhost")  # fmt: skip
    proc = diagnose(config([lst], [app_account(idp, USER)]), tmp_path, "--no-mail-from")
    out = proc.stdout
    assert proc.returncode == 0, out
    dns = step(out, "DNS")
    assert dns.startswith("✓ DNS localhost → ")
    assert set(dns.split(" → ")[1].split(", ")) == addresses
    assert f"127.0.0.1:{submission_server.port} in" in step(out, "TCP")
    if dns.find("::1") >= 0 and dns.find("::1") < dns.find("127.0.0.1"):
        assert f"(after [::1]:{submission_server.port}: connection refused)" in step(out, "TCP")
    assert "localhost matches" in out
    assert step(out, "NOOP") == "✓ NOOP 250 OK"


# -- nothing to diagnose: exit 2 ------------------------------------------------------------

EXAMPLES = ROOT.parent / "shared" / "examples"


def _proxy(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "mailwarden_proxy.cli", *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_usage_errors_exit_2(idp: LocalIdP, local_ca: LocalCA, tmp_path: Path) -> None:
    # an emailproxy file's [@] section serves any mailbox: which one?
    example = EXAMPLES / "emailproxy-office365.config"
    proc = _proxy("--config", str(example), "--diagnose")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "the configuration has accounts @: pass --username" in proc.stderr
    lst = listener("SMTP-1025", MailProtocol.SMTP, 587, UpstreamTLS.STARTTLS, local_ca.ca_path)
    path = write_native(config([lst], [app_account(idp, USER)]), tmp_path / "proxy.yaml")
    proc = _proxy("--config", str(path), "--diagnose", "--username", "other@example.com")
    assert proc.returncode == 2 and "no account of the configuration serves" in proc.stderr
    proc = _proxy("--config", str(path), "--diagnose", "--protocol", "imap")
    assert proc.returncode == 2 and "no listener for the protocols asked for" in proc.stderr
    assert proc.stdout == ""
    assert idp.request_count() == 0
