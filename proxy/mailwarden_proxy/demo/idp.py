"""A local HTTPS OAuth 2.0 identity provider for the demo, the tests and the benchmarks.

It answers the way Microsoft's v2.0 endpoints do, closely enough for msal (OpenID
discovery, `client_info` + `id_token` so msal's account cache works, `AADSTS` error
codes), for google-auth (jwt-bearer grant whose assertion audience is always Google's
token URL) and for Dovecot's oauth2 passdb (token introspection). HTTPS only, because
msal refuses `http://` authorities. Access tokens are opaque random strings held in
memory; tests can count requests and inject failures.
"""

from __future__ import annotations

import datetime
import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from socket import socket
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from mailwarden_proxy.demo.idp_grants import (
    Client,
    Grant,
    GrantState,
    OAuthError,
    Reply,
    new_secret,
    scripted_error,
)
from mailwarden_proxy.demo.tlsca import IssuedCert

_HANG_LIMIT = 30.0  # a "timeout" failure never holds a handler thread longer than this


def rsa_credentials(directory: Path, name: str) -> IssuedCert:
    """A self-signed RSA certificate and key, as Entra app certificates and Google service
    account keys are (msal signs assertions with PS256/RS256, which need RSA)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    issued = IssuedCert(directory / f"{name}.pem", directory / f"{name}.key")
    issued.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    issued.key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    issued.key_path.chmod(0o600)
    return issued


class LocalIdP(GrantState):
    """See the module docstring. Thread-safe; start with `with LocalIdP(...) as idp:`."""

    def __init__(
        self,
        cert: IssuedCert,
        ca_path: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        token_lifetime: int = 3600,
        *,
        device_interval: int = 1,
        single_use_refresh_tokens: bool = True,
    ) -> None:
        super().__init__(token_lifetime, device_interval, single_use_refresh_tokens)
        self.ca_path = ca_path
        self._stopping = threading.Event()
        self._failures: list[str] = []
        self._failure: str | None = None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert.cert_path, cert.key_path)
        self._server = _Server((host, port), _Handler, context, self)
        self._thread: threading.Thread | None = None
        bound_host, bound_port = self._server.socket.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in str(bound_host) else str(bound_host)
        self.base_url = f"https://{shown}:{bound_port}"

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> LocalIdP:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # releases handlers parked by the "timeout" failure
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()
        self._server.close_connections()

    def __enter__(self) -> LocalIdP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- registration and direct minting ------------------------------------------------
    def register_client(
        self,
        client_id: str,
        secret: str | None = None,
        *,
        certificate_pem: str | bytes | None = None,
    ) -> None:
        cert = None
        if certificate_pem is not None:
            raw = certificate_pem.encode() if isinstance(certificate_pem, str) else certificate_pem
            cert = x509.load_pem_x509_certificate(raw)
        with self._lock:
            self._clients[client_id] = Client(secret, cert)

    def register_user(self, username: str, password: str | None = None) -> None:
        with self._lock:
            self._users[username.lower()] = password

    def register_service_account(self, client_email: str, public_key_pem: str | bytes) -> None:
        """Accepts a public key or a certificate PEM (Google publishes both)."""
        raw = public_key_pem.encode() if isinstance(public_key_pem, str) else public_key_pem
        key: Any
        try:
            key = serialization.load_pem_public_key(raw)
        except ValueError:
            key = x509.load_pem_x509_certificate(raw).public_key()
        with self._lock:
            self._service_accounts[client_email] = key

    def issue_refresh_token(self, username: str, client_id: str, scope: str = "") -> str:
        token = new_secret(48)
        with self._lock:
            self._users.setdefault(username.lower(), None)
            self._refresh[token] = Grant(username, client_id, scope)
        return token

    def issue_token(self, username: str | None, lifetime: float | None = None) -> str:
        token = new_secret(32)
        life = self.token_lifetime if lifetime is None else lifetime
        with self._lock:
            self._access[token] = Grant(username, None, "", time.time() + life)
        return token

    def approve_device(self, user_code: str, username: str) -> None:
        with self._lock:
            self._devices[user_code.upper()].username = username

    def deny_device(self, user_code: str) -> None:
        with self._lock:
            self._devices[user_code.upper()].declined = True

    def pending_user_codes(self) -> list[str]:
        with self._lock:
            return [c for c, d in self._devices.items() if d.username is None]

    def is_valid(self, token: str, username: str) -> bool:
        with self._lock:
            grant = self._access.get(token)
        if grant is None or grant.expires_at <= time.time():
            return False
        # an app-only token (Microsoft's application permission) opens every mailbox
        return grant.username is None or grant.username.lower() == username.lower()

    def revoke_all_access_tokens(self) -> None:
        with self._lock:
            self._access.clear()

    # -- counters and failure injection --------------------------------------------------
    def request_count(self, grant_type: str | None = None) -> int:
        with self._lock:
            return sum(self.requests.values()) if grant_type is None else self.requests[grant_type]

    def fail_next(self, mode: str, count: int = 1) -> None:
        """Queue `count` failures: "500" (any 4xx/5xx status), "timeout", "invalid_grant",
        "invalid_client", "slow:<seconds>" (answers normally, late), "aadsts:<number>"
        (Entra ID's error body for that AADSTS code, see `idp_grants.AADSTS_ERRORS`),
        "google:<name>" (Google's, see `idp_grants.GOOGLE_ERRORS`)."""
        with self._lock:
            self._failures.extend([mode] * count)

    def set_failure(self, mode: str | None) -> None:
        """Fail every token request this way until set back to None."""
        with self._lock:
            self._failure = mode

    def reset(self) -> None:
        """Counters and failures back to zero (registrations and tokens stay)."""
        with self._lock:
            self.requests.clear()
            self.introspections = 0
            self._failures.clear()
            self._failure = None

    # -- request handling (called from handler threads) --------------------------------
    def _route(self, method: str, path: str, form: dict[str, str], auth: str | None) -> Reply:
        parts = [p for p in path.split("/") if p]
        try:
            if parts and parts[-1] == "openid-configuration":
                return 200, self._discovery(parts[0])
            if len(parts) >= 2 and parts[1] == "userrealm":
                return 200, {"ver": "1.0", "account_type": "Managed", "domain_name": "local"}
            if parts and parts[0] == "introspect":
                token = form.get("token") or form.get("access_token") or ""
                if auth and auth.lower().startswith("bearer "):
                    token = auth[7:].strip()
                return 200, self._introspect(token, parts[1] if len(parts) > 1 else None)
            if method == "POST" and parts and parts[-1] == "token":
                tenant = parts[0] if len(parts) > 1 else "common"
                return self._with_failures(form.get("grant_type", ""), tenant, form, auth)
            if method == "POST" and parts and parts[-1] == "devicecode":
                return self._with_failures("device_authorization", parts[0], form, auth)
            if method == "GET" and parts and parts[-1] == "authorize":
                return self._authorize(form)
        except OAuthError as err:
            return err.status, err.body
        return 404, {"error": "not_found"}

    def _with_failures(
        self, kind: str, tenant: str, form: dict[str, str], auth: str | None
    ) -> Reply:
        with self._lock:
            self.requests[kind] += 1
            mode = self._failures.pop(0) if self._failures else self._failure
        if mode == "timeout":
            self._stopping.wait(_HANG_LIMIT)
            return None
        if mode and mode.startswith("slow:"):
            self._stopping.wait(min(float(mode[5:]), _HANG_LIMIT))
        elif mode == "invalid_grant":
            raise OAuthError("invalid_grant", 70000, "The provided grant is invalid (injected).")
        elif mode == "invalid_client":
            raise OAuthError("invalid_client", 7000215, "Invalid client secret provided.", 401)
        elif mode and mode.startswith(("aadsts:", "google:")):
            return scripted_error(mode, form.get("client_id", ""), tenant)
        elif mode and mode.isdigit():
            status = int(mode)
            return status, {"error": "server_error", "error_description": f"injected {status}"}
        if kind == "device_authorization":
            return 200, self._device_authorization(form)
        return 200, self._token(kind, tenant, form, auth)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        context: ssl.SSLContext,
        idp: LocalIdP,
    ) -> None:
        self.context = context
        self.idp = idp
        self._open: set[socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, handler)

    def get_request(self) -> tuple[socket, Any]:
        sock, addr = self.socket.accept()
        # the handshake runs in the handler thread, so a slow client can't stall accept()
        tls = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        with self._open_lock:
            self._open.add(tls)
        return tls, addr

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._open_lock:
            open_now, self._open = list(self._open), set()
        for sock in open_now:
            sock.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that time out or hang up are part of the tests, not errors


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as requests sessions expect
    timeout = 30
    server: _Server

    def setup(self) -> None:
        self.request.settimeout(10)
        self.request.do_handshake()
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: URLs and forms may carry tokens

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        form = dict(parse_qsl(body if method == "POST" else url.query))
        reply = self.server.idp._route(method, url.path, form, self.headers.get("Authorization"))
        if reply is None:
            self.close_connection = True
            return
        status, payload = reply
        data = json.dumps(payload).encode()
        self.send_response(status)
        if status == 302:
            self.send_header("Location", payload["location"])
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
