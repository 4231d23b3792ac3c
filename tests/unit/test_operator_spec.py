"""spec.parse_spec: presets, every flow, the CRD's rules and defaults, and fuzzing."""

from __future__ import annotations

import copy
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailwarden_operator.spec import (
    CertificateRef,
    MailAccountSpec,
    SecretKeyRef,
    SpecError,
    parse_spec,
)
from mailwarden_proxy.config.model import Flow, MailProtocol, Mechanism, ProviderKind, UpstreamTLS

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "deploy" / "crds" / "mailaccounts.mailwarden.io.yaml"
MS_RESOURCE = "https://outlook.office365.com"
DELEGATED = (
    f"{MS_RESOURCE}/IMAP.AccessAsUser.All",
    f"{MS_RESOURCE}/POP.AccessAsUser.All",
    f"{MS_RESOURCE}/SMTP.Send",
    "offline_access",
)

# A minimal valid oauth2 block for each (provider, flow) the operator supports.
FLOWS: dict[tuple[str, str], dict[str, Any]] = {
    ("microsoft", "clientCredentials"): {
        "clientId": "cid",
        "tenantId": "contoso.onmicrosoft.com",
        "clientSecretRef": {"name": "app"},
    },
    ("microsoft", "authorizationCode"): {"clientId": "cid"},
    ("microsoft", "deviceCode"): {"clientId": "cid"},
    ("microsoft", "refreshToken"): {"clientId": "cid", "refreshTokenRef": {"name": "rt"}},
    ("microsoft", "password"): {"clientId": "cid", "passwordRef": {"name": "pw"}},
    ("google", "serviceAccount"): {"serviceAccountKeyRef": {"name": "sa"}},
    ("google", "authorizationCode"): {"clientId": "cid", "clientSecretRef": {"name": "web"}},
    ("google", "refreshToken"): {"clientId": "cid", "refreshTokenRef": {"name": "rt"}},
    ("generic", "clientCredentials"): {
        "clientId": "cid",
        "clientSecretRef": {"name": "app"},
        "scopes": ["mail"],
    },
    ("generic", "authorizationCode"): {
        "clientId": "cid",
        "authorizeUrl": "https://idp.example/authorize",
        "scopes": ["mail"],
    },
    ("generic", "deviceCode"): {
        "clientId": "cid",
        "deviceAuthorizationUrl": "https://idp.example/device",
        "scopes": ["mail"],
    },
    ("generic", "refreshToken"): {
        "clientId": "cid",
        "refreshTokenRef": {"name": "rt"},
        "scopes": ["mail"],
    },
    ("generic", "password"): {"clientId": "cid", "passwordRef": {"name": "pw"}, "scopes": ["m"]},
}


def make(provider: str = "microsoft", flow: str = "deviceCode", **extra: Any) -> dict[str, Any]:
    oauth2 = {"flow": flow, **copy.deepcopy(FLOWS[provider, flow])}
    if provider == "generic":
        oauth2["tokenUrl"] = "https://idp.example/token"
    spec: dict[str, Any] = {"provider": provider, "username": "box@example.com", "oauth2": oauth2}
    if provider == "generic":
        spec["imap"] = {"host": "mail.example"}
    else:
        spec["imap"] = {}
    spec.update(extra)
    return spec


def error(spec: dict[str, Any]) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    return info.value


# -- presets ------------------------------------------------------------------------------


def test_microsoft_server_presets() -> None:
    s = parse_spec(make(imap={}, pop3={}, smtp={}))
    assert s.imap is not None and s.pop3 is not None and s.smtp is not None
    assert (s.imap.host, s.imap.port, s.imap.tls) == (
        "outlook.office365.com",
        993,
        UpstreamTLS.IMPLICIT,
    )
    assert (s.pop3.host, s.pop3.port, s.pop3.tls) == (
        "outlook.office365.com",
        995,
        UpstreamTLS.IMPLICIT,
    )
    assert (s.smtp.host, s.smtp.port, s.smtp.tls) == (
        "smtp.office365.com",
        587,
        UpstreamTLS.STARTTLS,
    )
    assert [x.protocol for x in s.servers()] == list(MailProtocol)


