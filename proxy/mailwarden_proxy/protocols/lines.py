"""A byte buffer that yields CRLF-terminated lines under a hard size limit."""

from __future__ import annotations

from mailwarden_proxy.protocols.errors import LineTooLong


class LineBuffer:
    """Accumulates received bytes; hands out whole lines (with their terminator) or counted bytes.

    Lines end at LF (a bare LF is tolerated, as most servers do). A line longer than
    `max_line` raises `LineTooLong` once the limit is crossed, without waiting for its end,
    so a peer cannot make us buffer without bound.
    """

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._data = bytearray()
        self._scanned = 0  # bytes already known to hold no LF: keeps scanning linear

    def feed(self, data: bytes) -> None:
        self._data += data

    def next_line(self) -> bytes | None:
        end = self._data.find(b"\n", self._scanned)
        if end < 0:
            self._scanned = len(self._data)
            if len(self._data) > self.max_line:
                raise LineTooLong(f"line longer than {self.max_line} bytes")
            return None
        if end + 1 > self.max_line:
            raise LineTooLong(f"line longer than {self.max_line} bytes")
        line = bytes(self._data[: end + 1])
        del self._data[: end + 1]
        self._scanned = 0
        return line

    def take(self, count: int) -> bytes | None:
        """Exactly `count` bytes (an IMAP literal), or None until that many arrived."""
        if len(self._data) < count:
            return None
        chunk = bytes(self._data[:count])
        del self._data[:count]
        self._scanned = 0
        return chunk

    def drain(self) -> bytes:
        """Everything buffered; the buffer is left empty."""
        data = bytes(self._data)
        self._data.clear()
        self._scanned = 0
        return data

    def clear(self) -> None:
        """Drop buffered bytes: plaintext received before a TLS switch must never be used."""
        self.drain()

    def __len__(self) -> int:
        return len(self._data)


def strip_eol(line: bytes) -> bytes:
    return line.rstrip(b"\r\n")
