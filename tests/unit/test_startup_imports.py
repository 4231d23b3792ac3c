"""The proxy's start-up path leaves the heavy libraries unimported.

requests, msal, google-auth and cryptography load with the first token request (and
only for the provider an account names), aiosmtpd only in the demo, PyYAML only for a
native configuration. Each runs in a fresh interpreter: this test process has imported
most of them already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

PROXY_SRC = Path(__file__).resolve().parents[2] / "proxy"
HEAVY = ("requests", "msal", "google.auth", "cryptography", "aiosmtpd")

NATIVE = """\
version: 1
listeners:
  - protocol: imap
    local: {port: 1143}
    upstream: {host: outlook.office365.com}
accounts:
  - username: app@example.com
    localPassword: local
    oauth2:
      provider: microsoft
      flow: clientCredentials
      tenantId: contoso.onmicrosoft.com
      clientId: 00000000-0000-0000-0000-000000000000
      clientSecret: secret
metrics: {port: 0}
"""

EMAILPROXY = """\
[IMAP-1993]
server_address = outlook.office365.com
server_port = 993

[app@example.com]
permission_url = https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/authorize
token_url = https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token
oauth2_scope = https://outlook.office365.com/.default
oauth2_flow = client_credentials
client_id = 00000000-0000-0000-0000-000000000000
client_secret = secret
"""

# what `mailwarden-proxy --config FILE` does before it serves: import the start-up
# modules, load the file, build the app (metrics, token broker, relay server)
SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    import mailwarden_proxy.cli, mailwarden_proxy.app, mailwarden_proxy.relay.server
    from mailwarden_proxy.config.load import load_config
    from mailwarden_proxy.app import ProxyApp

    async def main():
        ProxyApp(load_config(sys.argv[1]), None)

    asyncio.run(main())
    print(json.dumps(sorted(sys.modules)))
    """
)


def _modules_after_startup(config: Path) -> set[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROXY_SRC), env.get("PYTHONPATH", "")) if p)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(config)],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def _loaded(modules: set[str], name: str) -> bool:
    return any(m == name or m.startswith(name + ".") for m in modules)


def test_native_startup_leaves_heavy_libraries_unimported(tmp_path: Path) -> None:
    config = tmp_path / "proxy.yaml"
    config.write_text(NATIVE, encoding="utf-8")
    modules = _modules_after_startup(config)
    assert "mailwarden_proxy.tokens.cache" in modules  # the broker was built
    assert [name for name in HEAVY if _loaded(modules, name)] == []


def test_emailproxy_startup_does_not_import_yaml(tmp_path: Path) -> None:
    config = tmp_path / "emailproxy.config"
    config.write_text(EMAILPROXY, encoding="utf-8")
    modules = _modules_after_startup(config)
    assert [name for name in (*HEAVY, "yaml") if _loaded(modules, name)] == []


# a token response as msal's requests session sees it, after the CLI's footprint settings
FOOTPRINT = textwrap.dedent(
    """
    import json, sys, warnings
    warnings.simplefilter("error")  # requests warns when it finds no charset detector
    from mailwarden_proxy import footprint
    footprint.apply()
    import msal, requests
    response = requests.models.Response()
    response.status_code = 200
    response._content = b'{"access_token": "t\\\\u00e9", "expires_in": 3600}'
    loaded = sorted(name for name, module in sys.modules.items() if module)
    print(json.dumps({"token": response.json()["access_token"], "modules": loaded}))
    """
)


def test_footprint_keeps_charset_detection_out_and_json_decodes() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROXY_SRC), env.get("PYTHONPATH", "")) if p)
    done = subprocess.run(
        [sys.executable, "-c", FOOTPRINT],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["token"] == "t\u00e9"
    assert not _loaded(set(found["modules"]), "charset_normalizer")