def test_google_server_presets() -> None:
    s = parse_spec(make("google", "serviceAccount", imap={}, pop3={}, smtp={}))
    assert s.imap is not None and s.pop3 is not None and s.smtp is not None
    assert (s.imap.host, s.imap.port, s.imap.tls) == ("imap.gmail.com", 993, UpstreamTLS.IMPLICIT)
    assert (s.pop3.host, s.pop3.port, s.pop3.tls) == ("pop.gmail.com", 995, UpstreamTLS.IMPLICIT)
    assert (s.smtp.host, s.smtp.port, s.smtp.tls) == ("smtp.gmail.com", 465, UpstreamTLS.IMPLICIT)


def test_google_smtp_starttls_takes_587() -> None:
    s = parse_spec(make("google", "serviceAccount", smtp={"tls": "starttls"}))
    assert s.smtp is not None
    assert (s.smtp.host, s.smtp.port, s.smtp.tls) == ("smtp.gmail.com", 587, UpstreamTLS.STARTTLS)


def test_explicit_server_values_win() -> None:
    s = parse_spec(make(imap={"host": "imap.test", "port": 1993, "tls": "starttls"}))
    assert s.imap is not None
    assert (s.imap.host, s.imap.port, s.imap.tls) == ("imap.test", 1993, UpstreamTLS.STARTTLS)


def test_tls_none_needs_allow_insecure() -> None:
    assert error(make(imap={"tls": "none"})).field == "spec.imap.tls"
    s = parse_spec(make(imap={"tls": "none", "allowInsecure": True}))
    assert s.imap is not None
    assert (s.imap.port, s.imap.allow_insecure) == (143, True)


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
def test_generic_needs_hosts(protocol: str) -> None:
    spec = make("generic", "clientCredentials")
    spec[protocol] = {}
    assert error(spec).field == f"spec.{protocol}.host"


def test_at_least_one_server() -> None:
    spec = make()
    del spec["imap"]
    err = error(spec)
    assert err.field == "spec" and "spec.imap" in err.message


@pytest.mark.parametrize(
    ("flow", "scopes"),
    [
        ("clientCredentials", (f"{MS_RESOURCE}/.default",)),
        ("authorizationCode", DELEGATED),
        ("deviceCode", DELEGATED),
        ("refreshToken", DELEGATED),
        ("password", DELEGATED),
    ],
)
def test_microsoft_scopes_per_flow(flow: str, scopes: tuple[str, ...]) -> None:
    assert parse_spec(make("microsoft", flow)).oauth2.scopes == scopes


def test_microsoft_delegated_flows_default_to_organizations() -> None:
    o = parse_spec(make("microsoft", "authorizationCode")).oauth2
    base = "https://login.microsoftonline.com/organizations/oauth2/v2.0"
    assert o.tenant_id == "organizations"
    assert (o.token_url, o.authorize_url) == (f"{base}/token", f"{base}/authorize")
    assert o.device_authorization_url is None
    d = parse_spec(make("microsoft", "deviceCode")).oauth2
    assert d.device_authorization_url == f"{base}/devicecode"
    assert d.authorize_url is None
    assert d.needs_consent and o.needs_consent


def test_microsoft_urls_from_tenant() -> None:
    o = parse_spec(make("microsoft", "clientCredentials")).oauth2
    assert o.token_url == (
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    )
    assert not o.needs_consent


def test_microsoft_tenant_inferred_from_custom_token_url() -> None:
    spec = make("microsoft", "refreshToken")
    spec["oauth2"]["tokenUrl"] = "https://login.microsoftonline.us/fabrikam.com/oauth2/v2.0/token"
    o = parse_spec(spec).oauth2
    assert o.tenant_id == "fabrikam.com"
    assert o.token_url.startswith("https://login.microsoftonline.us/")


