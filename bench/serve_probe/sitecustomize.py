"""bench/serve_phases.py's probes, imported by every Python process of the server it starts
(this directory is first on their PYTHONPATH): each wraps one of workerpool's functions as
its module is imported and notes (time.perf_counter_ns(), tag) as it starts (and, for some,
as it ends). perf_counter is CLOCK_MONOTONIC here, one clock for every process, so the
server's and the workers' notes interleave. A process writes its notes to
$PROBE_OUT/<pid>.txt, 500 at a time and at exit."""

import atexit
import functools
import importlib.abc
import importlib.machinery
import os
import sys
import time

_notes: list = []
_OUT = os.environ.get("PROBE_OUT", ".")


def note(tag: str) -> None:
    _notes.append((time.perf_counter_ns(), tag))
    if len(_notes) >= 500:
        flush()


def flush() -> None:
    if _notes:
        with open(os.path.join(_OUT, f"{os.getpid()}.txt"), "a") as out:
            out.write("".join(f"{t} {tag}\n" for t, tag in _notes))
        _notes.clear()


atexit.register(flush)


def wrap(owner, name: str, start: str, end: str | None = None) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def probed(*args, **kwargs):
        note(start)
        if end is None:
            return original(*args, **kwargs)
        try:
            return original(*args, **kwargs)
        finally:
            note(end)

    setattr(owner, name, probed)


def wrap_async(owner, name: str, start: str, end: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    async def probed(*args, **kwargs):
        note(start)
        try:
            return await original(*args, **kwargs)
        finally:
            note(end)

    setattr(owner, name, probed)


def _probe(name: str, module) -> None:
    if name == "workerpool.ipc.wire":
        send, recv = module.send, module.recv

        def probed_send(sock, frames, flags=0):
            note("send")
            return send(sock, frames, flags)

        def probed_recv(sock, flags=0, copied=1):
            frames = recv(sock, flags, copied)
            note("recv")
            return frames

        module.send, module.recv = probed_send, probed_recv
    elif name == "workerpool.ipc.codec":
        wrap(module.Codec, "encode", "encode", "encoded")
        wrap(module.Codec, "decode_call", "decode_call", "decoded_call")
    elif name == "workerpool.serving.dataplane":
        wrap_async(module.Inference, "run", "run", "ran")
    elif name == "workerpool.pool.loop_driver":
        wrap(module.LoopDriver, "_on_router", "router_readable")
        wrap(module.LoopDriver, "_turn", "turn")
    elif name == "workerpool.pool.loop_answer":
        wrap(module.LoopAnswer, "_settle", "settle")
    elif name == "workerpool.workers.runner":
        wrap(module.Runner, "call", "call", "called")
    elif name == "workerpool.serve.http.asgi":
        call = module.AsgiApp.__call__

        async def probed_call(self, scope, receive, send):  # (uvicorn calls an app with
            note("asgi")                                   # no arguments to tell a factory)
            try:
                return await call(self, scope, receive, send)
            finally:
                note("asgi_done")

        module.AsgiApp.__call__ = probed_call
    elif name == "workerpool.serve.http.guard":
        wrap(module.GuardedHttpTools, "data_received", "data_received", "data_received_done")
    elif name == "workerpool.serving.kserve":
        wrap(module, "parse_infer", "parse_infer", "parsed_infer")
        wrap(module, "encode_response", "encode_response", "encoded_response")
    elif name == "workerpool.serve.http.exchange":
        wrap_async(module.Exchange, "respond_parts", "respond", "responded")


_PROBED = {"workerpool.ipc.wire", "workerpool.ipc.codec", "workerpool.serving.dataplane",
           "workerpool.pool.loop_driver", "workerpool.pool.loop_answer",
           "workerpool.workers.runner", "workerpool.serve.http.asgi",
           "workerpool.serving.kserve", "workerpool.serve.http.exchange",
           "workerpool.serve.http.guard"}


class _Probes(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _PROBED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _probe(name, module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Probes())
