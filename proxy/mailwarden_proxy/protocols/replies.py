"""Small pieces the protocol cores share: command splitting, peer-text hygiene, reply
readers and capability rewriting.

Everything here is pure and bounded. Readers take one line at a time (as handed out by a
`LineBuffer`) and return a complete reply once its last line arrived, raising
`UpstreamProtocolError` for anything they cannot follow, so a core turns it into one
"upstream broke" path instead of many special cases.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mailwarden_proxy.protocols.errors import UpstreamProtocolError

CRLF = b"\r\n"

# C0 controls except TAB, and DEL. A line end is removed before the check, so a CR or LF
# found here is a bare one inside the line (a classic smuggling vector, refused).
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# What a status word from an error challenge may look like before we show it to a client.
_STATUS_WORD = re.compile(r"[A-Za-z0-9_.\-]{1,40}")
_SMTP_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]|$)")


def chomp(line: bytes) -> bytes:
    """The line without exactly one terminator (CRLF, or a bare LF)."""
    if line.endswith(b"\r\n"):
        return line[:-2]
    if line.endswith(b"\n"):
        return line[:-1]
    return line


def has_control_chars(text: bytes) -> bool:
    """True if `text` (a line without its terminator) holds NUL, CR, LF, DEL or another control."""
    return _CONTROL.search(text) is not None


def split_command(text: bytes) -> tuple[str, bytes]:
    """(verb in upper case, argument with surrounding spaces removed).

    A verb that is not plain ASCII letters comes back as "" so it can never match a
    known command (nor be echoed back).
    """
    verb, _, arg = text.partition(b" ")
    if not verb.isalpha() or not verb.isascii():
        return "", arg.strip(b" ")
    return verb.decode("ascii").upper(), arg.strip(b" ")


def safe_text(text: bytes, secrets: Iterable[bytes] = (), limit: int = 160) -> str:
    """A printable-ASCII, length-capped copy of peer text, fit for a reply or a log line.

    Returns "" if the text contains any of `secrets` (a token, its base64 form): peer text
    is passed on to clients and logs, credentials never are.
    """
    if any(secret and secret in text for secret in secrets):
        return ""
    printable = "".join(chr(b) if 0x20 <= b < 0x7F else "?" for b in text[: limit * 2])
    return printable.strip()[:limit]


def status_word(status: str) -> str:
    """`status` if it is a short plain word (e.g. "401", "invalid_token"), else ""."""
    return status if _STATUS_WORD.fullmatch(status) else ""


# -- SMTP --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SmtpReply:
    """A complete (possibly multi-line) SMTP reply, RFC 5321 §4.2."""

    code: int
    lines: tuple[bytes, ...]  # the text of each line, after "NNN-" / "NNN ", no terminator

    @property
    def text(self) -> bytes:
        """The last line's text: the one that carries the meaning for single replies."""
        return self.lines[-1] if self.lines else b""

    @property
    def kind(self) -> int:
        """First digit: 2 success, 3 intermediate, 4 temporary, 5 permanent failure."""
        return self.code // 100


class SmtpReplyReader:
    """Collects the lines of one SMTP reply; bounded by `max_bytes` over all its lines."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._code = 0
        self._lines: list[bytes] = []
        self._size = 0

    def feed(self, line: bytes) -> SmtpReply | None:
        text = chomp(line)
        match = _SMTP_REPLY_LINE.match(text)
        if match is None:
            raise UpstreamProtocolError("malformed SMTP reply line")
        code = int(match.group(1))
        if self._lines and code != self._code:
            raise UpstreamProtocolError("SMTP reply code changed inside a multi-line reply")
        self._size += len(line)
        if self._size > self.max_bytes:
            raise UpstreamProtocolError(f"SMTP reply longer than {self.max_bytes} bytes")
        self._code = code
        self._lines.append(text[4:])
        if match.group(2) == b"-":
            return None
        reply = SmtpReply(code, tuple(self._lines))
        self._lines, self._size = [], 0
        return reply


def ehlo_keyword(line: bytes) -> str:
    """Upper-case keyword of one EHLO extension line ("AUTH=PLAIN" counts as "AUTH")."""
    word = line.split(b" ", 1)[0].split(b"=", 1)[0]
    return word.decode("ascii", "replace").upper()


def rewrite_ehlo(hostname: str, extensions: Sequence[bytes], *, offer_starttls: bool) -> bytes:
    """Our EHLO reply: upstream's extensions minus AUTH/STARTTLS, plus what we accept locally.

    `extensions` are the upstream lines after its greeting line. What the client will do
    after login goes to the upstream unchanged, so SIZE, PIPELINING, CHUNKING, SMTPUTF8 …
    stay as the upstream announced them. Enhanced status codes are always announced,
    since this proxy's own replies carry them (RFC 2034).
    """
    kept = [
        line
        for line in extensions  # a control character would split or garble our reply
        if ehlo_keyword(line) not in {"AUTH", "STARTTLS"} and not has_control_chars(line)
    ]
    if "ENHANCEDSTATUSCODES" not in {ehlo_keyword(line) for line in kept}:
        kept.append(b"ENHANCEDSTATUSCODES")
    kept.append(b"AUTH PLAIN LOGIN")
    if offer_starttls:
        kept.append(b"STARTTLS")
    return smtp_reply(250, [hostname.encode(), *kept])


def smtp_reply(code: int, lines: Sequence[bytes]) -> bytes:
    """Format a (multi-line) reply: "250-a", "250-b", "250 c"."""
    prefix = str(code).encode()
    out = [prefix + b"-" + line + CRLF for line in lines[:-1]]
    out.append(prefix + b" " + lines[-1] + CRLF)
    return b"".join(out)


# -- POP3 --------------------------------------------------------------------------------


class DotListReader:
    """Collects a POP3 multi-line body (RFC 1939 §3): lines up to ".", dot-unstuffed."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lines: list[bytes] = []
        self._size = 0

    def feed(self, line: bytes) -> list[bytes] | None:
        text = chomp(line)
        if text == b".":
            lines, self._lines, self._size = self._lines, [], 0
            return lines
        self._size += len(line)
        if self._size > self.max_bytes:
            raise UpstreamProtocolError(f"multi-line response longer than {self.max_bytes} bytes")
        self._lines.append(text[1:] if text.startswith(b".") else text)
        return None


def capa_keyword(line: bytes) -> str:
    return line.split(b" ", 1)[0].decode("ascii", "replace").upper()


def rewrite_capa(capabilities: Sequence[bytes], *, offer_stls: bool) -> bytes:
    """Our CAPA response (RFC 2449): upstream's list with our login methods and name.

    Upstream's SASL, USER, STLS and IMPLEMENTATION lines are replaced; the response codes
    we use in our own replies ([AUTH], [SYS/TEMP]) are always announced.
    """
    dropped = {"SASL", "USER", "STLS", "IMPLEMENTATION"}
    kept = [  # a line with a control character would split or garble our reply
        line
        for line in capabilities
        if capa_keyword(line) not in dropped and not has_control_chars(line)
    ]
    names = {capa_keyword(line) for line in kept}
    kept += [word for word in (b"RESP-CODES", b"AUTH-RESP-CODE") if word.decode() not in names]
    kept += [b"USER", b"SASL PLAIN"]
    if offer_stls:
        kept.append(b"STLS")
    kept.append(b"IMPLEMENTATION mailwarden")
    body = b"".join((b"." + line if line.startswith(b".") else line) + CRLF for line in kept)
    return b"+OK Capability list follows" + CRLF + body + b"." + CRLF
