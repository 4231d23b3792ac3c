"""`mailwarden register` / `import` / `test` without a cluster: flag mapping, presets left
out, the two shared examples, and the errors (exit 2, flag or section named, no traceback)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailwarden_operator import cli, mailtest, manifests
from mailwarden_operator.cli_register import RegisterFlags, ServerFlags, account_from_flags
from mailwarden_operator.spec import parse_spec
from mailwarden_proxy.config.errors import ConfigError
from mailwarden_proxy.config.load import loads
from mailwarden_proxy.config.model import MailProtocol, UpstreamTLS

EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "examples"
if not EXAMPLES.is_dir():  # the checkout may live elsewhere; the brief names this path
    EXAMPLES = Path("/work/shared/examples")
GOOD = EXAMPLES / "emailproxy-office365.config"
PUBLISHED = EXAMPLES / "emailproxy-office365-as-published.config"

TENANT = "contoso.onmicrosoft.com"
MS = "https://login.microsoftonline.com"
# what the deployment guide prints, with its stray spaces, for a real tenant
GUIDE = [
    "--imap-server-address=outlook.office365.com",
    "--imap-server-port=993",
    "--smtp-server-address=smtp.office365.com",
    "--smtp-server-port=587",
    "--smtp-server-starttls",
    f"--oauth2-token-url={MS}/{TENANT}/oauth2/v2.0/token ",
    f"--oauth2-permission-url={MS}/{TENANT}/oauth2/v2.0/authorize ",
    "--oauth2-scope= https://outlook.office365.com/IMAP.AccessAsUser.All "
    "https://outlook.office365.com/SMTP.Send offline_access ",
    "--oauth2-flow=client_credentials",
    "--oauth2-client-id=11111111-2222-3333-4444-555555555555",
    "--oauth2-client-secret=s3cr~et.value",
    "--force",
]
WHO = ["--name", "vault", "--username", "vault@contoso.com"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[Any], str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    docs = [d for d in yaml.safe_load_all(out) if d] if code == 0 and out.strip() else []
    assert "Traceback" not in err
    return code, docs, err


def register(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[Any], str]:
    return run(capsys, "register", *WHO, *argv)


# --- register -----------------------------------------------------------------------------


def test_the_guides_register_command_becomes_a_short_mailaccount(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, docs, err = register(capsys, *GUIDE, "--namespace", "apps")
    assert code == 0, err
    secret, account = docs
    assert secret == {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": "vault-oauth2-client",
            "namespace": "apps",
            "labels": {"app.kubernetes.io/created-by": "mailwarden-cli"},
        },
        "type": "Opaque",
        "stringData": {"client-secret": "s3cr~et.value"},
    }
    assert account["apiVersion"] == "mailwarden.io/v1alpha1"
    assert account["kind"] == "MailAccount"
    assert account["metadata"]["name"] == "vault"
    # servers equal the Microsoft presets, scopes map to the preset .default: all left out
    assert account["spec"] == {
        "provider": "microsoft",
        "username": "vault@contoso.com",
        "oauth2": {
            "flow": "clientCredentials",
            "clientId": "11111111-2222-3333-4444-555555555555",
            "tenantId": TENANT,
            "clientSecretRef": {"name": "vault-oauth2-client", "key": "client-secret"},
        },
        "imap": {},
        "smtp": {},
    }
    # the same warnings the emailproxy loader gives for the same settings, named by flag
    assert "--oauth2-flow: emailproxy ignores --oauth2-flow client_credentials" in err
    assert "--oauth2-scope: clientCredentials cannot use delegated scopes" in err
    assert "s3cr~et" not in err


def test_a_markdown_link_token_url_is_refused_naming_the_flag_and_the_scope_is_linted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad_url = f"[{MS}/T/oauth2/v2.0/token]({MS}/T/oauth2/v2.0/token%22%5C)"
    argv = [a for a in GUIDE if not a.startswith(("--oauth2-token-url", "--oauth2-scope"))]
    code, docs, err = register(
        capsys,
        *argv,
        f"--oauth2-token-url={bad_url}",
        "--oauth2-scope=https://outlook.office365.com/SMPT.Send offline_access",
    )
    assert code == 2
    assert docs == []
    assert "--oauth2-token-url:" in err
    assert "Markdown link" in err
    assert "did you mean `https://outlook.office365.com/SMTP.Send`" in err


def test_a_misspelt_scope_is_a_warning_and_kept(capsys: pytest.CaptureFixture[str]) -> None:
    code, docs, err = register(
        capsys,
        "--imap-server-address=outlook.office365.com",
        f"--oauth2-token-url={MS}/common/oauth2/v2.0/token",
        "--oauth2-flow=device",
        "--oauth2-client-id=cid",
        "--oauth2-scope=https://outlook.office365.com/IMAP.AccessAsUser.Al offline_access",
    )
    assert code == 0, err
    assert "warning: --oauth2-scope: `https://outlook.office365.com/IMAP.AccessAsUser.Al`" in err
    spec = docs[-1]["spec"]
    assert spec["oauth2"]["scopes"] == [
        "https://outlook.office365.com/IMAP.AccessAsUser.Al",
        "offline_access",
    ]
    assert len(docs) == 1  # deviceCode has no client secret: no Secret


@pytest.mark.parametrize(
    ("flags", "flow"),
    [
        (["--oauth2-flow=client_credentials", "--oauth2-client-secret=x"], "clientCredentials"),
        (["--oauth2-flow=authorization_code"], "authorizationCode"),
        ([f"--oauth2-permission-url={MS}/{TENANT}/oauth2/v2.0/authorize"], "authorizationCode"),
        (["--oauth2-flow=device"], "deviceCode"),
        (["--oauth2-flow=password"], "password"),
        (["--oauth2-flow=deviceCode"], "deviceCode"),  # the MailAccount spelling works too
    ],
)
def test_emailproxy_flow_names_map_to_mailaccount_flows(
    capsys: pytest.CaptureFixture[str], flags: list[str], flow: str
) -> None:
    code, docs, err = register(
        capsys,
        "--smtp-server-address=smtp.office365.com",
        "--smtp-server-starttls",
        f"--oauth2-token-url={MS}/{TENANT}/oauth2/v2.0/token",
        "--oauth2-client-id=cid",
        *flags,
    )
    assert code == 0, err
    spec = docs[-1]["spec"]
    assert spec["oauth2"]["flow"] == flow
    assert spec["smtp"] == {}
    assert "authorizeUrl" not in spec["oauth2"]  # the tenant's own authorize URL is implied
    parse_spec(spec)  # what the operator would accept
    if flow == "password":
        assert spec["oauth2"]["passwordRef"] == {"name": "vault-oauth2-client", "key": "password"}
        assert docs[0]["stringData"] == {}
        assert "add the mailbox password to Secret vault-oauth2-client" in err


def test_service_account_key_goes_to_the_secret(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    key = {"type": "service_account", "client_email": "sa@p.iam.gserviceaccount.com"}
    key["private_key"] = "-----BEGIN PRIVATE KEY-----\nMII\n-----END PRIVATE KEY-----\n"
    path = tmp_path / "key.json"
    path.write_text(json.dumps(key))
    code, docs, err = run(
        capsys,
        "register",
        "--name=gmail",
        "--username=box@example.com",
        "--imap-server-address=imap.gmail.com",
        "--imap-server-port=993",
        "--oauth2-token-url=https://oauth2.googleapis.com/token",
        "--oauth2-flow=service_account",
        "--oauth2-client-id=file",
        f"--oauth2-client-secret={path}",
    )
    assert code == 0, err
    secret, account = docs
    assert json.loads(secret["stringData"]["key.json"]) == key
    assert account["spec"]["provider"] == "google"
    assert account["spec"]["imap"] == {}
    assert account["spec"]["oauth2"] == {
        "flow": "serviceAccount",
        "serviceAccountKeyRef": {"name": "gmail-oauth2-client", "key": "key.json"},
    }
    assert "BEGIN PRIVATE KEY" not in err


def test_client_secret_from_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "s").write_text("from-file\n")
    argv = [a for a in GUIDE if not a.startswith("--oauth2-client-secret")]
    code, docs, _ = register(capsys, *argv, f"--oauth2-client-secret-file={tmp_path / 's'}")
    assert code == 0
    assert docs[0]["stringData"] == {"client-secret": "from-file"}


@pytest.mark.parametrize(
    ("argv", "named", "text"),
    [
        (["--oauth2-flow=client_credential"], "--oauth2-flow", "did you mean `client_credentials`"),
        ([], "--oauth2-flow", "is required when there is no --oauth2-permission-url"),
        (["--oauth2-flow=device", "--imap-server-port=143"], "--imap-server-port", "needs"),
        (["--oauth2-flow=client_credentials"], "--oauth2-client-secret", "is required"),
    ],
)
def test_register_errors_name_the_flag(
    capsys: pytest.CaptureFixture[str], argv: list[str], named: str, text: str
) -> None:
    code, _, err = register(
        capsys,
        "--smtp-server-address=smtp.office365.com",
        f"--oauth2-token-url={MS}/{TENANT}/oauth2/v2.0/token",
        "--oauth2-client-id=cid",
        *argv,
    )
    assert code == 2
    assert f"mailwarden register: {named}: " in err
    assert text in err


def test_register_needs_a_server_and_a_valid_name(capsys: pytest.CaptureFixture[str]) -> None:
    token = f"--oauth2-token-url={MS}/{TENANT}/oauth2/v2.0/token"
    code, _, err = register(capsys, token, "--oauth2-flow=device", "--oauth2-client-id=c")
    assert code == 2
    assert "at least one of --imap-server-address" in err
    code, _, err = run(capsys, "register", "--name=Vault_1", "--username=a@b.c", *GUIDE)
    assert code == 2
    assert "--name: 'Vault_1' is not a valid MailAccount name" in err
    code, _, err = run(capsys, "register", "--name=v", "--username=@contoso.com", *GUIDE)
    assert code == 2
    assert "--username: '@contoso.com' must be the mailbox address" in err


def test_the_operator_would_refuse_is_fatal_only_when_applying(
    capsys: pytest.CaptureFixture[str],
) -> None:
    guide = [a.replace(TENANT, "TENANT_ID") for a in GUIDE]
    code, docs, err = register(capsys, *guide)
    assert code == 0
    assert docs[-1]["spec"]["oauth2"]["tenantId"] == "TENANT_ID"
    assert "the tenant id 'TENANT_ID' looks like a placeholder" in err
    assert "the operator would refuse the MailAccount vault as it is" in err
    code, _, err = register(capsys, *guide, "--apply")
    assert code == 2
    assert "spec.oauth2.tenantId" in err


# --- presets left out ------------------------------------------------------------------------


def _flags(**servers: ServerFlags) -> RegisterFlags:
    return RegisterFlags(
        username="box@example.com",
        token_url=f"{MS}/{TENANT}/oauth2/v2.0/token",
        flow="client_credentials",
        client_id="cid",
        client_secret="sec",
        **servers,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        (ServerFlags("outlook.office365.com", 993), {}),
        (ServerFlags("OUTLOOK.office365.com"), {}),
        (ServerFlags("outlook.office365.com", 1993), {"port": 1993}),
        (ServerFlags("outlook.office365.com", 143, starttls=True), {"tls": "starttls"}),
        (ServerFlags("imap.example.net", 993), {"host": "imap.example.net"}),
        (ServerFlags("outlook.office365.com", local_port=2993), {}),
    ],
)
def test_imap_servers_equal_to_the_preset_are_left_out(
    server: ServerFlags, expected: dict[str, Any]
) -> None:
    account, listeners = account_from_flags(_flags(imap=server))
    built = manifests.build(account, listeners, name="box", username="box@example.com")
    spec = built.mail_account["spec"]
    assert spec["imap"] == expected
    assert spec.get("local", {}) == ({"imapPort": 2993} if server.local_port else {})
    # whatever was left out, the operator resolves back to the same server
    resolved = parse_spec(spec).imap
    assert resolved is not None
    up = listeners[0].upstream
    assert (resolved.host.lower(), resolved.port, resolved.tls) == (
        up.host.lower(),
        up.port,
        up.tls,
    )


def test_a_generic_provider_spells_everything_out() -> None:
    flags = RegisterFlags(
        username="box@example.org",
        smtp=ServerFlags("mail.example.org", 465),
        token_url="https://idp.example.org/token",
        scope="mail",
        flow="client_credentials",
        client_id="cid",
        client_secret="sec",
    )
    account, listeners = account_from_flags(flags)
    spec = manifests.build(account, listeners, name="b", username="box@example.org").mail_account[
        "spec"
    ]
    assert spec["provider"] == "generic"
    assert spec["smtp"] == {"host": "mail.example.org", "tls": "implicit"}
    assert spec["oauth2"]["tokenUrl"] == "https://idp.example.org/token"
    assert spec["oauth2"]["scopes"] == ["mail"]
    resolved = parse_spec(spec).smtp
    assert resolved is not None
    assert (resolved.port, resolved.tls) == (465, UpstreamTLS.IMPLICIT)


def test_google_smtp_over_starttls_keeps_only_the_tls_mode() -> None:
    flags = RegisterFlags(
        username="box@example.com",
        smtp=ServerFlags("smtp.gmail.com", 587, starttls=True),
        token_url="https://oauth2.googleapis.com/token",
        flow="authorization_code",
        client_id="cid",
        client_secret="sec",
    )
    account, listeners = account_from_flags(flags)
    spec = manifests.build(account, listeners, name="b", username="box@example.com").mail_account[
        "spec"
    ]
    assert spec["smtp"] == {"tls": "starttls"}
    assert "scopes" not in spec["oauth2"]  # https://mail.google.com/ is the preset
    resolved = parse_spec(spec).smtp
    assert resolved is not None
    assert (resolved.host, resolved.port) == ("smtp.gmail.com", 587)


# --- import ----------------------------------------------------------------------------------


def test_the_shared_example_imports_with_the_mailbox_as_username(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, docs, err = run(capsys, "import", str(GOOD), "--username", "vault@contoso.com")
    assert code == 0, err
    secret, account = docs
    assert secret["stringData"] == {"client-secret": "CLIENT_SECRET"}
    assert account["metadata"]["name"] == "vault-contoso-com"
    spec = account["spec"]
    assert spec["username"] == "vault@contoso.com"
    assert spec["oauth2"]["flow"] == "clientCredentials"
    assert "scopes" not in spec["oauth2"]  # the delegated scopes map to the preset .default
    assert spec["imap"] == {} and spec["smtp"] == {}
    assert spec["local"] == {"imapPort": 2993, "smtpPort": 2465}
    assert "redirect_list_address: unknown key" in err
    assert "looks like a placeholder" in err
    # with the placeholder tenant filled in, the operator resolves the guide's servers
    spec["oauth2"]["tenantId"] = TENANT
    resolved = parse_spec(spec)
    assert resolved.imap is not None and resolved.smtp is not None
    assert (resolved.imap.host, resolved.imap.port) == ("outlook.office365.com", 993)
    assert (resolved.smtp.host, resolved.smtp.port, resolved.smtp.tls) == (
        "smtp.office365.com",
        587,
        UpstreamTLS.STARTTLS,
    )
    assert resolved.oauth2.scopes == ("https://outlook.office365.com/.default",)
    assert resolved.local.port_for(MailProtocol.SMTP) == 2465


def test_a_catch_all_without_username_is_refused_saying_what_to_pass(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, docs, err = run(capsys, "import", str(GOOD))
    assert code == 2
    assert docs == []
    assert "[@]: a catch-all section serves any mailbox" in err
    assert "pass --username MAILBOX" in err


def test_the_as_published_example_is_refused_naming_token_url(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, docs, err = run(capsys, "import", str(PUBLISHED), "--username", "vault@contoso.com")
    assert code == 2
    assert docs == []
    assert "[@] token_url:" in err
    assert "SMPT.Send" in err  # the loader's scope warning still reaches the user


def test_import_named_sections_and_a_catch_all(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "emailproxy.config"
    path.write_text(
        f"""
