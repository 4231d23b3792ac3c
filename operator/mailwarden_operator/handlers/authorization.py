"""The `Authorized` condition: credential checks, consent flows and refresh-token keep-alive.

One kopf daemon per MailAccount (`Guardian`) does all token work for it, so that no two
requests ever race with one single-use refresh token. It wakes when the MailAccount's
spec changes, when its rendered `<ma>-proxy` Secret changes (a rotated client secret),
when the consent server stored a token, and when a keep-alive refresh is due:

- clientCredentials, serviceAccount, password, refreshToken: fetch one token with the
  Account render builds; Authorized True (`TokenAcquired`) or False with a reason from
  the IdP's error code; temporary failures (`IdentityProviderUnavailable`) back off.
- deviceCode without a stored token: run msal's device flow, publish the code in
  `status.authorization`, store the refresh token once a person approved it; an expired
  code is replaced by a new one.
- authorizationCode without a stored token: point `status.authorization.consentUrl` at
  the consent server (`consent.server`) and wait for its callback.
- refresh-token flows with a token: refresh every `settings.refresh_interval`, store the
  rotated token; invalid_grant → `ConsentRequired` and the consent starts again.

A daemon rather than `@kopf.timer` because a timer's interval is fixed when the module is
imported, before the settings are read, and because one loop per object also serialises
the checks, the device flow and the refreshes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import kopf

from mailwarden_operator import render
from mailwarden_operator.consent.exchange import CodeGrant
from mailwarden_operator.consent.server import (
    Awaiting,
    ConsentServer,
    ConsentTarget,
    ConsentUnavailable,
)
from mailwarden_operator.handlers import Runtime, runtime
from mailwarden_operator.handlers.custody import (
    Loaded,
    Verdict,
    event,
    iso,
    load,
    store_refresh_token,
    write_status,
)
from mailwarden_operator.handlers.guardian import Custody, Guardian
from mailwarden_operator.kube import GROUP, VERSION
from mailwarden_operator.kube import MAILACCOUNTS as API_PATH
from mailwarden_proxy.catalogue import diagnose_token_error
from mailwarden_proxy.config.model import Flow

MAILACCOUNTS = (GROUP, VERSION, "mailaccounts")
# An extra CA bundle for token endpoints (a private IdP; the tests' local one).


def _custody(memo: Any) -> Custody:
    custody = getattr(memo, "custody", None)
    if not isinstance(custody, Custody):
        raise kopf.TemporaryError("authorization state not ready yet", delay=1)
    return custody


# --------------------------------------------------------------------------- kopf


@kopf.on.startup()
async def start_consent_server(*, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    try:
        rt = runtime(memo)
    except RuntimeError:  # main's start-up handler makes the runtime; it runs after us
        raise kopf.TemporaryError("waiting for the operator runtime", delay=0.2) from None
    custody = Custody(ca_file=rt.settings.token_ca_file)
    base = rt.settings.external_base_url
    if base:
        server = ConsentServer(Backend(rt, custody), base)
        await server.start(rt.settings.consent_host, rt.settings.consent_port)
        custody.server = server
    else:
        logger.info("no external base URL set: the authorizationCode flow is unavailable")
    memo.custody = custody


@kopf.on.cleanup()
async def stop_consent_server(*, memo: kopf.Memo, **_: Any) -> None:
    custody = getattr(memo, "custody", None)
    if isinstance(custody, Custody) and custody.server is not None:
        await custody.server.stop()


@kopf.on.event(*MAILACCOUNTS)
def mailaccount_event(*, type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    # Only spec changes (generation) and a person asking for a check matter; our own
    # status writes must not wake the daemon.
    custody = getattr(memo, "custody", None)
    if isinstance(custody, Custody) and type is not None:
        uid = str(body.metadata.uid)
        custody.trigger(uid, f"generation/{uid}", body.metadata.get("generation"))
        asked = (body.metadata.annotations or {}).get(render.CHECK_ANNOTATION)
        custody.trigger(uid, f"asked/{uid}", asked)


@kopf.on.event("", "v1", "secrets", labels={render.MAILACCOUNT_LABEL: kopf.PRESENT})
def rendered_secret_event(*, type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    # A changed <ma>-proxy means changed credentials (a rotated client secret, say).
    custody = getattr(memo, "custody", None)
    name = str(body.metadata.name)
    if not isinstance(custody, Custody) or type is None:
        return
    if not name.endswith(render.PROXY_SECRET_SUFFIX):
        return
    config_hash = (body.metadata.annotations or {}).get(render.CONFIG_HASH_ANNOTATION)
    for ref in body.metadata.get("ownerReferences") or []:
        if ref.get("kind") == render.KIND and ref.get("uid"):
            custody.trigger(ref["uid"], f"config/{ref['uid']}", config_hash)


@kopf.daemon(*MAILACCOUNTS, id="authorization", cancellation_timeout=5.0)
async def authorization_daemon(
    *,
    namespace: str | None,
    name: str,
    uid: str,
    memo: kopf.Memo,
    stopped: kopf.DaemonStopped,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    rt, custody = runtime(memo), _custody(memo)
    guardian = Guardian(
        rt, custody, namespace=namespace or "", name=name, uid=uid, stopped=stopped, logger=logger
    )
    custody.triggers[uid] = guardian.wake
    try:
        await guardian.run()
    finally:
        custody.triggers.pop(uid, None)


# --------------------------------------------------------------------------- consent


class Backend:
    """`consent.server.ConsentBackend` on the Kubernetes API."""

    def __init__(self, rt: Runtime, custody: Custody) -> None:
        self.rt, self.custody = rt, custody

    async def awaiting(self) -> Sequence[Awaiting]:
        namespaces = self.rt.settings.namespaces
        items: list[dict[str, Any]] = []
        if namespaces:
            for namespace in namespaces:
                items += await self.rt.kube.list_mailaccounts(namespace)
        else:
            found = await self.rt.kube.request("GET", f"{API_PATH}/mailaccounts")
            items = list(found.get("items") or [])
        waiting = []
        for ma in items:
            spec, meta = ma.get("spec") or {}, ma["metadata"]
            if (spec.get("oauth2") or {}).get("flow") != Flow.AUTHORIZATION_CODE.value:
                continue
            conditions = (ma.get("status") or {}).get("conditions") or []
            if any(c.get("type") == "Authorized" and c.get("status") == "True" for c in conditions):
                continue
            waiting.append(Awaiting(meta["namespace"], meta["name"], str(spec.get("username"))))
        return waiting

    async def _load(self, namespace: str, name: str) -> Loaded:
        namespaces = self.rt.settings.namespaces
        loaded = None
        if not namespaces or namespace in namespaces:
            loaded = await load(self.rt, namespace, name, self.custody.ca_file)
        if loaded is None:
            raise ConsentUnavailable(f"There is no MailAccount {namespace}/{name}.")
        return loaded

    async def target(self, namespace: str, name: str) -> ConsentTarget:
        loaded = await self._load(namespace, name)
        if loaded.flow is not Flow.AUTHORIZATION_CODE:
            raise ConsentUnavailable(
                f"MailAccount {namespace}/{name} does not use the authorizationCode flow.", 409
            )
        if loaded.account is None:
            raise ConsentUnavailable(f"MailAccount {namespace}/{name}: {loaded.problem}", 409)
        return ConsentTarget(
            namespace, name, loaded.uid, loaded.account, loaded.account.oauth2.use_pkce
        )

    async def granted(self, target: ConsentTarget, grant: CodeGrant) -> None:
        assert grant.refresh_token is not None
        loaded = await self._load(target.namespace, target.name)
        if loaded.uid != target.uid:
            raise ConsentUnavailable("The MailAccount was replaced meanwhile.", 409)
        await store_refresh_token(self.rt, loaded, grant.refresh_token)
        message = f"consent given; token valid until {iso(grant.expires_at)}"
        await write_status(
            self.rt,
            namespace=target.namespace,
            name=target.name,
            uid=target.uid,
            verdict=Verdict(True, "TokenAcquired", message),
            fields={"authorization": None, "tokenExpiresAt": iso(grant.expires_at)},
        )
        self.custody.trigger(target.uid)

    async def refused(self, target: ConsentTarget, reason: str, message: str) -> None:
        ma = await self.rt.kube.get_mailaccount(target.namespace, target.name)
        text = f"{reason}: {message}"
        entry = diagnose_token_error(reason, message, username=target.account.username).entry
        if entry.reason != "TokenRequestFailed":  # recognised: say what fixes it
            text = f"{entry.reason}: {entry.cause} Fix: {entry.fix} ({text})"
        await event(self.rt, ma, "ConsentFailed", text, warning=True)
