"""The transport floor for bench/light.py: what a request costs the HTTP and gRPC stacks
`workerpool serve` runs on before any serving code of ours.

One process, one uvloop event loop, as the server runs: uvicorn (httptools) on an HTTP port
and a grpcio asyncio server (the options serve/grpc/server.py gives it) on a gRPC port. Every
HTTP POST has its body read and its JSON parsed with orjson as the server parses it (a JSON
body whole, a binary body's JSON header), every gRPC call (any method, bytes in) is taken,
and each is answered with one fixed, precomputed KServe v2 answer: no model, no pool, no
checks. What workerpool adds per request is the server's CPU per request
minus this one's; gRPC's floor against HTTP's says how near a gRPC front end on grpcio can
come to an HTTP one at all.

    python bench/floor_server.py HTTP_PORT GRPC_PORT
"""

from __future__ import annotations

import json
import sys

import grpc
import orjson  # (the serve extra's JSON parser, as the server's)
import uvicorn

# the light model's answer to one row, as JSON and as a serialized ModelInferResponse
# (model_name "light", one FP32 output "probabilities" of shape [1, 10], raw contents)
JSON_ANSWER = json.dumps({"model_name": "light", "outputs": [
    {"name": "probabilities", "datatype": "FP32", "shape": [1, 10],
     "data": [0.1] * 10}]}).encode()


def grpc_answer() -> bytes:
    # Field numbers of grpc_service.proto's ModelInferResponse: model_name 1, outputs 5
    # (name 1, datatype 2, shape 3), raw_output_contents 6; hand-encoded so this floor
    # imports nothing of workerpool's.
    def field(number: int, payload: bytes) -> bytes:
        return bytes([number << 3 | 2, len(payload)]) + payload

    shape = bytes([1, 10])  # packed varints
    output = field(1, b"probabilities") + field(2, b"FP32") + field(3, shape)
    return field(1, b"light") + field(5, output) + field(6, b"\0" * 40)


async def http_app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    headers = dict(scope["headers"])
    header_length = headers.get(b"inference-header-content-length")
    orjson.loads(body if header_length is None else body[:int(header_length)])
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(JSON_ANSWER)).encode())]})
    await send({"type": "http.response.body", "body": JSON_ANSWER})


class AnyMethod(grpc.GenericRpcHandler):
    def __init__(self):
        answer = grpc_answer()

        async def infer(raw: bytes, context) -> bytes:
            return answer

        self.handler = grpc.unary_unary_rpc_method_handler(infer)

    def service(self, handler_call_details):
        return self.handler


async def main(http_port: int, grpc_port: int) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20),
                                      ("grpc.max_send_message_length", -1),
                                      ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((AnyMethod(),))
    server.add_insecure_port(f"127.0.0.1:{grpc_port}")
    await server.start()
    config = uvicorn.Config(http_app, host="127.0.0.1", port=http_port, loop="none",
                            http="httptools", lifespan="off", log_level="warning",
                            access_log=False)
    await uvicorn.Server(config).serve()
    await server.stop(None)


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
