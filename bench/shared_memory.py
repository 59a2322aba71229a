"""A large tensor into a model and back: HTTP binary, gRPC, and Triton's system shared memory.

One ``workerpool serve`` (one worker) serves bench/scale_model.py (FP32 [n] -> 2x, the
output as large as the input). For 16 MiB and 256 MiB tensors (``--sizes``), each path makes
the same call with tritonclient, in this process:

- in process: ``predict`` called here (the floor: the model's own work);
- HTTP binary: the tensor in the body after the JSON header, the answer likewise;
- gRPC: raw_input_contents / raw_output_contents;
- shared memory (HTTP) and (gRPC): input and output regions registered once; a request
  names them, the worker reads the input in place and writes the output into its region.

Per path and size: the median latency of ``--calls`` calls in each of ``--rounds`` rounds
(median over rounds), and CPU seconds per call of the server's own process and of its whole
tree (the server, its worker, its zygote), from psutil over the same calls. Every path's
answer is checked against the model run here. Prints JSON and writes
bench/results/shared_memory.md.

    .venv/bin/python bench/shared_memory.py [--sizes 16,256] [--rounds 3] [--calls 5]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time
import uuid

import numpy as np
import psutil
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
import tritonclient.utils.shared_memory as shm

import scale_model
from common import emit, free_port, log, markdown_table
from streaming import Process

HERE = pathlib.Path(__file__).resolve().parent
MIB = 1 << 20


def start_server(directory: pathlib.Path, largest: int) -> tuple[Process, int]:
    limit = largest + 16 * MIB  # the binary paths carry the whole tensor in one message
    grpc_port = free_port()
    config = directory / "serve.toml"
    config.write_text(
        f"[server]\ngrpc_port = {grpc_port}\nmax_request_bytes = {limit}\n\n"
        '[models.scale]\nsource = "scale_model:load"\npredict = "scale_model:predict"\n'
        f"workers = 1\nmax_message_bytes = {limit}\n"
        'inputs = [{name = "INPUT0", datatype = "FP32", shape = [-1]}]\n'
        'outputs = [{name = "OUTPUT0", datatype = "FP32", shape = [-1]}]\n')
    port = free_port()
    server = Process([sys.executable, "-m", "workerpool", "serve", "--port", str(port),
                      "--config", str(config)], port, "/v2/health/ready",
                     env={"PYTHONPATH": str(HERE)})
    return server, grpc_port


class Paths:
    """One callable per path for a tensor ``x``: each returns the model's output."""

    def __init__(self, server: Process, grpc_port: int, x: np.ndarray):
        self.x = x
        self.http = triton_http.InferenceServerClient(f"127.0.0.1:{server.port}",
                                                      network_timeout=600,
                                                      connection_timeout=600)
        self.grpc = triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        self.regions = []
        tag = uuid.uuid4().hex[:8]
        self.input_region = self.region(f"in_{tag}", x)
        self.output_region = self.region(f"out_{tag}", None)

    def region(self, name: str, fill):
        handle = shm.create_shared_memory_region(name, f"/wp_bench_{name}", self.x.nbytes)
        self.regions.append(handle)
        if fill is not None:
            shm.set_shared_memory_region(handle, [fill])
        self.http.register_system_shared_memory(name, f"/wp_bench_{name}", self.x.nbytes)
        return name, handle

    def close(self) -> None:
        self.http.unregister_system_shared_memory()
        for handle in self.regions:
            shm.destroy_shared_memory_region(handle)
        self.http.close()
        self.grpc.close()

    def all(self) -> dict:
        return {"in process": lambda: scale_model.predict(None, self.x),
                "HTTP binary": self.http_binary, "gRPC": self.grpc_raw,
                "shared memory (HTTP)": lambda: self.shared(triton_http, self.http),
                "shared memory (gRPC)": lambda: self.shared(triton_grpc, self.grpc)}

    def http_binary(self):
        tensor = triton_http.InferInput("INPUT0", [self.x.size], "FP32")
        tensor.set_data_from_numpy(self.x, binary_data=True)
        result = self.http.infer("scale", [tensor], outputs=[
            triton_http.InferRequestedOutput("OUTPUT0", binary_data=True)])
        return result.as_numpy("OUTPUT0")

    def grpc_raw(self):
        tensor = triton_grpc.InferInput("INPUT0", [self.x.size], "FP32")
        tensor.set_data_from_numpy(self.x)
        return self.grpc.infer("scale", [tensor]).as_numpy("OUTPUT0")

    def shared(self, module, client):
        tensor = module.InferInput("INPUT0", [self.x.size], "FP32")
        tensor.set_shared_memory(self.input_region[0], self.x.nbytes)
        output = module.InferRequestedOutput("OUTPUT0")
        output.set_shared_memory(self.output_region[0], self.x.nbytes)
        client.infer("scale", [tensor], outputs=[output])
        # the answer is in the region: a view of it, as a shm client reads it
        return shm.get_contents_as_numpy(self.output_region[1], np.float32, [self.x.size])


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(call, calls: int, server: psutil.Process) -> tuple[float, float, float]:
    """(median latency, server CPU per call, tree CPU per call) over ``calls`` calls."""
    tree = [server, *server.children(recursive=True)]
    server_before, tree_before = cpu_seconds([server]), cpu_seconds(tree)
    latencies = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - started)
    return (statistics.median(latencies),
            (cpu_seconds([server]) - server_before) / calls,
            (cpu_seconds(tree) - tree_before) / calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,256", help="tensor sizes in MiB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows, raw = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        server, grpc_port = start_server(pathlib.Path(tmp), max(sizes) * MIB)
        try:
            process = psutil.Process(server.process.pid)
            for size in sizes:
                x = np.random.default_rng(size).standard_normal(size * MIB // 4)
                x = x.astype(np.float32)
                expected = scale_model.predict(None, x)
                paths = Paths(server, grpc_port, x)
                try:
                    results = {name: [] for name in paths.all()}
                    for name, call in paths.all().items():  # warm, and check the answer
                        np.testing.assert_array_equal(call(), expected, err_msg=name)
                    for round_ in range(args.rounds):
                        for name, call in paths.all().items():
                            results[name].append(measure(call, args.calls, process))
                        log(f"{size} MiB round {round_ + 1}: " + ", ".join(
                            f"{name} {1e3 * r[-1][0]:.1f} ms" for name, r in results.items()))
                finally:
                    paths.close()
                raw[size] = results
                floor = statistics.median(r[0] for r in results["in process"])
                for name, values in results.items():
                    latency = statistics.median(v[0] for v in values)
                    row = {"tensor MiB": size, "path": name, "latency ms": 1e3 * latency,
                           "vs in process": latency / floor}
                    if name != "in process":
                        row["server CPU ms/call"] = 1e3 * statistics.median(
                            v[1] for v in values)
                        row["tree CPU ms/call"] = 1e3 * statistics.median(v[2] for v in values)
                    rows.append(row)
        finally:
            server.stop()
    columns = ["tensor MiB", "path", "latency ms", "vs in process", "server CPU ms/call",
               "tree CPU ms/call"]
    markdown = (
        f"# A large tensor in and out: HTTP binary, gRPC, system shared memory\n\n"
        f"`bench/shared_memory.py --sizes {args.sizes} --rounds {args.rounds} --calls "
        f"{args.calls}`: FP32 [n] -> 2x (bench/scale_model.py), one worker; latency is the "
        "median call (tritonclient, this process), CPU per call of the server's process and "
        "of its whole tree (server, worker, zygote); medians over the rounds.\n\n"
        + markdown_table(rows, columns))
    emit({"rows": rows, "raw": {str(k): v for k, v in raw.items()}}, "shared_memory",
         markdown)


if __name__ == "__main__":
    main()
