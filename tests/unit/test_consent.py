"""The consent flow's pure parts: PKCE, state values, the authorize URL, id_token names and
the mapping from IdP errors to the Authorized condition."""

from __future__ import annotations

import base64
import json
from urllib.parse import parse_qs, urlsplit

import pytest

from mailwarden_operator.consent.exchange import _signed_in_as, authorize_url
from mailwarden_operator.consent.pkce import Pkce, challenge_for
from mailwarden_operator.consent.state import StateError, StateProblem, StateStore
from mailwarden_operator.handlers.custody import verdict_for
from mailwarden_proxy.config.model import Account, Flow, OAuth2, ProviderKind
from mailwarden_proxy.secret import Secret
from mailwarden_proxy.tokens.base import PermanentTokenError, TemporaryTokenError, TokenError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_pkce_s256_matches_rfc7636_appendix_b() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert challenge_for(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    pair = Pkce.new()
    assert len(pair.verifier) == 43 and pair.challenge == challenge_for(pair.verifier)
    assert pair.verifier not in repr(pair)


def test_state_is_single_use() -> None:
    store = StateStore(clock=Clock())
    state, pkce = store.issue("ns", "ma", "uid-1", "https://x/oauth2/callback")
    pending = store.consume(state)
    assert (pending.namespace, pending.name, pending.uid) == ("ns", "ma", "uid-1")
    assert pending.pkce == pkce
    with pytest.raises(StateError) as err:
        store.consume(state)
    assert err.value.problem is StateProblem.REPLAYED


def test_state_expires() -> None:
    clock = Clock()
    store = StateStore(ttl=600, clock=clock)
    state, _ = store.issue("ns", "ma", "uid", "r")
    clock.now += 601
    with pytest.raises(StateError) as err:
        store.consume(state)
    assert err.value.problem is StateProblem.EXPIRED
    clock.now += 10_000  # long forgotten: just unknown
    with pytest.raises(StateError) as err:
        store.consume(state)
    assert err.value.problem is StateProblem.UNKNOWN


def test_unknown_state_and_capacity() -> None:
    store = StateStore(capacity=3, clock=Clock())
    with pytest.raises(StateError) as err:
        store.consume("forged")
    assert err.value.problem is StateProblem.UNKNOWN
    states = [store.issue("ns", f"ma{i}", "uid", "r")[0] for i in range(5)]
    assert len(store) == 3  # the oldest were dropped, not kept without bound
    with pytest.raises(StateError):
        store.consume(states[0])
    assert store.consume(states[-1]).name == "ma4"


def _account(provider: ProviderKind = ProviderKind.MICROSOFT) -> Account:
    return Account(
        username="alice@contoso.example",
        oauth2=OAuth2(
            provider=provider,
            flow=Flow.AUTHORIZATION_CODE,
            token_url="https://idp.example/t/oauth2/v2.0/token",
            client_id="client",
            client_secret=Secret("s3cr3t"),
            scopes=("https://outlook.office365.com/IMAP.AccessAsUser.All", "offline_access"),
            authorize_url="https://idp.example/t/oauth2/v2.0/authorize",
        ),
    )


def test_authorize_url_carries_pkce_state_and_login_hint_never_the_secret() -> None:
    url = authorize_url(
        _account(),
        redirect_uri="https://mail.example/mw/oauth2/callback",
        state="st",
        challenge="ch",
    )
    query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    assert url.startswith("https://idp.example/t/oauth2/v2.0/authorize?")
    assert query["response_type"] == "code" and query["client_id"] == "client"
    assert query["code_challenge"] == "ch" and query["code_challenge_method"] == "S256"
    assert query["state"] == "st" and query["login_hint"] == "alice@contoso.example"
    assert query["redirect_uri"] == "https://mail.example/mw/oauth2/callback"
    assert "offline_access" in query["scope"].split() and "openid" in query["scope"].split()
    assert "s3cr3t" not in url


def _jwt(claims: dict[str, str]) -> str:
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"eyJhbGciOiJub25lIn0.{body}.sig"


def test_signed_in_as_reads_the_id_token() -> None:
    assert _signed_in_as(_jwt({"preferred_username": "bob@x"})) == "bob@x"
    assert _signed_in_as(_jwt({"email": "carol@x"})) == "carol@x"
    assert _signed_in_as("not a jwt") is None and _signed_in_as(None) is None


@pytest.mark.parametrize(
    ("error", "flow", "reason"),
    [
        (
            PermanentTokenError("invalid_client", "AADSTS7000215: bad"),
            Flow.CLIENT_CREDENTIALS,
            "InvalidClient",
        ),
        (PermanentTokenError("invalid_grant", "AADSTS50126: x"), Flow.PASSWORD, "InvalidGrant"),
        (
            PermanentTokenError("invalid_grant", "AADSTS70000: x"),
            Flow.REFRESH_TOKEN,
            "ConsentRequired",
        ),
        (PermanentTokenError("invalid_grant", ""), Flow.DEVICE_CODE, "ConsentRequired"),
        (
            TemporaryTokenError("server_error", "HTTP 503"),
            Flow.CLIENT_CREDENTIALS,
            "IdentityProviderUnavailable",
        ),
        (PermanentTokenError("http_401", ""), Flow.CLIENT_CREDENTIALS, "AuthorizationFailed"),
    ],
)
def test_verdicts(error: TokenError, flow: Flow, reason: str) -> None:
    verdict = verdict_for(error, flow, "idp.example")
    assert verdict.status is False and verdict.reason == reason
    assert error.code in verdict.message and "idp.example" in verdict.message
    assert error.description in verdict.message
