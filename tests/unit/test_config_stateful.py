"""Stateful fuzzing of both configuration loaders (hypothesis `RuleBasedStateMachine`).

The property tests in test_config_native.py / test_config_emailproxy.py throw one bad
value or arbitrary text at a loader. Here a machine edits one document step by step —
sets known keys to wrong-typed or out-of-range values, deletes keys, adds listeners,
accounts and sections, adds unknown keys — and after every edit the loader must either
return a configuration (which `describe` can print without showing a secret) or raise
`ConfigError` naming a field that exists: a top-level key of the native format with a
valid list index, or for emailproxy files a `[section]` present in the text (or the
file / a line of it).
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import yaml
from fuzz.targets import check_loaded, hermetic_config
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from mailwarden_proxy.config import emailproxy, native
from mailwarden_proxy.config.emailproxy_ini import ACCOUNT_KEYS, GLOBAL_KEYS, SERVER_KEYS
from mailwarden_proxy.config.errors import ConfigError
from tests.unit import test_config_emailproxy, test_config_native

SETTINGS = settings(
    max_examples=100,
    stateful_step_count=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Values that are wrong in many places, and right in some.
JUNK = st.one_of(
    st.sampled_from(
        [
            None,
            True,
            False,
            0,
            -1,
            1,
            65536,
            2**64,
            1.5,
            float("nan"),
            "",
            " ",
            "x",
            "imap",
            "starttls",
            "none",
            "implicit",
            "microsoft",
            "generic",
            "refreshToken",
            "serviceAccount",
            "password",
            "deviceCode",
            "@",
            "@example.com",
            "a@b@c",
            "https://login.microsoftonline.com/t/oauth2/v2.0/token",
            "[t](https://x)",
            "http://[::1",
            "/missing/file",
            "/empty/file",
            "/key.json",
            "127.0.0.1",
            "0.0.0.0",
            "::1",
            "\x00",
            "é",
            [],
            {},
            ["x"],
            [""],
            {"x": 1},
        ]
    ),
    st.text(max_size=10),
    st.integers(),
)
NATIVE_KEYS = (  # noqa: SIM905 - a word list reads better than 47 quoted items
    "version listeners accounts metrics limits cacheStore name protocol local upstream "
    "address port tls certificateFile keyFile host caFile allowInsecure username "
    "localPassword localPasswordFile mechanism upstreamUsername oauth2 provider flow "
    "tenantId tokenUrl authorizeUrl clientId clientSecret clientSecretFile refreshToken "
    "refreshTokenFile serviceAccountKey serviceAccountKeyFile subject passwordFile "
    "clientCertificateFile clientKeyFile scopes redirectUri usePkce maxLineLength "
    "maxLiteralLength connectTimeoutSeconds loginTimeoutSeconds"
).split()
_TOP = {"version", "listeners", "accounts", "metrics", "limits", "cacheStore", "(top level)"}


def _nodes(doc: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths of every mapping and list inside `doc` (the document itself included)."""
    found = [path] if isinstance(doc, dict | list) else []
    children = (
        doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    )
    for key, value in children:
        found += _nodes(value, (*path, key))
    return found


