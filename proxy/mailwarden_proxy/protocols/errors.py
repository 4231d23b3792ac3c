"""Errors raised by the protocol cores and SASL helpers."""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class; messages never contain credentials."""


class LineTooLong(ProtocolError):
    """A line or literal exceeded the configured limit."""


class UpstreamProtocolError(ProtocolError):
    """The upstream server said something the core cannot follow; the session must end."""


class SaslError(ProtocolError):
    """A client's SASL response could not be decoded."""
