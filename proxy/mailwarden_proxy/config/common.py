"""Helpers shared by the two configuration loaders: suggestions, URLs, files, warnings."""

from __future__ import annotations

import difflib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from mailwarden_proxy.config.errors import ConfigError
from mailwarden_proxy.secret import Secret

log = logging.getLogger("mailwarden.config")

# Characters that never belong in a token or authorization URL but do turn up when one is
# copied out of Markdown or HTML: "[url](url)", "<placeholder>", stray quotes/backslashes.
_URL_FORBIDDEN = frozenset(' \t\r\n[]<>"\\{}|^`')


class Warnings:
    """Collects non-fatal findings in file order.

    They travel in ProxyConfig.warnings; when loading fails, `reported_on_error` logs the
    ones found so far, so that a misspelt scope in a file refused for its token URL still
    reaches the user.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[str] = []

    def add(self, field: str, message: str) -> None:
        text = f"{field}: {message}"
        if text in self.items:  # inherited catch-all values would repeat the same finding
            return
        self.items.append(text)


@contextmanager
def reported_on_error(warnings: Warnings) -> Iterator[None]:
    try:
        yield
    except ConfigError:
        for text in warnings.items:
            log.warning("%s: %s", warnings.source or "config", text)
        raise


def suggest(word: str, candidates: Iterable[str]) -> str:
    """' (did you mean `x`?)' for the closest candidate, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def check_url(value: str, field: str, *, source: str) -> str:
    """An absolute http(s) URL with a host, or ConfigError naming `field`."""
    bad = sorted({c for c in value if c in _URL_FORBIDDEN})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        hint = " (a Markdown link pasted as a URL?)" if "[" in value or "](" in value else ""
        raise ConfigError(field, f"{value!r} is not a URL: contains {shown}{hint}", source=source)
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises ValueError on a non-numeric or out-of-range port
    except ValueError as exc:
        raise ConfigError(field, f"{value!r} is not a valid URL: {exc}", source=source) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            field, f"{value!r} must be an absolute http:// or https:// URL", source=source
        )
    return value


def read_text_file(path: str, field: str, *, source: str) -> str:
    """The content of a mounted secret file; ConfigError naming `field` when unreadable.

    A single trailing newline is dropped: `echo secret > file` and Kubernetes Secrets
    created from files both add one, and no real secret ends in a line break.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(field, f"cannot read {path!r}: {reason}", source=source) from None
    if text.endswith("\r\n"):
        return text[:-2]
    return text.removesuffix("\n")


def read_secret_file(path: str, field: str, *, source: str) -> Secret:
    value = read_text_file(path, field, source=source)
    if not value:
        raise ConfigError(field, f"{path!r} is empty", source=source)
    return Secret(value)


def check_readable(path: str, field: str, *, source: str) -> str:
    """A certificate/key/CA path that must exist now, so a typo fails at load, not at the
    first connection."""
    if not path:
        raise ConfigError(field, "must not be empty", source=source)
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ConfigError(field, f"{path!r} is not a readable file", source=source)
    return path


def check_service_account_key(key: Secret, field: str, *, source: str) -> Secret:
    """A Google service-account key must be a JSON object; checked here so a truncated
    Secret is reported at load instead of as an opaque token error later."""
    try:
        data = json.loads(key.reveal())
    except (ValueError, RecursionError):
        raise ConfigError(field, "is not valid JSON", source=source) from None
    if not isinstance(data, dict) or "private_key" not in data or "client_email" not in data:
        raise ConfigError(
            field,
            "is not a service-account key (a JSON object with private_key and client_email)",
            source=source,
        )
    return key
