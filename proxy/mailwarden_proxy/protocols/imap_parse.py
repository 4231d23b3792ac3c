"""IMAP syntax for the pre-authentication dialogue: commands, strings, literals, responses.

Pure functions and two small readers over a `LineBuffer`, used by `imap.ImapCore`:

- `CommandReader` assembles one client command from its lines and the literals between
  them (RFC 3501 §4.3 / RFC 9051 §4.3, synchronizing `{n}` and non-synchronizing `{n+}`,
  RFC 7888), enforcing the literal and whole-command size limits;
- `parse_command` / `parse_astrings` split it into tag, command name and string arguments
  (atom, quoted string with `\\"`/`\\\\` escapes, literal; UTF-8 accepted, RFC 9051);
- `ResponseReader` / `parse_response` read what the upstream server says;
- `client_capabilities` rewrites the upstream capability list for the client.

Nothing here raises anything but `ProtocolError` subclasses, and no error message quotes
the argument bytes (they may be a password).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mailwarden_proxy.protocols.errors import (
    LineTooLong,
    ProtocolError,
    SaslError,
    UpstreamProtocolError,
)
from mailwarden_proxy.protocols.lines import LineBuffer, strip_eol
from mailwarden_proxy.protocols.sasl import decode_plain

# A literal announcement ends its line: "{" number ["+"] "}" CRLF.
_LITERAL_MARKER = re.compile(rb"\{([0-9]{1,10})(\+?)\}\Z")

# ATOM-CHAR is any CHAR except atom-specials: "(" ")" "{" SP CTL "%" "*" DQUOTE "\" "]".
# ASTRING-CHAR adds "]"; a tag is ASTRING-CHAR except "+". Bytes >= 0x80 are let through
# in astrings (UTF-8 user names in the wild), never in tags or command names.
_ATOM_SPECIALS = frozenset(b'(){ %*"\\]') | frozenset(range(0x20)) | {0x7F}
_ASTRING_SPECIALS = _ATOM_SPECIALS - {ord("]")}
_TAG_SPECIALS = _ASTRING_SPECIALS | {ord("+")}
_SP = 0x20


class ParseError(ProtocolError):
    """A client command is malformed; the message is safe to send back after `BAD`."""


# -- client commands -------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One client command. `texts` are its lines (literal markers and CRLF removed);
    literal `i` came between `texts[i]` and `texts[i + 1]`."""

    tag: str
    name: str  # upper-case
    texts: tuple[bytes, ...]  # texts[0] starts right after the command name
    literals: tuple[bytes, ...]


@dataclass(frozen=True)
class Continue:
    """The client announced a synchronizing literal that we accept: send `+` and wait."""


@dataclass(frozen=True)
class Rejected:
    """The command is refused before it was complete (or could not be parsed)."""

    tag: str | None  # None: answer untagged (`* BAD`)
    status: str  # "NO" or "BAD"
    text: str
    fatal: bool = False  # the stream cannot be resynchronised: close after replying


def _is_tag(tag: bytes) -> bool:
    return bool(tag) and all(0x20 < c < 0x7F and c not in _TAG_SPECIALS for c in tag)


def _is_atom(atom: bytes) -> bool:
    return bool(atom) and all(0x20 < c < 0x7F and c not in _ATOM_SPECIALS for c in atom)


def command_tag(text: bytes) -> str | None:
    """The tag of a command line, or None if it has no valid one."""
    tag = text.split(b" ", 1)[0]
    return tag.decode("ascii") if _is_tag(tag) else None


def parse_command(texts: list[bytes], literals: list[bytes]) -> Command | Rejected:
    first = texts[0]
    if not first.strip():
        return Rejected(None, "BAD", "Empty command line")
    tag = command_tag(first)
    if tag is None:
        return Rejected(None, "BAD", "Invalid or missing tag")
    _, separator, rest = first.partition(b" ")
    name = rest.partition(b" ")[0]
    if not separator or not _is_atom(name):
        return Rejected(tag, "BAD", "Missing or invalid command name")
    remainder = rest[len(name) :]
    return Command(tag, name.decode("ascii").upper(), (remainder, *texts[1:]), tuple(literals))


def _quoted(text: bytes, pos: int) -> tuple[bytes, int]:
    """Parse a quoted string starting after its opening DQUOTE; return (value, next pos)."""
    out = bytearray()
    while pos < len(text):
        c = text[pos]
        if c == ord('"'):
            return bytes(out), pos + 1
        if c == ord("\\"):
            if pos + 1 >= len(text) or text[pos + 1] not in b'"\\':
                raise ParseError("Invalid escape in quoted string")
            out.append(text[pos + 1])
            pos += 2
            continue
        if c in (0, 0x0D):
            raise ParseError("Invalid character in quoted string")
        out.append(c)
        pos += 1
    raise ParseError("Unterminated quoted string")


def _atom(text: bytes, pos: int) -> tuple[bytes, int]:
    end = text.find(b" ", pos)
    end = len(text) if end < 0 else end
    value = text[pos:end]
    if not value:
        raise ParseError("Empty argument")
    if any(c in _ASTRING_SPECIALS for c in value):
        raise ParseError("Invalid characters in atom")
    return value, end


