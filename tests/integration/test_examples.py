"""`kubectl apply -f examples/` works as the README shows, and the operator renders them."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.fixtures.operator import OperatorRunner

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_examples_apply_and_render(operator_runner: OperatorRunner) -> None:
    kube = operator_runner.kube
    result = kube.kubectl("apply", "-n", operator_runner.namespace, "-f", str(EXAMPLES))
    names = [
        doc["metadata"]["name"]
        for path in sorted(EXAMPLES.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc["kind"] == "MailAccount"
    ]
    assert len(names) == 4
    for name in names:
        assert f"mailaccount.mailwarden.io/{name} created" in result.stdout
    assert "deployment.apps/legacy-app created" in result.stdout
    # no network here: the configuration renders, the token endpoints can't be reached
    for name in ("vault-notifications", "helpdesk"):
        operator_runner.wait_for_condition(name, "ConfigRendered", "True")
    # the device-code account waits for a person before anything can be rendered
    operator_runner.wait_for_condition("erp-mailbox", "ConfigRendered", "False",
                                       reason="ConsentRequired")  # fmt: skip
