"""Where ``load()`` runs: in this process, or in a loader process that hands over the
published weights (``Pool(load_in="loader")``).

    load_in="parent"   load() ──publish──> PublishedModel         (this process imports the
                                                                   framework and, for Keras,
                                                                   keeps about a copy)
    load_in="loader"   spawn workers/loader.py ──(load, predict)──> load(), publish()
                       <──PublishedModel's data + its fds (SCM_RIGHTS)── the loader exits

Either way the caller gets the same PublishedModel: descriptors of sealed memfds and weight
files, and the skeleton. An exception of ``load()`` in a loader reaches the caller as its own
type where it pickles (else RemoteError), with the loader's traceback as ``__cause__``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import cloudpickle

from ..config import PoolConfig
from ..errors import PoolStartError
from ..ipc import control, wire
from ..publishing import PublishedModel, publish, weights_source
from .supervisor import spawn_with_channel


def load_and_publish(load, predict, config: PoolConfig, private_dir: str,
                     runtime=None) -> tuple[PublishedModel, str]:
    """Run ``load()`` where ``config.load_in`` says and publish ``(model, predict)``; a
    loader is forked from ``runtime`` (pool/runtime.py) when there is one, so it imports
    no framework the runtime has.

    Returns the PublishedModel (this process owns its fds) and where the workers' weights
    live, in words for stats()."""
    options = {"tf_engine": config.tf_engine, "private_dir": private_dir}
    if config.load_in == "loader":
        return _in_loader(load, predict, config, options, runtime)
    model = load()
    published = publish(model, predict, use_files=not config.preload, options=options)
    return published, weights_source(model, config.start_method, published)


def _in_loader(load, predict, config: PoolConfig, options: dict, runtime=None):
    try:
        call = cloudpickle.dumps((load, predict))
    except Exception as exc:
        raise PoolStartError(
            f"load_in='loader' sends load and predict to a loader process, and they do not "
            f"pickle: {exc}. Define them at module level, or use load_in='parent'") from exc
    if runtime is not None:
        loader, parent_end = runtime.loader_channel()
    else:
        loader, parent_end = spawn_with_channel("workerpool.workers.loader",
                                                [str(os.getpid())], stdin=subprocess.DEVNULL)
    published = None
    try:
        control.send(parent_end, {"op": "load", "call": call, "sys_path": list(sys.path),
                                  "use_files": not config.preload, "options": options,
                                  "start_method": config.start_method})
        reply = control.recv(parent_end)
        if reply is None:
            raise PoolStartError(f"the loader process {_ended(loader)} before publishing "
                                 "the model (out of memory? a crash in native code?)")
        if reply["op"] == "error":
            raise wire.rebuild_exception(reply, raised_by="load")
        described = reply["model"]
        fds = control.recv_fds(parent_end, PublishedModel.fd_count(described))
        published = PublishedModel.received(described, fds)
        return published, reply["weights_source"]
    finally:
        parent_end.close()
        # It leaves by itself once it has replied; a Ctrl-C or a failure here leaves it
        # inside load(), where only a kill stops it.
        if published is None and loader.poll() is None:
            loader.kill()
        try:
            loader.wait(timeout=30)
        except subprocess.TimeoutExpired:
            loader.kill()
            loader.wait()


def _ended(loader) -> str:
    status = loader.wait()
    if not getattr(loader, "status_known", True):  # forked by a runtime, which reaped it
        return "ended"
    return f"was killed by signal {-status}" if status < 0 else f"exited with code {status}"
