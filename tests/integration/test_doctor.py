"""`mailwarden doctor <mailaccount>`: the rendered Secret `<name>-proxy` read with the user's
kubectl from the real apiserver, laid out like the sidecar's mount, and diagnosed against
the local IdP and the aiosmtpd submission server."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from mailwarden_proxy.demo.idp import LocalIdP
from mailwarden_proxy.demo.smtpd import LocalSubmissionServer
from mailwarden_proxy.demo.tlsca import LocalCA
from tests.fixtures.idp import TEST_CLIENT_ID, TEST_CLIENT_SECRET, TEST_TENANT
from tests.fixtures.kube import KubeCluster
from tests.fixtures.operator import OperatorRunner
from tests.integration.test_diagnose import (
    USER,
    assert_no_secrets,
    lines_of,
    smtp_config,
    step,
    write_native,
)

ROOT = Path(__file__).resolve().parents[2]


def mailwarden(
    kube: KubeCluster, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    env = {**kube.env, **(env or {})}
    env["PATH"] = f"{kube.bin_dir}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(
        [sys.executable, "-m", "mailwarden_operator.cli", *args,
         f"--kubeconfig={kube.kubeconfig}"],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, check=False,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_doctor_a_mailaccount_from_its_rendered_secret(
    kube: KubeCluster,
    kube_namespace: str,
    idp: LocalIdP,
    submission_server: LocalSubmissionServer,
    local_ca: LocalCA,
    tmp_path: Path,
) -> None:
    cfg = smtp_config(idp, submission_server, local_ca.ca_path)
    native = yaml.safe_load(write_native(cfg, tmp_path / "proxy.yaml").read_text())
    account = native["accounts"][0]
    del account["localPassword"]
    account["localPasswordFile"] = "/etc/mailwarden/local-password"  # as the operator renders
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

    proc = mailwarden(kube, "doctor", "vault", "-n", kube_namespace, "--timeout", "5")
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert lines_of(out)[0] == (
        f"diagnosing mailaccount/vault as {USER}: microsoft, clientCredentials, XOAUTH2"
    )
    assert step(out, "login").startswith(f"✓ login XOAUTH2 as {USER}: 235")
    assert lines_of(out)[-1].startswith("result: pass")
    assert_no_secrets(cfg, out + proc.stderr)
    assert "rendered-local-password" not in out + proc.stderr

    # the identity provider refusing the client: exit 1, the catalogue's fix, no secret
    idp.set_failure("invalid_client")
    proc = mailwarden(kube, "doctor", "vault", "-n", kube_namespace, "--protocol", "smtp")
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert step(out, "token").startswith("✗ token 127.0.0.1: invalid_client")
    assert "reason: InvalidClientSecret" in out and "fix:" in out
    assert_no_secrets(cfg, out + proc.stderr)

    # no rendered Secret, or no name at all: exit 2 with kubectl's words
    missing = mailwarden(kube, "doctor", "nothere", "-n", kube_namespace)
    assert missing.returncode == 2
    assert "nothere-proxy" in missing.stderr and "NotFound" in missing.stderr
    neither = mailwarden(kube, "doctor")
    assert neither.returncode == 2
    assert "either a MailAccount name or --config FILE" in neither.stderr


@pytest.fixture
def operator_for_idp(
    mailaccount_crd: KubeCluster, kube_namespace: str, idp: LocalIdP
) -> Iterator[OperatorRunner]:
    """The operator, trusting the local IdP's CA for token requests."""
    runner = OperatorRunner(mailaccount_crd, kube_namespace)
    runner.env["MAILWARDEN_TOKEN_CA_FILE"] = str(idp.ca_path)
    runner.start()
    yield runner
    runner.stop()
    runner.http.close()


def test_doctor_an_operator_rendered_mailaccount_finds_the_untrusted_idp(
    operator_for_idp: OperatorRunner,
    idp: LocalIdP,
    submission_server: LocalSubmissionServer,
    local_ca: LocalCA,
) -> None:
    """The Secret as the operator really renders it (client secret, local password and
    username keys, the sidecar's mount paths). The test CA stands in for the system store
    (`SSL_CERT_FILE`), since a MailAccount names public mail servers; the token endpoint is
    checked against the CA bundle of the token client (certifi), which the local IdP's CA
    is not in: MAILWARDEN_TOKEN_CA_FILE is the operator's own setting and is not rendered
    into the sidecar's configuration. The doctor says exactly that."""
    op = operator_for_idp
    op.apply(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "app"},
         "stringData": {"client-secret": TEST_CLIENT_SECRET}},
        {"apiVersion": "mailwarden.io/v1alpha1", "kind": "MailAccount",
         "metadata": {"name": "vault"},
         "spec": {
             "provider": "microsoft",
             "username": USER,
             "oauth2": {"flow": "clientCredentials", "clientId": TEST_CLIENT_ID,
                        "tenantId": TEST_TENANT, "tokenUrl": idp.token_url(TEST_TENANT),
                        "clientSecretRef": {"name": "app"}},
             "smtp": {"host": "127.0.0.1", "port": submission_server.port, "tls": "starttls"},
         }},
    )  # fmt: skip
    op.wait_for_condition("vault", "ConfigRendered", "True")
    proc = mailwarden(
        op.kube, "doctor", "vault", "-n", op.namespace, env={"SSL_CERT_FILE": str(local_ca.ca_path)}
    )
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert lines_of(out)[1] == f"SMTP 127.0.0.1:{submission_server.port} (STARTTLS)"
    assert "trusted: chains to system store" in out
    assert step(out, "certificate").startswith("✓")
    assert step(out, "token") == (
        "✗ token 127.0.0.1: tls: TLS handshake with the token endpoint failed"
    )
    assert "reason: IdentityProviderTlsFailed" in out
    assert step(out, "login") == "- login no token"
    assert TEST_CLIENT_SECRET not in out + proc.stderr
