"""A minimal blocking IMAP client: just enough to log in, fetch everything and log out.

imaplib would parse every literal into Python objects; at ~150 MB/s the client must cost
less than what it measures, so FETCH responses are only counted, never parsed. The tag
of a command is unique per connection, and the messages the benchmark stores can't
contain a line starting with it, so "CRLF tag SP" marks the end of the response.
"""

from __future__ import annotations

import socket
import ssl
import time

from bench.clients.token import xoauth2
from bench.paths import Endpoint

RECV_SIZE = 1 << 20
TAIL = 1024  # longer than any tagged reply line
TIMEOUT = 60.0


class ImapError(Exception):
    pass


class ImapClient:
    def __init__(self, endpoint: Endpoint, timeout: float = TIMEOUT) -> None:
        self.endpoint = endpoint
        raw = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock: socket.socket = raw
        if endpoint.tls == "implicit":
            context = ssl.create_default_context(cafile=endpoint.ca_path)
            self.sock = context.wrap_socket(raw, server_hostname=endpoint.host)
        self._buffer = bytearray(RECV_SIZE)
        self._pending = b""
        self._tags = 0
        greeting = self._readline()
        if not greeting.startswith(b"* OK"):
            raise ImapError(f"greeting: {greeting[:100]!r}")

    def _readline(self) -> bytes:
        while b"\r\n" not in self._pending:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ImapError("connection closed")
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\r\n")
        return line

    def command(self, text: str) -> tuple[bytes, int]:
        """Send one command; return its tagged reply line and the bytes received before."""
        self._tags += 1
        tag = f"b{self._tags}".encode()
        self.sock.sendall(tag + b" " + text.encode() + b"\r\n")
        return self._until_tagged(tag)

    def _until_tagged(self, tag: bytes) -> tuple[bytes, int]:
        marker = b"\r\n" + tag + b" "
        view = memoryview(self._buffer)
        # a leading CRLF lets a reply with no untagged lines match the same marker
        tail = b"\r\n" + self._pending
        self._pending = b""
        received = len(tail) - 2
        while True:
            at = tail.rfind(marker)
            end = tail.find(b"\r\n", at + 2) if at >= 0 else -1
            if end >= 0:
                self._pending = tail[end + 2 :]
                return tail[at + 2 : end], received
            count = self.sock.recv_into(view)
            if count == 0:
                raise ImapError("connection closed")
            received += count
            # the tagged reply comes last: only the end of the stream is ever searched
            if count >= TAIL:
                tail = bytes(view[count - TAIL : count])
            else:
                tail = (tail + bytes(view[:count]))[-TAIL:]

    def login(self) -> None:
        if self.endpoint.direct:
            assert self.endpoint.token is not None
            sasl = xoauth2(self.endpoint.username, self.endpoint.token).decode()
            reply, _ = self.command(f"AUTHENTICATE XOAUTH2 {sasl}")
        else:
            reply, _ = self.command(f'LOGIN "{self.endpoint.username}" "{self.endpoint.password}"')
        if b" OK" not in reply[:16]:
            raise ImapError(f"login refused: {reply[:200]!r}")

    def logout(self) -> None:
        try:
            self.command("LOGOUT")
        finally:
            self.close()

    def close(self) -> None:
        self.sock.close()


def login_logout(endpoint: Endpoint) -> float:
    """connect + login + logout; seconds."""
    started = time.perf_counter()
    client = ImapClient(endpoint)
    client.login()
    client.logout()
    return time.perf_counter() - started


def login_series(endpoint: Endpoint, count: int) -> list[float]:
    """`count` connect + login + logout in a row; seconds each."""
    return [login_logout(endpoint) for _ in range(count)]


def fetch_all(endpoint: Endpoint) -> tuple[int, float]:
    """LOGIN, SELECT, FETCH 1:* (BODY.PEEK[]): (bytes received by the FETCH, its seconds)."""
    client = ImapClient(endpoint)
    try:
        client.login()
        client.command("SELECT INBOX")
        started = time.perf_counter()
        reply, size = client.command("FETCH 1:* (BODY.PEEK[])")
        elapsed = time.perf_counter() - started
        if b" OK" not in reply[:16]:
            raise ImapError(f"FETCH failed: {reply[:200]!r}")
        client.command("LOGOUT")
    finally:
        client.close()
    return size, elapsed
