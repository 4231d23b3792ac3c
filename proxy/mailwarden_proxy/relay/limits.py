"""What the relay says when a limit ends a connection, and the idle-sweep timing.

Each protocol gets its own "goodbye" line, sent before the proxy closes a connection
itself: refused over the per-listener cap (as the greeting, with the protocol's "try
again later" code), not logged in within the login timeout, or idle after login. IMAP
allows an untagged BYE at any time (RFC 3501 §7.1.5), POP3 and SMTP servers send an
unsolicited -ERR / 421 on their own timeouts (RFC 5321 §3.8).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from mailwarden_proxy.config.model import Limits, MailProtocol


@dataclass(frozen=True)
class Goodbyes:
    busy: bytes  # over max_connections: the whole "greeting"
    login_timeout: bytes  # the pre-login dialogue took longer than login_timeout
    idle_timeout: bytes  # no bytes either way after login for the idle timeout


GOODBYE = {
    MailProtocol.IMAP: Goodbyes(
        busy=b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n",
        login_timeout=b"* BYE Login not completed in time, closing the connection\r\n",
        idle_timeout=b"* BYE Autologout; idle for too long\r\n",
    ),
    MailProtocol.POP3: Goodbyes(
        busy=b"-ERR [SYS/TEMP] Too many connections, try again later\r\n",
        login_timeout=b"-ERR Login not completed in time, closing the connection\r\n",
        idle_timeout=b"-ERR Idle for too long, closing the connection\r\n",
    ),
    MailProtocol.SMTP: Goodbyes(
        busy=b"421 4.3.2 mailwarden Too many connections, try again later\r\n",
        login_timeout=b"421 4.4.2 mailwarden Login not completed in time, closing connection\r\n",
        idle_timeout=b"421 4.4.2 mailwarden Idle for too long, closing connection\r\n",
    ),
}

# One sweep over the spliced sessions finds the idle ones: a float per session instead of
# a timer per session. It runs every quarter of the shortest idle timeout, so a session
# is closed between 1 and 1.25 timeouts after its last byte, at most every 30 s.
MIN_SWEEP_INTERVAL = 0.05
MAX_SWEEP_INTERVAL = 30.0


def sweep_interval(limits: Limits) -> float:
    timeouts = [t for p in MailProtocol if (t := limits.idle_timeout(p)) > 0]
    if not timeouts:
        return MAX_SWEEP_INTERVAL  # nothing to do; look at the (reloadable) config again later
    return min(MAX_SWEEP_INTERVAL, max(MIN_SWEEP_INTERVAL, min(timeouts) / 4))


def is_loopback(host: str) -> bool:
    """A bound socket address reachable from this host only."""
    try:
        return ipaddress.ip_address(host.partition("%")[0]).is_loopback
    except ValueError:
        return False