def _at(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


class NativeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.doc: Any = test_config_native.base()

    @rule(data=st.data(), value=JUNK)
    def set_value(self, data: st.DataObject, value: Any) -> None:
        node = _at(self.doc, data.draw(st.sampled_from(_nodes(self.doc))))
        if isinstance(node, dict):
            node[data.draw(st.sampled_from(NATIVE_KEYS))] = copy.deepcopy(value)
        elif node:
            node[data.draw(st.integers(0, len(node) - 1))] = copy.deepcopy(value)

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        node = _at(self.doc, data.draw(st.sampled_from(_nodes(self.doc))))
        if node:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            del node[data.draw(st.sampled_from(keys))]

    @rule(which=st.sampled_from(["listeners", "accounts"]), index=st.integers(0, 3))
    def duplicate(self, which: str, index: int) -> None:
        items = self.doc.get(which) if isinstance(self.doc, dict) else None
        if isinstance(items, list) and items:
            items.append(copy.deepcopy(items[index % len(items)]))

    @rule(key=st.text(min_size=1, max_size=12))
    def unknown_key(self, key: str) -> None:
        if isinstance(self.doc, dict):
            self.doc[key] = 1

    @invariant()
    def loads_or_names_a_field(self) -> None:
        with hermetic_config():
            result = check_loaded(lambda: native.from_dict(copy.deepcopy(self.doc)))
            text = yaml.safe_dump(self.doc, allow_unicode=True)
            again = check_loaded(lambda: native.from_dict(yaml.safe_load(text)))
        assert type(result) is type(again)  # the YAML route says the same
        if isinstance(result, ConfigError) and result.message.startswith("unknown key"):
            keys = {
                k
                for path in _nodes(self.doc)
                if isinstance(_at(self.doc, path), dict)
                for k in _at(self.doc, path)
            }
            assert any(result.field.endswith((str(k), repr(k))) for k in keys), result
        elif isinstance(result, ConfigError):
            top = re.split(r"[.\[]", result.field, maxsplit=1)[0]
            assert top in _TOP, result
            for name, index in re.findall(r"(\w+)\[(\d+)\]", result.field):
                assert int(index) < len(self.doc[name]), result


def _ini(sections: dict[str, dict[str, str]]) -> str:
    out = []
    for name, keys in sections.items():
        out.append(f"[{name}]")
        out += [f"{key} = {value}" for key, value in keys.items()]
    return "\n".join(out) + "\n"


SECTIONS = [
    "emailproxy",
    "IMAP-1993",
    "POP-1995",
    "SMTP-1587",
    "SMTP-0",
    "imap-1",
    "@",
    "@x.org",
    "a@x.org",
    "b@x.org",
    "other",
]
INI_VALUES = st.one_of(
    st.sampled_from(
        [
            "True",
            "False",
            "maybe",
            "993",
            "99999",
            "0",
            "-1",
            "١٢",
            test_config_emailproxy.MS_TOKEN,
            "https://oauth2.googleapis.com/token",
            "[x](https://y)",
            "client_credentials",
            "device",
            "service_account",
            "authorization_code",
            "password",
            "file",
            "key",
            "/missing/key",
            "/key.json",
            "{}",
            '{"private_key": "k", "client_email": "e"}',
            "127.0.0.1",
            "0.0.0.0",
            "https://outlook.office365.com/.default",
            "https://outlook.office.com/IMAP.AccessAsUser.Al",
        ]
    ),
    st.text(
        alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n["),
        max_size=12,
    ),
)


class EmailproxyMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, dict[str, str]] = {
            "IMAP-1993": {"server_address": "outlook.office365.com", "server_port": "993"},
            "a@x.org": dict(
                line.split(" = ", 1) for line in test_config_emailproxy.CCG.strip().splitlines()
            ),
        }

    @rule(section=st.sampled_from(SECTIONS), data=st.data(), value=INI_VALUES)
    def set_value(self, section: str, data: st.DataObject, value: str) -> None:
        keys = (
            GLOBAL_KEYS
            if section == "emailproxy"
            else SERVER_KEYS
            if "-" in section and "@" not in section
            else ACCOUNT_KEYS
        )
        key = data.draw(st.sampled_from((*keys, "unknown_key")))
        self.sections.setdefault(section, {})[key] = value.strip()

    @precondition(lambda self: bool(self.sections))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        section = data.draw(st.sampled_from(sorted(self.sections)))
        keys = sorted(self.sections[section])
        drop_key: bool = data.draw(st.booleans())
        if keys and drop_key:
            key: str = data.draw(st.sampled_from(keys))
            del self.sections[section][key]
        else:
            del self.sections[section]

    @invariant()
    def loads_or_names_a_field(self) -> None:
        text = _ini(self.sections)
        with hermetic_config():
            result = check_loaded(lambda: emailproxy.from_text(text, source="t.config"))
        if isinstance(result, ConfigError):
            field = result.field
            named = re.match(r"\[([^\]]*)\]", field)
            assert (
                # the global section may be named to say what to add to it
                (named is not None and named[1] in {*self.sections, "emailproxy"})
                or field in {"listeners", "accounts", "metrics port (default)", "file"}
                or field.startswith("line ")
            ), result


def test_native_loader_stateful() -> None:
    run_state_machine_as_test(NativeMachine, settings=SETTINGS)


def test_emailproxy_loader_stateful() -> None:
    run_state_machine_as_test(EmailproxyMachine, settings=SETTINGS)


# -- regressions found by the fuzzers ------------------------------------------------------


def test_a_blank_unknown_key_is_named_visibly() -> None:
    """hypothesis NativeMachine: `" ": 1` gave `ConfigError(" : unknown key")`."""
    for key, shown in ((" ", "' '"), ("a\tb", "'a\\tb'"), ("", "''")):
        doc = {**test_config_native.base(), key: 1}
        with pytest.raises(ConfigError) as info:
            native.from_dict(doc)
        assert info.value.field == shown
    doc = test_config_native.base()
    doc["listeners"][0]["local"]["\x00"] = 1
    with pytest.raises(ConfigError, match=r"listeners\[0\]\.local\.'\\x00': unknown key"):
        native.from_dict(doc)
