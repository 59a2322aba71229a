"""A worker: attached model in, answers out.

    zygote fork (or spawn + attach) ──> serve():
        lifeline thread: pidfds of the pool's parent and of our own parent; either gone -> exit
        faulthandler -> crash-<id>.log, so a fatal signal leaves its Python stack for the pool
        DEALER (identity: random, from the pool) ──connect──> parent's ROUTER
        warm-up: predict on each of the pool's warm-up inputs (a failure is a boot error)
        READY{pid, credits, secret} ; loop: TASK -> Runner -> RESULT | ERROR ; STOP -> BYE, exit 0
                              idle for heartbeat_interval -> HEARTBEAT
        an exception out of the loop: its traceback in the crash log, exit 72 (not 70: the
        model was attached; the failure is the worker's own)

Run as ``python -m workerpool.workers.main WEIGHTS_FD`` it is a spawned worker: it reads its
boot message (pickled, from the zygote over stdin), attaches the weights and serves.
"""

from __future__ import annotations

import collections
import faulthandler
import functools
import os
import pickle
import select
import signal
import sys
import threading

from ..ipc.wire import EXIT_BOOT_ERROR, EXIT_OK, EXIT_PARENT_GONE, EXIT_SERVING_ERROR


def import_worker_modules() -> None:
    """Import what :func:`serve` uses, in a process that forks workers (the runtime, a
    zygote) before it freezes its heap: every worker then starts with these modules in
    pages it shares instead of importing its own copy after the fork, which each wake from
    zero workers paid (and compiled them, where no bytecode cache is written)."""
    import zmq  # noqa: F401

    from .. import malloc  # noqa: F401
    from ..frameworks import active_adapters
    from ..ipc import endpoints, wire  # noqa: F401
    from ..ipc.codec import Codec  # noqa: F401
    from . import tagged_output  # noqa: F401
    from .runner import Runner  # noqa: F401
    from .streaming import run_stream  # noqa: F401

    active_adapters()  # those of the frameworks imported so far


def serve(model, predict, boot: dict) -> int:
    """Serve until told to stop; return the exit code. Never returns on parent death."""
    import zmq

    from .. import malloc
    from ..frameworks import active_adapters
    from ..ipc import endpoints, wire
    from ..ipc.codec import Codec
    from . import tagged_output
    from .runner import Runner

    worker_id = boot["worker_id"]
    # One arena per compute thread: the lifeline and ZeroMQ's threads would otherwise get
    # one each, and ZeroMQ's I/O thread keeps ~2 MiB of message buffers in its own.
    malloc.limit_arenas(boot["threads_per_worker"])
    malloc.keep_freed_heap()  # (work_loop gives it back once idle)
    start_lifeline(boot["parent_pid"])
    crash_log = open(endpoints.crash_log_path(boot["private_dir"], worker_id), "w")
    if boot.get("cpus"):
        os.sched_setaffinity(0, boot["cpus"])
    faulthandler.enable(crash_log, all_threads=False)
    for adapter in active_adapters():
        if hasattr(adapter, "set_threads"):
            adapter.set_threads(boot["threads_per_worker"])

    # Models loaded lazily in workers (TF sessions, Keras copies, LiteRT) load now: a worker
    # says READY only when it can answer.
    prepare = getattr(model, "prepare_in_worker", None)
    if callable(prepare):
        prepare()
    tagged_output.install()  # predict's lines carry the request id they serve
    codec = Codec(allow_pickle=True, max_message_bytes=boot["max_message_bytes"],
                  zero_copy_threshold=boot["zero_copy_threshold"], align_arrays=True,
                  map_regions=True)
    runner = Runner(model, predict, codec)
    runner.warm_up(codec.decode(*boot["warmup"]))
    context = zmq.Context(io_threads=1)
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, boot["identity"])
    sock.setsockopt(zmq.LINGER, 1000)
    # Requests are checked against max_message_bytes before sending; this bounds a rogue peer.
    sock.setsockopt(zmq.MAXMSGSIZE, boot["max_message_bytes"] + 1024 * 1024)
    sock.connect(boot["endpoint"])
    sock.send(wire.head(wire.READY, {"pid": os.getpid(), "credits": boot["credits_per_worker"],
                                     "secret": boot["secret"]}))
    try:
        return work_loop(sock, runner, int(boot["heartbeat_interval"] * 1000))
    except BaseException:
        # Past READY a failure is ours, not the model's attach: say so in the exit code,
        # and leave the traceback where the pool reads crash reports.
        import traceback

        traceback.print_exc(file=crash_log)
        crash_log.flush()
        return EXIT_SERVING_ERROR
    finally:
        sock.close(linger=1000)
        context.term()


