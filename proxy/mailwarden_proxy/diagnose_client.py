"""The client side of `doctor`'s conversation with a mail server, over asyncio streams.

One small class per protocol with the same five moves: `greet`, `capabilities`,
`starttls` (the command only; the caller upgrades the stream, so the TLS step is reported
on its own), `login` and `follow_up`. The login follows the proxy's rules (the protocol
cores): the SASL encoders of `protocols.sasl`; IMAP sends the initial response inline only
with SASL-IR; SMTP and POP3 send it after the server's empty challenge (never inline:
Gmail refuses long SMTP lines, RFC 5034 caps POP3's at 255 octets); an error challenge is
answered (an empty response for XOAUTH2, `AQ==` for OAUTHBEARER) so the server ends the
exchange with its final reply, which is what the catalogue recognises.

Server text handed back is already made printable and never contains the token.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

from mailwarden_proxy.config.model import MailProtocol, Mechanism
from mailwarden_proxy.diagnose_report import count, printable
from mailwarden_proxy.protocols import sasl
from mailwarden_proxy.protocols.errors import UpstreamProtocolError
from mailwarden_proxy.protocols.imap_parse import (
    Response,
    has_capability,
    parse_response,
    response_capabilities,
)
from mailwarden_proxy.protocols.replies import CRLF, SmtpReply, SmtpReplyReader, chomp

EHLO_NAME = b"mailwarden"  # what the proxy's SMTP core says, too
_LITERAL = re.compile(rb"\{([0-9]{1,10})\+?\}\Z")


class ExchangeError(Exception):
    """The server answered something other than what the step needs.

    `reply` is the server's answer as text (printable, no credential) for the catalogue,
    "" when the connection broke instead.
    """

    def __init__(self, message: str, reply: str = "") -> None:
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True)
class LoginResult:
    ok: bool
    reply: str  # the server's final answer to the login, printable
    challenge: str = ""  # the decoded error challenge (JSON text) if the server sent one


@dataclass(frozen=True)
class FollowUp:
    name: str  # "NOOP", "EXAMINE INBOX", "STAT", "MAIL FROM", "RSET"
    ok: bool
    reply: str


class Conversation(ABC):
    """Common plumbing: line reading under a limit, writes, credential-free text."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_line: int
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.max_line = max_line
        self.caps: list[str] = []
        self._secrets: list[str] = []

    def _text(self, raw: bytes | str) -> str:
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        return printable(text, self._secrets)

    async def _line(self) -> bytes:
        try:
            line = await self.reader.readline()
        except ValueError as exc:  # the stream's limit: LimitOverrunError wrapped
            raise ExchangeError("the server sent an overlong line") from exc
        if not line:
            raise ExchangeError("the server closed the connection")
        if not line.endswith(b"\n"):
            raise ExchangeError("the server closed the connection in the middle of a line")
        return line

    async def _send(self, data: bytes) -> None:
        self.writer.write(data + CRLF)
        await self.writer.drain()

    @abstractmethod
    def offers(self, mechanism: Mechanism) -> bool:
        """Whether the last capability list announces `mechanism`."""

    @abstractmethod
    def starttls_offered(self) -> bool:
        """Whether the last capability list announces STARTTLS (POP3: STLS)."""

    @abstractmethod
    async def greet(self) -> str:
        """Read the greeting; its text, or ExchangeError if it refuses the session."""

    @abstractmethod
    async def capabilities(self) -> list[str]:
        """Ask for (and remember) the capabilities: IMAP CAPABILITY, SMTP EHLO, POP3 CAPA."""

    @abstractmethod
    async def starttls(self) -> None:
        """Send STARTTLS (STLS) and read its go-ahead; the caller upgrades the stream."""

    @abstractmethod
    async def login(
        self, username: str, token: str, mechanism: Mechanism, host: str, port: int
    ) -> LoginResult:
        """The SASL exchange with `token` for `username`; the server's final answer."""

    @abstractmethod
    async def follow_up(self, sender: str = "") -> list[FollowUp]:
        """Commands after the login, stopping at the first refusal (`sender`: SMTP MAIL FROM)."""

    @abstractmethod
    async def quit(self) -> None:
        """LOGOUT / QUIT."""

    def _remember(self, token: str, response: bytes) -> None:
        self._secrets = [token, response.decode("ascii"), base64.b64encode(response).decode()]

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), 2)


