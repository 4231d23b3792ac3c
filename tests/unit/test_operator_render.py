"""render.render: the proxy Secret for every flow, loaded back by the proxy's own loader."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailwarden_operator import render as r
from mailwarden_operator.render import RenderError, RenderInput, new_local_password
from mailwarden_operator.spec import parse_spec
from mailwarden_proxy.config.load import loads
from mailwarden_proxy.config.model import (
    Flow,
    MailProtocol,
    Mechanism,
    ProviderKind,
    ProxyConfig,
    UpstreamTLS,
)

# Values that must never appear in an error message.
CLIENT_SECRET = "cs-VALUE-never-shown"
REFRESH = "rt-VALUE-never-shown"
STORED = "stored-rt-VALUE-never-shown"
MAILBOX_PW = "mailbox-pw-VALUE-never-shown"
LOCAL_PW = "local-VALUE-never-shown"
SA_KEY = json.dumps(
    {"type": "service_account", "private_key": "pk-VALUE-never-shown", "client_email": "sa@x"}
)
CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"
VALUES = (CLIENT_SECRET, REFRESH, STORED, MAILBOX_PW, LOCAL_PW, "pk-VALUE-never-shown")

SECRETS: dict[str, dict[str, bytes]] = {
    "app": {"client-secret": CLIENT_SECRET.encode() + b"\n"},
    "rt": {"refresh-token": REFRESH.encode()},
    "pw": {"password": MAILBOX_PW.encode()},
    "sa": {"key.json": SA_KEY.encode()},
    "cert": {"tls.crt": CERT.encode(), "tls.key": KEY.encode()},
}


def spec_for(provider: str, flow: str, **oauth2: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"flow": flow, "clientId": "cid"}
    if provider == "generic":
        base.update(tokenUrl="https://idp.example/token", scopes=["mail.all"])
    base.update(oauth2)
    servers: dict[str, Any] = {"imap": {}, "pop3": {}, "smtp": {}}
    if provider == "generic":
        servers = {k: {"host": f"{k}.example"} for k in servers}
    return {"provider": provider, "username": "box@example.com", "oauth2": base, **servers}


CASES: dict[str, dict[str, Any]] = {
    "ms-client-credentials": spec_for(
        "microsoft", "clientCredentials", tenantId="contoso.com", clientSecretRef={"name": "app"}
    ),
    "ms-certificate": spec_for(
        "microsoft",
        "clientCredentials",
        tenantId="contoso.com",
        clientCertificateRef={"name": "cert"},
    ),
    "ms-refresh-token": spec_for("microsoft", "refreshToken", refreshTokenRef={"name": "rt"}),
    "ms-password": spec_for("microsoft", "password", passwordRef={"name": "pw"}),
    "ms-device-code": spec_for("microsoft", "deviceCode"),
    "ms-authorization-code": spec_for(
        "microsoft", "authorizationCode", clientSecretRef={"name": "app"}
    ),
    "google-service-account": {
        **spec_for("google", "serviceAccount", serviceAccountKeyRef={"name": "sa"}),
        "oauth2": {"flow": "serviceAccount", "serviceAccountKeyRef": {"name": "sa"}},
    },
    "google-authorization-code": spec_for(
        "google", "authorizationCode", clientSecretRef={"name": "app"}
    ),
    "google-refresh-token": spec_for("google", "refreshToken", refreshTokenRef={"name": "rt"}),
    "generic-client-credentials": spec_for(
        "generic", "clientCredentials", clientSecretRef={"name": "app"}
    ),
    "generic-password": spec_for("generic", "password", passwordRef={"name": "pw"}),
}


def inp(spec: dict[str, Any], **changes: Any) -> RenderInput:
    base = RenderInput(
        name="mail",
        namespace="apps",
        uid="uid-1",
        generation=3,
        spec=parse_spec(spec),
        secrets=copy.deepcopy(SECRETS),
        local_password=LOCAL_PW,
        refresh_token=STORED,
    )
    return replace(base, **changes)


def load(rendered: r.RenderedSecret, tmp_path: Path) -> ProxyConfig:
    """What the sidecar sees: the Secret's keys as files, proxy.yaml read by the proxy."""
    for key, value in rendered.string_data.items():
        (tmp_path / key).write_text(value)
    text = rendered.string_data[r.CONFIG_KEY].replace(r.MOUNT_PATH, str(tmp_path))
    return loads(text, source="proxy.yaml")