@pytest.mark.parametrize("tenant", [None, "common", "organizations", "Consumers"])
def test_microsoft_client_credentials_needs_a_real_tenant(tenant: str | None) -> None:
    spec = make("microsoft", "clientCredentials")
    spec["oauth2"].pop("tenantId")
    if tenant:
        spec["oauth2"]["tenantId"] = tenant
    assert error(spec).field == "spec.oauth2.tenantId"


def test_google_oauth2_presets() -> None:
    o = parse_spec(make("google", "authorizationCode")).oauth2
    assert o.token_url == "https://oauth2.googleapis.com/token"
    assert o.authorize_url == "https://accounts.google.com/o/oauth2/v2/auth"
    assert o.scopes == ("https://mail.google.com/",)
    assert o.tenant_id is None
    sa = parse_spec(make("google", "serviceAccount")).oauth2
    assert sa.scopes == ("https://mail.google.com/",) and sa.subject == "box@example.com"
    spec = make("google", "serviceAccount")
    spec["oauth2"]["subject"] = "other@example.com"
    assert parse_spec(spec).oauth2.subject == "other@example.com"


def test_explicit_scopes_and_empty_list() -> None:
    spec = make()
    spec["oauth2"]["scopes"] = ["a", "b"]
    assert parse_spec(spec).oauth2.scopes == ("a", "b")
    spec["oauth2"]["scopes"] = []
    assert parse_spec(spec).oauth2.scopes == DELEGATED
    spec["oauth2"]["scopes"] = ["ok", "has space"]
    assert error(spec).field == "spec.oauth2.scopes[1]"


# -- every flow ----------------------------------------------------------------------------


@pytest.mark.parametrize(("provider", "flow"), sorted(FLOWS))
def test_every_supported_flow_parses(provider: str, flow: str) -> None:
    s = parse_spec(make(provider, flow))
    assert (s.provider, s.oauth2.flow) == (ProviderKind(provider), Flow(flow))
    assert s.oauth2.token_url.startswith("https://")
    assert s.oauth2.scopes


@pytest.mark.parametrize(
    ("flow", "missing"),
    [
        ("clientCredentials", "clientSecretRef"),
        ("refreshToken", "refreshTokenRef"),
        ("password", "passwordRef"),
        ("deviceCode", "clientId"),
    ],
)
def test_flow_requirements(flow: str, missing: str) -> None:
    spec = make("microsoft", flow)
    spec["oauth2"].pop(missing)
    assert error(spec).field == f"spec.oauth2.{missing}"


def test_service_account_requirements() -> None:
    spec = make("google", "serviceAccount")
    spec["oauth2"].pop("serviceAccountKeyRef")
    assert error(spec).field == "spec.oauth2.serviceAccountKeyRef"
    spec = make("microsoft", "deviceCode")
    spec["oauth2"] = {"flow": "serviceAccount", "serviceAccountKeyRef": {"name": "sa"}}
    assert error(spec).field == "spec.oauth2.flow"


def test_client_credentials_with_certificate_only() -> None:
    spec = make("microsoft", "clientCredentials")
    spec["oauth2"].pop("clientSecretRef")
    spec["oauth2"]["clientCertificateRef"] = {"name": "cert"}
    o = parse_spec(spec).oauth2
    assert o.client_certificate_ref == CertificateRef("cert", "tls.crt", "tls.key")


@pytest.mark.parametrize("flow", ["clientCredentials", "password", "deviceCode"])
def test_google_refuses_flows_it_does_not_offer(flow: str) -> None:
    spec = make("google", "authorizationCode")
    spec["oauth2"] = {"flow": flow, "clientId": "c", "clientSecretRef": {"name": "s"}}
    spec["oauth2"]["passwordRef"] = {"name": "pw"}
    err = error(spec)
    assert err.field == "spec.oauth2.flow" and "Google" in err.message


def test_certificates_only_for_microsoft() -> None:
    spec = make("generic", "clientCredentials")
    spec["oauth2"]["clientCertificateRef"] = {"name": "cert"}
    assert error(spec).field == "spec.oauth2.clientCertificateRef"


