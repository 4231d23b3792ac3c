"""TLS contexts: verified upstream connections, optional local TLS."""

from __future__ import annotations

import ssl

from mailwarden_proxy.config.model import Listener, Upstream


def upstream_context(upstream: Upstream) -> ssl.SSLContext:
    """Verifying client context: system trust store plus the configured extra CA."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if upstream.ca_file:
        # added to, not instead of, the system store: a private CA alongside public ones
        context.load_verify_locations(cafile=upstream.ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def local_context(listener: Listener) -> ssl.SSLContext | None:
    if listener.local_certificate is None or listener.local_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(listener.local_certificate, listener.local_key)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
