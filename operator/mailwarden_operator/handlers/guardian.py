"""The per-MailAccount authorization loop run by `handlers.authorization`'s daemon.

`Guardian.step()` looks at the MailAccount as it is now and does the one thing due: a
credential check, a device code sign-in, publishing the consent link, or a keep-alive
refresh; it returns how long to sleep. A trigger (spec or credentials changed, consent
stored) cuts the sleep short. See `handlers.authorization` for the whole picture.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import kopf

from mailwarden_operator.consent.server import ConsentServer
from mailwarden_operator.handlers import Runtime
from mailwarden_operator.handlers.custody import (
    REFRESH_FLOWS,
    Loaded,
    Verdict,
    event,
    fetch_token,
    forget_refresh_token,
    iso,
    load,
    parse_iso,
    store_refresh_token,
    verdict_for,
    write_status,
)
from mailwarden_operator.kube import KubeError
from mailwarden_operator.spec import CONSENT_FLOWS
from mailwarden_proxy.config.model import Flow, ProviderKind
from mailwarden_proxy.secret import Secret
from mailwarden_proxy.tokens.base import TokenError
from mailwarden_proxy.tokens.http import DEFAULT_TIMEOUT

IDLE = 300.0  # re-read now and then even without a trigger: a missed watch event heals
POLL = 1.0  # device flow: how often the msal poller's outcome is looked at (no request)
MAX_BACKOFF = 300.0


@dataclass
class Custody:
    """Operator-wide state of this module, kept in kopf's memo (`memo.custody`)."""

    ca_file: str | None
    server: ConsentServer | None = None
    triggers: dict[str, asyncio.Event] = field(default_factory=dict)
    seen: dict[str, object] = field(default_factory=dict)  # what last triggered, per uid

    def trigger(self, uid: str, seen_key: str | None = None, value: object = None) -> None:
        """Wake the MailAccount's daemon; with `seen_key` only if `value` is new."""
        if seen_key is not None:
            if self.seen.get(seen_key) == value:
                return
            self.seen[seen_key] = value
        found = self.triggers.get(uid)
        if found is not None:
            found.set()