def parse_astrings(command: Command) -> list[bytes]:
    """The command's arguments as `SP astring` items (atom, quoted string or literal)."""
    args: list[bytes] = []
    for index, text in enumerate(command.texts):
        literal = command.literals[index] if index < len(command.literals) else None
        pos = 0
        while pos < len(text):
            if text[pos] != _SP:
                raise ParseError("Expected a space between arguments")
            pos += 1
            if pos == len(text) and literal is not None:
                args.append(literal)  # "SP {n}": the literal is the argument
                literal = None
            elif pos < len(text) and text[pos] == ord('"'):
                value, pos = _quoted(text, pos + 1)
                args.append(value)
            else:
                value, pos = _atom(text, pos)
                args.append(value)
        if literal is not None:
            raise ParseError("A literal must follow a space")
    return args


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:  # keep the password out of logs and assertion messages
        return f"Credentials(username={self.username!r}, password='****')"


@dataclass(frozen=True)
class AskPlain:
    """`AUTHENTICATE PLAIN` without an initial response: send "+ " and read one line."""


def _credentials(tag: str, username: str, password: str) -> Credentials | Rejected:
    # the user name may travel upstream inside XOAUTH2's \x01-separated fields
    if not username or any(c < " " or c == "\x7f" for c in username):
        return Rejected(tag, "BAD", "Invalid user name")
    return Credentials(username, password)


def login_credentials(command: Command) -> Credentials | Rejected:
    """`LOGIN user password`, each an atom, a quoted string or a literal (UTF-8)."""
    try:
        args = parse_astrings(command)
    except ParseError as exc:
        return Rejected(command.tag, "BAD", str(exc))
    if len(args) != 2:
        return Rejected(command.tag, "BAD", "LOGIN takes a user name and a password")
    try:
        username, password = args[0].decode(), args[1].decode()
    except UnicodeDecodeError:
        return Rejected(command.tag, "BAD", "User name and password must be UTF-8")
    return _credentials(command.tag, username, password)


def authenticate_request(command: Command) -> Credentials | AskPlain | Rejected:
    """`AUTHENTICATE PLAIN [initial-response]` (RFC 4959 SASL-IR: "=" means empty)."""
    try:
        args = parse_astrings(command)
    except ParseError as exc:
        return Rejected(command.tag, "BAD", str(exc))
    if not args or len(args) > 2:
        return Rejected(command.tag, "BAD", "AUTHENTICATE takes a mechanism and a response")
    if args[0].upper() != b"PLAIN":
        return Rejected(command.tag, "NO", "[CANNOT] Unsupported authentication mechanism")
    if len(args) == 1:
        return AskPlain()
    return plain_credentials(command.tag, b"" if args[1] == b"=" else args[1])


def plain_credentials(tag: str, response: bytes) -> Credentials | Rejected:
    """A base64 PLAIN response line; "*" cancels the exchange (RFC 3501 §6.2.2)."""
    if response == b"*":
        return Rejected(tag, "BAD", "Authentication cancelled")
    try:
        username, password = decode_plain(response)
    except SaslError as exc:
        return Rejected(tag, "BAD", f"Invalid SASL PLAIN response: {exc}")
    return _credentials(tag, username, password)


class CommandReader:
    """Assembles one client command (lines and literals) from a `LineBuffer`.

    `next()` returns None until something happened: a complete `Command`, a `Continue`
    (send the synchronizing-literal continuation), or a `Rejected` command. It raises
    `LineTooLong` when a line or the whole command exceeds its limit: the stream cannot be
    resynchronised then. A literal that is too large is refused with `NO [TOOBIG]`; for a
    non-synchronizing one the client sends the bytes anyway, so that is fatal (RFC 7888 §4).
    """

    def __init__(self, max_literal: int, max_command: int) -> None:
        self.max_literal = max_literal
        self.max_command = max_command
        self.reset()

    def reset(self) -> None:
        self._texts: list[bytes] = []
        self._literals: list[bytes] = []
        self._want: int | None = None  # literal bytes announced and not yet read
        self._size = 0

    def next(self, buf: LineBuffer) -> Command | Continue | Rejected | None:
        while True:
            if self._want is not None:
                literal = buf.take(self._want)
                if literal is None:
                    return None
                self._literals.append(literal)
                self._want = None
            line = buf.next_line()
            if line is None:
                return None
            self._size += len(line)
            if self._size > self.max_command:
                self.reset()
                raise LineTooLong(f"command longer than {self.max_command} bytes")
            text = strip_eol(line)
            marker = _LITERAL_MARKER.search(text)
            if marker is None:
                self._texts.append(text)
                texts, literals = self._texts, self._literals
                self.reset()
                return parse_command(texts, literals)
            self._texts.append(text[: marker.start()])
            count, synchronizing = int(marker[1]), not marker[2]
            tag = command_tag(self._texts[0])
            if count > self.max_literal or self._size + count > self.max_command:
                self.reset()
                if synchronizing:
                    return Rejected(tag, "NO", "[TOOBIG] Literal too large")
                return Rejected(tag, "BAD", "[TOOBIG] Literal too large", fatal=True)
            if tag is None and synchronizing:
                self.reset()
                return Rejected(None, "BAD", "Invalid or missing tag")
            self._want = count
            self._size += count
            if synchronizing:
                return Continue()