[emailproxy]
allow_catch_all_accounts = True
[IMAP-1993]
server_address = outlook.office365.com
server_port = 993
local_address = 127.0.0.1
[POP-1995]
server_address = pop.example.net
server_port = 995
local_address = 127.0.0.1
[a@contoso.com]
token_url = {MS}/{TENANT}/oauth2/v2.0/token
oauth2_flow = client_credentials
client_id = cid
client_secret = one
[@example.net]
token_url = {MS}/example.net/oauth2/v2.0/token
oauth2_flow = client_credentials
client_id = cid2
client_secret = two
"""
    )
    code, docs, err = run(
        capsys,
        "import",
        str(path),
        "--username=x@example.net",
        "--username=a@contoso.com",
        "--name-prefix=mw-",
    )
    assert code == 0, err
    names = [d["metadata"]["name"] for d in docs]
    assert names == [
        "mw-a-contoso-com-oauth2-client",
        "mw-a-contoso-com",
        "mw-x-example-net-oauth2-client",
        "mw-x-example-net",
    ]
    second = docs[3]["spec"]
    assert second["username"] == "x@example.net"
    assert second["oauth2"]["tenantId"] == "example.net"
    assert docs[2]["stringData"] == {"client-secret": "two"}
    assert second["pop3"] == {"host": "pop.example.net"}
    assert second["local"] == {"imapPort": 1993, "pop3Port": 1995}
    code, _, err = run(capsys, "import", str(path), "--username=x@example.net", "--name=one")
    assert code == 2
    assert "--name needs exactly one account; the file yields 2" in err
    code, _, err = run(capsys, "import", str(path), "--username=x@elsewhere.org")
    assert code == 2
    assert "--username x@elsewhere.org: no account section of the file serves it" in err


def test_settings_a_mailaccount_cannot_hold_are_warned_about() -> None:
    config = loads(
        f"""
