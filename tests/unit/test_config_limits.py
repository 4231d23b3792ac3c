"""The `limits` section: connection cap, idle timeouts, failed-login rate limit; defaults,
errors naming the field, the emailproxy loader's defaults, and `--check` round trips."""

from __future__ import annotations

from typing import Any

import pytest

from mailwarden_proxy.config import native
from mailwarden_proxy.config.emailproxy import from_text
from mailwarden_proxy.config.errors import ConfigError
from mailwarden_proxy.config.model import Limits, MailProtocol
from mailwarden_proxy.config.render import to_native
from tests.unit.test_config_native import base


def load(limits: Any) -> Any:
    doc = base()
    doc["limits"] = limits
    return native.from_dict(doc, source="test.yaml")


def error(limits: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(limits)
    return info.value


def test_defaults_respect_the_protocols_and_the_bench() -> None:
    limits = load({}).limits
    assert limits == Limits()
    assert limits.max_connections >= 1000  # bench: 1,000 idle IMAP sessions, one listener
    # RFC 2177: IDLE is re-issued every 29 minutes; RFC 3501 §5.4: autologout >= 30 min
    assert limits.idle_timeout(MailProtocol.IMAP) > 30 * 60
    assert limits.idle_timeout(MailProtocol.POP3) >= 10 * 60  # RFC 1939 §3
    # RFC 5321 §4.5.3.2.6: a client waits 10 minutes for the end-of-DATA reply
    assert limits.idle_timeout(MailProtocol.SMTP) >= 10 * 60
    assert (limits.failed_login_burst, limits.failed_logins_per_minute) == (10, 10.0)


def test_every_key() -> None:
    limits = load(
        {
            "maxConnectionsPerListener": 50,
            "idleTimeoutSeconds": {"imap": 3600, "smtp": 0},
            "failedLocalLogins": {"burst": 0, "perMinute": 2.5, "delaySeconds": 0},
        }
    ).limits
    assert limits.max_connections == 50
    assert limits.idle_timeout(MailProtocol.IMAP) == 3600
    assert limits.idle_timeout(MailProtocol.POP3) == Limits().pop3_idle_timeout  # default kept
    assert limits.idle_timeout(MailProtocol.SMTP) == 0  # never
    assert limits.failed_login_burst == 0
    assert limits.failed_logins_per_minute == 2.5
    assert limits.failed_login_delay == 0


def test_one_idle_timeout_for_every_protocol() -> None:
    limits = load({"idleTimeoutSeconds": 2400}).limits
    assert {limits.idle_timeout(p) for p in MailProtocol} == {2400}


@pytest.mark.parametrize(
    ("limits", "field", "text"),
    [
        ({"maxConnectionsPerListener": 0}, "limits.maxConnectionsPerListener", "at least 1"),
        ({"maxConnectionsPerListener": "many"}, "limits.maxConnectionsPerListener", "integer"),
        ({"idleTimeoutSeconds": -1}, "limits.idleTimeoutSeconds", "zero or a positive"),
        ({"idleTimeoutSeconds": "31m"}, "limits.idleTimeoutSeconds", "must be a number"),
        ({"idleTimeoutSeconds": {"imap": True}}, "limits.idleTimeoutSeconds.imap", "number"),
        ({"idleTimeoutSeconds": {"pop": 60}}, "limits.idleTimeoutSeconds.pop", "pop3"),
        ({"idleTimeoutSeconds": float("inf")}, "limits.idleTimeoutSeconds", "positive"),
        ({"failedLocalLogins": {"burst": -1}}, "limits.failedLocalLogins.burst", "negative"),
        ({"failedLocalLogins": {"perMinute": 0}}, "limits.failedLocalLogins.perMinute", ""),
        ({"failedLocalLogins": {"delaySeconds": -2}}, "limits.failedLocalLogins.delaySeconds", ""),
        ({"failedLocalLogins": {"burts": 3}}, "limits.failedLocalLogins.burts", "burst"),
        ({"failedLocalLogins": 5}, "limits.failedLocalLogins", "mapping"),
        ({"maxConnections": 5}, "limits.maxConnections", "maxConnectionsPerListener"),
    ],
)
def test_errors_name_the_field(limits: Any, field: str, text: str) -> None:
    exc = error(limits)
    assert exc.field == field
    assert text in exc.message


@pytest.mark.parametrize("value", [600, {"imap": 600}])
def test_a_short_imap_idle_timeout_is_a_warning(value: Any) -> None:
    config = load({"idleTimeoutSeconds": value})
    assert any("RFC 3501" in w and "idleTimeoutSeconds" in w for w in config.warnings)
    assert not load({"idleTimeoutSeconds": 0}).warnings  # never closing is fine


def test_render_round_trips_the_new_keys() -> None:
    config = load(
        {
            "maxConnectionsPerListener": 7,
            "idleTimeoutSeconds": {"imap": 1900, "pop3": 0, "smtp": 300},
            "failedLocalLogins": {"burst": 4, "perMinute": 1, "delaySeconds": 0.5},
        }
    )
    rendered = to_native(config)
    assert rendered["limits"]["idleTimeoutSeconds"] == {"imap": 1900, "pop3": 0, "smtp": 300}
    assert native.from_dict(rendered).limits == config.limits


def test_render_leaves_new_limits_at_their_defaults_out() -> None:
    """A file the new operator renders must load in the previous sidecar (which refuses
    unknown keys) while an upgrade rolls out, and a Secret must not change just because
    the operator was upgraded."""
    rendered = to_native(load({}))
    assert set(rendered["limits"]) == {
        "maxLineLength",
        "maxLiteralLength",
        "connectTimeoutSeconds",
        "loginTimeoutSeconds",
    }
    only_one = to_native(load({"maxConnectionsPerListener": 7}))["limits"]
    assert only_one["maxConnectionsPerListener"] == 7
    assert "idleTimeoutSeconds" not in only_one and "failedLocalLogins" not in only_one


EMAILPROXY = """
[IMAP-1993]
server_address = outlook.office365.com
server_port = 993

[SMTP-1587]
server_address = smtp.office365.com
server_port = 587
server_starttls = True
local_address = 0.0.0.0

[app@example.com]
token_url = https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token
oauth2_scope = https://outlook.office365.com/IMAP.AccessAsUser.All offline_access
oauth2_flow = client_credentials
client_id = cid
client_secret = secret
"""


def test_emailproxy_files_get_the_default_limits_and_loopback() -> None:
    """emailproxy has no setting for any of these (its limits are constants in the code),
    so its files run with the defaults; a missing local_address means 127.0.0.1, not
    emailproxy's `::`, and an explicit non-loopback one is warned about."""
    config = from_text(EMAILPROXY, source="emailproxy.config")
    assert config.limits == Limits()
    imap, smtp = config.listeners
    assert imap.local_address == "127.0.0.1"
    assert smtp.local_address == "0.0.0.0"
    assert any("local_address" in w and "(::)" in w for w in config.warnings)
    assert any("0.0.0.0 is reachable from other hosts" in w for w in config.warnings)
