"""Secrets never reach MLflow, the console or a kept error text: what fluxtune logs (params, tags, the spec
file, error lines) is redacted first.

Redacted: the value of any key that looks like a secret (`api_token`, `password`, `secret`, `*_key`, …),
passwords in URLs (`https://user:***@host`), well-known token formats (`hf_…`, `ghp_…`, `AKIA…`), and anywhere,
the value of every environment variable whose name looks like a secret (HF_TOKEN, AWS_SECRET_ACCESS_KEY,
MLFLOW_TRACKING_PASSWORD, …), so a secret pasted into a YAML value or a `--set` is caught too. Names (sweep,
experiment, model, alias, stage) never hold a secret: validation refuses them (`secret_in`), since a name
becomes folders, model-registry entries and console lines that redaction cannot all reach. fluxtune never expands
`${VAR}` in YAML: secrets belong in the environment, where the libraries that need them read them.
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


# Well-known token formats, redacted (and refused in names) even when no environment variable holds them:
# Hugging Face, GitHub, OpenAI-style, AWS access key ids, Slack.
TOKEN_SHAPES = re.compile(r"\b(hf_[A-Za-z0-9]{30,}|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}|"
                          r"sk-[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|xox[abprs]-[A-Za-z0-9-]{10,})\b")


def environment_secrets() -> list[str]:
    """Values of environment variables named like secrets, longest first (so overlaps redact whole)."""
    values = {v for k, v in os.environ.items() if is_secret_name(k) and len(v) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def secret_in(text: str) -> str | None:
    """What secret `text` holds, said without the secret (`the value of $HF_TOKEN`, `a token`), or None."""
    for name, value in sorted(os.environ.items()):
        if is_secret_name(name) and len(value) >= MIN_SECRET_LENGTH and value in text:
            return f"the value of ${name}"
    if TOKEN_SHAPES.search(text):
        return "an access token"
    return None


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    for secret in environment_secrets() if secrets is None else secrets:
        text = text.replace(secret, REDACTED)
    text = TOKEN_SHAPES.sub(REDACTED, text)
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
