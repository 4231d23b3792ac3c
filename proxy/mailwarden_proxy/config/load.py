"""Entry points: load a configuration file of either format, and describe one.

The format is recognised from the text, not the file name: an emailproxy file opens
with a `[section]` (after comments), everything else is read as native YAML. Both paths
end in the same validated ProxyConfig.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from mailwarden_proxy.config import emailproxy, native
from mailwarden_proxy.config.errors import ConfigError
from mailwarden_proxy.config.model import ProxyConfig
from mailwarden_proxy.config.render import MASK, to_native

Format = Literal["native", "emailproxy"]


def detect_format(text: str) -> Format:
    for line in text.lstrip("\ufeff").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        return "emailproxy" if stripped.startswith("[") else "native"
    return "native"


def _yaml(text: str, source: str) -> object:
    import yaml  # here, not at the top: an emailproxy (INI) file never needs PyYAML

    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}" if mark is not None else "file"
        raise ConfigError(where, f"not valid YAML: {exc.problem or exc}", source=source) from None
    except yaml.YAMLError as exc:
        raise ConfigError("file", f"not valid YAML: {exc}", source=source) from None
    except RecursionError:
        raise ConfigError("file", "not valid YAML: nested too deeply", source=source) from None


def loads(text: str, *, source: str = "") -> ProxyConfig:
    """A validated ProxyConfig from the text of a native or emailproxy file."""
    text = text.lstrip("\ufeff")
    if detect_format(text) == "emailproxy":
        return emailproxy.from_text(text, source=source)
    data = _yaml(text, source)
    if not isinstance(data, dict):
        raise ConfigError(
            "(top level)",
            "is neither a native configuration (a YAML mapping with `version` and "
            "`listeners`) nor an emailproxy file (`[IMAP-1993]`-style sections)",
            source=source,
        )
    return native.from_dict(data, source=source)


def load_config(path: str | Path) -> ProxyConfig:
    """Read, recognise and validate the configuration at `path`."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(source, f"not UTF-8 text (byte {exc.start})") from None
    return loads(text, source=source)


def describe(config: ProxyConfig) -> str:
    """The effective configuration as native YAML, secrets shown as `****`."""
    header = [
        f"# effective configuration{f' of {config.source}' if config.source else ''}",
        f"# native format; secrets are shown as {MASK}",
    ]
    if any(a.local_password is None for a in config.accounts):
        header.append(
            "# accounts without localPassword: the first successful login sets it (emailproxy"
            " meaning); add localPassword or localPasswordFile to use this file as is"
        )
    if config.allow_catch_all_accounts:
        header.append("# catch-all accounts (@domain, @) are enabled")
    import yaml

    body = yaml.safe_dump(to_native(config), sort_keys=False, default_flow_style=False, width=100)
    return "\n".join(header) + "\n" + body
