"""The starting corpus, built from the unit tests' scenarios (nothing binary is stored).

Core targets get every scripted scenario of tests/unit/test_imap_core.py,
test_smtp_core.py and test_pop3_core.py encoded as a `fuzz.targets` script (bytes,
token answers and closes in their order), plus each protocol's plausible client lines
after a cooperative prelude. Loader targets get the example configurations and the
documents the loader tests build.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from fuzz import targets
from fuzz.checks import PROTOCOLS

ROOT = Path(__file__).resolve().parents[1]
SHARED_EXAMPLES = ROOT.parent / "shared" / "examples"


def _raw(op: int, data: bytes) -> Iterator[bytes]:
    """`data` as raw ops (255-byte pieces; the long form for the fuzzed side)."""
    if op == targets.RAW and len(data) > 255:
        for i in range(0, len(data), 65535):
            piece = data[i : i + 65535]
            yield bytes([targets.RAW_LONG]) + len(piece).to_bytes(2, "big") + piece
        return
    for i in range(0, max(len(data), 1), 255):
        piece = data[i : i + 255]
        yield bytes([op, len(piece)]) + piece


def encode(options: int, steps: Iterable[tuple[str, Any]], fuzzed: str) -> bytes:
    """A script from ("c"|"u", bytes), ("answer", choice), ("cclose"|"uclose", None) steps."""
    out = [bytes([options])]
    for kind, value in steps:
        if kind in ("c", "u"):
            side = "client" if kind == "c" else "upstream"
            out += _raw(targets.RAW if side == fuzzed else targets.RAW_OTHER, value)
        elif kind == "answer":
            out.append(bytes([targets.ANSWER, value]))
        elif kind == "cclose":
            out.append(bytes([targets.CLIENT_CLOSE]))
        else:
            out.append(bytes([targets.UPSTREAM_CLOSE]))
    return b"".join(out)


def _answer_choice(method: str, args: tuple[Any, ...]) -> int:
    if method == "provide_token":
        return 1 if str(args[2]) == "oauthbearer" else 0
    if method == "reject_login":
        return 2
    return 4 if args and args[0] else 3


def _imap_scenarios() -> Iterator[tuple[int, list[tuple[str, Any]]]]:
    from tests.unit import imap_script, test_imap_core

    for options, steps in test_imap_core.SCENARIOS.values():
        flags = (
            targets.STARTTLS * options.get("starttls", False)
            | targets.LOCAL_STARTTLS * options.get("local_starttls", False)
            | targets.TLS_ACTIVE * options.get("tls_active", False)
            | targets.SMALL_LINE * (options.get("max_line", 1024) < 1024)
            | targets.SMALL_LITERAL * (options.get("max_literal", 256) < 256)
        )
        script: list[tuple[str, Any]] = []
        for item, _ in steps:
            if isinstance(item, imap_script.C):
                script.append(("c", item.data))
            elif isinstance(item, imap_script.U):
                script.append(("u", item.data))
            elif item.method in ("client_closed", "upstream_closed"):
                script.append(("cclose" if item.method == "client_closed" else "uclose", None))
            else:
                script.append(("answer", _answer_choice(item.method, item.args)))
        yield flags, script


def _line_scenarios(protocol: str) -> Iterator[tuple[int, list[tuple[str, Any]]]]:
    from tests.unit import test_pop3_core, test_smtp_core

    module: Any = test_smtp_core if protocol == "smtp" else test_pop3_core
    for case in module.CASES:
        flags = (
            targets.STARTTLS * case.upstream.starttls
            | targets.LOCAL_STARTTLS * case.local.starttls
            | targets.TLS_ACTIVE * case.local.tls_active
            | targets.SMALL_LINE * (case.max_line < 1024)
        )
        script: list[tuple[str, Any]] = []
        for step in case.steps:
            kind = step[0]
            if kind in ("c", "u"):
                script.append((kind, step[1]))
            elif kind in ("cclose", "uclose"):
                script.append((kind, None))
            elif kind == "token":
                script.append(("answer", 1 if str(step[3]) == "oauthbearer" else 0))
            elif kind == "reject":
                script.append(("answer", 2))
            else:
                script.append(("answer", 4 if step[1] else 3))
        yield flags, script


def core_seeds(target: str) -> list[bytes]:
    protocol, fuzzed = target.split("_")
    scenarios = list(_imap_scenarios() if protocol == "imap" else _line_scenarios(protocol))
    seeds = [encode(flags, script, fuzzed) for flags, script in scenarios]
    # each plausible client line, and all of them in a row, after a cooperative prelude
    lines = PROTOCOLS[protocol].client_lines
    for index in range(len(lines)):
        seeds.append(bytes([targets.PRELUDE, targets.CLIENT_LINE, index, targets.ANSWER, 0]))
    dialogue = [targets.PRELUDE]
    for index in range(len(lines)):
        dialogue += [targets.CLIENT_LINE, index, targets.ANSWER, index, targets.UPSTREAM_ANSWER, 0]
    seeds.append(bytes(dialogue))
    return seeds


def config_seeds(target: str) -> list[bytes]:
    import yaml
    from tests.unit import test_config_emailproxy, test_config_native

    texts: list[str] = []
    if target == "config_native":
        texts.append(yaml.safe_dump(test_config_native.base(), sort_keys=False))
        for path, value, _ in test_config_native.ERRORS:
            doc = test_config_native._mutate(path, value)
            texts.append(yaml.safe_dump(doc, sort_keys=False))
    else:
        texts += [p.read_text() for p in sorted(SHARED_EXAMPLES.glob("*.config"))]
        module: Any = test_config_emailproxy
        texts.append(module.account_file(module.CCG))
        texts.append(module.account_file(module.CCG, catch_all=True, section="@"))
        for body, _, _ in module.ACCOUNT_ERRORS:
            texts.append(module.account_file(body))
    return sorted({t.encode() for t in texts if t.strip()})


def seeds(target: str) -> list[bytes]:
    return config_seeds(target) if target.startswith("config_") else core_seeds(target)


def write(target: str, directory: Path) -> int:
    """Write the seeds of `target` into `directory` (named by content); returns the count."""
    import hashlib

    directory.mkdir(parents=True, exist_ok=True)
    found = seeds(target)
    for data in found:
        (directory / f"seed-{hashlib.sha256(data).hexdigest()[:16]}").write_bytes(data)
    return len(found)
