"""`mailwarden-proxy`: run the proxy, check or diagnose a configuration, or watch the demo."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from mailwarden_proxy import logsetup
from mailwarden_proxy.config.errors import ConfigError

if TYPE_CHECKING:
    from mailwarden_proxy.config.model import ProxyConfig
    from mailwarden_proxy.tokens.store import TokenStore


def _run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailwarden-proxy",
        description="Plain SMTP/IMAP/POP3 in, OAuth 2.0 (XOAUTH2/OAUTHBEARER) out. "
        "Run `mailwarden-proxy demo` to see it work on loopback.",
    )
    parser.add_argument(
        "--config", required=True, type=Path, help="native YAML or emailproxy INI file"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate, print the effective configuration (secrets masked) and exit",
    )
    parser.add_argument(
        "--diagnose",
        action="store_true",
        help="walk the chain for the account step by step (DNS, TCP, TLS and certificate, "
        "token request, XOAUTH2/OAUTHBEARER login, a follow-up command) for every upstream, "
        "print each result and the fix for the first failure, and exit: 0 all passed, "
        "1 a step failed, 2 configuration error; no token or secret is printed",
    )
    parser.add_argument(
        "--username",
        help="with --diagnose: the mailbox to log in as (needed when the configuration has "
        "several accounts or a catch-all)",
    )
    parser.add_argument(
        "--protocol",
        action="append",
        choices=("imap", "pop3", "smtp"),
        help="with --diagnose: only this protocol's upstream (repeatable; default all)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=15.0,
        help="with --diagnose: seconds per step (default 15)",
    )
    parser.add_argument(
        "--no-mail-from",
        action="store_true",
        help="with --diagnose: SMTP follow-up NOOP instead of MAIL FROM + RSET",
    )
    parser.add_argument(
        "--drain-seconds",
        type=float,
        default=25.0,
        help="on SIGTERM, how long live sessions may continue (default 25)",
    )
    parser.add_argument(
        "--watch-interval",
        type=float,
        default=10.0,
        help="reload when the configuration file changes, checked every N seconds "
        "(default 10; 0 turns it off, SIGHUP still works)",
    )
    parser.add_argument(
        "--cache-store",
        type=Path,
        metavar="PATH",
        help="keep the newest refresh token of each account in this encrypted file, so a "
        "token the identity provider rotated survives a restart (overrides cacheStore; "
        "default: memory only, nothing is written). Key: a passphrase in "
        "MAILWARDEN_CACHE_KEY or --cache-store-key-file",
    )
    parser.add_argument(
        "--cache-store-key-file",
        type=Path,
        metavar="PATH",
        help="a file holding the cache store's passphrase (instead of MAILWARDEN_CACHE_KEY); "
        "keep it away from the store",
    )
    _add_logging(parser)
    return parser


def _add_logging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("--log-format", choices=("text", "json"), default="text")


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["demo"]:
        demo_parser = argparse.ArgumentParser(
            prog="mailwarden-proxy demo",
            description="Start a local identity provider, a local submission server and the "
            "proxy on loopback, send one message through it with a local password only.",
        )
        _add_logging(demo_parser)
        demo_args = demo_parser.parse_args(args_list[1:])
        logsetup.configure(demo_args.verbose, demo_args.log_format)
        from mailwarden_proxy.demo.run import run_demo

        return run_demo()

    args = _run_parser().parse_args(args_list)
    logsetup.configure(args.verbose, args.log_format)
    from mailwarden_proxy.config.load import describe, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"mailwarden-proxy: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"mailwarden-proxy: cannot read {args.config}: {exc.strerror}", file=sys.stderr)
        return 2
    store_path = args.cache_store or (Path(config.cache_store) if config.cache_store else None)
    if args.check:
        for warning in config.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        shown = replace(config, cache_store=str(store_path) if store_path else None)
        print(describe(shown))
        return 0
    if args.diagnose:
        return _diagnose(config, args)
    store = None
    if store_path is not None:
        from mailwarden_proxy.tokens.store import StoreError

        try:
            store = _open_cache_store(store_path, args.cache_store_key_file)
        except StoreError as exc:
            print(f"mailwarden-proxy: {exc}", file=sys.stderr)
            return 2

    from mailwarden_proxy import footprint
    from mailwarden_proxy.app import install_event_loop, run

    footprint.apply()
    install_event_loop()
    run_app = run(
        args.config, args.drain_seconds, args.watch_interval, config=config, token_store=store
    )
    asyncio.run(run_app)
    return 0


def _open_cache_store(path: Path, key_file: Path | None) -> TokenStore:
    from mailwarden_proxy.tokens.store import TokenStore, passphrase_from

    passphrase, source = passphrase_from(key_file, os.environ)
    return TokenStore.open(path, passphrase, key_source=source)


def _diagnose(config: ProxyConfig, args: argparse.Namespace) -> int:
    from mailwarden_proxy.config.model import MailProtocol
    from mailwarden_proxy.diagnose import Options, SetupError, run_diagnosis

    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    protocols = frozenset(MailProtocol(p) for p in args.protocol or MailProtocol)
    options = Options(timeout=args.timeout, protocols=protocols, mail_from=not args.no_mail_from)
    try:
        return run_diagnosis(
            config, username=args.username, label=str(args.config), out=sys.stdout, options=options
        )
    except SetupError as exc:
        print(f"mailwarden-proxy --diagnose: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
