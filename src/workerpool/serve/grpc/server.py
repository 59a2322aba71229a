"""The gRPC front ends, on the server's one event loop beside HTTP.

    --grpc-port        inference.GRPCInferenceService                  (kserve.py)
    --tf-serving-port  tensorflow.serving.PredictionService, ModelService  (tfserving.py)

One grpcio asyncio server per port, started on the loop uvicorn runs on and calling the
same data plane: the same pools, checks, batching, queue limits and errors as HTTP. Methods
are registered by their path (``/inference.GRPCInferenceService/ModelInfer``) with message
classes from our own descriptor pool (proto/), so no generated ``_pb2_grpc`` stubs are
needed. Every method goes through :func:`method`: the API key is checked, then the request
is decoded (malformed bytes: INVALID_ARGUMENT), and an error becomes the gRPC status
serving/errors.py maps it to, its message cut to what gRPC metadata carries. Inference
methods pass the client's deadline (``context.time_remaining()``) as the request's timeout
(never longer than the model's own).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError

from ... import request_ids
from ...serving.errors import (MAX_ERROR_CHARS, BadRequest, Unauthorized, clip_utf8,
                               grpc_code_of, message_of)
from ..auth import key_matches
from ..proto import protocol

log = logging.getLogger("workerpool.serve")

OPEN_METHODS = {"ServerLive", "ServerReady"}  # health: no API key needed, as over HTTP
# Non-ASCII bytes of a status message take 3 once percent-encoded: 2,400 stays under 8 KiB.
GRPC_MESSAGE_BYTES = 2400


class Front:
    """One protocol's methods and the server settings they share."""

    protocol = "grpc"  # the metrics' protocol label
    descriptors = ""  # its module of proto/

    def __init__(self, plane, *, api_key: bytes | None = None, debug: bool = False,
                 access_log=None, tracing=None):
        self.plane = plane  # serving/dataplane.py: every method's one path
        self.api_key = api_key
        self.debug = debug
        self.access_log = access_log  # serve/access_log.py's AccessLog, or None
        self.tracing = tracing  # serve/tracing.py's Tracing, or None
        self.message = protocol(self.descriptors).message  # a message class by full name

    def methods(self) -> dict[str, dict[str, tuple]]:
        """service name -> method name -> (handler, request class, response class);
        a handler is ``async (request, grpc.aio.ServicerContext) -> response``, or, for a
        method in ``streaming``, an async generator ``(requests, context)`` of responses."""
        raise NotImplementedError

    streaming: frozenset = frozenset()  # its bidirectional streaming methods, by name


def method(front: Front, name: str, handler: Callable[..., Awaitable], request_class):
    """One unary method as grpcio calls it (a coroutine function, so it runs on the
    loop): the API key checked, the request decoded (bytes that are not the message are
    the client's error, INVALID_ARGUMENT, so grpcio never decodes them itself), the handler
    run, an error turned into a gRPC status."""
    async def call(raw: bytes, context: grpc.aio.ServicerContext):
        with Logged(front, name, context) as logged:
            try:
                if name not in OPEN_METHODS:
                    check_key(front, context)
                try:
                    request = request_class.FromString(raw)
                except DecodeError as exc:
                    raise BadRequest(f"the request is not a "
                                     f"{request_class.DESCRIPTOR.full_name} message: "
                                     f"{exc}") from None
                return await handler(request, context)
            except Exception as error:  # noqa: BLE001 - every error is a status, never a crash
                await logged.abort(error)

    return call


def stream_method(front: Front, name: str, handler, request_class):
    """One bidirectional streaming method: the API key checked once, each request message
    decoded as it arrives (INVALID_ARGUMENT for bytes that are not one), the handler's
    responses written as it yields them; an error ends the call with its status."""
    async def call(raw_requests, context: grpc.aio.ServicerContext):
        with Logged(front, name, context) as logged:
            try:
                check_key(front, context)

                async def requests():
                    async for raw in raw_requests:
                        try:
                            yield request_class.FromString(raw)
                        except DecodeError as exc:
                            what = request_class.DESCRIPTOR.full_name
                            raise BadRequest(f"a message is not a {what}: {exc}") from None

                async for response in handler(requests(), context):
                    yield response
            except Exception as error:  # noqa: BLE001 - every error is a status, never a crash
                await logged.abort(error)

    return call


