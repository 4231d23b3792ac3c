"""Logging: text or JSON lines, with a last-line redaction filter for credentials.

Code never logs secrets on purpose; the filter is there for what libraries might echo
(HTTP bodies, SASL lines) and masks bearer tokens and token/secret JSON fields.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

_REDACTIONS = (
    (re.compile(r"(Bearer\s+)[^\s\x01\"']+", re.IGNORECASE), r"\1****"),
    (
        re.compile(
            r"((?:access_token|refresh_token|id_token|client_secret|assertion|password|code)"
            r"[\"']?\s*[:=]\s*[\"']?)[^\"'&\s,}]+",
            re.IGNORECASE,
        ),
        r"\1****",
    ),
)

_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}


def redact(text: str) -> str:
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        peer = getattr(record, "peer", None)
        return f"{text} [{peer}]" if peer else text

    def formatException(self, ei: logging._SysExcInfoType) -> str:
        return redact(super().formatException(ei))


def configure(verbosity: int = 0, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity > 0 else logging.INFO)
    # msal and urllib3 at DEBUG print request details; keep them quieter than ours
    for noisy in ("msal", "urllib3", "google"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbosity > 1 else logging.WARNING)
    # aiosmtpd (the demo's mail server) warns about its own deprecated API on every AUTH
    logging.getLogger("mail.log").setLevel(logging.DEBUG if verbosity > 1 else logging.ERROR)