class Guardian:
    """The authorization loop of one MailAccount; `step()` returns seconds to sleep."""

    def __init__(
        self,
        rt: Runtime,
        custody: Custody,
        *,
        namespace: str,
        name: str,
        uid: str,
        stopped: kopf.DaemonStopped,
        logger: kopf.Logger,
    ) -> None:
        self.rt, self.custody, self.logger = rt, custody, logger
        self.namespace, self.name, self.uid = namespace, name, uid
        self.stopped = stopped
        self.wake = asyncio.Event()
        self.checked: str | None = None  # fingerprint of the last conclusive check
        self.failures = 0
        self.unsaved: Secret | None = None  # a rotated token whose storing failed

    async def run(self) -> None:
        while not self.stopped:
            try:
                delay = await self.step()
            except KubeError as exc:
                self.logger.warning("API request failed, retrying: %s", exc)
                delay = self._backoff()
            await self.sleep(delay)

    async def sleep(self, seconds: float) -> bool:
        """Sleep until woken (True), stopped or `seconds` passed."""
        if seconds <= 0 or self.stopped:
            return False
        waiter = asyncio.ensure_future(self.wake.wait())
        stopper = asyncio.ensure_future(self.stopped.wait())
        try:
            await asyncio.wait({waiter, stopper}, timeout=seconds, return_when="FIRST_COMPLETED")
        finally:
            waiter.cancel()
            stopper.cancel()
        woken = self.wake.is_set()
        self.wake.clear()
        return woken

    def _backoff(self) -> float:
        self.failures += 1
        return float(min(MAX_BACKOFF, 2.0 ** min(self.failures, 9)))

    async def status(self, verdict: Verdict | None, **fields: Any) -> None:
        await write_status(
            self.rt,
            namespace=self.namespace,
            name=self.name,
            uid=self.uid,
            verdict=verdict,
            fields=fields,
        )

    async def step(self) -> float:
        loaded = await load(self.rt, self.namespace, self.name, self.custody.ca_file)
        if loaded is None or loaded.uid != self.uid:
            return IDLE  # deleted: kopf stops this daemon
        if self.unsaved is not None:  # a rotated token must not be lost: retry storing it
            await store_refresh_token(self.rt, loaded, self.unsaved)
            self.unsaved = None
        if loaded.account is None:
            self.checked = None
            await self.status(
                Verdict(None, "NotChecked", f"credentials not checked: {loaded.problem}")
            )
            return IDLE
        flow = loaded.flow
        if flow in CONSENT_FLOWS and loaded.stored_token is None:
            if flow is Flow.DEVICE_CODE:
                return await self.device_flow(loaded)
            await self.await_browser(loaded)
            return IDLE
        if not self.rt.settings.check_credentials and flow not in REFRESH_FLOWS:
            await self.status(Verdict(True, "NotChecked", "credential checks are switched off"))
            return IDLE
        if loaded.fingerprint != self.checked:
            return await self.check(loaded, keep_alive=False)
        if flow in REFRESH_FLOWS:
            due = self._refresh_due(loaded) - time.time()
            return await self.check(loaded, keep_alive=True) if due <= 0 else due
        return IDLE

    def _refresh_due(self, loaded: Loaded) -> float:
        last = parse_iso(loaded.status.get("lastRefreshTime"))
        if last is None:
            last = parse_iso(loaded.condition("Authorized").get("lastTransitionTime")) or 0.0
        return last + self.rt.settings.refresh_interval

    async def check(self, loaded: Loaded, *, keep_alive: bool) -> float:
        assert loaded.account is not None
        flow, host = loaded.flow, urlsplit(loaded.account.oauth2.token_url).netloc
        started = time.time()
        try:
            fetched = await asyncio.to_thread(
                fetch_token, loaded.account, loaded.files, DEFAULT_TIMEOUT
            )
        except TokenError as exc:
            verdict = verdict_for(exc, flow, host, loaded.account.username)
            self.logger.warning("token request failed: %s", verdict.message)
            if exc.temporary:
                if keep_alive:  # the last token still works: warn, don't flip Authorized
                    await event(self.rt, loaded.ma, "RefreshFailed", verdict.message, warning=True)
                else:
                    await self.status(verdict)
                return self._backoff()
            self.failures = 0
            self.checked = loaded.fingerprint  # permanent: wait for something to change
            fields: dict[str, Any] = {}
            if verdict.reason == "ConsentRequired" and flow in REFRESH_FLOWS:
                await forget_refresh_token(self.rt, loaded)  # refused: nothing may reuse it
                if flow is Flow.AUTHORIZATION_CODE:
                    fields["authorization"] = self._consent_authorization(loaded)
            await self.status(verdict, **fields)
            return 0.0 if flow in CONSENT_FLOWS else IDLE
        if fetched.refresh_token is not None:
            try:
                await store_refresh_token(self.rt, loaded, fetched.refresh_token)
            except KubeError:
                self.unsaved = fetched.refresh_token
                raise
        self.failures, self.checked = 0, loaded.fingerprint
        fields = {"tokenExpiresAt": iso(fetched.expires_at), "authorization": None}
        if flow in REFRESH_FLOWS:
            fields["lastRefreshTime"] = iso(started)
        what = "refreshed" if keep_alive else "acquired"
        message = f"token {what} from {host}, valid until {iso(fetched.expires_at)}"
        await self.status(Verdict(True, "TokenAcquired", message), **fields)
        if keep_alive:
            self.logger.info("refresh token kept alive")
        return self.rt.settings.refresh_interval if flow in REFRESH_FLOWS else IDLE

    def _pending_reason(self, loaded: Loaded) -> str:
        # After a refusal the reason stays ConsentRequired (it says why a person is asked)
        current = loaded.condition("Authorized")
        if current.get("status") == "False" and current.get("reason") == "ConsentRequired":
            return "ConsentRequired"
        return "AwaitingConsent"

    def _consent_authorization(self, loaded: Loaded) -> dict[str, str] | None:
        server = self.custody.server
        if server is None or loaded.account is None:
            return None
        url = server.consent_url(self.namespace, self.name)
        who = loaded.account.username
        return {"consentUrl": url, "message": f"Open {url} and sign in as {who}."}

    async def await_browser(self, loaded: Loaded) -> None:
        authorization = self._consent_authorization(loaded)
        if authorization is None:
            await self.status(
                Verdict(
                    False,
                    "ConsentUnavailable",
                    "the authorizationCode flow needs the operator's consent server: set "
                    "MAILWARDEN_EXTERNAL_BASE_URL",
                )
            )
            return
        verdict = Verdict(False, self._pending_reason(loaded), authorization["message"])
        await self.status(verdict, authorization=authorization)

    async def device_flow(self, loaded: Loaded) -> float:
        """Runs one device code sign-in until approved, spec changed or stopped."""
        assert loaded.account is not None and loaded.spec is not None
        if loaded.spec.provider is not ProviderKind.MICROSOFT:
            await self.status(
                Verdict(False, "UnsupportedFlow", "the deviceCode flow exists for microsoft only")
            )
            return IDLE
        from mailwarden_proxy.tokens.msal_provider import MsalProvider  # msal is heavy

        o = loaded.account.oauth2
        account = dataclasses.replace(
            loaded.account,
            oauth2=dataclasses.replace(o, flow=Flow.DEVICE_CODE, refresh_token=None),
        )
        rotated: list[Secret] = []
        provider = MsalProvider(account, on_refresh_token=lambda _u, token: rotated.append(token))
        host, published = urlsplit(o.token_url).netloc, None
        reason = self._pending_reason(loaded)
        try:
            while not self.stopped:
                try:
                    token = await asyncio.to_thread(provider.fetch, account.username)
                    break
                except TokenError as exc:
                    prompt = provider.pending_device_code
                    if prompt is not None and prompt.user_code != published:
                        if published is not None:
                            await event(
                                self.rt,
                                loaded.ma,
                                "DeviceCodeRenewed",
                                "the previous code expired or was declined; a new code was issued",
                                warning=True,
                            )
                        published = prompt.user_code
                        authorization = {
                            "userCode": prompt.user_code,
                            "verificationUri": prompt.verification_uri,
                            "expiresAt": iso(prompt.expires_at),
                            "message": prompt.message,
                        }
                        message = (
                            f"open {prompt.verification_uri} and enter the code {prompt.user_code}"
                        )
                        await self.status(
                            Verdict(False, reason, message), authorization=authorization
                        )
                    elif prompt is None and exc.code != "authorization_pending":
                        verdict = verdict_for(exc, Flow.DEVICE_CODE, host, account.username)
                        if exc.temporary or exc.code in ("authorization_declined", "expired_token"):
                            self.logger.warning("device code sign-in: %s", verdict.message)
                        else:  # the client registration is wrong: a person can't fix that
                            await self.status(verdict, authorization=None)
                            self.checked = loaded.fingerprint
                            return IDLE
                if await self.sleep(POLL):
                    return 0.0  # spec or credentials changed: start over with the new ones
        finally:
            provider.close()
        if self.stopped:
            return 0.0
        if not rotated:
            await self.status(
                Verdict(
                    False,
                    "NoRefreshToken",
                    "the sign-in gave no refresh token (offline_access missing from the scopes?)",
                ),
                authorization=None,
            )
            return IDLE
        await store_refresh_token(self.rt, loaded, rotated[-1])
        self.checked, self.failures = loaded.fingerprint, 0
        message = f"device code sign-in completed; token valid until {iso(token.expires_at)}"
        await self.status(
            Verdict(True, "TokenAcquired", message),
            authorization=None,
            tokenExpiresAt=iso(token.expires_at),
            lastRefreshTime=iso(time.time()),
        )
        return self.rt.settings.refresh_interval
