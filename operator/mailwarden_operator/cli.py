"""`mailwarden`: register / import MailAccounts, and test one end to end.

- `register` takes the flags deployment guides print for emailproxy's `register` wrapper
  (see `cli_register`) plus `--name`/`--username`, and prints a YAML stream: the Secret
  holding the credential, then the MailAccount. `--apply` pipes it to `kubectl apply -f -`.
- `import FILE` reads an emailproxy (or native) configuration with the proxy's own loader
  and does the same for every account section.
- `test` runs the proxy in-process from a rendered configuration and reports each step
  (`mailtest`).
- `doctor` reads the same rendered configuration and walks the chain step by step (DNS,
  TCP, TLS and certificate, token, login, a follow-up command) with the proxy's
  `diagnose`, printing the error catalogue's fix for the first failure.

Exit codes: 0 success, 1 a test/doctor step or `kubectl apply` failed, 2 the input was refused
(with the offending flag or `[section] key` named, never a traceback).

`--force` (kept from the guides, where it overwrote an existing registration): a plain
`kubectl apply` already updates existing objects; with `--force` the apply is server-side
with `--force-conflicts`, so fields another manager (an earlier `kubectl edit`, Helm)
owns are taken over instead of refused.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mailwarden_operator import manifests
from mailwarden_operator.cli_register import (
    RegisterFlags,
    ServerFlags,
    account_from_flags,
    read_client_secret,
)
from mailwarden_operator.mailtest import TestSetupError, load_target, main_test
from mailwarden_operator.spec import SpecError, parse_spec
from mailwarden_proxy.config.common import Warnings
from mailwarden_proxy.config.errors import ConfigError
from mailwarden_proxy.config.load import load_config
from mailwarden_proxy.config.model import Account, ProxyConfig
from mailwarden_proxy.logsetup import RedactingFilter

FIELD_MANAGER = "mailwarden-cli"


class CliError(Exception):
    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class _WarningLines(logging.Handler):
    """The loaders' warnings (logged when a file is refused) as `warning: ...` lines."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"{record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1..65535)")
    return int(text)


