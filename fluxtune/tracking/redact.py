"""Secrets never reach MLflow: what fluxtune logs (params, tags, the spec file) is redacted first.

Redacted: the value of any key that looks like a secret (`api_token`, `password`, `secret`, `*_key`, …),
passwords in URLs (`https://user:***@host`), and anywhere, the value of every environment variable whose name
looks like a secret (HF_TOKEN, AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_PASSWORD, …), so a secret pasted into a
YAML value or a `--set` is caught too. fluxtune never expands `${VAR}` in YAML: secrets belong in the environment,
where the libraries that need them read them.
"""

from __future__ import annotations

import os
import re

REDACTED = "***"
# `…_key` is a secret (`aws_key`, `signing_key`) unless it is a content hash (`data.cache_key`, logged on purpose)
SECRET_NAME = re.compile(r"token|secret|passw(or)?d|credential|api_?key|access_?key|private_?key|"
                         r"(^|(?<!cache)[_.-])key$", re.IGNORECASE)
MIN_SECRET_LENGTH = 6  # shorter environment values ("1", "true") would redact ordinary text
_URL_PASSWORD = re.compile(r"(://[^/\s:@]+:)([^/\s@]+)(@)")
# `api_token: value`, `"password": "value"`, `--set x.secret=value` in YAML (block or flow), JSON or flags
_KEY_VALUE = re.compile(r"""(["']?)([\w.-]+)\1(\s*[:=]\s*)("[^"\n]*"|'[^'\n]*'|[^\s,}\]#]+)""")


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name.rsplit(".", 1)[-1]))


def environment_secrets() -> list[str]:
    """Values of environment variables named like secrets, longest first (so overlaps redact whole)."""
    values = {v for k, v in os.environ.items() if is_secret_name(k) and len(v) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    for secret in environment_secrets() if secrets is None else secrets:
        text = text.replace(secret, REDACTED)
    text = _URL_PASSWORD.sub(rf"\1{REDACTED}\3", text)

    def value_of_secret_key(match: re.Match) -> str:
        quote, key, sep, value = match.groups()
        if not is_secret_name(key) or value.strip("\"'") == REDACTED:
            return match.group(0)
        return f"{quote}{key}{quote}{sep}{REDACTED}"

    return _KEY_VALUE.sub(value_of_secret_key, text)


def redact_params(params: dict[str, str]) -> dict[str, str]:
    """Flat MLflow params or tags with secret values replaced (keys are kept: they say what was set)."""
    secrets = environment_secrets()
    return {key: REDACTED if is_secret_name(key) and value not in ("", "None")
            else redact_text(str(value), secrets) for key, value in params.items()}
