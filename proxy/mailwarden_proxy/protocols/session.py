"""The interface every protocol core implements, and the actions it emits.

A core is created per client connection, after the I/O layer has connected upstream
(with implicit TLS where configured). The I/O layer then loops:

    feed bytes  -> core.receive_client(data) / core.receive_upstream(data)
    act         -> while (action := core.next_action()) is not None: perform(action)

Actions are performed in order. `Authenticate` asks the I/O layer to check the local
password and fetch a token; it answers with exactly one of `provide_token`,
`reject_login` or `token_unavailable`. `NeedFreshToken` (after an upstream 400/401
error challenge, at most once per login) is answered with `provide_token` or
`token_unavailable`. After `Splice` the core is finished: the I/O layer forwards the
leftover bytes it carries and relays raw bytes from then on.

Until login the core answers the client itself; no client command reaches upstream
before the upstream authentication succeeded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from enum import StrEnum

from mailwarden_proxy.config.model import DEFAULT_MAX_LINE, DEFAULT_MAX_LITERAL, Mechanism
from mailwarden_proxy.protocols.lines import LineBuffer


@dataclass(frozen=True)
class SendClient:
    data: bytes


@dataclass(frozen=True)
class SendUpstream:
    data: bytes


@dataclass(frozen=True)
class StartClientTLS:
    """Flush pending client output, then wrap the client socket in TLS (server side)."""


@dataclass(frozen=True)
class StartUpstreamTLS:
    """Flush pending upstream output, then wrap the upstream socket in TLS (client side)."""


@dataclass(frozen=True)
class Authenticate:
    """The client presented credentials: check them locally, then get a token."""

    username: str
    password: str

    def __repr__(self) -> str:  # keep the password out of logs and assertion messages
        return f"Authenticate(username={self.username!r}, password='****')"


@dataclass(frozen=True)
class NeedFreshToken:
    """Upstream refused the token with a retryable error challenge; fetch a new one."""

    status: str


class FailureKind(StrEnum):
    LOCAL_CREDENTIALS = "local_credentials"  # unknown user or wrong local password
    TOKEN_UNAVAILABLE = "token_unavailable"  # temporary: IdP down, timeout
    TOKEN_REJECTED = "token_rejected"  # upstream refused the token (after the one retry)
    NOT_CONNECTED = "not_connected"  # Microsoft: authenticated but not connected
    UPSTREAM_ERROR = "upstream_error"  # upstream said no for another reason or broke off
    RATE_LIMITED = "rate_limited"  # too many failed local logins from the source: unchecked


@dataclass(frozen=True)
class LoginSucceeded:
    username: str


@dataclass(frozen=True)
class LoginFailed:
    """Informational, for logs and metrics: the client reply is already queued."""

    username: str
    kind: FailureKind
    detail: str = ""  # upstream status or reply text; never a credential


@dataclass(frozen=True)
class Splice:
    """Login done: forward these leftovers, then relay raw bytes both ways."""

    to_upstream: bytes = b""
    to_client: bytes = b""


@dataclass(frozen=True)
class Close:
    """Flush pending output, then close both connections."""

    reason: str


Action = (
    SendClient
    | SendUpstream
    | StartClientTLS
    | StartUpstreamTLS
    | Authenticate
    | NeedFreshToken
    | LoginSucceeded
    | LoginFailed
    | Splice
    | Close
)


@dataclass(frozen=True)
class UpstreamInfo:
    host: str
    port: int
    starttls: bool  # upgrade upstream with the protocol's STARTTLS before authenticating


@dataclass(frozen=True)
class LocalInfo:
    starttls: bool = False  # offer STARTTLS/STLS to the client
    tls_active: bool = False  # client connection is already TLS (implicit)
    hostname: str = "mailwarden"  # our name in greetings


class SessionCore(ABC):
    """Shared plumbing: two bounded line buffers and an action queue."""

    def __init__(
        self,
        upstream: UpstreamInfo,
        local: LocalInfo | None = None,
        *,
        max_line: int = DEFAULT_MAX_LINE,
        max_literal: int = DEFAULT_MAX_LITERAL,
    ) -> None:
        self.upstream = upstream
        self.local = local or LocalInfo()
        self.max_line = max_line
        self.max_literal = max_literal
        self.client_in = LineBuffer(max_line)
        # Upstream capability replies can be long (many extensions); never unbounded.
        self.upstream_in = LineBuffer(max(max_line, 64 * 1024))
        self.actions: deque[Action] = deque()
        self.finished = False  # Splice or Close emitted

    # -- inputs ---------------------------------------------------------------------------

    def receive_client(self, data: bytes) -> None:
        if self.finished:
            return
        self.client_in.feed(data)
        self._process()

    def receive_upstream(self, data: bytes) -> None:
        if self.finished:
            return
        self.upstream_in.feed(data)
        self._process()

    def client_closed(self) -> None:
        if not self.finished:
            self.close("client closed the connection")

    def upstream_closed(self) -> None:
        if not self.finished:
            self._upstream_closed()

    @abstractmethod
    def provide_token(self, upstream_username: str, token: str, mechanism: Mechanism) -> None:
        """Answer to `Authenticate` or `NeedFreshToken`: authenticate upstream with it."""

    @abstractmethod
    def reject_login(self, *, rate_limited: bool = False) -> None:
        """Answer to `Authenticate`: unknown user or wrong local password; or, with
        `rate_limited`, refused unchecked ("try again later") after too many failures."""

    @abstractmethod
    def token_unavailable(self, permanent: bool) -> None:
        """Answer to `Authenticate`/`NeedFreshToken`: no token (temporary or permanent)."""

    # -- outputs --------------------------------------------------------------------------

    def next_action(self) -> Action | None:
        return self.actions.popleft() if self.actions else None

    # -- for subclasses -------------------------------------------------------------------

    @abstractmethod
    def _process(self) -> None:
        """Consume whatever complete input is buffered, emitting actions."""

    @abstractmethod
    def _upstream_closed(self) -> None:
        """Upstream went away before login finished: tell the client, then Close."""

    def emit(self, action: Action) -> None:
        self.actions.append(action)

    def to_client(self, data: bytes) -> None:
        self.actions.append(SendClient(data))

    def to_upstream(self, data: bytes) -> None:
        self.actions.append(SendUpstream(data))

    def close(self, reason: str) -> None:
        self.finished = True
        self.actions.append(Close(reason))

    def splice(self) -> None:
        self.finished = True
        self.actions.append(
            Splice(to_upstream=self.client_in.drain(), to_client=self.upstream_in.drain())
        )
