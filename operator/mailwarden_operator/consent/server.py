"""The consent web server: a page listing MailAccounts awaiting consent, the start of each
sign-in, and the OAuth 2.0 redirect target `/oauth2/callback`.

It knows nothing of Kubernetes: a `ConsentBackend` (implemented by
`handlers.authorization`) finds MailAccounts and records the outcome. Routes live under
the path of the external base URL (`https://mail.example.com/mailwarden` → `/mailwarden/…`),
because ingress controllers forward the full path by default and the links the pages hand
out must be exactly what the browser will request.

Pages never contain a token, a code or a verifier, carry `Referrer-Policy: no-referrer`
(the callback URL holds the authorization code) and a CSP that allows no script at all;
every value that reaches HTML is escaped.
"""

from __future__ import annotations

import asyncio
import html
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import quote, urlsplit

from aiohttp import web

from mailwarden_operator.consent.exchange import CodeGrant, authorize_url, exchange_code
from mailwarden_operator.consent.state import StateError, StateProblem, StateStore
from mailwarden_proxy.config.model import Account
from mailwarden_proxy.tokens.base import TokenError
from mailwarden_proxy.tokens.errors import scrub

log = logging.getLogger(__name__)

CALLBACK_PATH = "/oauth2/callback"
_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}
_STATE_MESSAGES = {
    StateProblem.UNKNOWN: "This sign-in link is unknown. Start again from the consent page.",
    StateProblem.EXPIRED: "This sign-in took too long and expired. Start again from the "
    "consent page.",
    StateProblem.REPLAYED: "This sign-in was already completed or used. Start again from the "
    "consent page if you need to.",
}


@dataclass(frozen=True)
class ConsentTarget:
    """A MailAccount that can be consented to, with the proxy Account built from it."""

    namespace: str
    name: str
    uid: str
    account: Account = field(repr=False)
    use_pkce: bool = True

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Awaiting:
    """A line of the consent page."""

    namespace: str
    name: str
    username: str


class ConsentUnavailable(Exception):
    """The MailAccount can't be consented to now; the message is shown to the person."""

    def __init__(self, message: str, status: int = 404) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class ConsentBackend(Protocol):
    async def awaiting(self) -> Sequence[Awaiting]:
        """The authorizationCode MailAccounts without a working consent."""
        ...

    async def target(self, namespace: str, name: str) -> ConsentTarget:
        """The MailAccount to sign in for; raises ConsentUnavailable."""
        ...

    async def granted(self, target: ConsentTarget, grant: CodeGrant) -> None:
        """Store the refresh token and mark the MailAccount Authorized."""
        ...

    async def refused(self, target: ConsentTarget, reason: str, message: str) -> None:
        """Record (as an Event) that a sign-in failed; nothing is stored."""
        ...