def fails(i: RenderInput, reason: str) -> RenderError:
    with pytest.raises(RenderError) as info:
        r.render(i)
    err = info.value
    assert err.reason == reason
    for value in VALUES:
        assert value not in str(err)
    return err


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_flow_renders_and_loads(case: str, tmp_path: Path) -> None:
    i = inp(CASES[case])
    rendered = r.render(i)
    cfg = load(rendered, tmp_path)
    (account,) = cfg.accounts
    o, spec = account.oauth2, i.spec
    # it means what the spec says
    assert account.username == "box@example.com"
    assert account.local_password is not None and account.local_password.reveal() == LOCAL_PW
    assert account.mechanism is Mechanism.XOAUTH2
    assert o.provider is spec.provider
    assert o.token_url == spec.oauth2.token_url and o.scopes == spec.oauth2.scopes
    assert o.client_id == (spec.oauth2.client_id or "")
    expected = Flow.REFRESH_TOKEN if spec.oauth2.needs_consent else spec.oauth2.flow
    assert o.flow is expected
    assert [(x.protocol, x.local_address, x.local_port) for x in cfg.listeners] == [
        (MailProtocol.IMAP, "127.0.0.1", 1143),
        (MailProtocol.POP3, "127.0.0.1", 1110),
        (MailProtocol.SMTP, "127.0.0.1", 1025),
    ]
    for listener, server in zip(cfg.listeners, spec.servers(), strict=True):
        up = listener.upstream
        assert (up.host, up.port, up.tls) == (server.host, server.port, server.tls)
    assert (cfg.metrics.address, cfg.metrics.port) == ("0.0.0.0", 9464)
    assert rendered.string_data[r.PASSWORD_KEY] == LOCAL_PW
    assert rendered.string_data[r.USERNAME_KEY] == "box@example.com"


def test_flow_specific_values() -> None:
    def account_of(case: str, **changes: Any) -> Any:
        text = r.render(inp(CASES[case], **changes)).string_data[r.CONFIG_KEY]
        return yaml.safe_load(text)["accounts"][0]["oauth2"]

    assert account_of("ms-client-credentials")["clientSecret"] == CLIENT_SECRET  # newline gone
    assert account_of("ms-refresh-token")["refreshToken"] == REFRESH
    assert account_of("ms-password")["password"] == MAILBOX_PW
    sa = account_of("google-service-account")
    assert sa["serviceAccountKey"] == SA_KEY and sa["subject"] == "box@example.com"
    assert "clientId" not in sa
    device = account_of("ms-device-code")
    assert (device["flow"], device["refreshToken"]) == ("refreshToken", STORED)
    assert device["tenantId"] == "organizations"
    code = account_of("ms-authorization-code")
    assert (code["flow"], code["refreshToken"], code["clientSecret"]) == (
        "refreshToken",
        STORED,
        CLIENT_SECRET,
    )
    cert = account_of("ms-certificate")
    assert cert["clientCertificateFile"] == f"{r.MOUNT_PATH}/{r.CLIENT_CERTIFICATE_KEY}"
    assert cert["clientKeyFile"] == f"{r.MOUNT_PATH}/{r.CLIENT_KEY_KEY}"
    assert "clientSecret" not in cert


def test_certificate_files_travel_in_the_secret() -> None:
    data = r.render(inp(CASES["ms-certificate"])).string_data
    assert (data[r.CLIENT_CERTIFICATE_KEY], data[r.CLIENT_KEY_KEY]) == (CERT, KEY)
    assert set(r.render(inp(CASES["ms-password"])).string_data) == {
        r.CONFIG_KEY,
        r.PASSWORD_KEY,
        r.USERNAME_KEY,
    }


@pytest.mark.parametrize("case", ["ms-device-code", "ms-authorization-code"])
def test_consent_flows_wait_for_the_refresh_token(case: str) -> None:
    err = fails(inp(CASES[case], refresh_token=None), "ConsentRequired")
    assert "waiting for consent" in err.message and "'mail-oauth2-token'" in err.message


def test_consent_flows_prefer_the_stored_token_over_a_seed() -> None:
    spec = spec_for("microsoft", "deviceCode", refreshTokenRef={"name": "rt"})

    def token(**changes: Any) -> str:
        text = r.render(inp(spec, **changes)).string_data[r.CONFIG_KEY]
        value: str = yaml.safe_load(text)["accounts"][0]["oauth2"]["refreshToken"]
        return value

    assert token() == STORED
    assert token(refresh_token=None) == REFRESH


def test_refresh_token_flow_uses_our_rotation_of_the_current_seed() -> None:
    """After the keep-alive rotated the user's token, a single-use IdP retired the seed."""
    spec = CASES["ms-refresh-token"]

    def token(**changes: Any) -> str:
        text = r.render(inp(spec, **changes)).string_data[r.CONFIG_KEY]
        value: str = yaml.safe_load(text)["accounts"][0]["oauth2"]["refreshToken"]
        return value

    ours = {"refresh_token": STORED}
    assert token(**ours, refresh_token_seed_sha256=r.seed_sha256(REFRESH)) == STORED
    # the user put a new seed in their Secret: theirs wins over our older rotation
    assert token(**ours, refresh_token_seed_sha256=r.seed_sha256("an older seed")) == REFRESH
    assert token(**ours, refresh_token_seed_sha256=None) == REFRESH