def work_loop(sock, runner, heartbeat_ms: int) -> int:
    """TASK -> replies, until STOP; HEARTBEAT when idle for ``heartbeat_ms``; the heap
    freed by the last requests goes back to the OS once idle for TRIM_AFTER_IDLE_MS."""
    import zmq

    from .. import malloc
    from ..ipc import wire
    from .streaming import StreamLink, run_stream

    trim_after_ms = min(TRIM_AFTER_IDLE_MS, heartbeat_ms)  # never a late heartbeat
    backlog: collections.deque = collections.deque()  # what arrived during a stream
    # The idle steps are recv's timeout (ZMQ_RCVTIMEO), changed only when one is taken:
    # a blocking recv waits in one poll() of the socket's own signal, where asking
    # ZMQ_EVENTS and then a Poller cost a request ~3 us and four more system calls.
    idle_step = _IdleSteps(sock, trim_after_ms, heartbeat_ms)
    while True:
        if backlog:
            frames = backlog.popleft()
        else:
            try:
                frames = wire.recv(sock)
            except zmq.Again:  # idle for the step's timeout
                if idle_step.trim_pending:
                    malloc.return_free_heap()
                else:  # from the work loop itself: a worker stuck in predict stays silent
                    sock.send(wire.head(wire.HEARTBEAT, {}))
                idle_step.taken()
                continue
        if not idle_step.trim_pending:
            idle_step.busy()
        kind, meta = wire.read_head(frames[0])
        if kind == wire.TASK:
            if meta.get("stream") is not None:
                link = StreamLink(sock, (meta.get("ids") or [None])[0], meta["stream"],
                                  heartbeat_ms, backlog)
                run_stream(runner, meta, frames[1:], link)
            else:
                for reply in runner.run(meta, frames[1:]):
                    wire.send(sock, reply)
        elif kind == wire.STOP:
            sock.send(wire.head(wire.BYE, {}))
            return EXIT_OK
        # (MORE or CANCEL of a stream that has ended: nothing to do)


class _IdleSteps:
    """What an idle worker does next, and recv's timeout until then: give the heap back
    after ``trim_after_ms`` without a message, then a HEARTBEAT every ``heartbeat_ms`` of
    silence (the first counted from the last message, the trim's wait included)."""

    def __init__(self, sock, trim_after_ms: int, heartbeat_ms: int):
        import zmq

        self.set_timeout = functools.partial(sock.setsockopt, int(zmq.RCVTIMEO))
        self.trim_after_ms = trim_after_ms
        self.heartbeat_ms = heartbeat_ms
        self.trim_pending = True  # the warm-up has freed some already
        self._timeout(trim_after_ms)

    def taken(self) -> None:
        """The step is done: the next is a heartbeat."""
        waited = self.trim_after_ms if self.trim_pending else 0
        self.trim_pending = False
        self._timeout(self.heartbeat_ms - waited)

    def busy(self) -> None:
        """A message came after an idle step: the next idle's trim is due again."""
        self.trim_pending = True
        self._timeout(self.trim_after_ms)

    def _timeout(self, ms: int) -> None:
        self.set_timeout(max(0, ms))


# A worker idle this long hands back the heap its requests freed (activations, decoded
# inputs): glibc keeps it otherwise (measured, ~5 MiB of a BERT-base worker's heap). A trim
# takes ~0.5 ms once a BERT-base forward pass ran (0.01 ms when there is nothing to give
# back); a busy worker never pays it between requests.
TRIM_AFTER_IDLE_MS = 200


def start_lifeline(pool_parent_pid: int) -> None:
    """Exit at once when the pool's process or our own parent (the zygote) dies.

    PR_SET_PDEATHSIG would only watch our direct parent; a pidfd works for any process.
    """
    pidfds = [os.pidfd_open(pool_parent_pid)]
    own_parent = os.getppid()
    if own_parent != pool_parent_pid:
        pidfds.append(os.pidfd_open(own_parent))
    if os.getppid() != own_parent or not _alive(pool_parent_pid):
        os._exit(EXIT_PARENT_GONE)  # died before we watched it
    exit_when_any_dies(pidfds)


def exit_when_any_dies(pidfds: list[int], before_exit=None) -> None:
    """A thread that waits on ``pidfds`` and, once one of those processes is gone, runs
    ``before_exit()`` and ends this process at once (EXIT_PARENT_GONE), whatever the other
    threads are doing."""

    def wait_for_death():
        select.select(pidfds, [], [])
        if before_exit is not None:
            before_exit()
        os._exit(EXIT_PARENT_GONE)

    threading.Thread(target=wait_for_death, name="workerpool-lifeline", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def spawned_main(argv: list[str]) -> int:
    """Entry of a spawned worker: boot message on stdin, weights fd in argv."""
    ignore_stop_signals()
    boot = pickle.load(sys.stdin.buffer)
    sys.stdin.close()
    sys.path[:] = boot["sys_path"]
    try:
        from .attach import attach_boot

        model, predict = attach_boot(boot, int(argv[0]))
    except BaseException:
        write_boot_error(boot)
        return EXIT_BOOT_ERROR
    return serve(model, predict, boot)


def ignore_stop_signals() -> None:
    """Ctrl-C and SIGTERM are the pool's process's to act on, not the zygote's or a
    worker's (the zygote's module docstring says why nothing is left either way)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def write_boot_error(boot: dict) -> None:
    """Leave the boot failure's traceback where the supervisor reads crash reports."""
    import traceback

    from ..ipc import endpoints

    with open(endpoints.crash_log_path(boot["private_dir"], boot["worker_id"]), "w") as log:
        traceback.print_exc(file=log)


if __name__ == "__main__":
    os._exit(spawned_main(sys.argv[1:]))
