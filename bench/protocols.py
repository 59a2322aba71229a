"""One server, three protocols: KServe v2 over gRPC, KServe v2 HTTP binary, TF Serving gRPC.

``workerpool serve``'s built-in demo model (a numpy MLP, 64 features in, 10 classes out),
2 workers, no batching, one row per request, served with ``--grpc-port`` and
``--tf-serving-port``; each protocol called from its own load process (bench/http_load.py:
raw keep-alive sockets; bench/grpc_load.py: grpc.aio, concurrent calls on one channel,
pre-serialized messages), 1 and 32 clients, rounds interleaved, medians reported. Every
protocol's answer is checked against the model called in-process before timing.

    .venv/bin/python bench/protocols.py [--rounds 3] [--requests 4000]

Prints JSON, writes bench/results/protocols.md.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

import serve
from common import emit, log, markdown_table
from serve import bodies, http_load, median_of, run_load

CONNECTIONS = (1, 32)
KSERVE_INFER = "/inference.GRPCInferenceService/ModelInfer"
TF_PREDICT = "/tensorflow.serving.PredictionService/Predict"


class Server(serve.Server):
    """``workerpool serve`` with the demo model on HTTP and both gRPC ports."""

    def __init__(self, workers: int):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "workerpool", "serve", "--port", "0", "--grpc-port", "0",
             "--tf-serving-port", "0", "--workers", str(workers)],
            stdout=subprocess.PIPE, text=True)
        lines = [self.process.stdout.readline() for _ in range(3)]
        self.port = int(re.search(r"http://[\w.]+:(\d+)", lines[0])[1])
        self.grpc = {re.search(r"\((.*)\)", line)[1]: re.search(r"grpc://([\w.:]+)", line)[1]
                     for line in lines[1:]}
        self.wait_ready()


def grpc_bodies(directory: pathlib.Path, x: np.ndarray) -> dict[str, pathlib.Path]:
    """Serialized requests: a KServe ModelInferRequest (raw contents) and a TF Serving
    PredictRequest (tensor_content, as tf.make_tensor_proto writes it)."""
    from workerpool.serve.proto import protocol
    from workerpool.serve.proto.tensor import from_array

    kserve = kserve_request(x, "demo")
    predict = protocol("tf_serving").message("tensorflow.serving.PredictRequest")()
    predict.model_spec.name = "demo"
    predict.model_spec.signature_name = "serving_default"
    from_array(x, predict.inputs["features"])
    paths = {"kserve": directory / "kserve.pb", "tfserving": directory / "predict.pb"}
    paths["kserve"].write_bytes(kserve.SerializeToString())
    paths["tfserving"].write_bytes(predict.SerializeToString())
    return paths


def kserve_request(x: np.ndarray, model: str):
    """A KServe v2 ModelInferRequest for ``model``: ``x`` as input "features", raw."""
    from workerpool.serve.proto import protocol

    request = protocol("triton").message("inference.ModelInferRequest")(model_name=model)
    request.inputs.add(name="features", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


def kserve_infer(address: str, body: bytes) -> dict[str, np.ndarray]:
    """One KServe v2 ModelInfer call of a serialized request: its raw outputs by name."""
    import grpc

    from workerpool.serve.proto import protocol
    from workerpool.signature import DATATYPES

    with grpc.insecure_channel(address) as channel:
        raw = channel.unary_unary(KSERVE_INFER)(body, timeout=30)
    response = protocol("triton").message("inference.ModelInferResponse").FromString(raw)
    assert len(response.outputs) == len(response.raw_output_contents)
    return {tensor.name: np.frombuffer(content, DATATYPES[tensor.datatype]).reshape(
        tuple(tensor.shape)) for tensor, content in zip(response.outputs,
                                                        response.raw_output_contents)}


def check_answers(server: Server, paths: dict, x: np.ndarray) -> None:
    """Each protocol's answer equals the model in-process (before anything is timed)."""
    import grpc

    from workerpool.serve import demo_model
    from workerpool.serve.proto import protocol
    from workerpool.serve.proto.tensor import to_array
    from workerpool.serving.limits import DEFAULT_MAX_REQUEST_BYTES

    want = demo_model.predict(demo_model.load(), x)  # {"probabilities", "label"}
    got = kserve_infer(server.grpc["KServe v2"], paths["kserve"].read_bytes())
    assert sorted(got) == sorted(want), f"KServe gRPC: outputs {sorted(got)}"
    for name, array in got.items():
        assert np.array_equal(array, want[name]), f"KServe gRPC: {name} differs"
    with grpc.insecure_channel(server.grpc["TensorFlow Serving"]) as channel:
        raw = channel.unary_unary(TF_PREDICT)(paths["tfserving"].read_bytes(), timeout=30)
    response = protocol("tf_serving").message(
        "tensorflow.serving.PredictResponse").FromString(raw)
    assert sorted(response.outputs) == sorted(want)
    for name, tensor in response.outputs.items():
        got = to_array(name, tensor, DEFAULT_MAX_REQUEST_BYTES)
        assert np.array_equal(got, want[name]), f"TF Serving: {name} differs"


def grpc_load(address: str, method: str, body: pathlib.Path, connections: int,
              requests: int) -> dict:
    return run_load("grpc_load.py", [address, method, str(body)], connections, requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=4000, help="per trial at 32 clients "
                        "(a quarter of it at 1 client)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    from workerpool.serve import demo_model

    directory = pathlib.Path(tempfile.mkdtemp(prefix="bench-protocols-"))
    x = demo_model.example(1)
    http_body = bodies(directory)["binary"]
    grpc_paths = grpc_bodies(directory, x)
    server = Server(args.workers)
    trials: dict[tuple, list[dict]] = {}
    try:
        check_answers(server, grpc_paths, x)
        runs = {
            "KServe v2 gRPC": lambda c, n: grpc_load(server.grpc["KServe v2"], KSERVE_INFER,
                                                     grpc_paths["kserve"], c, n),
            "KServe v2 HTTP binary": lambda c, n: http_load(server.port, http_body, c, n),
            "TF Serving gRPC": lambda c, n: grpc_load(server.grpc["TensorFlow Serving"],
                                                      TF_PREDICT, grpc_paths["tfserving"], c, n),
        }
        for round_ in range(args.rounds):
            for connections in CONNECTIONS:
                requests = args.requests if connections > 1 else args.requests // 4
                for name, run in runs.items():
                    key = (name, connections)
                    trials.setdefault(key, []).append(run(connections, requests))
                    log(key, f"{trials[key][-1]['requests_per_s']:.0f} req/s, p50 "
                             f"{trials[key][-1]['p50_ms']:.3f} ms")
            log(f"round {round_ + 1}/{args.rounds} done")
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
    rows = []
    for (name, connections), results in trials.items():
        base = median_of(trials[("KServe v2 HTTP binary", connections)])
        row = {"protocol": name, "clients": connections, **median_of(results)}
        row["rps_vs_http_binary"] = row["requests_per_s"] / base["requests_per_s"]
        rows.append(row)
    columns = ["protocol", "clients", "requests_per_s", "p50_ms", "p99_ms",
               "rps_vs_http_binary"]
    markdown = (f"# One server, three protocols (demo model, {args.workers} workers, "
                f"medians of {args.rounds} rounds)\n\n"
                f"`{' '.join(['bench/protocols.py', *sys.argv[1:]])}`\n\n"
                + markdown_table(rows, columns))
    emit({"rounds": args.rounds, "workers": args.workers, "rows": rows}, "protocols", markdown)
    print(markdown, file=sys.stderr)


if __name__ == "__main__":
    main()