# -- IMAP -------------------------------------------------------------------------------------


class ImapConversation(Conversation):
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_line: int
    ) -> None:
        super().__init__(reader, writer, max_line)
        self._tags = 0

    async def _response(self) -> Response:
        raw = await self._line()
        while (marker := _LITERAL.search(chomp(raw))) is not None:
            size = int(marker[1])
            if size > 16 * self.max_line:
                raise ExchangeError(f"the server sent a literal of {size} bytes")
            try:
                raw += await self.reader.readexactly(size)
            except asyncio.IncompleteReadError as exc:
                raise ExchangeError("the server closed the connection in a literal") from exc
            raw += await self._line()
        try:
            return parse_response(raw)
        except UpstreamProtocolError as exc:
            raise ExchangeError(str(exc)) from exc

    def _status(self, response: Response) -> str:
        code = f"[{response.code}] " if response.code else ""
        return self._text(f"{response.status} {code}{response.text}".strip())

    async def _command(self, text: bytes) -> tuple[Response, list[Response]]:
        """Send `text` tagged; read up to its tagged response (or a continuation)."""
        self._tags += 1
        tag = f"mw{self._tags}"
        await self._send(tag.encode() + b" " + text)
        untagged: list[Response] = []
        while True:
            response = await self._response()
            if response.tag in (tag, "+"):
                return response, untagged
            untagged.append(response)
            self._note_caps(response)

    def _note_caps(self, response: Response) -> None:
        caps = response_capabilities(response)
        if caps is not None:
            self.caps = caps

    async def greet(self) -> str:
        greeting = await self._response()
        if greeting.tag != "*" or greeting.status not in ("OK", "PREAUTH"):
            raise ExchangeError("the server refused the session", self._status(greeting))
        self._note_caps(greeting)
        if greeting.code.upper().startswith("CAPABILITY"):  # shown apart, if at all
            greeting = replace(greeting, code="")
        return self._status(greeting)

    async def capabilities(self) -> list[str]:
        response, _ = await self._command(b"CAPABILITY")
        if response.status != "OK":
            raise ExchangeError("CAPABILITY refused", self._status(response))
        return self.caps

    def offers(self, mechanism: Mechanism) -> bool:
        return has_capability(self.caps, f"AUTH={sasl.mechanism_name(mechanism)}")

    def starttls_offered(self) -> bool:
        return has_capability(self.caps, "STARTTLS")

    async def starttls(self) -> None:
        response, _ = await self._command(b"STARTTLS")
        if response.status != "OK":
            raise ExchangeError("STARTTLS refused", self._status(response))
        self.caps = []  # RFC 3501 §6.2.1: forget what was said in clear text

    async def login(
        self, username: str, token: str, mechanism: Mechanism, host: str, port: int
    ) -> LoginResult:
        response = sasl.initial_response(mechanism, username, token, host, port)
        self._remember(token, sasl.b64(response))
        command = b"AUTHENTICATE " + sasl.mechanism_name(mechanism).encode()
        inline = has_capability(self.caps, "SASL-IR")
        answer, _ = await self._command(command + b" " + sasl.b64(response) if inline else command)
        if answer.tag == "+" and not inline:
            await self._send(sasl.b64(response))
            answer = await self._until_tagged()
        challenge = ""
        if answer.tag == "+":  # an error challenge instead of success
            challenge = _challenge_text(answer.text.encode())
            await self._send(sasl.error_challenge_reply(mechanism))
            answer = await self._until_tagged()
        self._note_caps(answer)
        return LoginResult(answer.status == "OK", self._status(answer), challenge)

    async def _until_tagged(self) -> Response:
        while True:
            response = await self._response()
            if response.tag != "*":
                return response

    async def follow_up(self, sender: str = "") -> list[FollowUp]:
        del sender  # SMTP only
        results = []
        noop, _ = await self._command(b"NOOP")
        results.append(FollowUp("NOOP", noop.status == "OK", self._status(noop)))
        if noop.status != "OK":
            return results
        # EXAMINE is SELECT without changing anything (no \Recent flags are cleared)
        examine, untagged = await self._command(b"EXAMINE INBOX")
        exists = [r.status for r in untagged if r.tag == "*" and r.text.upper() == "EXISTS"]
        reply = self._status(examine)
        if examine.status == "OK" and exists:
            reply = count(exists[-1], "message")
        results.append(FollowUp("EXAMINE INBOX", examine.status == "OK", reply))
        return results

    async def quit(self) -> None:
        await self._command(b"LOGOUT")