[emailproxy]
[IMAP-1993]
server_address = outlook.office365.com
server_port = 993
local_address = 0.0.0.0
[IMAP-1994]
server_address = imap.example.net
server_port = 993
local_address = 127.0.0.1
[a@contoso.com]
token_url = {MS}/{TENANT}/oauth2/v2.0/token
oauth2_flow = client_credentials
client_id = cid
client_secret = one
"""
    )
    built = manifests.build(
        config.accounts[0], config.listeners, name="a", username="a@contoso.com"
    )
    assert built.mail_account["spec"]["imap"] == {}
    assert any("[IMAP-1994]: a MailAccount has one imap server" in w for w in built.warnings)
    assert any("local_address 0.0.0.0 is not carried over" in w for w in built.warnings)


def test_apply_without_kubectl_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    code, _, err = register(capsys, *GUIDE, "--apply")
    assert code == 2
    assert "--apply needs kubectl on PATH" in err


def test_names_derived_from_mailboxes() -> None:
    assert manifests.name_for("Vault.Notify@Contoso.com", "mw-") == "mw-vault-notify-contoso-com"
    assert len(manifests.name_for("x" * 100 + "@example.com")) <= 63 - len("-oauth2-client")
    with pytest.raises(ConfigError):
        manifests.check_name("-bad")


# --- test: loading the rendered Secret --------------------------------------------------------


def test_a_rendered_secret_is_laid_out_like_the_sidecar_mount(tmp_path: Path) -> None:
    proxy_yaml = f"""