def _output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--namespace", help="namespace of the objects (default: kubectl's)")
    p.add_argument("--apply", action="store_true", help="apply with `kubectl apply -f -`")
    p.add_argument("--kubeconfig", help="kubeconfig for kubectl")
    p.add_argument(
        "--force",
        action="store_true",
        help="with --apply: server-side apply with --force-conflicts (take over fields "
        "other managers own)",
    )


def _register_parser(sub: Any) -> None:
    p = sub.add_parser(
        "register",
        help="a MailAccount from emailproxy `register` flags",
        description="Print (or --apply) a MailAccount and its credentials Secret, from the "
        "flags deployment guides print for `emailproxy register`.",
    )
    p.add_argument("--name", required=True, help="MailAccount name")
    p.add_argument("--username", required=True, help="the mailbox (what the app logs in as)")
    for proto, label in (("imap", "IMAP"), ("pop", "POP3"), ("smtp", "SMTP")):
        p.add_argument(f"--{proto}-server-address", help=f"upstream {label} host")
        p.add_argument(f"--{proto}-server-port", type=_port, help=f"upstream {label} port")
        p.add_argument(
            f"--{proto}-server-starttls", action="store_true", help=f"{label} upstream STARTTLS"
        )
        p.add_argument(f"--{proto}-local-port", type=_port, help=f"local {label} port in the pod")
    p.add_argument("--oauth2-token-url")
    p.add_argument("--oauth2-permission-url", help="authorize (or device-code) endpoint")
    p.add_argument("--oauth2-scope", help="space-separated scopes")
    p.add_argument(
        "--oauth2-flow",
        help="client_credentials | authorization_code | device | password | service_account",
    )
    p.add_argument("--oauth2-client-id")
    secret = p.add_mutually_exclusive_group()
    secret.add_argument("--oauth2-client-secret")
    secret.add_argument(
        "--oauth2-client-secret-file", type=Path, help="read the client secret from a file"
    )
    _output_args(p)
    p.set_defaults(run=_register)


def _import_parser(sub: Any) -> None:
    p = sub.add_parser(
        "import",
        help="MailAccounts from an emailproxy configuration file",
        description="One MailAccount (+ Secret) per account section of an emailproxy file.",
    )
    p.add_argument("file", type=Path)
    p.add_argument(
        "--username",
        action="append",
        default=[],
        help="a mailbox served by a catch-all section ([@], [@domain]); repeat for more",
    )
    p.add_argument("--name", help="MailAccount name, when the file yields exactly one")
    p.add_argument("--name-prefix", default="", help="prefix of names derived from mailboxes")
    _output_args(p)
    p.set_defaults(run=_import)


def _test_parser(sub: Any) -> None:
    p = sub.add_parser(
        "test",
        help="log in through a proxy built from the rendered config and send a message",
        description="Start the proxy in this process from a MailAccount's rendered Secret "
        "(or --config FILE), get a token, log in over IMAP/POP3/SMTP and send a message.",
    )
    p.add_argument("mailaccount", nargs="?", help="MailAccount name (reads Secret <name>-proxy)")
    p.add_argument("--config", type=Path, help="a proxy configuration file instead")
    p.add_argument("-n", "--namespace")
    p.add_argument("--kubeconfig")
    p.add_argument("--to", help="recipient of the test message (needed with SMTP)")
    p.add_argument("--from", dest="sender", help="sender (default: the username)")
    p.add_argument("--username", help="login name (needed for catch-all accounts)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per step (default 30)")
    p.set_defaults(run=_test)


def _doctor_parser(sub: Any) -> None:
    p = sub.add_parser(
        "doctor",
        help="diagnose a MailAccount step by step and say what to fix",
        description="Read a MailAccount's rendered Secret (or --config FILE) and walk the chain "
        "the sidecar depends on, for every upstream: DNS, TCP, TLS and the certificate, the "
        "token request, the XOAUTH2/OAUTHBEARER login, a follow-up command (IMAP NOOP + "
        "EXAMINE INBOX, POP3 STAT, SMTP MAIL FROM + RSET). Each step's result is printed, and "
        "the first failure of each upstream with the error catalogue's cause and fix. "
        "Exit code 0: all passed, 1: a step failed, 2: no usable configuration. No token, "
        "secret or password is printed.",
    )
    p.add_argument("mailaccount", nargs="?", help="MailAccount name (reads Secret <name>-proxy)")
    p.add_argument("--config", type=Path, help="a proxy configuration file instead")
    p.add_argument("-n", "--namespace")
    p.add_argument("--kubeconfig")
    p.add_argument("--username", help="login name (needed for catch-all accounts)")
    p.add_argument(
        "--protocol",
        action="append",
        choices=("imap", "pop3", "smtp"),
        help="only this protocol's upstream (repeatable; default: all)",
    )
    p.add_argument("--timeout", type=float, default=15.0, help="seconds per step (default 15)")
    p.add_argument(
        "--no-mail-from",
        action="store_true",
        help="SMTP follow-up: NOOP instead of MAIL FROM + RSET",
    )
    p.set_defaults(run=_doctor)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mailwarden", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    _register_parser(sub)
    _import_parser(sub)
    _test_parser(sub)
    _doctor_parser(sub)
    return p


def _warn(lines: Sequence[str], prefix: str = "") -> None:
    for line in lines:
        print(f"warning: {prefix}{line}", file=sys.stderr)


def _check_spec(built: manifests.Manifests, *, applying: bool) -> None:
    """What the operator would refuse (a tenant that is a guide's `TENANT_ID` placeholder,
    say): refused before an apply, a warning on printed output, which is meant to be
    edited anyway when the file still carries placeholders."""
    try:
        parse_spec(built.mail_account["spec"])
    except SpecError as exc:
        name = built.mail_account["metadata"]["name"]
        message = f"the operator would refuse the MailAccount {name} as it is: {exc}"
        if applying:
            raise CliError(message) from None
        _warn([f"{message}; edit it before applying"])


def _emit(documents: list[dict[str, Any]], args: argparse.Namespace, command: str) -> int:
    text = yaml.safe_dump_all(documents, sort_keys=False, explicit_start=True, width=100)
    if not args.apply:
        print(f"# generated by `mailwarden {command}`; apply with `kubectl apply -f -`")
        print(text, end="")
        return 0
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise CliError(
            "--apply needs kubectl on PATH; install it, or run without --apply and apply "
            "the printed manifests yourself"
        )
    cmd = [kubectl, *([f"--kubeconfig={args.kubeconfig}"] if args.kubeconfig else [])]
    cmd += ["apply", "-f", "-"]
    if args.force:
        cmd += ["--server-side", "--force-conflicts", f"--field-manager={FIELD_MANAGER}"]
    # the user's own kubectl with fixed arguments; no shell
    proc = subprocess.run(cmd, input=text, capture_output=True, text=True, check=False)  # noqa: S603
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    return 0 if proc.returncode == 0 else 1


def _server_flags(args: argparse.Namespace, proto: str) -> ServerFlags:
    return ServerFlags(
        address=getattr(args, f"{proto}_server_address"),
        port=getattr(args, f"{proto}_server_port"),
        starttls=getattr(args, f"{proto}_server_starttls"),
        local_port=getattr(args, f"{proto}_local_port"),
    )


def _register(args: argparse.Namespace) -> int:
    secret = args.oauth2_client_secret
    if args.oauth2_client_secret_file is not None:
        secret = read_client_secret(args.oauth2_client_secret_file)
    flags = RegisterFlags(
        username=args.username,
        imap=_server_flags(args, "imap"),
        pop=_server_flags(args, "pop"),
        smtp=_server_flags(args, "smtp"),
        token_url=args.oauth2_token_url,
        permission_url=args.oauth2_permission_url,
        scope=args.oauth2_scope,
        flow=args.oauth2_flow,
        client_id=args.oauth2_client_id,
        client_secret=secret,
    )
    warnings = Warnings("")
    try:
        account, listeners = account_from_flags(flags, warnings)
    finally:
        _warn(warnings.items)  # a refused command still reports its misspelt scope
    built = manifests.build(
        account, listeners, name=args.name, username=account.username, namespace=args.namespace
    )
    _warn(built.warnings)
    _check_spec(built, applying=args.apply)
    return _emit(built.documents, args, "register")


def _import_pairs(config: ProxyConfig, usernames: Sequence[str]) -> list[tuple[Account, str]]:
    """(account section, mailbox) for every named section and every --username."""
    pairs = [(a, a.username) for a in config.accounts if not a.is_catch_all]
    served = {a.username.lower() for a, _ in pairs}
    by_catch_all: set[str] = set()
    for username in usernames:
        if username.lower() in served:
            continue  # its own section is imported already
        # the proxy's own lookup: exact, then [@domain], then [@]
        full = "@" in username and not username.startswith("@")
        section = config.account_for(username) if full else None
        if section is None:
            raise CliError(f"--username {username}: no account section of the file serves it")
        pairs.append((section, username))
        served.add(username.lower())
        by_catch_all.add(section.username)
    unused = [
        a.username for a in config.accounts if a.is_catch_all and a.username not in by_catch_all
    ]
    if unused:
        sections = ", ".join(f"[{u}]" for u in unused)
        raise CliError(
            f"{sections}: a catch-all section serves any mailbox, but a MailAccount serves "
            "one: pass --username MAILBOX (the address your application logs in with; "
            "repeat it for more mailboxes)"
        )
    return pairs


def _import(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    _warn(config.warnings)
    pairs = _import_pairs(config, args.username)
    if args.name and len(pairs) != 1:
        raise CliError(f"--name needs exactly one account; the file yields {len(pairs)}")
    documents: list[dict[str, Any]] = []
    seen: set[str] = set()
    for account, username in pairs:
        name = args.name or manifests.name_for(username, args.name_prefix)
        if name in seen:
            raise CliError(f"two mailboxes map to the name {name}; use --name-prefix or --name")
        seen.add(name)
        built = manifests.build(
            account, config.listeners, name=name, username=username, namespace=args.namespace
        )
        _warn(built.warnings, f"{name}: ")
        _check_spec(built, applying=args.apply)
        documents += built.documents
    return _emit(documents, args, "import")


def _test(args: argparse.Namespace) -> int:
    if (args.config is None) == (args.mailaccount is None):
        raise CliError("give either a MailAccount name or --config FILE")
    return main_test(
        args.config,
        args.mailaccount,
        namespace=args.namespace,
        kubeconfig=args.kubeconfig,
        username=args.username,
        to=args.to,
        sender=args.sender,
        timeout=args.timeout,
        out=sys.stdout,
    )


def _doctor(args: argparse.Namespace) -> int:
    if (args.config is None) == (args.mailaccount is None):
        raise CliError("give either a MailAccount name or --config FILE")
    from mailwarden_proxy.config.model import MailProtocol
    from mailwarden_proxy.diagnose import Options, SetupError, run_diagnosis

    options = Options(
        timeout=args.timeout,
        protocols=frozenset(MailProtocol(p) for p in args.protocol or MailProtocol),
        mail_from=not args.no_mail_from,
    )
    with tempfile.TemporaryDirectory(prefix="mailwarden-doctor-") as tmp:
        target = load_target(
            args.config,
            args.mailaccount,
            namespace=args.namespace,
            kubeconfig=args.kubeconfig,
            username=args.username,
            workdir=Path(tmp),
        )
        try:
            return run_diagnosis(
                target.config,
                username=target.username,
                label=target.label,
                out=sys.stdout,
                options=options,
            )
        except SetupError as exc:
            raise CliError(str(exc)) from None


def _setup_logging() -> None:
    handler = _WarningLines()
    handler.addFilter(RedactingFilter())
    handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _setup_logging()
    try:
        code: int = args.run(args)
    except ConfigError as exc:
        print(f"mailwarden {args.command}: {exc}", file=sys.stderr)
        return 2
    except (CliError, TestSetupError) as exc:
        print(f"mailwarden {args.command}: {exc}", file=sys.stderr)
        return exc.code if isinstance(exc, CliError) else 2
    return code


if __name__ == "__main__":
    sys.exit(main())
