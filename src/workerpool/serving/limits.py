"""What one client may make a server hold or do: the limits, and the reasons for them.

Every decoder asks here before it allocates for a client (a tensor's shape, the values one
sent value fills, how deep its JSON nests); the HTTP head is bounded in serve/http/guard.py,
error messages in errors.py, loaded models in serve/registry.py. The defaults leave every
real client working (tritonclient's binary requests send a few hundred header bytes; an
honest tensor arrives with all its values in the body, up to --max-request-bytes) and bound
what a hostile one costs:

    request bytes   64 MiB (--max-request-bytes): a body, a gRPC message, and what one
                    tensor may decode to
    head bytes      64 KiB (--max-header-bytes): nginx's default is 4 x 8 KiB, Node's
                    16 KiB; parsing an unbounded head grows faster than linearly
    header lines    100: Apache's LimitRequestFields
    head timeout    30 s (--header-timeout) from a connection's first byte (or from its
                    opening) until the head is complete: uvicorn's keep-alive timeout
    tensor rank     32 dimensions (numpy's limit is 64; no model takes more than a handful),
                    and so JSON data nested at most that deep
    JSON nesting    what Python's parser takes (about 1,000 levels); deeper is a 400
    fills           a value that fills a shape (TF Serving's one float_val for dims
                    [1, 268435456]) may fill at most max_request_bytes: what an honest
                    client could have sent whole
    loaded models   64 model versions (--max-models) past which a repository load is refused:
                    each is a pool of processes, and the API must not add them without end
    error messages  2,000 characters (errors.MAX_ERROR_CHARS: gRPC sends a status message
                    as metadata, whose limit is 8 KiB)
"""

from __future__ import annotations

import math

import numpy as np

from ..tensors import narrowed
from . import jsontext
from .errors import BadRequest

KIB = 1024
DEFAULT_MAX_REQUEST_BYTES = 64 * KIB * KIB
MAX_RANK = 32
# Per element of a BYTES tensor filled from one value: the list slot that points at it.
_FILLED_STRING_BYTES = 8


def check_shape(name: str, shape: list[int], itemsize: int, max_tensor_bytes: int) -> int:
    """The element count of a tensor of ``shape`` (non-negative ints, checked by the
    caller), or BadRequest when no honest request has that shape: more than MAX_RANK
    dimensions, or an empty tensor whose other dimensions describe more than
    ``max_tensor_bytes`` (numpy cannot even hold [0, 10**30])."""
    if len(shape) > MAX_RANK:
        raise BadRequest(f"input {name!r}: shape has {len(shape)} dimensions; at most "
                         f"{MAX_RANK} are taken")
    count = math.prod(shape)
    if count == 0:
        span = math.prod(size for size in shape if size) * max(itemsize, 1)
        if span > max_tensor_bytes:
            raise BadRequest(f"input {name!r}: shape {_short(shape)} is empty but its other "
                             f"dimensions describe {span} bytes, over this server's "
                             f"{max_tensor_bytes} (--max-request-bytes)")
    return count


def parse_json(data: bytes, what: str = "the body"):
    """A client's JSON document; BadRequest when it is not JSON or nests deeper than the
    parser can follow (100,000 levels once answered 500 with a RecursionError)."""
    try:
        return jsontext.loads(data)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise BadRequest(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest(f"{what} nests JSON arrays or objects too deeply") from None


def check_fill(name: str, shape: list[int], count: int, itemsize: int | None,
               max_tensor_bytes: int) -> None:
    """BadRequest unless filling ``count`` elements (``itemsize`` bytes each; None: a
    BYTES element) from one sent value stays within ``max_tensor_bytes``."""
    size = count * (itemsize if itemsize is not None else _FILLED_STRING_BYTES)
    if size > max_tensor_bytes:
        raise BadRequest(f"input {name!r}: one value would fill shape {_short(shape)}, "
                         f"{size} bytes, over this server's {max_tensor_bytes} "
                         "(--max-request-bytes); send the values themselves")


def narrow(name: str, values, dtype: np.dtype, label: str) -> np.ndarray:
    """Integers a protocol carries in a wider field (int32 on the wire) as ``dtype``;
    BadRequest naming ``label`` when one does not fit."""
    array = narrowed(values, dtype)
    if array is None:
        raise BadRequest(f"input {name!r}: values do not fit {label}")
    return array


def _short(shape: list[int]) -> str:
    text = str(list(shape))
    return text if len(text) <= 200 else text[:200] + "...]"
