"""A tiny script runner for `ImapCore`: feed inputs, collect the actions they cause.

A script is a list of `(input, expected_actions)` steps. Inputs are bytes from the client
(`C`), bytes from upstream (`U`), or a call on the core (`Call`). `run()` feeds every byte
string whole, or one byte at a time with `bytewise=True`; both must give the same actions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from mailwarden_proxy.config.model import Mechanism
from mailwarden_proxy.protocols.imap import ImapCore
from mailwarden_proxy.protocols.session import (
    Action,
    LocalInfo,
    SendClient,
    SendUpstream,
    Splice,
    UpstreamInfo,
)

HOST, PORT = "imap.example.com", 993
TOKEN = "ya29.TOKEN-abc123"
FRESH = "ya29.FRESH-def456"


@dataclass(frozen=True)
class C:
    data: bytes


@dataclass(frozen=True)
class U:
    data: bytes


@dataclass(frozen=True)
class Call:
    method: str
    args: tuple[object, ...] = field(default_factory=tuple)


Input = C | U | Call
Step = tuple[Input, Sequence[Action]]


def token(user: str = "user@example.com", tok: str = TOKEN, mech: str = "xoauth2") -> Call:
    return Call("provide_token", (user, tok, Mechanism(mech)))


def to_c(data: bytes) -> SendClient:
    return SendClient(data)


def to_u(data: bytes) -> SendUpstream:
    return SendUpstream(data)


def make_core(
    *,
    starttls: bool = False,
    local_starttls: bool = False,
    tls_active: bool = False,
    max_line: int = 1024,
    max_literal: int = 256,
) -> ImapCore:
    return ImapCore(
        UpstreamInfo(HOST, PORT, starttls),
        LocalInfo(starttls=local_starttls, tls_active=tls_active, hostname="proxy.test"),
        max_line=max_line,
        max_literal=max_literal,
    )


def drain(core: ImapCore) -> list[Action]:
    out: list[Action] = []
    while (action := core.next_action()) is not None:
        out.append(action)
    return out


def feed(core: ImapCore, item: Input, *, bytewise: bool = False) -> list[Action]:
    out: list[Action] = []
    if isinstance(item, Call):
        method: Callable[..., None] = getattr(core, item.method)
        method(*item.args)
        return drain(core)
    receive = core.receive_client if isinstance(item, C) else core.receive_upstream
    chunks = [item.data[i : i + 1] for i in range(len(item.data))] if bytewise else [item.data]
    for index, chunk in enumerate(chunks):
        receive(chunk)
        out += drain(core)
        if out and isinstance(out[-1], Splice):
            # after the splice the I/O layer relays raw bytes: model that, so a splice in
            # the middle of a byte-by-byte feed compares equal to the whole feed's leftovers
            rest = b"".join(chunks[index + 1 :])
            side = "to_client" if isinstance(item, U) else "to_upstream"
            out[-1] = replace(out[-1], **{side: getattr(out[-1], side) + rest})
            break
    return out


def run(core: ImapCore, steps: Sequence[Step], *, bytewise: bool = False) -> None:
    for number, (item, expected) in enumerate(steps):
        got = feed(core, item, bytewise=bytewise)
        assert got == list(expected), f"step {number} ({item!r}):\n got {got}\nwant {expected}"
