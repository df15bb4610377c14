"""Credentials out of everything the project prints, logs or records.

A tracking URI (`https://user:token@mlflow.example`), a data source URL with a password or a
signed query (`?X-Amz-Signature=…`) and the service's API key are secrets. Wherever the
project shows or records a URL (the run's summary, log lines, MLflow params and tags, error
messages, UI links), it passes through here first: the user part and any password become
`***`, and so do query values whose names say they are secrets.
"""

from __future__ import annotations

import os
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
# Query parameters that carry credentials in signed or token URLs (S3, GCS, Azure SAS, OAuth).
SECRET_QUERY = re.compile(r"(sig|signature|token|key|secret|password|passwd|pwd|credential|auth)", re.I)
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")
# Environment variables whose values are secrets wherever they show up.
SECRET_ENV = ("MNIST_MLOPS_API_KEY", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY",
              "AWS_SESSION_TOKEN")


def url(value: str) -> str:
    """The URL with its user, password and secret query values masked; anything else as it was."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    if not parts.scheme or not parts.netloc:
        return value
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(SECRET_QUERY.search(k) for k, _ in pairs):
            query = urlencode([(k, MASK if SECRET_QUERY.search(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def without_credentials(value: str) -> str:
    """A link to open in a browser: the user and password dropped (the browser asks for them)."""
    parts = urlsplit(value)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1])) if "@" in parts.netloc else value


def text(value: str) -> str:
    """Any text (a log line, an error message) with every URL in it masked and every secret
    environment value (the API key, a tracking password) replaced by `***`."""
    out = _URL.sub(lambda m: url(m.group(0)), value)
    for name in SECRET_ENV:
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            out = out.replace(secret, MASK)
    return out
