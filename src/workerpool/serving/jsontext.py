"""JSON text for the protocols: orjson where it applies, the standard library where not.

A light model's request is parsed and answered in JSON: with the standard library that was
~24 + 14 us of the front end's CPU per request (a 64-float KServe body, a 10-float answer),
with orjson ~2.3 + 0.6 us (measured on our 2-core machine). orjson is strict JSON; what it
refuses and the standard library accepts (NaN and Infinity tokens, which TF Serving's REST
API documents; lone surrogates), and integers past 64 bits (which orjson would read as
floats), are parsed by the standard library, so a client sees exactly what it saw before,
errors included. Without orjson installed
(it comes with the ``serve`` extra) everything goes through the standard library.
"""

from __future__ import annotations

import json
import re

try:
    import orjson
except ImportError:  # pragma: no cover - the serve extra installs it
    orjson = None


# orjson reads an integer past 64 bits as a float (10**30 -> 1e+30) where the standard
# library keeps it exact; a document holding one goes to the standard library. The scan
# maps every digit to "9" and looks for twenty in a row (C passes: ~4 us for a 64-float
# body, timeit, where the regex [0-9]{20} retried at every digit of every float: ~50 us);
# a run after a "." or before a ".", "e" or "E" is part of a float, not an integer (small
# floats such as 0.00012345678901234567 have 20 digits: a 256-row body of random floats
# went to the standard library, 8.4 ms against orjson's 2.4 ms).
_DIGITS_TO_NINES = bytes.maketrans(b"012345678", b"999999999")
_TWENTY_DIGITS = b"9" * 20
_NINE = ord("9")
_FLOAT_AFTER = (b".", b"e", b"E")
_LONG_DIGITS_TEXT = re.compile(r"(?<![0-9.])[0-9]{20,}(?![0-9.eE])")


def _has_long_integers(data: bytes | str) -> bool:
    if isinstance(data, str):
        return _LONG_DIGITS_TEXT.search(data) is not None
    nines = bytes(data).translate(_DIGITS_TO_NINES)
    at = nines.find(_TWENTY_DIGITS)
    while at != -1:
        start, end = at, at + len(_TWENTY_DIGITS)
        while start and nines[start - 1] == _NINE:
            start -= 1
        while end < len(nines) and nines[end] == _NINE:
            end += 1
        if nines[start - 1:start] != b"." and nines[end:end + 1] not in _FLOAT_AFTER:
            return True
        at = nines.find(_TWENTY_DIGITS, end)
    return False


def loads(data: bytes | str):
    """The document in ``data``; ValueError or RecursionError as ``json.loads`` raises."""
    if orjson is not None and not _has_long_integers(data):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # not strict JSON (or not JSON): the standard library decides
    return json.loads(data)


def dumps(value) -> bytes:
    """``value`` as compact JSON bytes (no spaces). For values with finite floats only:
    orjson writes NaN and infinities as null, so a caller replaces them first (KServe's
    answers spell them "NaN", "Infinity", "-Infinity")."""
    if orjson is not None:
        try:
            return orjson.dumps(value)
        except (orjson.JSONEncodeError, TypeError):
            pass  # a type or an integer (past 64 bits) orjson does not take
    return json.dumps(value, separators=(",", ":")).encode()
