"""Secrets out of log lines: a URL's user:password and credential query parameters.

InfluxDB 1.x takes its credentials in the URL (`http://user:pass@host:8086`) or as `u`/`p`
query parameters, and httpx puts the URL into its error messages, so every text that may hold
one passes through `redact` before it is logged.
"""

from __future__ import annotations

import re

_USERINFO = re.compile(r"(?<=//)[^/@\s'\"]+@")
_QUERY_SECRET = re.compile(r"(?i)([?&](?:p|password|token|u|username)=)[^&\s'\"]*")


def redact(text: str) -> str:
    return _QUERY_SECRET.sub(r"\1***", _USERINFO.sub("***@", text))
