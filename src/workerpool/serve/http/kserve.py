"""KServe Open Inference Protocol v2 over HTTP: the /v2 routes.

    GET  /v2                                    server metadata
    GET  /v2/health/live | /v2/health/ready     200, or 503 until every model is ready
    GET  /v2/models/{m}[/versions/{v}]          model metadata (its Signature)
    GET  /v2/models/{m}[/versions/{v}]/ready    200 or 503
    POST /v2/models/{m}[/versions/{v}]/infer    JSON or binary tensors (serving/kserve.py);
                                                without a version: the newest ready one
    POST /v2/models/{m}[/versions/{v}]/generate         Triton's generate extension: inputs
                                                        as top-level JSON keys, one answer
    POST /v2/models/{m}[/versions/{v}]/generate_stream  the same, an event per item the
                                                        model yields (server-sent events)
    GET  /v2/models/stats                       Triton's statistics extension: every model
    GET  /v2/models/{m}[/versions/{v}]/stats    ... of a model (every version) or a version
    GET  /v2/models/{m}[/versions/{v}]/config   Triton's model configuration extension
    GET  /v2/systemsharedmemory[/region/{r}]/status      Triton's system shared memory
    POST /v2/systemsharedmemory/region/{r}/register     {"key", "offset", "byte_size"}
    POST /v2/systemsharedmemory[/region/{r}]/unregister  (and /v2/cudasharedmemory/...:
                                                        no CUDA regions, register refused)
    POST /v2/repository/index                   every model version and its state
    POST /v2/repository/models/{m}/load         load, or hot-swap a loaded one; optional JSON
                                                {"parameters": {"version", "source", "config"}}
    POST /v2/repository/models/{m}/unload       drain, then free (optional "version")

Inference is decode (serving/kserve.py) -> the data plane -> encode; repository calls run
in a thread (they wait for workers to start or drain) while the loop keeps serving.
"""

from __future__ import annotations

import asyncio

from ...serving import generate as generate_codec
from ...serving import kserve
from ...serving.errors import BadRequest, ModelNotFound, StreamFailed, message_of
from ...serving.limits import parse_json
from .exchange import Exchange

PROTOCOL = "kserve_http"
GENERATE = "generate_http"
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


async def route(app, exchange: Exchange, parts: list[str]) -> None:
    """``parts``: the path after /v2, split."""
    plane = app.plane
    if not parts or parts == [""]:
        exchange.expect("GET")
        await exchange.json(200, plane.server_metadata())
    elif parts == ["health", "live"]:
        await exchange.json(200, {"live": True})
    elif parts == ["health", "ready"]:
        ready = plane.ready
        await exchange.json(200 if ready else 503, {"ready": ready})
    elif parts == ["models", "stats"]:
        exchange.expect("GET")
        await exchange.json(200, await asyncio.to_thread(plane.statistics))
    elif parts[0] == "models" and len(parts) >= 2:
        await model_route(app, exchange, parts[1:])
    elif parts[0] == "repository":
        await repository_route(app, exchange, parts[1:])
    elif parts[0] in ("systemsharedmemory", "cudasharedmemory"):
        await shared_memory_route(app, exchange, parts[0], parts[1:])
    else:
        raise ModelNotFound(f"no route {exchange.method} {exchange.path}")


async def model_route(app, exchange: Exchange, parts: list[str]) -> None:
    name, rest, version = parts[0], parts[1:], None
    if rest[:1] == ["versions"]:
        if len(rest) < 2:
            raise ModelNotFound("a version is missing after /versions/")
        version, rest = rest[1], rest[2:]
    if rest == ["infer"]:
        exchange.expect("POST")
        await infer(app, exchange, name, version)
    elif rest in (["generate"], ["generate_stream"]):
        exchange.expect("POST")
        await generate(app, exchange, name, version, streamed=rest[0] == "generate_stream")
    elif rest == []:
        exchange.expect("GET")
        await exchange.json(200, app.plane.model_metadata(name, version))
    elif rest == ["ready"]:
        exchange.expect("GET")
        model = app.plane.model(name, version)
        await exchange.json(200 if model.ready else 503,
                            {"name": model.name, "ready": model.ready})
    elif rest == ["stats"]:
        exchange.expect("GET")
        await exchange.json(200, await asyncio.to_thread(app.plane.statistics, name, version))
    elif rest == ["config"]:
        exchange.expect("GET")
        await exchange.json(200, app.plane.config(name, version))
    else:
        raise ModelNotFound(f"no route {exchange.method} {exchange.path}")


async def infer(app, exchange: Exchange, name: str, version: str | None) -> None:
    with app.plane.inference(name, version, PROTOCOL, exchange.started) as call:
        body = await exchange.body(app.max_request_bytes)  # after the lookup: 404 first
        request = kserve.parse_infer(body, exchange.header(b"inference-header-content-length"),
                                     app.plane.max_tensor_bytes)
        outputs = await call.run(request.inputs, request.output_names,
                                 placed=request.placed)
        parts, headers = kserve.encode_response(call.model.name, call.model.version,
                                                request, outputs)
        await exchange.respond_parts(200, parts, headers)


