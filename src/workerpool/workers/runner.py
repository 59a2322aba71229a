"""One task in a worker: decode the request, call ``predict``, encode the result or error.

Nothing raised by ``predict`` escapes: it becomes an ERROR message and the worker goes on
serving. Only a fatal signal or ``os._exit`` ends the process, and the supervisor sees that.
"""

from __future__ import annotations

import contextlib
import pickle
import sys
import traceback

from ..errors import EncodeError
from ..ipc import protocol
from ..ipc.codec import Codec


class Runner:
    def __init__(self, model, predict, codec: Codec):
        self.model = model
        self.predict = predict
        self.codec = codec

    def run(self, meta: dict, body, frames: list) -> list:
        """Return the reply's frames (RESULT or ERROR) for one TASK."""
        task_id = meta.get("id")
        try:
            args, kwargs = self.codec.decode(body, frames)
            with _inference_mode():
                value = self.predict(self.model, *args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - every failure is the caller's answer
            return error_reply(task_id, exc)
        try:
            header, out_frames = self.codec.encode(value)
        except BaseException as exc:  # noqa: BLE001
            if not isinstance(exc, EncodeError):
                exc = EncodeError(f"cannot encode the output of predict(): {exc!r}")
            return error_reply(task_id, exc)
        return [protocol.RESULT, protocol.pack_meta({"id": task_id}), header, *out_frames]


def error_reply(task_id, exc: BaseException) -> list:
    """An ERROR message carrying the exception, by value when it pickles, always as text."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        pickled = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(pickled)  # an exception that pickles but cannot be rebuilt is no use
    except Exception:
        pickled = None
    meta = {
        "id": task_id,
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": _safe_str(exc),
        "traceback": tb,
        "pickled": pickled,
    }
    return [protocol.ERROR, protocol.pack_meta(meta)]


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__}>"


def _inference_mode():
    torch = sys.modules.get("torch")
    return torch.inference_mode() if torch is not None else contextlib.nullcontext()
