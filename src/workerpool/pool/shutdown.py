"""Closing a pool, whoever asks: ``close()`` from any thread, the garbage collector, atexit.

    close() in a caller thread   ── request_close ──> dispatcher; join; release()
    close() on the dispatcher    ── request_close ──> (returns at once)  ┐
      (a done-callback)                                                  │ the dispatcher
    an unreachable Pool (__del__) ── request_close ──> (returns at once) ┤ thread calls
    interpreter exit (atexit)    ── close() as above, for every pool     │ release() as its
                                    this process owns                    ┘ last act
    release(): stop the zygote (it reaps the workers), close the weights' fds, remove the
               private directory; each step once, under a lock, so a close() interrupted by
               Ctrl-C finishes on the next call.

A process forked from the pool's owner (a web server's pre-fork, ``multiprocessing``) inherits
the Pool object but none of its threads: there every Pool is *foreign*, its close and atexit
do nothing (they would stop the owner's zygote and delete its socket), and ``submit`` raises
WrongProcess.
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref

from ..ipc import endpoints

_owned: "weakref.WeakSet[Shutdown]" = weakref.WeakSet()


class Shutdown:
    """Everything a pool must give back, and the one way to give it back. Holds no
    reference to the Pool object, so an unreachable Pool can be collected."""

    def __init__(self, config, supervisor, published, private_dir: str):
        self.config = config
        self.supervisor = supervisor
        self.published = published
        self.private_dir = private_dir
        self.dispatcher = None
        self.owner_pid = os.getpid()
        self.foreign = False  # set in a forked child
        self.requested = False  # no more work is accepted
        self.released = False
        self._release_lock = threading.Lock()
        _owned.add(self)

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the dispatcher (draining first if asked), then release everything. On the
        dispatcher's own thread it only asks: the thread releases on its way out."""
        if self.foreign:
            return
        self.requested = True
        dispatcher = self.dispatcher
        if dispatcher is not None and dispatcher.is_alive():
            dispatcher.request_close(drain)
            if dispatcher.on_owner_thread():  # (or on the loop that drives it)
                return
            dispatcher.join(timeout)
            if dispatcher.is_alive():
                dispatcher.request_close(drain=False)
                dispatcher.join(self.config.close_timeout)
            if dispatcher.is_alive():  # the zygote is not answering: stop it the hard way
                self.supervisor.kill_zygote()
                dispatcher.join()
        self.release()

    def close_soon(self) -> None:
        """Ask for a draining close without waiting for it (an unreachable Pool)."""
        if self.foreign or self.requested:
            return
        self.requested = True
        dispatcher = self.dispatcher
        if dispatcher is not None and dispatcher.is_alive():
            dispatcher.request_close(drain=True)
        else:
            self.release()

    def release(self) -> None:
        """Stop the zygote, close the weights, remove the private directory. Idempotent;
        safe from any thread; resumes where an interrupted call stopped."""
        if self.foreign:
            return
        with self._release_lock:
            if self.released:
                return
            self.supervisor.stop_zygote()
            self.published.close()
            endpoints.remove_private_dir(self.private_dir)
            self.released = True
            _owned.discard(self)


def _disown_in_forked_child() -> None:
    for shutdown in list(_owned):
        shutdown.foreign = True
    _owned.clear()


os.register_at_fork(after_in_child=_disown_in_forked_child)


@atexit.register
def _close_owned_pools() -> None:
    for shutdown in list(_owned):
        shutdown.close(drain=True, timeout=shutdown.config.close_timeout)
