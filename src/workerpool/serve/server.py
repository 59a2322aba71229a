"""Running the server: one event loop, uvicorn on it, the models loading beside it.

    run(): bind -> gRPC servers (--grpc-port, --tf-serving-port) start on this loop
           -> start loading every model (threads) -> uvicorn serves at once ("live")
    SIGTERM / SIGINT -> stop accepting (HTTP and gRPC); requests in flight finish (up to
                        --drain-timeout); every pool drains and closes; exit 0. A second
                        SIGINT forces it.
    SIGHUP           -> re-read --config; new models load, removed ones unload, changed
                        ones are hot-swapped (in a thread: the loop keeps serving)
    --watch          -> a thread polls model files and hot-swaps replaced ones (watch.py)

--http-workers N -> N front-end processes listen on the port (SO_REUSEPORT; http_workers.py)
                    and relay inference to this process (relay.py); this process then
                    serves no HTTP on the main port itself, only the pools, gRPC and
                    --metrics-port

Every request head is bounded in bytes, lines and time (http/guard.py), on the main
port and on --metrics-port, which serves the same app's /metrics (API key included).

Sockets and uvicorn servers are made in listen.py (the front ends make theirs there too).
"""

from __future__ import annotations

import asyncio
import logging
import signal

from .http.app import App, MetricsPortApp
from .listen import bind, has_module, http_server
from .registry import Registry
from .settings import ServerSettings

log = logging.getLogger("workerpool.serve")

FRONT_ENDS_START_S = 60.0  # how long the address waits for --http-workers to listen