def _challenge_text(encoded: bytes) -> str:
    try:
        decoded = base64.b64decode(encoded.strip(), validate=False)
    except ValueError:
        return ""
    return printable(decoded.decode("utf-8", "replace"))


# -- SMTP -------------------------------------------------------------------------------------


class SmtpConversation(Conversation):
    async def _reply(self) -> SmtpReply:
        reader = SmtpReplyReader(16 * self.max_line)
        while True:
            try:
                reply = reader.feed(await self._line())
            except UpstreamProtocolError as exc:
                raise ExchangeError(str(exc)) from exc
            if reply is not None:
                return reply

    def _status(self, reply: SmtpReply) -> str:
        return self._text(
            f"{reply.code} " + " ".join(line.decode("utf-8", "replace") for line in reply.lines)
        )

    async def _command(self, text: bytes) -> SmtpReply:
        await self._send(text)
        return await self._reply()

    async def greet(self) -> str:
        greeting = await self._reply()
        if greeting.code != 220:
            raise ExchangeError("the server refused the session", self._status(greeting))
        return self._status(greeting)

    async def capabilities(self) -> list[str]:
        reply = await self._command(b"EHLO " + EHLO_NAME)
        if reply.code != 250:
            raise ExchangeError("EHLO refused", self._status(reply))
        self.caps = [line.decode("utf-8", "replace") for line in reply.lines[1:]]
        return self.caps

    def _auth_mechanisms(self) -> set[str]:
        names: set[str] = set()
        for line in self.caps:
            words = line.replace("=", " ").upper().split()
            if words and words[0] == "AUTH":
                names.update(words[1:])
        return names

    def offers(self, mechanism: Mechanism) -> bool:
        return sasl.mechanism_name(mechanism) in self._auth_mechanisms()

    def starttls_offered(self) -> bool:
        return any(line.upper().split()[:1] == ["STARTTLS"] for line in self.caps)

    async def starttls(self) -> None:
        reply = await self._command(b"STARTTLS")
        if reply.code != 220:
            raise ExchangeError("STARTTLS refused", self._status(reply))
        self.caps = []

    async def login(
        self, username: str, token: str, mechanism: Mechanism, host: str, port: int
    ) -> LoginResult:
        response = sasl.initial_response(mechanism, username, token, host, port)
        self._remember(token, sasl.b64(response))
        reply = await self._command(b"AUTH " + sasl.mechanism_name(mechanism).encode())
        if reply.code != 334:
            return LoginResult(False, self._status(reply))
        reply = await self._command(sasl.b64(response))
        challenge = ""
        if reply.code == 334:
            challenge = _challenge_text(reply.text)
            reply = await self._command(sasl.error_challenge_reply(mechanism))
        return LoginResult(reply.code == 235, self._status(reply), challenge)

    async def follow_up(self, sender: str = "") -> list[FollowUp]:
        if not sender:
            reply = await self._command(b"NOOP")
            return [FollowUp("NOOP", reply.code == 250, self._status(reply))]
        mail = await self._command(f"MAIL FROM:<{sender}>".encode())
        results = [FollowUp("MAIL FROM", mail.code == 250, f"<{sender}>: {self._status(mail)}")]
        if mail.code != 250:
            return results
        rset = await self._command(b"RSET")
        results.append(FollowUp("RSET", rset.code == 250, self._status(rset)))
        return results

    async def quit(self) -> None:
        await self._command(b"QUIT")