@pytest.mark.parametrize(
    ("flow", "key"),
    [
        ("clientCredentials", "tokenUrl"),
        ("clientCredentials", "scopes"),
        ("authorizationCode", "authorizeUrl"),
        ("deviceCode", "deviceAuthorizationUrl"),
    ],
)
def test_generic_has_no_presets(flow: str, key: str) -> None:
    spec = make("generic", flow)
    spec["oauth2"].pop(key)
    assert error(spec).field == f"spec.oauth2.{key}"


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("provider",), "yahoo"),
        (("username",), "no-at-sign"),
        (("username",), "two@@example.com"),
        (("mechanism",), "plain"),
        (("oauth2", "flow"), "implicit"),
        (("oauth2", "tenantId"), "-bad"),
        (("oauth2", "tokenUrl"), "http://insecure.example/token"),
        (("oauth2", "tokenUrl"), "[https://x](https://x)"),
        (("oauth2", "tokenUrl"), "https://host:99999/token"),
        (("oauth2", "usePkce"), "yes"),
        (("oauth2", "clientId"), "x" * 257),
        (("oauth2", "clientSecretRef"), {"key": "k"}),
        (("oauth2", "clientSecretRef"), "app"),
        (("imap", "port"), 0),
        (("imap", "port"), True),
        (("imap", "host"), "bad host"),
        (("imap", "tls"), "ssl"),
        (("local", "imapPort"), 70000),
        (("local", "metricsPort"), -1),
    ],
)
def test_schema_violations_name_the_field(path: tuple[str, ...], value: Any) -> None:
    spec = make()
    spec.setdefault("local", {})
    target = spec
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    err = error(spec)
    assert err.field.startswith("spec." + ".".join(path)), err
    assert str(err).startswith(err.field + ": ")


def test_local_ports() -> None:
    s = parse_spec(make(smtp={}, local={"imapPort": 2143, "metricsPort": 0}))
    assert (s.local.imap_port, s.local.smtp_port, s.local.metrics_port) == (2143, 1025, 0)
    assert s.local.port_for(MailProtocol.IMAP) == 2143
    assert error(make(local={"imapPort": 1025})).field == "spec.local"
    assert error(make(local={"metricsPort": 1143})).field == "spec.local.metricsPort"
    # the POP3 port is unused without spec.pop3, so metrics may take it
    assert parse_spec(make(local={"metricsPort": 1110})).local.metrics_port == 1110


def test_secret_refs_default_keys_and_dedup() -> None:
    spec = make("microsoft", "clientCredentials", local={"passwordSecretRef": {"name": "app"}})
    spec["oauth2"].update(
        clientCertificateRef={"name": "cert", "certificateKey": "c.pem"},
        refreshTokenRef={"name": "rt"},
        passwordRef={"name": "pw", "key": "pass"},
    )
    assert parse_spec(spec).secret_refs() == [
        SecretKeyRef("app", "client-secret"),
        SecretKeyRef("cert", "c.pem"),
        SecretKeyRef("cert", "tls.key"),
        SecretKeyRef("rt", "refresh-token"),
        SecretKeyRef("pw", "pass"),
        SecretKeyRef("app", "local-password"),
    ]
    sa = parse_spec(make("google", "serviceAccount"))
    assert sa.secret_refs() == [SecretKeyRef("sa", "key.json")]
    same = make("microsoft", "refreshToken")
    same["oauth2"]["clientSecretRef"] = {"name": "rt", "key": "refresh-token"}
    assert parse_spec(same).secret_refs() == [SecretKeyRef("rt", "refresh-token")]


def test_accepts_any_mapping_like_kopf_bodies() -> None:
    spec = make()
    assert parse_spec(MappingProxyType(spec)) == parse_spec(spec)
    kopf = pytest.importorskip("kopf")
    assert parse_spec(kopf.Body({"spec": spec}).spec) == parse_spec(spec)
    assert error({"provider": "microsoft"}).field in ("spec.username",)
    with pytest.raises(SpecError) as info:
        parse_spec([])  # type: ignore[arg-type]
    assert info.value.field == "spec"