@pytest.mark.parametrize("section", ["web", "installed"])
def test_google_client_json_is_accepted(section: str) -> None:
    client = {
        section: {
            "client_id": "cid",
            "client_secret": CLIENT_SECRET,
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": "https://oauth2.googleapis.com/token",
        }
    }
    secrets = {**SECRETS, "app": {"client-secret": json.dumps(client, indent=2).encode()}}
    rendered = r.render(inp(CASES["google-authorization-code"], secrets=secrets))
    oauth2 = yaml.safe_load(rendered.string_data[r.CONFIG_KEY])["accounts"][0]["oauth2"]
    assert oauth2["clientSecret"] == CLIENT_SECRET


@pytest.mark.parametrize(
    "content",
    [
        {"web": {"client_id": "another", "client_secret": CLIENT_SECRET}},
        {"web": {"client_id": "cid"}},
        {"other": {"client_secret": CLIENT_SECRET}},
        "{not json " + CLIENT_SECRET,
    ],
)
def test_bad_google_client_json(content: Any) -> None:
    raw = content if isinstance(content, str) else json.dumps(content)
    secrets = {**SECRETS, "app": {"client-secret": raw.encode()}}
    err = fails(inp(CASES["google-authorization-code"], secrets=secrets), "InvalidSecret")
    assert "Secret 'app' key 'client-secret'" in err.message


def test_only_a_json_object_is_taken_for_a_client_file() -> None:
    secrets = {**SECRETS, "app": {"client-secret": b'["literal"]'}}
    rendered = r.render(inp(CASES["google-authorization-code"], secrets=secrets))
    assert "clientSecret: '[\"literal\"]'" in rendered.string_data[r.CONFIG_KEY]


def test_missing_secrets_are_named_all_at_once() -> None:
    spec = CASES["ms-authorization-code"]
    spec = {**spec, "local": {"passwordSecretRef": {"name": "local"}}}
    err = fails(inp(spec, secrets={}), "SecretNotFound")
    assert err.message == "Secrets 'app', 'local' not found"
    err = fails(inp(CASES["ms-password"], secrets={}), "SecretNotFound")
    assert err.message == "Secret 'pw' not found"


def test_missing_keys_are_named() -> None:
    secrets = {**SECRETS, "cert": {"other": b"x"}}
    err = fails(inp(CASES["ms-certificate"], secrets=secrets), "SecretKeyNotFound")
    assert "Secret 'cert' key 'tls.crt' not found" in err.message
    assert "Secret 'cert' key 'tls.key' not found" in err.message


@pytest.mark.parametrize(
    ("case", "secret", "key", "value"),
    [
        ("ms-client-credentials", "app", "client-secret", b"\n"),
        ("ms-client-credentials", "app", "client-secret", b"\xff\xfe" + CLIENT_SECRET.encode()),
        ("ms-refresh-token", "rt", "refresh-token", b""),
        ("google-service-account", "sa", "key.json", b"{" + REFRESH.encode()),
        ("google-service-account", "sa", "key.json", json.dumps({"a": REFRESH}).encode()),
        ("ms-certificate", "cert", "tls.crt", KEY.encode()),
        ("ms-certificate", "cert", "tls.key", CERT.encode()),
    ],
)
def test_invalid_secret_values(case: str, secret: str, key: str, value: bytes) -> None:
    secrets = copy.deepcopy(SECRETS)
    secrets[secret][key] = value
    err = fails(inp(CASES[case], secrets=secrets), "InvalidSecret")
    assert f"Secret {secret!r} key {key!r}" in err.message


def test_deterministic_hash() -> None:
    one, two = r.render(inp(CASES["ms-device-code"])), r.render(inp(CASES["ms-device-code"]))
    assert one == two and one.config_hash == two.config_hash
    assert one.config_hash == r.config_hash(one.string_data)
    assert len(one.config_hash) == 64
    rotated = copy.deepcopy(SECRETS)
    rotated["app"]["client-secret"] = b"rotated"
    three = r.render(inp(CASES["ms-authorization-code"], secrets=rotated))
    assert three.config_hash != r.render(inp(CASES["ms-authorization-code"])).config_hash
    # the generation is bookkeeping, not content
    assert r.render(inp(CASES["ms-device-code"], generation=9)) == one