class Logged:
    """One call's request id (the client's x-request-id metadata, or a new one: set for
    the pool, sent back in the trailing metadata), its span (with --tracing) and its access
    log line, written when the call ends with its status code's name."""

    def __init__(self, front: Front, name: str, context: grpc.aio.ServicerContext):
        self.front, self.name, self.context = front, name, context
        self.started = time.perf_counter()
        self.metadata = dict(context.invocation_metadata() or ())  # (read once)
        self.request_id = request_ids.accepted(self.metadata.get("x-request-id"))
        self.code = "OK"

    def __enter__(self) -> "Logged":
        request_ids.current.set(self.request_id)
        self.context.set_trailing_metadata((("x-request-id", self.request_id),))
        tracing = self.front.tracing
        self._span = tracing.request(
            self.name, self.metadata,
            {"rpc.system": "grpc", "rpc.method": self.name,
             "workerpool.request_id": self.request_id}) if tracing is not None else None
        self.span = self._span.__enter__() if self._span is not None else None
        return self

    async def abort(self, error: Exception) -> None:
        """End the call with the status ``error`` maps to."""
        code, message = failure(self.front, self.name, error)
        self.code = code.name
        await self.context.abort(code, message,
                                 trailing_metadata=(("x-request-id", self.request_id),))

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None and self.code == "OK":  # (cancelled: the client left)
            self.code = "CANCELLED"
        if self._span is not None:
            self.span.set_attribute("rpc.grpc.status_code", self.code)
            self._span.__exit__(kind, error, traceback)
        log = self.front.access_log
        if log is None:
            return
        log.write(client=self.context.peer(), protocol=self.front.protocol, method="grpc",
                  path=f"/{self.name}", status=self.code, started=self.started,
                  request_id=self.request_id)


def check_key(front: Front, context: grpc.aio.ServicerContext) -> None:
    if front.api_key is not None and \
            not key_matches(context.invocation_metadata(), front.api_key):
        raise Unauthorized("this server needs its API key: send the metadata "
                           "'authorization: Bearer <key>' (or 'x-api-key: <key>')")


def failure(front: Front, name: str, error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status ``error`` maps to and the message the client gets; a failure of the
    model's own (INTERNAL) is logged."""
    code = grpc.StatusCode[grpc_code_of(error)]
    if code == grpc.StatusCode.INTERNAL:
        log.info("%s failed: %s", name, error)
    return code, status_message(error, front.debug)


def status_message(error: BaseException, debug: bool) -> str:
    """The status message of a failed call: it travels as percent-encoded metadata, which
    clients refuse past 8 KiB (RESOURCE_EXHAUSTED instead of the real status), so at most
    GRPC_MESSAGE_BYTES of UTF-8; with ``debug``, half the text and half the traceback."""
    text = message_of(error, debug, limit=GRPC_MESSAGE_BYTES // 2 if debug else
                      MAX_ERROR_CHARS)
    return clip_utf8(text, GRPC_MESSAGE_BYTES)


def serialize(response) -> bytes:
    """A handler's answer on the wire: a message, or bytes a handler serialized itself
    (a large ModelInferResponse: grpc/kserve.py serialized_with_raw)."""
    return response if type(response) is bytes else response.SerializeToString()


def handlers(front: Front) -> list:
    """grpcio generic handlers for every method of ``front``."""
    result = []
    for service, methods in front.methods().items():
        table = {}
        for name, (handler, request, response) in methods.items():
            if name in front.streaming:
                table[name] = grpc.stream_stream_rpc_method_handler(
                    stream_method(front, name, handler, request),
                    response_serializer=serialize)
            else:
                table[name] = grpc.unary_unary_rpc_method_handler(
                    method(front, name, handler, request),
                    response_serializer=serialize)
        result.append(grpc.method_handlers_generic_handler(service, table))
    return result


async def start(fronts: list[Front], host: str, port: int, *, max_message_bytes: int,
                tls: tuple[bytes, bytes] | None = None) -> tuple[grpc.aio.Server, int]:
    """A started server for ``fronts`` on host:port (0: any); returns it and its port.
    ``tls``: (certificate chain, private key) in PEM: TLS only."""
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", -1),  # the client's own limit applies
        ("grpc.so_reuseport", 0),  # a port in use is an error, not a second listener
    ])
    for front in fronts:
        server.add_generic_rpc_handlers(handlers(front))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if tls is None:
            bound = server.add_insecure_port(address)
        else:
            certificate, key = tls
            bound = server.add_secure_port(
                address, grpc.ssl_server_credentials([(key, certificate)]))
    except RuntimeError as exc:
        raise OSError(f"cannot listen for gRPC on {address}: {exc}") from None
    await server.start()
    return server, bound
