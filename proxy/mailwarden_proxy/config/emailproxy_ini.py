"""The syntax layer of emailproxy files: key tables, INI parsing, emailproxy's lookups.

`emailproxy.py` gives the values their meaning; this module only knows where a value is
and what emailproxy calls it.
"""

from __future__ import annotations

import configparser
import re
from collections.abc import Iterable

from mailwarden_proxy.config.common import Warnings, suggest
from mailwarden_proxy.config.errors import ConfigError
from mailwarden_proxy.config.model import Flow, MailProtocol
from mailwarden_proxy.config.validate import check_port

GLOBAL_SECTION = "emailproxy"
SERVER_SECTION = re.compile(r"^(?P<type>IMAP|POP|SMTP)-(?P<port>\d+)$")
PROTOCOLS = {"IMAP": MailProtocol.IMAP, "POP": MailProtocol.POP3, "SMTP": MailProtocol.SMTP}
GLOBAL_KEYS = (
    "allow_catch_all_accounts",
    "delete_account_token_on_password_error",
    "encrypt_client_secret_on_first_use",
    "use_login_password_as_client_credentials_secret",
)
SERVER_KEYS = (
    "server_address",
    "server_port",
    "server_starttls",
    "starttls",
    "local_address",
    "local_starttls",
    "local_certificate_path",
    "local_key_path",
)
ACCOUNT_KEYS = (
    "token_url",
    "permission_url",
    "oauth2_scope",
    "oauth2_resource",
    "oauth2_flow",
    "redirect_uri",
    "redirect_listen_address",
    "client_id",
    "client_secret",
    "client_secret_encrypted",
    "use_pkce",
    "jwt_certificate_path",
    "jwt_key_path",
)
# written back by emailproxy, encrypted with the login password (PBKDF2 + token_salt)
CACHED_KEYS = (
    "access_token",
    "access_token_expiry",
    "refresh_token",
    "token_salt",
    "token_iterations",
    "last_activity",
)
FLOWS = {
    "authorization_code": Flow.AUTHORIZATION_CODE,
    "client_credentials": Flow.CLIENT_CREDENTIALS,
    "device": Flow.DEVICE_CODE,
    "service_account": Flow.SERVICE_ACCOUNT,
    "password": Flow.PASSWORD,
}
# the sample file's prose sections: only a `documentation` key, never served
DOCUMENTATION_ONLY = frozenset({"documentation"})

LISTENER_NAMES = {
    "local_address": "local_address",
    "local_tls": "local_starttls",
    "local_certificate": "local_certificate_path",
    "local_key": "local_key_path",
    "upstream.host": "server_address",
    "upstream.port": "server_port",
    "upstream.tls": "server_starttls",
}
ACCOUNT_NAMES = {
    "oauth2.provider": "token_url",
    "oauth2.tenant_id": "token_url",
    "oauth2.token_url": "token_url",
    "oauth2.authorize_url": "permission_url",
    "oauth2.scopes": "oauth2_scope",
    "oauth2.flow": "oauth2_flow",
    "oauth2.client_id": "client_id",
    "oauth2.client_secret": "client_secret",
    "oauth2.service_account_key": "client_secret",
    "oauth2.redirect_uri": "redirect_uri",
    "oauth2.use_pkce": "use_pkce",
    "oauth2.client_certificate_path": "jwt_certificate_path",
    "oauth2.client_key_path": "jwt_key_path",
    "oauth2.password": "oauth2_flow",
    "oauth2.refresh_token": "oauth2_flow",
}


class IniFile:
    """The parsed file, with emailproxy's value lookup and its catch-all fallback."""

    def __init__(self, parser: configparser.ConfigParser, source: str) -> None:
        self.parser, self.source = parser, source
        self.warnings = Warnings(source)
        self.catch_all = self.flag(GLOBAL_SECTION, "allow_catch_all_accounts", False)

    def raw(self, section: str, key: str) -> str | None:
        if not self.parser.has_section(section):
            return None
        value = self.parser.get(section, key, fallback=None)
        return value.strip() if value and value.strip() else None  # `key =` means unset

    def origin(self, account: str, key: str) -> str:
        """The section a value of `account` comes from: itself, `@domain`, then `@`."""
        if not self.catch_all:
            return account
        domain = "@" + account.rpartition("@")[2]
        for section in (account, domain, "@"):
            if self.raw(section, key) is not None:
                return section
        return account

    def get(self, account: str, key: str) -> str | None:
        return self.raw(self.origin(account, key), key)

    def flag(self, section: str, key: str, default: bool) -> bool:
        value = self.raw(section, key)
        if value is None:
            return default
        states = configparser.ConfigParser.BOOLEAN_STATES
        if value.lower() not in states:
            raise ConfigError(
                f"[{section}] {key}", f"{value!r} is not True or False", source=self.source
            )
        return states[value.lower()]

    def error(self, section: str, key: str, message: str) -> ConfigError:
        return ConfigError(
            f"[{section}] {key}" if key else f"[{section}]", message, source=self.source
        )

    def unknown_keys(self, section: str, known: Iterable[str]) -> None:
        known = tuple(known)
        for key in self.parser.options(section):
            if key not in known and key not in self.parser.defaults():
                self.warnings.add(
                    f"[{section}] {key}", f"unknown key, ignored{suggest(key, known)}"
                )


def parse_ini(text: str, source: str) -> configparser.ConfigParser:
    # interpolation off as in emailproxy: `%` is common in secrets and URLs
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text, source=source or "<string>")
    except configparser.DuplicateOptionError as exc:
        raise ConfigError(
            f"[{exc.section}] {exc.option}", "appears twice in the section", source=source
        ) from None
    except configparser.DuplicateSectionError as exc:
        raise ConfigError(f"[{exc.section}]", "section appears twice", source=source) from None
    except configparser.Error as exc:
        lineno = getattr(exc, "lineno", None)
        where = f"line {lineno}" if lineno else "file"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(where, f"not an emailproxy INI file: {first}", source=source) from None
    return parser


def parse_port(text: str, field: str, source: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 5):
        raise ConfigError(field, f"{text!r} is not a port number", source=source)
    return check_port(int(text), field, source=source)
