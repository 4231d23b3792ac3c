"""emailproxy INI files: the shared examples, emailproxy's semantics, warnings, errors."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mailwarden_proxy.config import emailproxy, native, presets
from mailwarden_proxy.config.emailproxy_ini import ACCOUNT_KEYS, GLOBAL_KEYS, SERVER_KEYS
from mailwarden_proxy.config.errors import ConfigError
from mailwarden_proxy.config.load import describe, detect_format, load_config, loads
from mailwarden_proxy.config.model import (
    Flow,
    LocalTLS,
    MailProtocol,
    ProviderKind,
    ProxyConfig,
    UpstreamTLS,
)

EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "examples"
if not EXAMPLES.is_dir():  # the checkout may live elsewhere; the brief names this path
    EXAMPLES = Path("/work/shared/examples")
GOOD = EXAMPLES / "emailproxy-office365.config"
PUBLISHED = EXAMPLES / "emailproxy-office365-as-published.config"

MS_TOKEN = "https://login.microsoftonline.com/TENANT/oauth2/v2.0/token"
SERVERS = """
[IMAP-1993]
server_address = outlook.office365.com
server_port = 993
local_address = 127.0.0.1
"""
CCG = f"""
token_url = {MS_TOKEN}
oauth2_scope = https://outlook.office365.com/.default
oauth2_flow = client_credentials
client_id = CID
client_secret = CSECRET
"""


def load(text: str) -> ProxyConfig:
    return emailproxy.from_text(text, source="ep.config")


def account_file(body: str, *, catch_all: bool = False, section: str = "a@x.org") -> str:
    head = "[emailproxy]\nallow_catch_all_accounts = True\n" if catch_all else ""
    return f"{head}{SERVERS}\n[{section}]\n{body}"


def error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(text)
    return info.value


# --- the shared examples ---------------------------------------------------------------


def test_example_loads_and_means_what_it_says() -> None:
    config = load_config(GOOD)
    imap, smtp = config.listeners
    assert (imap.name, imap.protocol, imap.local_address, imap.local_port) == (
        "IMAP-2993",
        MailProtocol.IMAP,
        "127.0.0.1",
        2993,
    )
    assert (imap.upstream.host, imap.upstream.port, imap.upstream.tls) == (
        "outlook.office365.com",
        993,
        UpstreamTLS.IMPLICIT,
    )
    assert (smtp.protocol, smtp.local_port, imap.local_tls) == (
        MailProtocol.SMTP,
        2465,
        LocalTLS.NONE,
    )
    assert (smtp.upstream.host, smtp.upstream.port, smtp.upstream.tls) == (
        "smtp.office365.com",
        587,
        UpstreamTLS.STARTTLS,
    )
    assert config.allow_catch_all_accounts
    (account,) = config.accounts
    assert account.username == "@" and account.local_password is None
    assert not account.delete_token_on_password_error  # app-only: never reset by a password
    o = account.oauth2
    assert (o.provider, o.flow, o.tenant_id, o.client_id) == (
        ProviderKind.MICROSOFT,
        Flow.CLIENT_CREDENTIALS,
        "TENANT_ID",
        "CLIENT_ID",
    )
    assert o.token_url == "https://login.microsoftonline.com/TENANT_ID/oauth2/v2.0/token"
    assert o.client_secret is not None and o.client_secret.reveal() == "CLIENT_SECRET"
    assert o.scopes == ("https://outlook.office365.com/.default",)
    assert o.authorize_url is None and o.redirect_uri is None  # unused by client credentials
    for user in ("alerts@example.com", "someone@else.org"):
        assert config.account_for(user) is account


def test_example_warnings() -> None:
    warnings = "\n".join(load_config(GOOD).warnings)
    assert "[@] redirect_list_address" in warnings
    assert "did you mean `redirect_listen_address`" in warnings
    assert "https://outlook.office365.com/.default" in warnings  # the app-only mapping
    assert "ignores oauth2_flow = client_credentials when permission_url is set" in warnings
    assert "[IMAP-2993], [SMTP-2465] local_address" in warnings


def test_published_example_is_refused_naming_token_url(caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="mailwarden.config"),
        pytest.raises(ConfigError) as info,
    ):
        load_config(PUBLISHED)
    assert info.value.field == "[@] token_url"
    assert "Markdown" in info.value.message
    logged = caplog.text
    assert (
        "SMPT.Send" in logged and "did you mean `https://outlook.office365.com/SMTP.Send`" in logged
    )
    assert "redirect_listen_address" in logged


def test_example_describe_is_a_migration_path_to_native() -> None:
    config = load_config(GOOD)
    text = describe(config)
    assert "CLIENT_SECRET" not in text and "'****'" in text
    doc = yaml.safe_load(text)
    doc["accounts"][0]["localPassword"] = "chosen-by-you"
    again = native.from_dict(doc)
    assert again.listeners == config.listeners
    assert again.accounts[0].oauth2.scopes == config.accounts[0].oauth2.scopes
    assert detect_format(GOOD.read_text()) == "emailproxy"


# --- servers ---------------------------------------------------------------------------


def test_smtp_starttls_names_and_precedence() -> None:
    base = "[SMTP-1587]\nserver_address = smtp.x\nserver_port = 587\nlocal_address = ::1\n"
    cases = {
        "starttls = True": UpstreamTLS.STARTTLS,
        "server_starttls = yes": UpstreamTLS.STARTTLS,
        "starttls = True\nserver_starttls = False": UpstreamTLS.IMPLICIT,
        "": UpstreamTLS.IMPLICIT,
    }
    for extra, tls in cases.items():
        config = load(f"{base}{extra}\n[a@x.org]\n{CCG}")
        assert config.listeners[0].upstream.tls is tls, extra


def test_imap_starttls_is_honoured_with_a_warning() -> None:
    config = load(SERVERS + "server_starttls = True\n[a@x.org]\n" + CCG)
    assert config.listeners[0].upstream.tls is UpstreamTLS.STARTTLS
    assert any("ignores STARTTLS settings for IMAP/POP" in w for w in config.warnings)


def test_local_tls_modes(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("c")
    key.write_text("k")
    paths = f"local_certificate_path = {cert}\nlocal_key_path = {key}\n"
    smtp = "[SMTP-1465]\nserver_address = smtp.x\nserver_port = 465\n"
    implicit = load(f"{smtp}{paths}[a@x.org]\n{CCG}")
    assert implicit.listeners[0].local_tls is LocalTLS.IMPLICIT
    starttls = load(f"{smtp}{paths}local_starttls = True\n[a@x.org]\n{CCG}")
    assert starttls.listeners[0].local_tls is LocalTLS.STARTTLS
    assert starttls.listeners[0].local_certificate == str(cert)


def test_pop_section_and_non_loopback_warning() -> None:
    config = load(
        "[POP-1995]\nserver_address = pop.x\nserver_port = 995\nlocal_address = 0.0.0.0\n"
        f"[a@x.org]\n{CCG}"
    )
    assert config.listeners[0].protocol is MailProtocol.POP3
    assert any("clear text" in w for w in config.warnings)


@pytest.mark.parametrize(
    ("servers", "field"),
    [
        ("[IMAP-0]\nserver_address = h\nserver_port = 993\n", "[IMAP-0]"),
        ("[IMAP-70000]\nserver_address = h\nserver_port = 993\n", "[IMAP-70000]"),
        ("[IMAP-1993]\nserver_port = 993\n", "[IMAP-1993] server_address"),
        ("[IMAP-1993]\nserver_address = h\n", "[IMAP-1993] server_port"),
        ("[IMAP-1993]\nserver_address = h\nserver_port = imaps\n", "[IMAP-1993] server_port"),
        ("[IMAP-1993]\nserver_address = h\nserver_port = 99999\n", "[IMAP-1993] server_port"),
        ("[IMAP-1993]\nserver_address = h h\nserver_port = 993\n", "[IMAP-1993] server_address"),
        (
            "[SMTP-1587]\nserver_address = h\nserver_port = 587\nstarttls = maybe\n",
            "[SMTP-1587] starttls",
        ),
        (
            "[SMTP-1587]\nserver_address = h\nserver_port = 587\nlocal_starttls = True\n",
            "[SMTP-1587] local_certificate_path",
        ),
        (
            "[SMTP-1587]\nserver_address = h\nserver_port = 587\nlocal_key_path = /k\n",
            "[SMTP-1587] local_certificate_path",
        ),
        (
            "[IMAP-1993]\nserver_address = h\nserver_port = 993\nlocal_certificate_path = /nope\n"
            "local_key_path = /nope\n",
            "[IMAP-1993] local_certificate_path",
        ),
        (
            "[IMAP-1993]\nserver_address = h\nserver_port = 993\n"
            "[SMTP-1993]\nserver_address = h\nserver_port = 465\n",
            "[SMTP-1993]",
        ),
        ("[IMAP-9464]\nserver_address = h\nserver_port = 993\n", "metrics port (default)"),
        ("", "listeners"),
    ],
)
def test_server_errors(servers: str, field: str) -> None:
    assert error(f"{servers}[a@x.org]\n{CCG}").field == field


# --- accounts --------------------------------------------------------------------------


def test_named_account_and_catch_all_precedence() -> None:
    text = account_file(CCG, catch_all=True) + f"\n[@x.org]\n{CCG}\n[@]\n{CCG}"
    config = load(text)
    assert [a.username for a in config.accounts] == ["a@x.org", "@x.org", "@"]
    assert config.account_for("a@x.org").username == "a@x.org"  # type: ignore[union-attr]
    assert config.account_for("b@X.org").username == "@x.org"  # type: ignore[union-attr]
    assert config.account_for("c@y.org").username == "@"  # type: ignore[union-attr]


def test_values_fall_back_to_domain_then_global_catch_all() -> None:
    """A section emailproxy wrote for a catch-all user holds only cached tokens."""
    text = (
        "[emailproxy]\nallow_catch_all_accounts = True\n"
        + SERVERS
        + "[u@x.org]\naccess_token = gAAA\nrefresh_token = gAAA\ntoken_salt = abc\n"
        + "[@x.org]\nclient_id = DOMAIN_CID\n"
        + f"[@]\n{CCG}"
    )
    config = load(text)
    user = config.account_for("u@x.org")
    assert user is not None and user.username == "u@x.org"
    assert user.oauth2.client_id == "DOMAIN_CID" and user.oauth2.token_url == MS_TOKEN
    assert any("[u@x.org] access_token, refresh_token, token_salt" in w for w in config.warnings)


def test_catch_all_sections_without_the_global_switch() -> None:
    config = load(account_file(CCG) + f"\n[@]\n{CCG}")
    assert [a.username for a in config.accounts] == ["a@x.org"]
    assert config.account_for("b@x.org") is None
    assert any("[@]: catch-all section ignored" in w for w in config.warnings)
    only = error(f"{SERVERS}[@]\n{CCG}")
    assert only.field == "[emailproxy] allow_catch_all_accounts"


def test_delete_token_on_password_error_follows_emailproxy(tmp_path: Path) -> None:
    device = CCG.replace("client_credentials", "device") + f"permission_url = {MS_TOKEN}\n"
    assert load(account_file(device)).accounts[0].delete_token_on_password_error
    off = "[emailproxy]\ndelete_account_token_on_password_error = False\n" + account_file(device)
    assert not load(off).accounts[0].delete_token_on_password_error
    assert not load(account_file(CCG)).accounts[0].delete_token_on_password_error


def test_device_flow_keeps_permission_url_without_quirk_warning() -> None:
    url = "https://login.microsoftonline.com/TENANT/oauth2/v2.0/devicecode"
    text = account_file(CCG.replace("client_credentials", "device") + f"permission_url = {url}\n")
    config = load(text)
    o = config.accounts[0].oauth2
    assert o.flow is Flow.DEVICE_CODE and o.authorize_url == url
    assert not any("ignores oauth2_flow" in w for w in config.warnings)


def test_google_service_account_key_file_and_inline(tmp_path: Path) -> None:
    key = json.dumps({"type": "service_account", "private_key": "p", "client_email": "e"})
    (tmp_path / "sa.json").write_text(key)
    sa = (
        "token_url = https://oauth2.googleapis.com/token\noauth2_scope = https://mail.google.com/"
        "\noauth2_flow = service_account\n"
    )
    from_file = load(account_file(sa + f"client_id = file\nclient_secret = {tmp_path / 'sa.json'}"))
    o = from_file.accounts[0].oauth2
    assert o.provider is ProviderKind.GOOGLE and o.subject == "a@x.org"
    assert o.service_account_key is not None and o.service_account_key.reveal() == key
    inline = load(
        account_file(sa + f"client_id = key\nclient_secret = {key}", catch_all=True, section="@")
    )
    assert inline.accounts[0].oauth2.subject is None  # the user who logs in


def test_generic_provider_and_certificate_credentials(tmp_path: Path) -> None:
    (tmp_path / "c").write_text("c")
    (tmp_path / "k").write_text("k")
    jwt = f"jwt_certificate_path = {tmp_path / 'c'}\njwt_key_path = {tmp_path / 'k'}\n"
    generic = (
        "token_url = https://idp.example/token\noauth2_scope = mail\n"
        "oauth2_flow = client_credentials\nclient_id = c\n"
    )
    o = load(account_file(generic + jwt)).accounts[0].oauth2
    assert o.provider is ProviderKind.GENERIC and o.client_certificate_path == str(tmp_path / "c")
    both = load(account_file(generic + jwt + "client_secret = s\n"))
    assert both.accounts[0].oauth2.client_certificate_path is None
    assert any("jwt_certificate_path" in w and "wins" in w for w in both.warnings)


def test_misspelt_scope_warns_in_a_loadable_file() -> None:
    device = CCG.replace("client_credentials", "device").replace(
        "https://outlook.office365.com/.default",
        "https://outlook.office365.com/IMAP.AccessAsUser.Al offline_acess SMTP.Send",
    )
    warnings = "\n".join(load(account_file(device)).warnings)
    assert "`https://outlook.office365.com/IMAP.AccessAsUser.All`?" in warnings
    assert "did you mean `offline_access`?" in warnings
    assert "`SMTP.Send` needs its resource" in warnings


def test_global_switches_we_do_not_implement_warn() -> None:
    text = (
        "[emailproxy]\nencrypt_client_secret_on_first_use = True\n"
        "use_login_password_as_client_credentials_secret = True\nallow_catch_all = True\n"
        + account_file(CCG + "client_secret_encrypted = gAAAA\noauth2_resource = r\n")
    )
    warnings = "\n".join(load(text).warnings)
    for needle in (
        "never writes",
        "not supported: set client_secret",
        "did you mean `allow_catch_all_accounts`",
        "client_secret_encrypted: ignored",
        "oauth2_resource",
    ):
        assert needle in warnings


def test_unknown_and_documentation_sections() -> None:
    text = (
        "[Server setup]\ndocumentation = prose\n[imap-1993]\nserver_address = x\n"
        + account_file(CCG)
    )
    warnings = load(text).warnings
    assert not any("Server setup" in w for w in warnings)
    assert any("[imap-1993]: unknown section" in w and "`IMAP-1993`" in w for w in warnings)


ACCOUNT_ERRORS = [
    (CCG.replace(f"token_url = {MS_TOKEN}", ""), "[a@x.org] token_url", "required"),
    (CCG.replace(MS_TOKEN, "login.microsoftonline.com/t/token"), "[a@x.org] token_url", "absolute"),
    (CCG.replace("oauth2_flow = client_credentials", ""), "[a@x.org] oauth2_flow", "required"),
    (
        CCG.replace("client_credentials", "client_credential"),
        "[a@x.org] oauth2_flow",
        "did you mean `client_credentials`",
    ),
    (CCG.replace("client_credentials", "password"), "[a@x.org] oauth2_flow", "not supported"),
    (
        CCG.replace("oauth2_flow = client_credentials", f"permission_url = {MS_TOKEN}"),
        "[a@x.org] permission_url",
        "browser consent",
    ),
    (
        CCG.replace("client_secret = CSECRET", "client_secret_encrypted = gAAAA"),
        "[a@x.org] client_secret_encrypted",
        "login password",
    ),
    (CCG.replace("client_secret = CSECRET", ""), "[a@x.org] client_secret", "required"),
    (CCG.replace("client_id = CID", ""), "[a@x.org] client_id", "required"),
    (CCG.replace("TENANT", "common"), "[a@x.org] token_url", "app-only"),
    (
        CCG.replace("client_credentials", "device") + "redirect_uri = http://<vault>/\n",
        "[a@x.org] redirect_uri",
        "not a URL",
    ),
    (
        CCG.replace("client_credentials", "device") + "use_pkce = sometimes\n",
        "[a@x.org] use_pkce",
        "True or False",
    ),
    (
        CCG.replace("oauth2_flow = client_credentials", "oauth2_flow = service_account"),
        "[a@x.org] client_id",
        "`file` or `key`",
    ),
    (
        "token_url = https://oauth2.googleapis.com/token\noauth2_flow = service_account\n"
        "client_id = file\nclient_secret = /nope/sa.json\n",
        "[a@x.org] client_secret",
        "cannot read",
    ),
    (
        "token_url = https://oauth2.googleapis.com/token\noauth2_flow = service_account\n"
        'client_id = key\nclient_secret = {"a": 1}\n',
        "[a@x.org] client_secret",
        "service-account",
    ),
    (
        CCG.replace("oauth2_scope = https://outlook.office365.com/.default", "").replace(
            MS_TOKEN, "https://idp.example/token"
        ),
        "[a@x.org] oauth2_scope",
        "no scopes",
    ),
    (
        CCG.replace("client_secret = CSECRET", "jwt_certificate_path = /nope\njwt_key_path = /n"),
        "[a@x.org] jwt_certificate_path",
        "readable",
    ),
    (
        CCG.replace("client_secret = CSECRET", "jwt_key_path = /n"),
        "[a@x.org] jwt_certificate_path",
        "required",
    ),
]


@pytest.mark.parametrize(("body", "field", "text"), ACCOUNT_ERRORS)
def test_account_errors(body: str, field: str, text: str) -> None:
    err = error(account_file(body))
    assert (err.field, text in err.message) == (field, True), str(err)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[IMAP-1]\na = 1\n[IMAP-1]\n", "[IMAP-1]"),
        ("[IMAP-1]\na = 1\na = 2\n", "[IMAP-1] a"),
        ("a = 1\n", "line 1"),
        (
            "[emailproxy]\nallow_catch_all_accounts = sure\n",
            "[emailproxy] allow_catch_all_accounts",
        ),
        (account_file(CCG) + f"\n[A@x.org]\n{CCG}", "[A@x.org]"),
    ],
)
def test_file_level_errors(text: str, field: str) -> None:
    assert error(text).field == field


def test_interpolation_is_off() -> None:
    config = load(account_file(CCG.replace("CSECRET", "50%off%(x)s")))
    secret = config.accounts[0].oauth2.client_secret
    assert secret is not None and secret.reveal() == "50%off%(x)s"


def test_presets_infer_provider() -> None:
    assert presets.infer_provider(MS_TOKEN) == (ProviderKind.MICROSOFT, "TENANT")
    assert presets.infer_provider("https://accounts.google.com/o/oauth2/token")[0] is (
        ProviderKind.GOOGLE
    )
    assert presets.infer_provider("http://[::1") == (ProviderKind.GENERIC, None)


_LINE = st.one_of(
    st.sampled_from(
        [
            "[emailproxy]",
            "[IMAP-1993]",
            "[SMTP-1587]",
            "[POP-0]",
            "[@]",
            "[a@x.org]",
            "[@x.org]",
            "[IMAP-99999999999999999999]",
            "[",
            "#c",
        ]
    ),
    st.builds(
        lambda k, v: f"{k} = {v}",
        st.sampled_from(GLOBAL_KEYS + SERVER_KEYS + ACCOUNT_KEYS + ("x",)),
        st.one_of(
            st.sampled_from(
                [
                    "True",
                    "1",
                    "993",
                    MS_TOKEN,
                    "device",
                    "file",
                    "key",
                    "client_credentials",
                    "[x](y)",
                    "",
                    "{}",
                ]
            ),
            st.text(max_size=12),
        ),
    ),
    st.text(max_size=20),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_LINE, max_size=25))
def test_arbitrary_ini_loads_or_raises_config_error(lines: list[str]) -> None:
    with contextlib.suppress(ConfigError):
        loads("[IMAP-1993]\n" + "\n".join(lines))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_after_a_section_header(text: str) -> None:
    with contextlib.suppress(ConfigError):
        loads("[emailproxy]\n" + text)