# -- the CRD's defaults are parse_spec's defaults ----------------------------------------


def _schema_defaults(schema: dict[str, Any], path: str = "spec") -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, sub in schema.get("properties", {}).items():
        here = f"{path}.{key}"
        if "default" in sub:
            found[here] = sub["default"]
        found.update(_schema_defaults(sub, here))
    return found


def _crd_spec_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    version = crd["spec"]["versions"][0]
    spec_schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return spec_schema


def test_crd_defaults_match_parse_spec_defaults() -> None:
    spec = make("microsoft", "clientCredentials", imap={}, pop3={}, smtp={})
    spec["oauth2"]["clientCertificateRef"] = {"name": "cert"}
    parsed: MailAccountSpec = parse_spec(spec)
    cert = parsed.oauth2.client_certificate_ref
    assert cert is not None and parsed.imap and parsed.pop3 and parsed.smtp
    # every CRD default, read through the parsed spec; a new default fails here until mapped
    ours = {
        "spec.mechanism": parsed.mechanism.value,
        "spec.oauth2.usePkce": parsed.oauth2.use_pkce,
        "spec.oauth2.clientCertificateRef.certificateKey": cert.certificate_key,
        "spec.oauth2.clientCertificateRef.privateKeyKey": cert.private_key_key,
        "spec.imap.allowInsecure": parsed.imap.allow_insecure,
        "spec.pop3.allowInsecure": parsed.pop3.allow_insecure,
        "spec.smtp.allowInsecure": parsed.smtp.allow_insecure,
        "spec.local.imapPort": parsed.local.imap_port,
        "spec.local.pop3Port": parsed.local.pop3_port,
        "spec.local.smtpPort": parsed.local.smtp_port,
        "spec.local.metricsPort": parsed.local.metrics_port,
    }
    assert _schema_defaults(_crd_spec_schema()) == ours
    assert parsed.mechanism is Mechanism.XOAUTH2


def test_crd_enums_match_the_model() -> None:
    props = _crd_spec_schema()["properties"]
    assert props["provider"]["enum"] == [p.value for p in ProviderKind]
    assert props["mechanism"]["enum"] == [m.value for m in Mechanism]
    assert sorted(props["oauth2"]["properties"]["flow"]["enum"]) == sorted(f.value for f in Flow)
    assert props["imap"]["properties"]["tls"]["enum"] == [t.value for t in UpstreamTLS]


# -- fuzzing: anything at all gives a spec or a SpecError ---------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**31), 2**31) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
KEYS = st.sampled_from(
    [
        "provider",
        "username",
        "oauth2",
        "flow",
        "clientId",
        "tenantId",
        "tokenUrl",
        "scopes",
        "imap",
        "pop3",
        "smtp",
        "host",
        "port",
        "tls",
        "local",
        "name",
        "key",
        "clientSecretRef",
        "metricsPort",
    ]
)


def _parses_or_spec_error(spec: Any) -> None:
    try:
        parse_spec(spec)
    except SpecError as err:
        assert err.field.startswith("spec")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.text(max_size=10) | KEYS, JSON, max_size=6))
def test_arbitrary_json_raises_only_spec_error(spec: dict[str, Any]) -> None:
    _parses_or_spec_error(spec)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(sorted(FLOWS)),
    st.lists(st.tuples(st.lists(KEYS, min_size=1, max_size=3), JSON), max_size=3),
)
def test_mutated_valid_specs_raise_only_spec_error(
    base: tuple[str, str], edits: list[tuple[list[str], Any]]
) -> None:
    spec = make(*base)
    for path, value in edits:
        target: Any = spec
        for key in path[:-1]:
            if not isinstance(target, dict):
                break
            target = target.setdefault(key, {})
        if isinstance(target, dict):
            target[path[-1]] = value
    _parses_or_spec_error(spec)