version: 1
listeners:
  - protocol: smtp
    local: {{port: 1025}}
    upstream: {{host: smtp.office365.com, port: 587, tls: starttls}}
accounts:
  - username: box@contoso.com
    localPasswordFile: /etc/mailwarden/local-password
    oauth2:
      provider: microsoft
      flow: clientCredentials
      tenantId: {TENANT}
      clientId: cid
      clientSecretFile: /etc/mailwarden/client-secret
metrics: {{port: 9464}}
"""
    data = {
        "proxy.yaml": proxy_yaml.encode(),
        "local-password": b"local-pw",
        "username": b"box@contoso.com",
        "client-secret": b"sec",
    }
    target = mailtest.target_from_secret(data, "box", tmp_path)
    assert target.username == "box@contoso.com"
    assert target.password == "local-pw"
    secret = target.config.accounts[0].oauth2.client_secret
    assert secret is not None and secret.reveal() == "sec"
    test_config = mailtest.for_test(target.config)
    assert [lst.local_port for lst in test_config.listeners] == [0]
    assert test_config.metrics.port == 0
    with pytest.raises(mailtest.TestSetupError, match=r"has no key 'proxy\.yaml'"):
        mailtest.target_from_secret({"local-password": b"x"}, "box", tmp_path)


def test_test_needs_exactly_one_target(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "test", "--to", "a@b.c")
    assert code == 2
    assert "give either a MailAccount name or --config FILE" in err


def test_base64_secret_data_is_decoded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """fetch_secret runs the user's kubectl; a fake one on PATH stands in for it here."""
    body = {"data": {"proxy.yaml": base64.b64encode(b"x: 1").decode()}}
    fake = tmp_path / "kubectl"
    fake.write_text(f"#!/bin/sh\necho '{json.dumps(body)}'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert mailtest.fetch_secret("box", "ns", None) == {"proxy.yaml": b"x: 1"}


def test_a_native_file_carries_its_refresh_token_and_password(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(
        f"""
version: 1
listeners:
  - protocol: imap
    local: {{port: 1143}}
    upstream: {{host: outlook.office365.com}}
accounts:
  - username: a@contoso.com
    localPassword: local
    oauth2: {{provider: microsoft, flow: refreshToken, tenantId: {TENANT}, clientId: c,
             refreshToken: rt-value}}
  - username: b@contoso.com
    localPassword: local
    oauth2: {{provider: microsoft, flow: password, tenantId: {TENANT}, clientId: c,
             password: mailbox-pw}}
"""
    )
    code, docs, err = run(capsys, "import", str(path))
    assert code == 0, err
    assert docs[0]["stringData"] == {"refresh-token": "rt-value"}
    assert docs[1]["spec"]["oauth2"]["refreshTokenRef"]["key"] == "refresh-token"
    assert docs[2]["stringData"] == {"password": "mailbox-pw"}
    assert docs[3]["spec"]["oauth2"]["passwordRef"]["key"] == "password"
    assert "the local password is not carried over" in err
    assert "add the mailbox password" not in err
    for value in ("rt-value", "mailbox-pw"):
        assert value not in err
