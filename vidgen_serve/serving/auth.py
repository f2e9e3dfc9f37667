"""Bearer API keys: loaded from the environment or a secrets file, compared in constant time.

Keys come from `VIDGEN_API_KEYS` (comma-separated) or the file named by
`VIDGEN_API_KEYS_FILE` (one key per line, `#` comments). Keys are never logged: a
request is identified in logs and job records by `key_id`, a short hash of its key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

MAX_KEY_CHARS = 256


def key_id(key: str) -> str:
    """A short, non-reversible id of a key (for logs and job ownership)."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _read_keys(value: str | None, file_var: str) -> list[str]:
    keys = [k.strip() for k in (value or "").split(",") if k.strip()]
    path = os.environ.get(file_var)
    if path:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    return keys


class ApiKeys:
    """A set of accepted keys.

    Args:
        keys: the accepted keys (plain text, kept only as SHA-256 digests).
    """

    def __init__(self, keys: list[str]):
        # Compare digests: equal length, and a match costs the same whichever key it is.
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    @classmethod
    def from_env(cls, var: str = "VIDGEN_API_KEYS", file_var: str = "VIDGEN_API_KEYS_FILE") -> "ApiKeys":
        return cls(_read_keys(os.environ.get(var), file_var))

    def __len__(self) -> int:
        return len(self._digests)

    def check(self, authorization: str | None) -> str | None:
        """The key id for a valid `Authorization: Bearer <key>` header, else None."""
        if not authorization or len(authorization) > MAX_KEY_CHARS + 7:
            return None
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        digest = hashlib.sha256(token.encode()).digest()
        matched = False
        for candidate in self._digests:  # no early exit: time does not depend on which key matched
            matched |= hmac.compare_digest(digest, candidate)
        return key_id(token) if matched else None