async def serve(registry: Registry, app: App, settings: ServerSettings,
                reread_config=None) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code. ``reread_config()``: the models
    of --config as it reads now (SIGHUP), or None without a --config."""
    host, drain_timeout = settings.host, settings.drain_timeout
    # --http-workers: each front end listens on the port (SO_REUSEPORT); this process only
    # holds it (bound, not listening: the kernel hands it no connection), so the port stays
    # ours while a front end is replaced
    fronts_serve = settings.http_workers > 1
    sock = bind(host, settings.port, reuse_port=fronts_serve, listen=not fronts_serve)
    bound_port = sock.getsockname()[1]
    metrics_sock = bind(host, settings.metrics_port) if settings.metrics_port is not None \
        else None
    grpc_servers = await start_grpc(app, settings)
    server = http_server(app, settings)
    # --metrics-port: the same app, answering only /metrics (API key included) and health
    metrics_server = http_server(MetricsPortApp(app), settings) \
        if metrics_sock is not None else None
    loop = asyncio.get_running_loop()
    grpc_draining: list[asyncio.Task] = []
    fronts = relay = None
    stopped = asyncio.Event()
    if fronts_serve:
        fronts, relay = await start_relay(app, (host, bound_port), settings)
        registry.http_workers = fronts
        registry.changed = relay.inline.publish  # front ends hold the inline models too

    def drain_grpc() -> None:
        """New calls refused at once; those in flight get up to drain_timeout."""
        if not grpc_draining:
            grpc_draining.extend(asyncio.ensure_future(g.stop(drain_timeout))
                                 for g, _, _ in grpc_servers)

    def stop(signum: int) -> None:
        if server.should_exit and signum == signal.SIGINT:
            server.force_exit = True
            if fronts is not None:
                fronts.kill()
            return
        log.warning("workerpool serve: %s: draining, then exiting",
                    signal.Signals(signum).name)
        registry.closing = True  # ready turns 503 for load balancers at once
        server.should_exit = True
        stopped.set()
        if metrics_server is not None:
            metrics_server.should_exit = True
        drain_grpc()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop, signum)
    reloading: set[asyncio.Task] = set()  # the loop holds tasks weakly

    def reload_config() -> None:
        if reread_config is None:
            log.warning("workerpool serve: SIGHUP: no --config to re-read; ignored")
            return
        task = asyncio.ensure_future(apply_config(registry, reread_config))
        reloading.add(task)
        task.add_done_callback(reloading.discard)

    loop.add_signal_handler(signal.SIGHUP, reload_config)
    budget = None
    if settings.max_memory is not None:
        from .budget import MemoryBudget

        registry.budget = budget = MemoryBudget(registry, settings.max_memory)
        budget.start()
    watcher = None
    if settings.watch:
        from .watch import Watcher

        watcher = Watcher(registry, settings.watch_interval)
        watcher.start()
    metrics_task = asyncio.ensure_future(metrics_server.serve(sockets=[metrics_sock])) \
        if metrics_server is not None else None
    history_task = asyncio.ensure_future(app.history.run())  # the status page's charts
    registry.drive_on(loop)
    registry.start_loading()
    if fronts is not None:
        fronts.start()
        # the address is printed once it takes connections: each front end listens before
        # it connects to the relay
        if not await relay.wait_for_front_ends(settings.http_workers, FRONT_ENDS_START_S):
            log.warning("workerpool serve: %d of %d HTTP front ends started within %g s",
                        relay.front_ends, settings.http_workers, FRONT_ENDS_START_S)
    if host in ("0.0.0.0", "::"):
        log.warning("workerpool serve: listening on every interface (%s); anyone who can "
                    "reach this machine can call the models. Set --api-key", host)
    secure = "s" if settings.tls else ""
    print(f"workerpool serve: http{secure}://{host}:{bound_port} (models: "
          f"{', '.join(registry.names())}; loading)", flush=True)
    for _, grpc_bound, what in grpc_servers:
        print(f"workerpool serve: grpc{secure}://{host}:{grpc_bound} ({what})", flush=True)
    if metrics_sock is not None:
        print(f"workerpool serve: metrics http{secure}://{host}:"
              f"{metrics_sock.getsockname()[1]}/metrics", flush=True)
    try:
        if fronts is None:
            await server.serve(sockets=[sock])
        else:
            await stopped.wait()
    finally:
        if fronts is not None:
            await asyncio.to_thread(fronts.stop, drain_timeout)  # the relay answers meanwhile
            await relay.close()
            sock.close()
        drain_grpc()
        await asyncio.gather(*grpc_draining, return_exceptions=True)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        if watcher is not None:
            watcher.stop()
        if budget is not None:
            budget.stop()
        if metrics_task is not None:
            metrics_server.should_exit = True
            await asyncio.gather(metrics_task, return_exceptions=True)
        history_task.cancel()
        await asyncio.gather(history_task, return_exceptions=True)
        await asyncio.to_thread(registry.close, drain_timeout)
    return 0


async def start_relay(app: App, address: tuple[str, int], settings: ServerSettings):
    """--http-workers: the relay on this loop and the front ends (not started yet), each to
    listen on ``address``."""
    from .http_workers import HttpWorkers
    from .relay import Relay

    relay = Relay(app)
    await relay.start()
    return HttpWorkers(settings.http_workers, address, relay.path, settings), relay


async def start_grpc(app: App, settings: ServerSettings) -> list[tuple]:
    """The gRPC servers asked for, started: (server, port, what it speaks) each. One port
    given for both serves both services."""
    grpc_port, tf_serving_port = settings.grpc_port, settings.tf_serving_port
    wanted = []
    if grpc_port is not None:
        from .grpc.kserve import KServeGrpc

        wanted.append(([KServeGrpc], grpc_port, "KServe v2"))
    if tf_serving_port is not None:
        from .grpc.tfserving import TFServingGrpc

        if wanted and tf_serving_port == grpc_port != 0:
            wanted = [([KServeGrpc, TFServingGrpc], grpc_port,
                       "KServe v2 and TensorFlow Serving")]
        else:
            wanted.append(([TFServingGrpc], tf_serving_port, "TensorFlow Serving"))
    if not wanted:
        return []
    from .grpc import server as grpc_server

    started = []
    for fronts, port, what in wanted:
        server, bound = await grpc_server.start(
            [front(app.plane, api_key=app.api_key, debug=app.debug,
                   access_log=app.access_log, tracing=app.tracing) for front in fronts],
            settings.host, port, max_message_bytes=settings.max_request_bytes,
            tls=settings.tls_pair())
        started.append((server, bound, what))
    return started


async def apply_config(registry: Registry, reread_config) -> None:
    """SIGHUP: the models of the re-read --config, applied in a thread."""
    try:
        specs = await asyncio.to_thread(reread_config)
    except Exception as exc:  # noqa: BLE001 - a bad edit must not stop the server
        log.error("workerpool serve: SIGHUP: the config cannot be used, nothing changed: %s",
                  exc)
        return
    try:
        done = await asyncio.to_thread(registry.apply, specs)
    except Exception as exc:  # noqa: BLE001 - closing, say
        log.error("workerpool serve: SIGHUP: %s", exc)
        return
    log.warning("workerpool serve: SIGHUP applied: %s",
                ", ".join(f"{k} {v}" for k, v in done.items()) or "nothing changed")


def run(registry: Registry, app: App, settings: ServerSettings, reread_config=None) -> int:
    """Serve on a fresh event loop (uvloop's where installed and ``settings.loop`` says so;
    else the standard one)."""
    if settings.loop == "uvloop" and has_module("uvloop"):
        import uvloop

        return uvloop.run(serve(registry, app, settings, reread_config))
    return asyncio.run(serve(registry, app, settings, reread_config))