# -- POP3 -------------------------------------------------------------------------------------


class Pop3Conversation(Conversation):
    async def _status_line(self) -> str:
        return self._text(chomp(await self._line()))

    async def _command(self, text: bytes) -> str:
        await self._send(text)
        return await self._status_line()

    async def greet(self) -> str:
        greeting = await self._status_line()
        if not greeting.startswith("+OK"):
            raise ExchangeError("the server refused the session", greeting)
        return greeting

    async def capabilities(self) -> list[str]:
        status = await self._command(b"CAPA")
        if not status.startswith("+OK"):
            self.caps = []  # CAPA is optional (RFC 2449); USER/PASS-only servers lack it
            return self.caps
        caps = []
        while (line := chomp(await self._line())) != b".":
            caps.append(self._text(line[1:] if line.startswith(b".") else line))
        self.caps = caps
        return caps

    def offers(self, mechanism: Mechanism) -> bool:
        for line in self.caps:
            words = line.upper().split()
            if words[:1] == ["SASL"] and sasl.mechanism_name(mechanism) in words[1:]:
                return True
        return False

    def starttls_offered(self) -> bool:
        return any(line.upper().split()[:1] == ["STLS"] for line in self.caps)

    async def starttls(self) -> None:
        status = await self._command(b"STLS")
        if not status.startswith("+OK"):
            raise ExchangeError("STLS refused", status)
        self.caps = []

    async def login(
        self, username: str, token: str, mechanism: Mechanism, host: str, port: int
    ) -> LoginResult:
        response = sasl.initial_response(mechanism, username, token, host, port)
        self._remember(token, sasl.b64(response))
        await self._send(b"AUTH " + sasl.mechanism_name(mechanism).encode())
        line = chomp(await self._line())
        if not (line == b"+" or line.startswith(b"+ ")):
            return LoginResult(False, self._text(line))
        await self._send(sasl.b64(response))
        line = chomp(await self._line())
        challenge = ""
        if line == b"+" or line.startswith(b"+ "):
            challenge = _challenge_text(line[2:])
            await self._send(sasl.error_challenge_reply(mechanism))
            line = chomp(await self._line())
        return LoginResult(line.startswith(b"+OK"), self._text(line), challenge)

    async def follow_up(self, sender: str = "") -> list[FollowUp]:
        del sender  # SMTP only
        status = await self._command(b"STAT")
        reply = status
        fields = status.split()
        if status.startswith("+OK") and len(fields) >= 3:
            reply = f"{count(fields[1], 'message')}, {count(fields[2], 'byte')}"
        return [FollowUp("STAT", status.startswith("+OK"), reply)]

    async def quit(self) -> None:
        await self._command(b"QUIT")


_CONVERSATIONS: dict[MailProtocol, type[Conversation]] = {
    MailProtocol.IMAP: ImapConversation,
    MailProtocol.SMTP: SmtpConversation,
    MailProtocol.POP3: Pop3Conversation,
}


def conversation_for(
    protocol: MailProtocol,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    max_line: int,
) -> Conversation:
    return _CONVERSATIONS[protocol](reader, writer, max_line)


__all__ = [
    "Conversation",
    "ExchangeError",
    "FollowUp",
    "ImapConversation",
    "LoginResult",
    "Pop3Conversation",
    "SmtpConversation",
    "conversation_for",
]
