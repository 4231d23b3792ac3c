"""Failed logins as the error catalogue sees them: one diagnosis, one log line, one count.

`ProxySession` hands every `LoginFailed` here together with what it knows besides the
core (a token error it caught, whether the user name is configured at all); this module
picks the catalogue entry, writes the single structured log line (reason, hint, account,
listener, the provider's own code; never a credential) and counts the failure by reason.

`Backoffs` remembers accounts an upstream asked to leave alone for a while (Microsoft's
IMAP "Request is throttled. Suggested Backoff Time: N milliseconds"): until then a login
of that account is answered "try again later" without contacting the upstream. A plain
deadline per account, checked at login, so no timer is needed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from mailwarden_proxy.catalogue import (
    Diagnosis,
    Stage,
    backoff_seconds,
    by_reason,
    diagnose_connection,
    diagnose_reply,
)
from mailwarden_proxy.logsetup import redact
from mailwarden_proxy.metrics import ProxyMetrics
from mailwarden_proxy.protocols.session import FailureKind

log = logging.getLogger("mailwarden.session")

MAX_BACKOFF = 900.0  # seconds: never trust an upstream's figure beyond this
_MAX_HELD = 10_000  # accounts remembered at once (catch-all configurations)


@dataclass
class Backoffs:
    """Per account (the local user name): when the upstream may be asked again."""

    until: dict[str, float] = field(default_factory=dict)  # monotonic deadlines

    def hold(self, account: str, seconds: float, now: float) -> None:
        if len(self.until) >= _MAX_HELD:
            self.until = {k: t for k, t in self.until.items() if t > now}
        deadline = now + min(max(seconds, 0.0), MAX_BACKOFF)
        self.until[account] = max(self.until.get(account, 0.0), deadline)

    def remaining(self, account: str, now: float) -> float:
        """Seconds left to wait for `account`; 0 when it may go ahead."""
        deadline = self.until.get(account)
        if deadline is None:
            return 0.0
        if deadline <= now:
            del self.until[account]
            return 0.0
        return deadline - now


def throttled(seconds_left: float) -> Diagnosis:
    """A login refused here because the upstream's backoff has not passed yet."""
    return Diagnosis(by_reason("Throttled"), f"backing off, {seconds_left:.1f} s left")


def diagnose(
    kind: FailureKind, detail: str, *, stage: Stage, known_user: bool, upstream_user: str
) -> Diagnosis:
    """The catalogue entry for a `LoginFailed` the core emitted (when the session had no
    diagnosis of its own, as it has for token errors)."""
    if kind is FailureKind.LOCAL_CREDENTIALS:
        return Diagnosis(by_reason("LocalPasswordRejected" if known_user else "UnknownLocalUser"))
    if kind is FailureKind.RATE_LIMITED:
        return Diagnosis(by_reason("LocalLoginRateLimited"))
    if kind is FailureKind.TOKEN_UNAVAILABLE:
        temporary = detail != "permanent"
        reason = "IdentityProviderUnavailable" if temporary else "TokenRequestFailed"
        return Diagnosis(by_reason(reason), detail)
    found = diagnose_reply(stage, detail, username=upstream_user)
    if found is not None:
        return found
    return Diagnosis(by_reason("UpstreamConnectionLost"), detail[:120])


def report(
    diagnosis: Diagnosis,
    *,
    metrics: ProxyMetrics,
    listener: str,
    account: str,
    detail: str,
    peer: str,
) -> None:
    """Count the failure by reason and log its one line."""
    entry = diagnosis.entry
    metrics.login_failures.labels(listener, entry.reason).inc()
    detail = redact(detail)
    shown = f" ({detail})" if detail and detail not in ("permanent", "temporary") else ""
    local = entry.stage is Stage.LOCAL
    log.log(
        logging.INFO if local or entry.temporary else logging.WARNING,
        "login failed for %s: %s%s. %s Fix: %s",
        account,
        entry.reason,
        shown,
        entry.cause,
        entry.fix,
        extra={
            "peer": peer,
            "event": "login_failed",
            "reason": entry.reason,
            "hint": entry.fix,
            "account": account,
            "listener": listener,
            "provider_code": redact(diagnosis.provider_code),
            "temporary": entry.temporary,
        },
    )


def report_unreachable(
    error: BaseException, *, listener: str, address: str, detail: str, peer: str
) -> None:
    """One line for a mail server that could not be reached or secured (DNS, TCP, TLS
    and its certificate): before any login, so no account; counted by the caller."""
    diagnosis = diagnose_connection(error)
    entry = diagnosis.entry
    log.warning(
        "cannot reach upstream %s: %s. %s Fix: %s",
        address,
        detail,
        entry.cause,
        entry.fix,
        extra={
            "peer": peer,
            "event": "upstream_unreachable",
            "reason": entry.reason,
            "hint": entry.fix,
            "listener": listener,
            "upstream": address,
            "provider_code": redact(diagnosis.provider_code),
            "temporary": entry.temporary,
        },
    )


def hold_if_throttled(
    backoffs: Backoffs, diagnosis: Diagnosis, account: str, detail: str, now: float
) -> None:
    """Remember the backoff an upstream's throttling reply asked for."""
    if diagnosis.reason != "Throttled":
        return
    seconds = backoff_seconds(detail)
    if seconds is not None:
        backoffs.hold(account, seconds, now)
