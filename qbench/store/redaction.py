"""Secrets never reach a file: environment variables are not recorded wholesale, and any string that contains the
value of a token-like variable is redacted before it is written (results, specs, Hydra's job log)."""
from __future__ import annotations

import os
import re
from typing import Any, Optional

SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|CREDENTIAL|(^|_)KEY($|_)", re.I)


def secret_values() -> list[str]:
    return [v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 6]


def redact(obj: Any, secrets: Optional[list[str]] = None) -> Any:
    """Replace any secret value found in strings of ``obj`` (recursively) by '<redacted>'."""
    secrets = secret_values() if secrets is None else secrets
    if not secrets:
        return obj
    if isinstance(obj, str):
        for s in secrets:
            obj = obj.replace(s, "<redacted>")
        return obj
    if isinstance(obj, dict):
        return {k: redact(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v, secrets) for v in obj]
    return obj


class RedactFilter:
    """A logging filter that redacts secrets in every record it passes (Hydra's job log, cli.log: Hydra logs
    each job's overrides, which may carry a token's value). Named in conf/config.yaml's hydra.job_logging."""

    def filter(self, record: Any) -> bool:
        secrets = secret_values()
        if secrets:
            text = record.getMessage()
            clean = redact(text, secrets)
            if clean != text:
                record.msg, record.args = clean, ()
        return True