# -- upstream responses ----------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    """One server response: `tag` is "*" (untagged), "+" (continuation) or a command tag."""

    tag: str
    status: str  # upper-cased first word after the tag ("OK", "BYE", "CAPABILITY", "3"...)
    code: str  # the response code inside "[...]" for OK/NO/BAD/BYE/PREAUTH, else ""
    text: str  # the rest of the line; for "+" everything after "+ "
    raw: bytes  # the whole response as received (lines and literals)


_CONDITIONS = frozenset({"OK", "NO", "BAD", "BYE", "PREAUTH"})


def parse_response(raw: bytes) -> Response:
    line = strip_eol(raw.split(b"\n", 1)[0]).decode("utf-8", "replace")
    if line.startswith("+"):
        return Response("+", "", "", line[1:].removeprefix(" "), raw)
    tag, _, rest = line.partition(" ")
    if not tag or not rest:
        raise UpstreamProtocolError("upstream sent a malformed response line")
    status, _, text = rest.partition(" ")
    status = status.upper()
    code = ""
    if status in _CONDITIONS and text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise UpstreamProtocolError("upstream sent an unterminated response code")
        code, text = text[1:end], text[end + 1 :].lstrip(" ")
    return Response(tag, status, code, text, raw)


def printable(text: str, limit: int = 200) -> str:
    """Upstream text fit for a log line or reason: printable ASCII only, truncated."""
    return "".join(c if " " <= c <= "~" else "?" for c in text[:limit])


class ResponseReader:
    """Reads whole server responses, following any literals (bounded) to stay in sync."""

    def __init__(self, max_literal: int, max_response: int) -> None:
        self.max_literal = max_literal
        self.max_response = max_response
        self.reset()

    def reset(self) -> None:
        self._parts: list[bytes] = []
        self._want: int | None = None
        self._size = 0

    def next(self, buf: LineBuffer) -> bytes | None:
        while True:
            if self._want is not None:
                literal = buf.take(self._want)
                if literal is None:
                    return None
                self._parts.append(literal)
                self._want = None
            line = buf.next_line()
            if line is None:
                return None
            self._parts.append(line)
            self._size += len(line)
            marker = _LITERAL_MARKER.search(strip_eol(line))
            if marker is None:
                raw = b"".join(self._parts)
                self.reset()
                return raw
            self._want = int(marker[1])
            self._size += self._want
            if self._want > self.max_literal or self._size > self.max_response:
                raise UpstreamProtocolError("upstream sent an oversized literal")


# -- capabilities ----------------------------------------------------------------------------


def capability_list(text: str) -> list[str]:
    """Capability names from `* CAPABILITY ...` text or a `CAPABILITY ...` response code."""
    names = text.split()
    if names and names[0].upper() == "CAPABILITY":
        names = names[1:]
    return [n for n in names if _is_atom(n.encode("utf-8", "replace"))]


def response_capabilities(response: Response) -> list[str] | None:
    """The list in `* CAPABILITY ...` or in a `[CAPABILITY ...]` response code, if any."""
    if response.tag == "*" and response.status == "CAPABILITY":
        return capability_list(response.text)
    if response.code.upper().startswith("CAPABILITY"):
        return capability_list(response.code)
    return None


def has_capability(capabilities: list[str], name: str) -> bool:
    return name.upper() in (c.upper() for c in capabilities)


# Upstream capabilities the client must not see: upstream authentication and TLS are the
# proxy's business; referrals would send the client around the proxy. SASL-IR is re-added.
_HIDDEN = frozenset({"STARTTLS", "LOGINDISABLED", "LOGIN-REFERRALS", "SASL-IR"})


def client_capabilities(upstream: list[str], offer_starttls: bool) -> list[str]:
    """What the proxy advertises: upstream's list without its authentication and TLS items,
    plus what the proxy itself accepts (`AUTH=PLAIN`, `SASL-IR`, maybe `STARTTLS`).

    Everything else (IMAP4rev1/rev2, IDLE, LITERAL+/LITERAL-, ...) is passed through
    unchanged: it describes the server the client talks to after the splice.
    """
    kept: list[str] = []
    for name in upstream:
        upper = name.upper()
        if upper.startswith("AUTH=") or upper in _HIDDEN or has_capability(kept, name):
            continue
        kept.append(name)
    if not (has_capability(kept, "IMAP4rev1") or has_capability(kept, "IMAP4rev2")):
        kept.insert(0, "IMAP4rev1")
    if offer_starttls:
        kept.append("STARTTLS")
    return [*kept, "SASL-IR", "AUTH=PLAIN"]
