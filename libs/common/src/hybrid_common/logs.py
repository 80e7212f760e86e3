"""Structured logging that never prints secrets.

One JSON object per line (or a plain line with ``LOG_JSON=false``). A filter redacts every registered secret value
and anything that looks like a bearer token or an ``api_key=`` parameter, whatever logged it.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson

_PATTERNS = (
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{6,}"),
    re.compile(r"(?i)((?:api[_-]?key|token|password|secret)[\"']?\s*[=:]\s*[\"']?)[^\s\"'&,}]{4,}"),
)
REDACTED = "***"


class SecretRedactor(logging.Filter):
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = {s for s in secrets if s and len(s) >= 4}

    def add(self, *secrets: str) -> None:
        self.secrets.update(s for s in secrets if s and len(s) >= 4)

    def redact(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, REDACTED)
        for pat in _PATTERNS:
            text = pat.sub(lambda m: m.group(1) + REDACTED, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.redact(record.getMessage())
        record.args = None
        if record.exc_info:
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_text:
            entry["exc"] = record.exc_text
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update(extra)
        return orjson.dumps(entry, default=str).decode()


_redactor = SecretRedactor()


def setup_logging(
    service: str, *, level: str = "INFO", json: bool = True, secrets: Iterable[str] = ()
) -> SecretRedactor:
    """Configure the root logger once per process; returns the redactor so more secrets can be added."""
    _redactor.add(*secrets)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_redactor)
    handler.setFormatter(
        JsonFormatter(service)
        if json
        else logging.Formatter(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiormq", "aio_pika", "httpx", "asyncssh"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    return _redactor
