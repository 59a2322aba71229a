"""The API key, checked the same way on every port and protocol (HTTP headers, gRPC
metadata): ``authorization: Bearer <key>`` or ``x-api-key: <key>``, in constant time."""

from __future__ import annotations

import hmac


def key_matches(pairs, key: bytes) -> bool:
    """Whether HTTP headers or gRPC metadata (name, value pairs; bytes or str) carry
    ``key``."""
    given = None
    for name, value in pairs or ():
        name = name.encode() if isinstance(name, str) else name
        value = value.encode() if isinstance(value, str) else value
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            given = value[7:].strip()
        elif name == b"x-api-key":
            given = value.strip()
    return given is not None and hmac.compare_digest(given, key)
