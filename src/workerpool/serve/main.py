"""``workerpool serve``: its command line, turned into models and a running server."""

from __future__ import annotations

import argparse
import logging
import sys

from ..config import LOAD_IN
from .config import (POOL_OPTIONS, ConfigError, ModelSpec, check_declarations, check_name,
                     default_name, models_from_toml, split_version)
from .settings import (DEFAULT_HEADER_TIMEOUT_S, DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_MODELS,
                       DEFAULT_PORT, MAX_HEADERS, ServerSettings)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="workerpool serve",
        description="Serve models over HTTP (KServe Open Inference Protocol v2, Triton's "
                    "binary tensors, Prometheus metrics) from pools of workers that share "
                    "one copy of each model's weights. With no model: two built-in demos "
                    "(demo: an MLP; textgen: a streaming text generator).")
    p.add_argument("spec", nargs="?", help="module:load, path/to/file.py:load, or a model "
                   "path or URL (safetensors with --builder, torch checkpoint, TorchScript, "
                   "Hugging Face directory, SavedModel directory, .keras)")
    p.add_argument("--predict", help="module:function or file.py:function; optional for "
                   "torch modules and Keras/TensorFlow models (the model is called)")
    p.add_argument("--builder", help="module:function returning the empty module, for "
                   "state-dict files")
    p.add_argument("--trust-pickle", action="store_true", help="allow a model file that "
                   "pickles a whole module (unpickling runs code from the file: only files "
                   "you trust); serve.toml: trust_pickle = true per model")
    p.add_argument("--name", help="the model's name in URLs (default: from the SPEC)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=SPEC[@VERSION]",
                   help="serve several models, each its own pool (repeatable; the same NAME "
                   "with several @VERSIONs keeps them all live)")
    p.add_argument("--config", help="a serve.toml: [server] settings and [models.NAME] "
                   "tables (source, predict, builder, warmup, inputs, outputs, pool options)")
    p.add_argument("--allow-source", action="append", default=[], metavar="PATH",
                   help="a model file or directory that POST /v2/repository/models/NAME/load "
                   "may name as parameters.source (repeatable; configured sources always are)")
    p.add_argument("--watch", action="store_true",
                   help="hot-swap a model when its file or directory changes (a new file "
                   "renamed in); polls mtime, size and a hash of the first and last MiB")
    p.add_argument("--watch-interval", type=float, default=None,
                   help="seconds between --watch polls (default 2)")
    p.add_argument("--warmup", help="an .npz of inputs run on every worker before it takes "
                   "requests (its arrays by name)")
    p.add_argument("--workers", type=int,
                   help="worker processes per model (default 2); each attaches the one "
                   "copy of the weights")
    p.add_argument("--min-workers", type=int,
                   help="elastic workers: the fewest each model keeps (0: scale to zero; the "
                   "next request wakes a worker by a fork, no reload). Default: --workers, "
                   "or 0 with --idle-timeout")
    p.add_argument("--idle-timeout", type=float,
                   help="elastic workers: seconds a worker may idle before it stops, down to "
                   "--min-workers (default 60 when --min-workers is below --workers); a model "
                   "grows back toward --workers while requests wait")
    p.add_argument("--threads-per-worker", type=int,
                   help="intra-op threads of each worker (default: usable cores // workers, "
                   "at least 1)")
    p.add_argument("--max-batch-size", type=int,
                   help="rows merged into one predict call from requests that queue "
                   "together (default 1: no batching)")
    p.add_argument("--max-wait-ms", type=float,
                   help="how long a lone request may wait for others to batch with "
                   "(default 0: batch only what is already queued)")
    p.add_argument("--max-queue", type=int,
                   help="requests waiting for a worker past which 503 (each worker also "
                   "holds up to 2 tasks beyond it)")
    p.add_argument("--timeout", type=float,
                   help="seconds a request may take from its arrival, queueing included "
                   "(504 after); a worker is aborted only for a call that ran this long")
    p.add_argument("--spare-zygote", action="store_const", const=True, default=None,
                   help="keep each model's next zygote started (its framework imported), "
                   "so a hot swap skips that (about 2 s for torch) for one idle process")
    p.add_argument("--inline", action="store_const", const=True, default=None,
                   help="call the model in the server's own process (with --http-workers, "
                   "each front end calls its own copy), on the thread that decoded the "
                   "request: no worker, no hop (for light models: logistic "
                   "regression, trees; predict must take well under a millisecond). A "
                   "predict that crashes takes the server with it; no batching")
    p.add_argument("--load-in", choices=LOAD_IN, default=None,
                   help="where load() runs: 'loader' (default: a short-lived process, so the "
                   "server's own imports no framework and holds no weights) or 'parent'")
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help=f"default {DEFAULT_PORT}; 0: any")
    p.add_argument("--metrics-port", type=int, help="also serve /metrics on this port")
    p.add_argument("--grpc-port", type=int, default=None,
                   help="also serve KServe v2 over gRPC (inference.GRPCInferenceService: "
                   "tritonclient.grpc) on this port; 0: any (needs the grpc extra)")
    p.add_argument("--tf-serving-port", type=int, default=None,
                   help="also serve TensorFlow Serving's gRPC API (PredictionService, "
                   "ModelService; TF Serving's own default is 8500) on this port; 0: any "
                   "(needs the tfserving extra). Its REST API is always on the HTTP port")
    p.add_argument("--api-key", default=None, help="require this key on every route but "
                   "health (also WORKERPOOL_API_KEY)")
    p.add_argument("--access-log", default=None, choices=("text", "json"),
                   help="write a line per request (HTTP and gRPC) to stderr: time, client, "
                   "protocol, route, model, version, status, duration, request id")
    p.add_argument("--tracing", action="store_true",
                   help="OpenTelemetry: a span per request with its queue wait and worker "
                   "compute, to the environment's tracer provider or OTLP (OTEL_* variables; "
                   "needs the otel extra)")
    p.add_argument("--tls-cert", default=None, metavar="PEM",
                   help="serve TLS with this certificate (chain) on the HTTP, metrics and "
                   "gRPC ports; needs --tls-key")
    p.add_argument("--tls-key", default=None, metavar="PEM",
                   help="the private key of --tls-cert (unencrypted PEM)")
    p.add_argument("--max-request-bytes", type=int, default=None,
                   help="largest request body, or gRPC request message (default 64 MiB)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="a memory budget for the server's whole process tree (PSS; e.g. "
                   "6GiB): past it, the least recently used models' idle workers stop, and "
                   "each wakes on its next request (weights stay published)")
    p.add_argument("--max-models", type=int, default=None,
                   help="model versions loaded at once past which a repository load is "
                   f"refused (409; default {DEFAULT_MAX_MODELS}); each is a pool of processes")
    p.add_argument("--max-header-bytes", type=int, default=None,
                   help="largest HTTP request line and headers together; 431 past it "
                   f"(default {DEFAULT_MAX_HEADER_BYTES // 1024} KiB; at most {MAX_HEADERS} "
                   "header lines)")
    p.add_argument("--header-timeout", type=float, default=None,
                   help="seconds a connection may take to send a request's line and "
                   f"headers; 408 after (default {DEFAULT_HEADER_TIMEOUT_S:g})")
    p.add_argument("--history-interval", type=float, default=None, metavar="SECONDS",
                   help="seconds between the samples the status page charts (default 5; "
                   "the last 120 are kept)")
    p.add_argument("--drain-timeout", type=float, default=None,
                   help="seconds to finish requests in flight on SIGTERM (default 30)")
    p.add_argument("--http-workers", type=int, default=None, metavar="N",
                   help="HTTP front-end processes on the port (default 1: this process "
                   "serves HTTP itself). With N > 1, N processes accept on the one socket, "
                   "parse and encode requests, and relay the inference to this process's "
                   "pools: HTTP scales past one core; weights and workers stay one set")
    p.add_argument("--http", choices=("httptools", "h11"), default="httptools",
                   help="uvicorn's HTTP parser (default httptools: faster, measured)")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                   help="the event loop (default uvloop: faster, measured)")
    p.add_argument("--debug", action="store_true",
                   help="send model tracebacks to clients (never in production)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        specs, settings = models_and_settings(args)
    except ConfigError as exc:
        print(f"workerpool serve: {exc}", file=sys.stderr)
        return 2
    missing = missing_extra(settings)
    if missing:
        print(f"workerpool serve: {missing}", file=sys.stderr)
        return 2
    from .access_log import AccessLog
    from .http.app import App
    from .tracing import Tracing
    from .registry import Registry
    from .server import run

    raise_open_files_limit()
    limit_malloc_arenas()
    registry = Registry(specs, allowed_sources=settings.allow_sources,
                        defaults=pool_options(args), drain_timeout=settings.drain_timeout,
                        max_models=settings.max_models)
    try:
        tracing = Tracing.start() if settings.tracing else None
    except ImportError as exc:
        print(f"workerpool serve: {exc}", file=sys.stderr)
        return 2
    app = App(registry, api_key=settings.api_key,
              max_request_bytes=settings.max_request_bytes, debug=settings.debug,
              access_log=AccessLog(settings.access_log) if settings.access_log else None,
              tracing=tracing, history_interval=settings.history_interval)

    def reread_config() -> list[ModelSpec]:
        """The models --config declares now (SIGHUP)."""
        return models_and_settings(args)[0]

    try:
        return run(registry, app, settings, reread_config if args.config else None)
    finally:
        if tracing is not None:
            tracing.shutdown()  # (what is buffered goes out)


def raise_open_files_limit() -> None:
    """Each model holds about a dozen descriptors here (its segment, sockets, pidfds): the
    soft limit is raised to the hard one, so a server of a hundred models does not run out
    at a default soft limit of 1024."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # (an infinite hard limit the kernel caps: keep the soft one)


def limit_malloc_arenas() -> None:
    """At most one malloc arena per core in this process. glibc gives each new thread an
    arena of its own (up to 8 per core), and every model's pool brings three threads (its
    dispatcher, ZeroMQ's I/O thread and reaper): measured, 16 pools cost 68 MiB of USS here
    with the default and none with two arenas. Called before those threads exist."""
    from .. import malloc
    from ..config import usable_cores

    malloc.limit_arenas(max(2, usable_cores()))


def missing_extra(settings: ServerSettings) -> str | None:
    """What to install for the protocols asked for, if it is not installed."""
    for port, extra in (("grpc_port", "grpc"), ("tf_serving_port", "tfserving")):
        if getattr(settings, port) is not None and not all(
                _installed(m) for m in ("grpc", "google.protobuf")):
            return (f"--{port.replace('_', '-')} needs grpcio and protobuf: "
                    f"pip install 'workerpool-serve[{extra}]' (from a clone of workerpool: "
                    f"pip install '.[{extra}]')")
    return None


def pool_options(args) -> dict:
    """The pool options given on the command line (for every model)."""
    return {key: getattr(args, key) for key in POOL_OPTIONS
            if getattr(args, key, None) is not None}


def models_and_settings(args) -> tuple[list[ModelSpec], ServerSettings]:
    """The models to serve and the server's settings: command line over [server] table
    over defaults."""
    options = pool_options(args)
    file_settings: dict = {}
    if args.config:
        if args.spec or args.model:
            raise ConfigError("give models either in --config or on the command line")
        specs, file_settings = models_from_toml(args.config, options)
    elif args.model:
        if args.spec:
            raise ConfigError("give a SPEC or --model NAME=SPEC, not both")
        specs = []
        for item in args.model:
            name, sep, source = item.partition("=")
            if not sep or not source:
                raise ConfigError(f"--model {item!r}: use NAME=SPEC or NAME=SPEC@VERSION")
            source, version = split_version(source)
            specs.append(ModelSpec(check_name(name), source, version=version or "1",
                                   predict=args.predict, builder=args.builder,
                                   warmup=args.warmup, trust_pickle=args.trust_pickle,
                                   pool_options=options))
    elif args.spec:
        source, version = split_version(args.spec)
        specs = [ModelSpec(check_name(args.name or default_name(source)), source,
                           version=version or "1", predict=args.predict,
                           builder=args.builder, warmup=args.warmup,
                           trust_pickle=args.trust_pickle, pool_options=options)]
    else:
        specs = [demo_spec(args.name or "demo", options), generator_spec(options)]
    labels = [f"{spec.name}@{spec.version}" for spec in specs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"each model version must be given once: {labels}")
    for spec in specs:
        check_declarations(spec)
    return specs, ServerSettings.resolve(args, file_settings)


def demo_spec(name: str, options: dict) -> ModelSpec:
    from . import demo_model

    return ModelSpec(name, demo_model.load, predict=demo_model.predict,
                     warmup=[demo_model.example(1)], inputs=list(demo_model.INPUTS),
                     outputs=list(demo_model.OUTPUTS), pool_options=options)


def generator_spec(options: dict) -> ModelSpec:
    """The streaming demo (serve/demo_generator.py), served beside the demo as "textgen"."""
    from . import demo_generator

    return ModelSpec("textgen", demo_generator.load, predict=demo_generator.predict,
                     warmup=[demo_generator.example()], inputs=list(demo_generator.INPUTS),
                     outputs=list(demo_generator.OUTPUTS), pool_options=options)


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False
