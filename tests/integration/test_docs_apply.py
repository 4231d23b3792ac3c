"""Every manifest the docs show applies on the real kube-apiserver (the CRD's schema and
CEL rules included), and every Helm values snippet renders with the real helm.

Manifests are the ```yaml blocks whose documents all have apiVersion and kind (see
tests/unit/test_docs.py for how blocks are found and marked). Each block is created, not
dry-run, in a fresh namespace of its own, as `kubectl apply -n NS -f block.yaml` would.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.kube import KubeCluster, find_binaries
from tests.unit.test_docs import Block, helm_value_blocks, manifest_blocks

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "deploy" / "crds" / "mailaccounts.mailwarden.io.yaml"
CHART = ROOT / "charts" / "mailwarden"


@pytest.fixture(scope="module")
def crd(kube: KubeCluster) -> KubeCluster:
    kube.kubectl("apply", "-f", str(CRD))
    kube.kubectl("wait", "--for=condition=Established", "crd/mailaccounts.mailwarden.io",
                 "--timeout=30s")  # fmt: skip
    return kube


@pytest.mark.parametrize("block", manifest_blocks(), ids=lambda b: b.where)
def test_manifest_applies(crd: KubeCluster, block: Block) -> None:
    namespace = crd.create_namespace()
    result = crd.kubectl("apply", "-n", namespace, "-f", "-", input=block.text, check=False)
    assert result.returncode == 0, f"{block.where}:\n{result.stderr}"
    for doc in block.documents():
        kind, name = doc["kind"].lower(), doc["metadata"]["name"]
        assert f"/{name} created" in result.stdout, result.stdout
        crd.kubectl("get", "-n", namespace, f"{kind}/{name}")


@pytest.fixture(scope="module")
def helm_bin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    bin_dir = find_binaries()
    if bin_dir is None or not os.access(bin_dir / "helm", os.X_OK):
        if os.environ.get("CI"):
            pytest.fail("helm not found: run tests/k8s/build.sh", pytrace=False)
        pytest.skip("helm not found: run tests/k8s/build.sh or set MAILWARDEN_K8S_BIN")
    home = tmp_path_factory.mktemp("helm")
    env = dict(os.environ)
    env.update(
        HELM_CACHE_HOME=str(home / "cache"),
        HELM_CONFIG_HOME=str(home / "config"),
        HELM_DATA_HOME=str(home / "data"),
        KUBECONFIG=str(home / "no-cluster"),
    )
    return bin_dir / "helm", env


@pytest.mark.parametrize("block", helm_value_blocks(), ids=lambda b: b.where)
def test_helm_values_render(
    helm_bin: tuple[Path, dict[str, str]], block: Block, tmp_path: Path
) -> None:
    helm, env = helm_bin
    values = tmp_path / "values.yaml"
    values.write_text(block.text)
    proc = subprocess.run(
        [str(helm), "template", "mailwarden", str(CHART), "-n", "mailwarden-system",
         "-f", str(values)],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"{block.where}:\n{proc.stderr}"
    assert "kind: Deployment" in proc.stdout