class ConsentServer:
    """The aiohttp application and its listener; `start()` in a kopf startup handler."""

    def __init__(
        self,
        backend: ConsentBackend,
        external_base_url: str,
        *,
        states: StateStore | None = None,
    ) -> None:
        self.backend = backend
        self.base_url = external_base_url.rstrip("/")
        self.redirect_uri = self.base_url + CALLBACK_PATH
        self.states = states or StateStore()
        self.prefix = urlsplit(self.base_url).path.rstrip("/")
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self.app = web.Application(middlewares=[_security_headers])
        self.app.add_routes(
            [
                web.get(self.prefix + "/", self.index),
                web.get(self.prefix + "/consent/{namespace}/{name}", self.start_consent),
                web.get(self.prefix + CALLBACK_PATH, self.callback),
            ]
        )
        if self.prefix:  # `/mailwarden` as well as `/mailwarden/`
            self.app.router.add_get(self.prefix, self.index)

    async def start(self, host: str, port: int) -> None:
        # access_log=None: the callback's query string holds the authorization code
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=128)
        await site.start()
        addresses = self._runner.addresses  # the real port when `port` was 0
        self.port = int(addresses[0][1]) if addresses else port
        log.info(
            "consent server listening on %s:%s, external URL %s", host, self.port, self.base_url
        )

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def consent_url(self, namespace: str, name: str) -> str:
        """The link that starts the sign-in for one MailAccount (status.authorization)."""
        return f"{self.base_url}/consent/{quote(namespace, safe='')}/{quote(name, safe='')}"

    # -- handlers ------------------------------------------------------------------------
    async def index(self, request: web.Request) -> web.Response:
        try:
            waiting = sorted(await self.backend.awaiting(), key=lambda a: (a.namespace, a.name))
        except Exception:
            log.exception("listing MailAccounts for the consent page failed")
            return _page(503, "Unavailable", "<p>The MailAccounts could not be listed.</p>")
        if not waiting:
            body = "<p>No MailAccount is waiting for consent.</p>"
        else:
            rows = "".join(
                f"<tr><td>{_e(a.namespace)}</td><td>{_e(a.name)}</td><td>{_e(a.username)}</td>"
                f'<td><a class="sign-in" href="{_e(self.consent_url(a.namespace, a.name))}">'
                f"Sign in</a></td></tr>"
                for a in waiting
            )
            body = (
                "<p>Sign in with the mailbox shown to let mailwarden reach it.</p>"
                "<table><tr><th>Namespace</th><th>MailAccount</th><th>Mailbox</th><th></th></tr>"
                f"{rows}</table>"
            )
        return _page(200, "MailAccounts awaiting consent", body)

    async def start_consent(self, request: web.Request) -> web.Response:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        try:
            target = await self.backend.target(namespace, name)
        except ConsentUnavailable as exc:
            return _page(exc.status, "Cannot sign in", f"<p>{_e(exc.message)}</p>")
        state, pkce = self.states.issue(namespace, name, target.uid, self.redirect_uri)
        try:
            location = authorize_url(
                target.account,
                redirect_uri=self.redirect_uri,
                state=state,
                challenge=pkce.challenge if target.use_pkce else None,
            )
        except ValueError as exc:
            return _page(409, "Cannot sign in", f"<p>{_e(str(exc))}</p>")
        log.info("consent for MailAccount %s started", target.key)
        raise web.HTTPFound(location, headers=_HEADERS)

    async def callback(self, request: web.Request) -> web.Response:
        query = request.query
        try:
            pending = self.states.consume(query.get("state", ""))
        except StateError as exc:
            log.warning("consent callback refused: state %s", exc.problem.value)
            return _page(400, "Sign-in not accepted", f"<p>{_e(_STATE_MESSAGES[exc.problem])}</p>")
        where = f"{pending.namespace}/{pending.name}"
        try:
            target = await self.backend.target(pending.namespace, pending.name)
        except ConsentUnavailable as exc:
            return _page(exc.status, "Cannot sign in", f"<p>{_e(exc.message)}</p>")
        if target.uid != pending.uid:  # deleted and re-created while the person signed in
            return _page(409, "Cannot sign in", "<p>The MailAccount was replaced meanwhile.</p>")
        error = query.get("error")
        if error is not None or "code" not in query:
            code = scrub(error or "missing_code")[:64]
            description = scrub(query.get("error_description", ""))
            await self._refused(target, code, description or "the identity provider sent no code")
            return _page(
                400,
                "Sign-in failed",
                f"<p>The identity provider answered <code>{_e(code)}</code>"
                f"{': ' + _e(description) if description else '.'}</p>"
                f"<p>MailAccount {_e(where)} is not authorized.</p>",
            )
        try:
            grant = await asyncio.to_thread(
                exchange_code,
                target.account,
                query["code"],
                redirect_uri=pending.redirect_uri,
                verifier=pending.pkce.verifier if target.use_pkce else None,
            )
        except TokenError as exc:
            await self._refused(target, exc.code, exc.description)
            status = 502 if exc.temporary else 400
            return _page(
                status,
                "Sign-in failed",
                f"<p>The token endpoint answered <code>{_e(exc.code)}</code>"
                f"{': ' + _e(exc.description) if exc.description else '.'}</p>",
            )
        problem = _check_grant(target, grant)
        if problem is not None:
            await self._refused(
                target, "WrongAccount" if grant.refresh_token else "NoRefreshToken", problem
            )
            return _page(400, "Sign-in not accepted", f"<p>{_e(problem)}</p>")
        try:
            await self.backend.granted(target, grant)
        except Exception:
            log.exception("storing the consent of MailAccount %s failed", where)
            return _page(503, "Not stored", "<p>The consent could not be stored; try again.</p>")
        log.info("consent for MailAccount %s stored", where)
        return _page(
            200,
            "Authorized",
            f"<p>Authorized — you can close this window.</p>"
            f"<p>MailAccount {_e(where)} ({_e(target.account.username)}) can now reach the "
            f"mailbox.</p>",
        )

    async def _refused(self, target: ConsentTarget, reason: str, message: str) -> None:
        log.warning("consent for MailAccount %s failed: %s %s", target.key, reason, message)
        try:
            await self.backend.refused(target, reason, message)
        except Exception:
            log.exception("recording the failed consent of %s failed", target.key)


def _check_grant(target: ConsentTarget, grant: CodeGrant) -> str | None:
    if grant.refresh_token is None:
        return (
            "The identity provider gave no refresh token (is offline_access among the scopes?); "
            "nothing was stored."
        )
    wanted = target.account.username
    if grant.signed_in_as is not None and grant.signed_in_as.lower() != wanted.lower():
        return (
            f"You signed in as {grant.signed_in_as}, but this MailAccount is for {wanted}. "
            "Nothing was stored; sign in with that mailbox."
        )
    return None


def _e(value: str) -> str:
    return html.escape(value, quote=True)


def _page(status: int, title: str, body_html: str) -> web.Response:
    """`body_html` must already be escaped; the title is escaped here."""
    text = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width">'
        f"<title>{_e(title)} · mailwarden</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:48rem;padding:0 1rem}"
        "td,th{padding:.3rem .8rem;text-align:left}"
        "</style></head><body>"
        f"<h1>{_e(title)}</h1>{body_html}</body></html>"
    )
    return web.Response(status=status, text=text, content_type="text/html", headers=_HEADERS)


@web.middleware
async def _security_headers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400:  # aiohttp's own 404/405 pages: plain text, no reflection
            return _page(exc.status, exc.reason, "")
        raise
    for key, value in _HEADERS.items():
        response.headers.setdefault(key, value)
    return response
