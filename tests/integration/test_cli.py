"""`mailwarden` as a user runs it: register/import output applied to the real apiserver
(schema and CEL accept it), `--apply` through the real kubectl, and `mailwarden test`
driving the real proxy against the local IdP, aiosmtpd submission server and Dovecot."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailwarden_proxy.config.model import MailProtocol, ProxyConfig, UpstreamTLS
from mailwarden_proxy.config.render import to_native
from mailwarden_proxy.demo.idp import LocalIdP
from mailwarden_proxy.demo.smtpd import LocalSubmissionServer
from tests.fixtures.dovecot import DovecotServer
from tests.fixtures.kube import KubeCluster
from tests.integration.proxyconf import LOCAL_PASSWORD, app_account, config, listener
from tests.unit.test_cli_manifests import GOOD, GUIDE, PUBLISHED, TENANT

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "deploy" / "crds" / "mailaccounts.mailwarden.io.yaml"
USER = "app@example.com"


def mailwarden(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "mailwarden_operator.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.fixture(scope="module")
def crd(kube: KubeCluster) -> KubeCluster:
    kube.kubectl("apply", "-f", str(CRD))
    kube.kubectl("wait", "--for=condition=Established", "crd/mailaccounts.mailwarden.io",
                 "--timeout=30s")  # fmt: skip
    return kube


def _get(kube: KubeCluster, namespace: str, *what: str) -> Any:
    return json.loads(kube.kubectl("get", *what, "-n", namespace, "-o", "json").stdout)


def _secret_value(kube: KubeCluster, namespace: str, name: str, key: str) -> str:
    return base64.b64decode(_get(kube, namespace, "secret", name)["data"][key]).decode()


# --- register / import output on the real apiserver ------------------------------------------


def test_register_output_is_accepted_by_the_crd(crd: KubeCluster, kube_namespace: str) -> None:
    proc = mailwarden("register", "--name=vault", "--username=vault@contoso.com", *GUIDE)
    assert proc.returncode == 0, proc.stderr
    crd.kubectl("apply", "-n", kube_namespace, "-f", "-", input=proc.stdout)
    stored = _get(crd, kube_namespace, "mailaccount", "vault")
    assert stored["spec"]["oauth2"]["flow"] == "clientCredentials"
    assert stored["spec"]["oauth2"]["tenantId"] == TENANT
    # empty server objects take the provider's servers; the CRD defaults allowInsecure
    assert stored["spec"]["smtp"] == stored["spec"]["imap"] == {"allowInsecure": False}
    assert stored["spec"]["mechanism"] == "xoauth2"  # CRD default filled in
    assert _secret_value(crd, kube_namespace, "vault-oauth2-client", "client-secret") == (
        "s3cr~et.value"
    )


@pytest.mark.parametrize(
    "flags",
    [
        ["--oauth2-flow=authorization_code", "--oauth2-client-secret=s"],
        [f"--oauth2-permission-url=https://login.microsoftonline.com/{TENANT}/authorize2"],
        ["--oauth2-flow=device"],
        ["--oauth2-flow=password"],
        ["--oauth2-flow=client_credentials", "--oauth2-client-secret=s", "--smtp-local-port=2465"],
    ],
    ids=["authorization_code", "permission_url", "device", "password", "local_port"],
)
def test_every_flow_register_emits_passes_schema_and_cel(
    crd: KubeCluster, kube_namespace: str, flags: list[str]
) -> None:
    proc = mailwarden(
        "register",
        "--name=box",
        "--username=box@contoso.com",
        "--smtp-server-address=smtp.office365.com",
        "--smtp-server-starttls",
        "--pop-server-address=pop.example.net",
        f"--oauth2-token-url=https://login.microsoftonline.com/{TENANT}/oauth2/v2.0/token",
        "--oauth2-client-id=cid",
        *flags,
    )
    assert proc.returncode == 0, proc.stderr
    applied = crd.kubectl("apply", "-n", kube_namespace, "-f", "-", input=proc.stdout, check=False)
    assert applied.returncode == 0, applied.stderr
    pop3 = _get(crd, kube_namespace, "ma", "box")["spec"]["pop3"]
    assert pop3 == {"host": "pop.example.net", "allowInsecure": False}


def test_google_service_account_output_passes_cel(
    crd: KubeCluster, kube_namespace: str, tmp_path: Path
) -> None:
    key = {"client_email": "sa@p.iam.gserviceaccount.com", "private_key": "-----BEGIN..."}
    proc = mailwarden(
        "register",
        "--name=gmail",
        "--username=box@example.com",
        "--imap-server-address=imap.gmail.com",
        "--smtp-server-address=smtp.gmail.com",
        "--smtp-server-port=587",
        "--smtp-server-starttls",
        "--oauth2-token-url=https://oauth2.googleapis.com/token",
        "--oauth2-flow=service_account",
        "--oauth2-client-id=key",
        f"--oauth2-client-secret={json.dumps(key)}",
    )
    assert proc.returncode == 0, proc.stderr
    crd.kubectl("apply", "-n", kube_namespace, "-f", "-", input=proc.stdout)
    spec = _get(crd, kube_namespace, "ma", "gmail")["spec"]
    assert spec["smtp"] == {"tls": "starttls", "allowInsecure": False}
    assert spec["oauth2"]["serviceAccountKeyRef"] == {
        "name": "gmail-oauth2-client",
        "key": "key.json",
    }


def test_the_shared_example_imports_and_applies(
    crd: KubeCluster, kube_namespace: str, tmp_path: Path
) -> None:
    # as published, the guide's file carries TENANT_ID, which the CRD's pattern refuses:
    # import warns, and the apiserver agrees
    raw = mailwarden("import", str(GOOD), "--username=vault@contoso.com")
    assert raw.returncode == 0, raw.stderr
    assert "looks like a placeholder" in raw.stderr
    refused = crd.kubectl("apply", "-n", kube_namespace, "-f", "-", input=raw.stdout, check=False)
    assert refused.returncode != 0
    assert "tenantId" in refused.stderr
    # the file a user has after filling in the placeholders
    filled = tmp_path / "emailproxy.config"
    filled.write_text(GOOD.read_text().replace("TENANT_ID", TENANT))
    proc = mailwarden("import", str(filled), "--username=vault@contoso.com", "--name=vault")
    assert proc.returncode == 0, proc.stderr
    crd.kubectl("apply", "-n", kube_namespace, "-f", "-", input=proc.stdout)
    spec = _get(crd, kube_namespace, "ma", "vault")["spec"]
    assert spec["local"]["imapPort"] == 2993 and spec["local"]["smtpPort"] == 2465
    assert spec["local"]["pop3Port"] == 1110  # CRD default
    assert _secret_value(crd, kube_namespace, "vault-oauth2-client", "client-secret") == (
        "CLIENT_SECRET"
    )


def test_the_as_published_example_is_refused() -> None:
    proc = mailwarden("import", str(PUBLISHED), "--username=vault@contoso.com")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "[@] token_url:" in proc.stderr
    assert "SMPT.Send" in proc.stderr


def _kubectl_env(kube: KubeCluster) -> dict[str, str]:
    env = dict(kube.env)
    env["PATH"] = f"{kube.bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_register_apply_and_force(crd: KubeCluster, kube_namespace: str) -> None:
    env = _kubectl_env(crd)
    common = ["register", "--name=vault", "--username=vault@contoso.com", "-n", kube_namespace]
    common += [f"--kubeconfig={crd.kubeconfig}", "--apply"]
    guide = [a for a in GUIDE if a != "--force"]
    proc = mailwarden(*common, *guide, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "mailaccount.mailwarden.io/vault created" in proc.stdout
    # a rotated secret, applied again: client-side apply updates, --force goes server-side
    rotated = [a for a in guide if not a.startswith("--oauth2-client-secret")]
    rotated.append("--oauth2-client-secret=rotated")
    proc = mailwarden(*common, *rotated, env=env)
    assert proc.returncode == 0, proc.stderr
    assert _secret_value(crd, kube_namespace, "vault-oauth2-client", "client-secret") == "rotated"
    crd.kubectl("patch", "ma", "vault", "-n", kube_namespace, "--type=merge", "-p",
                '{"spec":{"imap":{"port":1993}}}')  # fmt: skip
    proc = mailwarden(*common, *rotated, "--force", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "serverside-applied" in proc.stdout
    # a failed apply is exit 1 with kubectl's own message
    bad = mailwarden(*common, *rotated, "-n", "no-such-namespace", env=env)
    assert bad.returncode == 1
    assert "no-such-namespace" in bad.stderr and "not found" in bad.stderr


# --- mailwarden test --------------------------------------------------------------------------


def _native(cfg: ProxyConfig, path: Path) -> Path:
    # a native file needs real local ports; `mailwarden test` swaps them for free ones
    ports = iter(range(1025, 1100))
    cfg = replace(
        cfg, listeners=tuple(replace(lst, local_port=next(ports)) for lst in cfg.listeners)
    )
    path.write_text(yaml.safe_dump(to_native(cfg, mask=False), sort_keys=False))
    return path


def _smtp_config(idp: LocalIdP, smtpd: LocalSubmissionServer, ca: Path) -> ProxyConfig:
    lst = listener("SMTP-1025", MailProtocol.SMTP, smtpd.port, UpstreamTLS.STARTTLS, ca)
    return config([lst], [app_account(idp, USER)])


def test_test_sends_through_the_proxy(
    idp: LocalIdP, submission_server: LocalSubmissionServer, local_ca: Any, tmp_path: Path
) -> None:
    cfg = _smtp_config(idp, submission_server, local_ca.ca_path)
    path = _native(cfg, tmp_path / "proxy.yaml")
    proc = mailwarden("test", "--config", str(path), "--to", "rcpt@example.com")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"testing {path} as {USER} (smtp → 127.0.0.1:")
    assert lines[1].startswith("✓ token acquired (expires ")
    assert lines[2:] == ["✓ SMTP login", "✓ message accepted by upstream (to rcpt@example.com)"]
    [message] = submission_server.wait_for_messages(1)
    assert message.subject == "mailwarden test message"
    assert idp.request_count("client_credentials") == 1


def test_test_reports_the_failed_step_and_reply(
    idp: LocalIdP, submission_server: LocalSubmissionServer, local_ca: Any, tmp_path: Path
) -> None:
    cfg = _smtp_config(idp, submission_server, local_ca.ca_path)
    path = _native(cfg, tmp_path / "proxy.yaml")
    submission_server.reject_next_tokens(100)
    proc = mailwarden("test", "--config", str(path), "--to", "rcpt@example.com")
    assert proc.returncode == 1
    assert "✓ token acquired" in proc.stdout
    assert "✗ SMTP login: 535 " in proc.stdout
    assert "message accepted" not in proc.stdout
    secret = cfg.accounts[0].oauth2.client_secret
    assert secret is not None
    for leaked in (secret.reveal(), LOCAL_PASSWORD, "eyJ"):
        assert leaked not in proc.stdout + proc.stderr
    submission_server.reset()
    # the IdP refusing the client: the token step fails with its error code, nothing else runs
    idp.set_failure("invalid_client")
    proc = mailwarden("test", "--config", str(path), "--to", "rcpt@example.com")
    assert proc.returncode == 1
    assert "✗ token acquired: invalid_client" in proc.stdout
    assert "SMTP" not in proc.stdout.split("\n", 1)[1]


@pytest.mark.dovecot
def test_test_logs_in_over_imap_too(
    idp: LocalIdP,
    dovecot: DovecotServer,
    submission_server: LocalSubmissionServer,
    local_ca: Any,
    tmp_path: Path,
) -> None:
    imap = listener(
        "IMAP-1143", MailProtocol.IMAP, dovecot.imaps_port, UpstreamTLS.IMPLICIT,
        dovecot.ca_path, host=dovecot.host,
    )  # fmt: skip
    smtp = listener(
        "SMTP-1025", MailProtocol.SMTP, submission_server.port, UpstreamTLS.STARTTLS,
        local_ca.ca_path,
    )  # fmt: skip
    path = _native(config([smtp, imap], [app_account(idp, USER)]), tmp_path / "proxy.yaml")
    proc = mailwarden("test", "--config", str(path), "--to", "rcpt@example.com")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # IMAP first: a login there proves the token without sending anything
    assert proc.stdout.splitlines()[2:] == [
        "✓ IMAP login",
        "✓ SMTP login",
        "✓ message accepted by upstream (to rcpt@example.com)",
    ]


def test_test_a_mailaccount_reads_its_rendered_secret(
    kube: KubeCluster,
    kube_namespace: str,
    idp: LocalIdP,
    submission_server: LocalSubmissionServer,
    local_ca: Any,
    tmp_path: Path,
) -> None:
    """The Secret `<name>-proxy` as the operator renders it (config + local password);
    the local password lives in its own key, read through the sidecar's mount path."""
    cfg = _smtp_config(idp, submission_server, local_ca.ca_path)
    native = yaml.safe_load(_native(cfg, tmp_path / "proxy.yaml").read_text())
    account = native["accounts"][0]
    del account["localPassword"]
    account["localPasswordFile"] = "/etc/mailwarden/local-password"
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "vault-proxy"},
        "stringData": {
            "proxy.yaml": yaml.safe_dump(native),
            "local-password": "rendered-local-password",
            "username": USER,
        },
    }
    kube.kubectl("apply", "-n", kube_namespace, "-f", "-", input=yaml.safe_dump(secret))
    proc = mailwarden(
        "test", "vault", "-n", kube_namespace, f"--kubeconfig={kube.kubeconfig}",
        "--to", "rcpt@example.com", env=_kubectl_env(kube),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[0].startswith(f"testing mailaccount/vault as {USER}")
    assert "✓ message accepted by upstream" in proc.stdout
    missing = mailwarden(
        "test", "nothere", "-n", kube_namespace, f"--kubeconfig={kube.kubeconfig}",
        "--to", "rcpt@example.com", env=_kubectl_env(kube),
    )  # fmt: skip
    assert missing.returncode == 2
    assert "nothere-proxy" in missing.stderr and "NotFound" in missing.stderr