def test_local_password_kept_generated_or_referenced() -> None:
    kept = r.render(inp(CASES["ms-device-code"], local_password="kept-one"))
    assert kept.string_data[r.PASSWORD_KEY] == "kept-one"
    assert "localPassword: kept-one" in kept.string_data[r.CONFIG_KEY]
    fresh = {new_local_password() for _ in range(5)}
    assert len(fresh) == 5 and all(len(p) == 32 for p in fresh)
    spec = {**CASES["ms-device-code"], "local": {"passwordSecretRef": {"name": "lp"}}}
    secrets = {**SECRETS, "lp": {"local-password": b"from-the-user\n"}}
    # the referenced password wins over whatever the caller passes
    ref = r.render(inp(spec, secrets=secrets, local_password=new_local_password()))
    assert ref.string_data[r.PASSWORD_KEY] == "from-the-user"
    secrets["lp"]["local-password"] = b"two\nlines"
    fails(inp(spec, secrets=secrets), "InvalidSecret")
    with pytest.raises(ValueError, match="local_password"):
        r.render(inp(CASES["ms-device-code"], local_password=None))


def test_metadata() -> None:
    rendered = r.render(inp(CASES["ms-device-code"]))
    assert rendered.name == r.rendered_secret_name("mail") == "mail-proxy"
    assert r.token_secret_name("mail") == "mail" + r.TOKEN_SECRET_SUFFIX
    assert rendered.labels == {
        "app.kubernetes.io/managed-by": "mailwarden",
        "mailwarden.io/mailaccount": "mail",
    }
    assert rendered.owner_reference == {
        "apiVersion": "mailwarden.io/v1alpha1",
        "kind": "MailAccount",
        "name": "mail",
        "uid": "uid-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    manifest = rendered.manifest()
    assert manifest["type"] == "Opaque" and manifest["metadata"]["namespace"] == "apps"
    assert manifest["metadata"]["annotations"]["mailwarden.io/config-hash"] == rendered.config_hash
    assert manifest["stringData"] == dict(rendered.string_data)


def test_long_names() -> None:
    label = r.label_value("m" * 200)
    assert len(label) == 63 and label == r.label_value("m" * 200) != r.label_value("m" * 201)
    assert r.render(inp(CASES["ms-device-code"], name="x" * 240)).labels[r.MAILACCOUNT_LABEL]
    fails(inp(CASES["ms-device-code"], name="x" * 241), "InvalidSpec")


def test_proxy_refusals_become_invalid_spec() -> None:
    # the CRD's username pattern lets `<` through; the proxy does not
    spec = {**CASES["ms-device-code"], "username": "a<b@example.com"}
    err = fails(inp(spec), "InvalidSpec")
    assert "accounts[0].username" in err.message and "'mail-proxy'" in err.message


def test_loader_warnings_are_passed_on(tmp_path: Path) -> None:
    spec = copy.deepcopy(CASES["ms-client-credentials"])
    spec["oauth2"]["scopes"] = [
        "https://outlook.office365.com/IMAP.AccessAsUser.All",
        "https://outlook.office365.com/SMPT.Send",
    ]
    rendered = r.render(inp(spec))
    assert any("SMPT.Send" in w for w in rendered.warnings)
    assert any(".default" in w for w in rendered.warnings)
    assert load(rendered, tmp_path).accounts[0].oauth2.scopes == (
        "https://outlook.office365.com/.default",
    )


def test_options_reach_the_config(tmp_path: Path) -> None:
    spec = copy.deepcopy(CASES["google-refresh-token"])
    spec.update(
        mechanism="oauthbearer",
        imap={"host": "imap.test", "port": 1993, "tls": "none", "allowInsecure": True},
        pop3=None,
        smtp={"tls": "starttls"},
        local={"imapPort": 2143, "smtpPort": 2025, "metricsPort": 0},
    )
    cfg = load(r.render(inp(spec)), tmp_path)
    assert cfg.accounts[0].mechanism is Mechanism.OAUTHBEARER
    assert cfg.accounts[0].oauth2.provider is ProviderKind.GOOGLE
    assert [(x.name, x.upstream.host, x.upstream.port, x.upstream.tls) for x in cfg.listeners] == [
        ("IMAP-2143", "imap.test", 1993, UpstreamTLS.NONE),
        ("SMTP-2025", "smtp.gmail.com", 587, UpstreamTLS.STARTTLS),
    ]
    assert cfg.listeners[0].upstream.allow_insecure
    assert cfg.metrics.port == 0


def test_render_error_reasons() -> None:
    assert {
        "SecretNotFound",
        "SecretKeyNotFound",
        "InvalidSecret",
        "InvalidSpec",
        "ConsentRequired",
    } == r.REASONS
    assert str(RenderError("InvalidSpec", "x")) == "InvalidSpec: x"
