"""Native YAML configuration: schema, presets, *File secrets, every error path, describe."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailwarden_proxy.config import native, presets
from mailwarden_proxy.config.errors import ConfigError
from mailwarden_proxy.config.load import describe, detect_format, load_config, loads
from mailwarden_proxy.config.model import (
    Flow,
    LocalTLS,
    MailProtocol,
    Mechanism,
    ProviderKind,
    UpstreamTLS,
)
from mailwarden_proxy.config.render import to_native

SA_KEY = json.dumps({"type": "service_account", "private_key": "k", "client_email": "sa@x"})


def base() -> dict[str, Any]:
    return {
        "version": 1,
        "listeners": [
            {
                "protocol": "imap",
                "local": {"port": 1143},
                "upstream": {"host": "outlook.office365.com"},
            },
            {
                "protocol": "smtp",
                "local": {"port": 1587},
                "upstream": {"host": "smtp.office365.com", "tls": "starttls"},
            },
        ],
        "accounts": [
            {
                "username": "app@example.com",
                "localPassword": "local-pw",
                "oauth2": {
                    "provider": "microsoft",
                    "flow": "clientCredentials",
                    "tenantId": "contoso.onmicrosoft.com",
                    "clientId": "cid",
                    "clientSecret": "csecret",
                },
            }
        ],
    }


def oauth(data: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = data["accounts"][0]["oauth2"]
    return result


def test_minimal_config_gets_every_default() -> None:
    config = native.from_dict(base(), source="t.yaml")
    imap, smtp = config.listeners
    assert (imap.name, imap.protocol, imap.local_address, imap.local_port) == (
        "IMAP-1143",
        MailProtocol.IMAP,
        "127.0.0.1",
        1143,
    )
    assert (imap.upstream.port, imap.upstream.tls, imap.local_tls) == (
        993,
        UpstreamTLS.IMPLICIT,
        LocalTLS.NONE,
    )
    assert (smtp.upstream.port, smtp.upstream.tls) == (587, UpstreamTLS.STARTTLS)
    account = config.accounts[0]
    assert account.mechanism is Mechanism.XOAUTH2
    assert account.local_password is not None and account.local_password.equals("local-pw")
    o = account.oauth2
    assert o.token_url == (
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    )
    assert o.scopes == ("https://outlook.office365.com/.default",)
    assert config.metrics.port == 9464 and config.limits.max_line == 16384
    assert config.warnings == () and not config.allow_catch_all_accounts


@pytest.mark.parametrize(
    ("protocol", "tls", "port"),
    [
        ("pop3", "implicit", 995),
        ("pop3", "starttls", 110),
        ("imap", "starttls", 143),
        ("smtp", "implicit", 465),
    ],
)
def test_upstream_port_defaults(protocol: str, tls: str, port: int) -> None:
    data = base()
    data["listeners"] = [
        {"protocol": protocol, "local": {"port": 2000}, "upstream": {"host": "h", "tls": tls}}
    ]
    listener = native.from_dict(data).listeners[0]
    assert listener.upstream.port == port
    assert listener.name == f"{native.LISTENER_PREFIX[MailProtocol(protocol)]}-2000"


def test_microsoft_delegated_flow_gets_delegated_scopes_and_authorize_url() -> None:
    data = base()
    oauth(data).update(flow="refreshToken", refreshToken="rt", tenantId="t1")
    del oauth(data)["clientSecret"]
    o = native.from_dict(data).accounts[0].oauth2
    assert o.scopes == presets.MICROSOFT_DELEGATED_SCOPES
    assert o.authorize_url is None  # only filled for authorizationCode
    oauth(data)["flow"] = "authorizationCode"
    o = native.from_dict(data).accounts[0].oauth2
    assert o.authorize_url == "https://login.microsoftonline.com/t1/oauth2/v2.0/authorize"


def test_tenant_is_taken_from_an_explicit_microsoft_token_url() -> None:
    data = base()
    del oauth(data)["tenantId"]
    oauth(data)["tokenUrl"] = "https://login.microsoftonline.com/abc/oauth2/v2.0/token"
    assert native.from_dict(data).accounts[0].oauth2.tenant_id == "abc"


def test_google_service_account_from_key_file(tmp_path: Path) -> None:
    key = tmp_path / "sa.json"
    key.write_text(SA_KEY + "\n")
    data = base()
    data["accounts"][0]["oauth2"] = {
        "provider": "google",
        "flow": "serviceAccount",
        "serviceAccountKeyFile": str(key),
        "subject": "box@example.com",
    }
    o = native.from_dict(data).accounts[0].oauth2
    assert o.token_url == presets.GOOGLE_TOKEN_URL and o.scopes == presets.GOOGLE_MAIL_SCOPES
    assert o.service_account_key is not None and o.service_account_key.reveal() == SA_KEY


def test_secret_files_are_read_at_load_and_lose_one_trailing_newline(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("from-file\n")
    (tmp_path / "cs").write_text("secret\r\n")
    data = base()
    account = data["accounts"][0]
    del account["localPassword"]
    account["localPasswordFile"] = str(tmp_path / "pw")
    del account["oauth2"]["clientSecret"]
    account["oauth2"]["clientSecretFile"] = str(tmp_path / "cs")
    a = native.from_dict(data).accounts[0]
    assert a.local_password is not None and a.local_password.reveal() == "from-file"
    assert a.oauth2.client_secret is not None and a.oauth2.client_secret.reveal() == "secret"


def test_catch_all_accounts_match_through_account_for() -> None:
    data = base()
    template = data["accounts"][0]
    data["accounts"] = [
        {**copy.deepcopy(template), "username": name} for name in ("a@x.org", "@x.org", "@")
    ]
    config = native.from_dict(data)
    assert config.allow_catch_all_accounts
    assert config.account_for("A@X.org").username == "a@x.org"  # type: ignore[union-attr]
    assert config.account_for("b@x.org").username == "@x.org"  # type: ignore[union-attr]
    assert config.account_for("c@y.org").username == "@"  # type: ignore[union-attr]


def test_without_catch_all_unknown_users_match_nothing() -> None:
    config = native.from_dict(base())
    assert config.account_for("other@example.com") is None


def test_client_credentials_with_delegated_scopes_is_mapped_with_a_warning() -> None:
    data = base()
    oauth(data)["scopes"] = list(presets.MICROSOFT_DELEGATED_SCOPES)
    config = native.from_dict(data)
    assert config.accounts[0].oauth2.scopes == presets.MICROSOFT_APP_SCOPES
    assert any(".default" in w for w in config.warnings)


def test_misspelt_microsoft_scope_warns_with_suggestion() -> None:
    data = base()
    oauth(data).update(flow="deviceCode", scopes=["https://outlook.office365.com/SMPT.Send"])
    config = native.from_dict(data)
    assert any("SMPT.Send" in w and "SMTP.Send" in w for w in config.warnings)


def _mutate(path: str, value: Any) -> dict[str, Any]:
    """base() with the dotted path set (or deleted when value is ...)."""
    data = base()
    node: Any = data
    *parents, last = path.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if value is ...:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


ERRORS = [
    ("version", ..., "version"),
    ("version", 2, "version"),
    ("listeners", [], "listeners"),
    ("listeners", "imap", "listeners"),
    ("accounts", [], "accounts"),
    ("listener", [], "listener"),  # unknown top-level key
    ("listeners.0.local.port", ..., "listeners[0].local.port"),
    ("listeners.1.name", "IMAP-1143", "listeners[1].name"),
    ("listeners.0.local.port", 0, "listeners[0].local.port"),
    ("listeners.0.local.port", 70000, "listeners[0].local.port"),
    ("listeners.0.local.port", "1143", "listeners[0].local.port"),
    ("listeners.0.local.port", True, "listeners[0].local.port"),
    ("listeners.0.local.port", 1587, "listeners[1].local.port"),  # the second user is named
    ("listeners.1.local.port", 1143, "listeners[1].local.port"),
    ("listeners.0.local.tls", False, "listeners[0].local.tls"),  # YAML `off`
    ("listeners.0.local.tls", "starttls", "listeners[0].local.certificateFile"),
    ("listeners.0.local.certificateFile", "/nope", "listeners[0].local.certificateFile"),
    ("listeners.0.local.address", "bad host", "listeners[0].local.address"),
    ("listeners.0.protocol", "imaps", "listeners[0].protocol"),
    ("listeners.0.protocol", ..., "listeners[0].protocol"),
    ("listeners.0.upstream", ..., "listeners[0].upstream"),
    ("listeners.0.upstream.host", ..., "listeners[0].upstream.host"),
    ("listeners.0.upstream.tls", "none", "listeners[0].upstream.tls"),
    ("listeners.0.upstream.port", 0, "listeners[0].upstream.port"),
    ("listeners.0.upstream.caFile", "/nope", "listeners[0].upstream.caFile"),
    ("listeners.0.upstream.allowInsecure", "yes", "listeners[0].upstream.allowInsecure"),
    ("listeners.0.upstrem", {}, "listeners[0].upstrem"),
    ("accounts.0.username", "not an address", "accounts[0].username"),
    ("accounts.0.username", "user@", "accounts[0].username"),
    ("accounts.0.localPassword", ..., "accounts[0].localPassword"),
    ("accounts.0.localPassword", "", "accounts[0].localPassword"),
    ("accounts.0.localPassword", 1234, "accounts[0].localPassword"),
    ("accounts.0.localPasswordFile", "/nope/pw", "accounts[0].localPassword"),
    ("accounts.0.mechanism", "plain", "accounts[0].mechanism"),
    ("accounts.0.upstreamUsername", "@example.com", "accounts[0].upstreamUsername"),
    ("accounts.0.oauth2", ..., "accounts[0].oauth2"),
    ("accounts.0.oauth2.provider", "azure", "accounts[0].oauth2.provider"),
    ("accounts.0.oauth2.flow", "client_credentials", "accounts[0].oauth2.flow"),
    ("accounts.0.oauth2.clientSecret", ..., "accounts[0].oauth2.clientSecret"),
    ("accounts.0.oauth2.clientSecretFile", "/nope", "accounts[0].oauth2.clientSecret"),
    ("accounts.0.oauth2.clientSecrett", "x", "accounts[0].oauth2.clientSecrett"),
    ("accounts.0.oauth2.clientId", ..., "accounts[0].oauth2.clientId"),
    ("accounts.0.oauth2.tenantId", ..., "accounts[0].oauth2.tokenUrl"),
    ("accounts.0.oauth2.tenantId", "common", "accounts[0].oauth2.tenantId"),
    ("accounts.0.oauth2.tokenUrl", "[https://x](https://x)", "accounts[0].oauth2.tokenUrl"),
    ("accounts.0.oauth2.tokenUrl", "ftp://x/token", "accounts[0].oauth2.tokenUrl"),
    ("accounts.0.oauth2.tokenUrl", "https://x:99999/t", "accounts[0].oauth2.tokenUrl"),
    ("accounts.0.oauth2.authorizeUrl", "/relative", "accounts[0].oauth2.authorizeUrl"),
    ("accounts.0.oauth2.redirectUri", "http://<vault>/", "accounts[0].oauth2.redirectUri"),
    ("accounts.0.oauth2.scopes", "a b", "accounts[0].oauth2.scopes"),
    ("accounts.0.oauth2.scopes", [""], "accounts[0].oauth2.scopes"),
    ("accounts.0.oauth2.clientCertificateFile", "/nope", "accounts[0].oauth2.clientKeyFile"),
    ("accounts.0.oauth2.usePkce", "no", "accounts[0].oauth2.usePkce"),
    ("accounts.0.oauth2.serviceAccountKey", "{", "accounts[0].oauth2.serviceAccountKey"),
    ("metrics.port", 70000, "metrics.port"),
    ("metrics.port", 1143, "metrics.port"),
    ("limits.maxLineLength", 100, "limits.maxLineLength"),
    ("limits.maxLiteralLength", -1, "limits.maxLiteralLength"),
    ("limits.connectTimeoutSeconds", 0, "limits.connectTimeoutSeconds"),
    ("limits.loginTimeoutSeconds", True, "limits.loginTimeoutSeconds"),
    ("cacheStore", 5, "cacheStore"),
]


@pytest.mark.parametrize(("path", "value", "field"), ERRORS)
def test_error_names_the_field(path: str, value: Any, field: str) -> None:
    data = _mutate(path, value)
    with pytest.raises(ConfigError) as info:
        native.from_dict(data, source="f.yaml")
    assert info.value.field == field, str(info.value)
    assert str(info.value).startswith("f.yaml: ")


@pytest.mark.parametrize(
    ("oauth2", "field", "text"),
    [
        (
            {
                "provider": "generic",
                "flow": "clientCredentials",
                "clientId": "c",
                "clientSecret": "s",
                "scopes": ["x"],
            },
            "tokenUrl",
            "required",
        ),
        (
            {
                "provider": "generic",
                "flow": "clientCredentials",
                "clientId": "c",
                "clientSecret": "s",
                "tokenUrl": "https://idp/token",
            },
            "scopes",
            "no scopes",
        ),
        (
            {
                "provider": "microsoft",
                "flow": "serviceAccount",
                "tenantId": "t",
                "serviceAccountKey": SA_KEY,
            },
            "flow",
            "Google flow",
        ),
        ({"provider": "google", "flow": "serviceAccount"}, "serviceAccountKey", "required"),
        (
            {
                "provider": "google",
                "flow": "clientCredentials",
                "clientId": "c",
                "clientSecret": "s",
            },
            "flow",
            "serviceAccount",
        ),
        (
            {"provider": "microsoft", "flow": "refreshToken", "tenantId": "t", "clientId": "c"},
            "refreshToken",
            "required",
        ),
        (
            {
                "provider": "microsoft",
                "flow": "authorizationCode",
                "tenantId": "t",
                "clientId": "c",
            },
            "refreshToken",
            "required",
        ),
        (
            {"provider": "microsoft", "flow": "password", "tenantId": "t", "clientId": "c"},
            "password",
            "required",
        ),
        (
            {
                "provider": "microsoft",
                "flow": "clientCredentials",
                "tenantId": "t",
                "clientId": "c",
                "clientSecret": "a",
                "clientSecretFile": "/x",
            },
            "clientSecret",
            "not both",
        ),
    ],
)
def test_flow_requirements(oauth2: dict[str, Any], field: str, text: str) -> None:
    data = base()
    data["accounts"][0]["oauth2"] = oauth2
    with pytest.raises(ConfigError) as info:
        native.from_dict(data)
    assert info.value.field == f"accounts[0].oauth2.{field}"
    assert text in info.value.message


def test_device_code_needs_no_token_yet_and_password_flow_accepts_password() -> None:
    data = base()
    data["accounts"][0]["oauth2"] = {
        "provider": "microsoft",
        "flow": "deviceCode",
        "tenantId": "t",
        "clientId": "c",
    }
    assert native.from_dict(data).accounts[0].oauth2.flow is Flow.DEVICE_CODE
    data["accounts"][0]["oauth2"].update(flow="password", password="mailbox-pw")
    assert native.from_dict(data).accounts[0].oauth2.password is not None


def test_certificate_credential_and_local_tls_files(tmp_path: Path) -> None:
    for name in ("c.pem", "k.pem", "ca.pem"):
        (tmp_path / name).write_text("x")
    data = base()
    del oauth(data)["clientSecret"]
    oauth(data).update(
        clientCertificateFile=str(tmp_path / "c.pem"),
        clientKeyFile=str(tmp_path / "k.pem"),
        caFile=str(tmp_path / "ca.pem"),
    )
    data["listeners"][0]["local"].update(
        tls="implicit", certificateFile=str(tmp_path / "c.pem"), keyFile=str(tmp_path / "k.pem")
    )
    config = native.from_dict(data)
    assert config.listeners[0].local_tls is LocalTLS.IMPLICIT
    assert config.accounts[0].oauth2.client_key_path == str(tmp_path / "k.pem")


def test_insecure_upstream_needs_the_explicit_switch() -> None:
    data = _mutate("listeners.0.upstream.tls", "none")
    data["listeners"][0]["upstream"]["allowInsecure"] = True
    assert native.from_dict(data).listeners[0].upstream.tls is UpstreamTLS.NONE


def test_non_loopback_listener_without_tls_warns() -> None:
    config = native.from_dict(_mutate("listeners.0.local.address", "0.0.0.0"))
    assert any("clear text" in w for w in config.warnings)


def test_unknown_key_error_suggests_the_right_one() -> None:
    with pytest.raises(ConfigError, match="did you mean `clientSecret`"):
        native.from_dict(_mutate("accounts.0.oauth2.clientSecrett", "x"))
    with pytest.raises(ConfigError, match="did you mean `listeners`"):
        native.from_dict(_mutate("listener", []))


def test_yaml_boolean_for_an_enum_explains_itself() -> None:
    with pytest.raises(ConfigError, match="boolean"):
        loads(yaml.safe_dump(base()).replace("tls: starttls", "tls: off"))


def test_loads_and_load_config_detect_the_format(tmp_path: Path) -> None:
    text = "# comment\n" + yaml.safe_dump(base())
    assert detect_format(text) == "native"
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert load_config(path).source == str(path)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("version: 1\nlisteners: [\n", "line 3"),
        ("- a\n- b\n", "(top level)"),
        ("", "(top level)"),
        ("a: {b: [c}\n", "line 1"),
    ],
)
def test_unparsable_text_is_a_config_error(text: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads(text)
    assert info.value.field == field


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(tmp_path / "bin")


def test_describe_masks_every_secret_and_round_trips(tmp_path: Path) -> None:
    data = base()
    data["accounts"].append(
        {
            "username": "@",
            "localPassword": "lp2",
            "mechanism": "oauthbearer",
            "oauth2": {"provider": "google", "flow": "serviceAccount", "serviceAccountKey": SA_KEY},
        }
    )
    config = native.from_dict(data)
    text = describe(config)
    for secret in ("local-pw", "csecret", "lp2", "private_key"):
        assert secret not in text
    assert text.count("'****'") == 4
    again = native.from_dict(yaml.safe_load(yaml.safe_dump(to_native(config, mask=False))))
    assert (again.listeners, again.accounts, again.metrics, again.limits) == (
        config.listeners,
        config.accounts,
        config.metrics,
        config.limits,
    )
    assert ProviderKind.GOOGLE is again.accounts[1].oauth2.provider


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=400))
def test_arbitrary_text_loads_or_raises_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        loads(text)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_arbitrary_values_in_a_valid_shape_never_crash(data: st.DataObject) -> None:
    """Replace one node of a valid document with junk: ConfigError or a config, nothing else."""
    doc = base()
    paths = [p for p, _, _ in ERRORS]
    path = data.draw(st.sampled_from(paths))
    with contextlib.suppress(ConfigError):
        native.from_dict(_mutate(path, data.draw(_json)))
    with contextlib.suppress(ConfigError):
        native.from_dict(data.draw(_json) if data.draw(st.booleans()) else doc)