async def generate(app, exchange: Exchange, name: str, version: str | None,
                   streamed: bool) -> None:
    """Triton's generate extension. A client that goes away ends the stream's generator in
    its worker (asgi.py cancels this task)."""
    with app.plane.inference(name, version, GENERATE, exchange.started) as call:
        body = await exchange.body(app.max_request_bytes)
        inputs = generate_codec.parse_generate(body, call.model.signature,
                                               app.plane.max_tensor_bytes)
        model = call.model
        items = call.stream(inputs)
        if not streamed:
            await exchange.json(200, generate_codec.item_json(
                model.name, model.version, await only_item(items, model.name)))
            return
        # The first item before the answer starts: what fails before it (not ready, bad
        # inputs, a predict that raises at once) is answered with its own status.
        first = await anext(items, None)
        await exchange.send({"type": "http.response.start", "status": 200,
                             "headers": SSE_HEADERS})
        try:
            if first is not None:
                await send_event(exchange, model, first)
                async for outputs in items:
                    await send_event(exchange, model, outputs)
        except Exception as error:
            # The answer has started: the error is the stream's last event, as in Triton.
            await exchange.send({"type": "http.response.body", "more_body": False,
                                 "body": generate_codec.event(
                                     {"error": message_of(error, app.debug)})})
            raise StreamFailed(error) from error
        await exchange.send({"type": "http.response.body", "body": b""})


async def send_event(exchange: Exchange, model, outputs: dict) -> None:
    await exchange.send({"type": "http.response.body", "more_body": True,
                         "body": generate_codec.event(generate_codec.item_json(
                             model.name, model.version, outputs))})


async def only_item(items, name: str) -> dict:
    """The one item of a stream; BadRequest if the model yields more (after closing it)."""
    first = None
    try:
        async for outputs in items:
            if first is not None:
                raise BadRequest(f"model {name} yielded more than one item; read it with "
                                 "generate_stream")
            first = outputs
    finally:
        await items.aclose()
    if first is None:
        raise BadRequest(f"model {name} yielded nothing")
    return first


async def shared_memory_route(app, exchange: Exchange, kind: str, parts: list[str]) -> None:
    """Triton's system shared memory extension (serving/shared_memory.py); its CUDA twin
    answers that there is no CUDA shared memory (its status is empty, unregistering is a
    no-op: what clients do first)."""
    if len(parts) == 3 and parts[0] == "region":
        region, action = parts[1], parts[2]
    elif len(parts) == 1:
        region, action = None, parts[0]
    else:
        raise ModelNotFound(f"no route {exchange.method} {exchange.path}")
    regions = app.plane.shared_memory
    if action == "status":
        exchange.expect("GET")
        if kind == "cudasharedmemory":
            if region:
                raise BadRequest(f"Unable to find cuda shared memory region: '{region}'")
            await exchange.json(200, [])
        else:
            await exchange.json(200, regions.status(region))
    elif action == "unregister":
        exchange.expect("POST")
        if kind == "systemsharedmemory":
            regions.unregister(region)
        await exchange.json(200, {})
    elif action == "register" and region:
        exchange.expect("POST")
        if kind == "cudasharedmemory":
            raise BadRequest("CUDA shared memory is not supported: this server runs its "
                             "models on CPUs; register system shared memory instead")
        body = await exchange.body(app.max_request_bytes)
        request = parse_json(body)
        if not isinstance(request, dict) or not isinstance(request.get("key"), str):
            raise BadRequest('the body must be a JSON object {"key": ..., "offset": ..., '
                             '"byte_size": ...}')
        regions.register(region, request["key"], request.get("offset", 0),
                         request.get("byte_size"))
        await exchange.json(200, {})
    else:
        raise ModelNotFound(f"no route {exchange.method} {exchange.path}")


async def repository_route(app, exchange: Exchange, parts: list[str]) -> None:
    """The model repository extension."""
    exchange.expect("POST")
    body = await exchange.body(app.max_request_bytes)
    request = parse_json(body) if body.strip() else {}
    if not isinstance(request, dict):
        raise BadRequest("the body must be a JSON object")
    registry = app.registry
    if parts == ["index"]:
        await exchange.json(200, registry.index(request.get("ready") is True))
        return
    if len(parts) != 3 or parts[0] != "models" or parts[2] not in ("load", "unload"):
        raise ModelNotFound(f"no route {exchange.method} {exchange.path}")
    name, action = parts[1], parts[2]
    parameters = request.get("parameters")
    if action == "load":
        model = await asyncio.to_thread(registry.load, name, parameters)
        await exchange.json(200, {"name": model.name, "version": model.version,
                                  "weights_version": model.weights_version})
    else:
        models = await asyncio.to_thread(registry.unload, name, parameters)
        await exchange.json(200, {"name": name, "unloaded": [m.version for m in models]})
