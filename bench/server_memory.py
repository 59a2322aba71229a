"""The server's own process: what ``workerpool serve`` holds besides its pools, with load()
in the server (``--load-in parent``) and in a loader process (``--load-in loader``, the
default).

One server serves two models at once, each with ``--workers`` workers: a torch MLP and a
Keras MLP of ``--size`` MiB of fp32 weights each (bench/common.mlp_shape; built by
``load()`` functions in bench/server_models.py, whose module imports no framework). Once
``/v2/health/ready`` answers 200 and each model has answered one v2 inference (outputs
checked against the same model called in this benchmark's helper process), measured:

- the server process's PSS, USS and RSS (psutil ``memory_full_info``), and whether torch's
  or TensorFlow's shared libraries are mapped in it (``/proc/PID/maps``);
- the whole tree's PSS (the server, the runtime, the workers);
- ``ready_s``: from starting the server to both models ready.

Prints JSON and writes bench/results/server_memory.md.

    .venv/bin/python bench/server_memory.py [--size 64] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import psutil

from common import emit, log, markdown_table, memory_of, mib, mlp_shape, tree_pids

HERE = pathlib.Path(__file__).resolve().parent
MODELS = {"torch_mlp": "server_models:torch_mlp", "keras_mlp": "server_models:keras_mlp"}


def start_server(config: pathlib.Path, load_in: str, workers: int,
                 extra: list[str] = ()) -> tuple:
    command = [sys.executable, "-m", "workerpool", "serve", "--config", str(config),
               "--port", "0", "--workers", str(workers), "--load-in", load_in, *extra]
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), *sys.path]))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=environment)
    line = process.stdout.readline()
    match = re.search(r"http://[\w.]+:(\d+)", line)
    if match is None:
        process.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    return process, int(match[1])


def get(port: int, path: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method="POST" if body else "GET",
        data=json.dumps(body).encode() if body else None,
        headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        try:
            return error.code, json.loads(error.read() or b"{}")
        except ValueError:
            return error.code, {}
    except OSError:
        return 0, {}


def infer(port: int, model: str, x: np.ndarray) -> np.ndarray:
    # the input's name as the model declares it (a Keras model names its own)
    inputs = get(port, f"/v2/models/{model}")[1].get("inputs") or [{"name": "input"}]
    body = {"inputs": [{"name": inputs[0]["name"], "datatype": "FP32", "shape": list(x.shape),
                        "data": x.reshape(-1).tolist()}]}
    status, answer = get(port, f"/v2/models/{model}/infer", body)
    if status != 200:
        raise RuntimeError(f"{model}: HTTP {status} {answer}")
    (output,) = answer["outputs"]
    return np.asarray(output["data"], np.float32).reshape(output["shape"])


def mapped_frameworks(pid: int) -> list[str]:
    with open(f"/proc/{pid}/maps") as maps:
        paths = {line.split()[-1] for line in maps if "/" in line}
    return sorted(name for name, marker in (("torch", "libtorch"),
                                            ("tensorflow", "libtensorflow"))
                  if any(marker in path for path in paths))


def reference(size: int, x: np.ndarray) -> dict[str, np.ndarray]:
    """Both models called here, in a helper process (this one stays framework-free)."""
    code = ("import sys, json, numpy as np, server_models;"
            "x = np.load(sys.argv[1]);"
            "out = server_models.reference(x);"
            "np.savez(sys.argv[2], **out)")
    with tempfile.TemporaryDirectory() as tmp:
        np.save(f"{tmp}/x.npy", x)
        subprocess.run([sys.executable, "-c", code, f"{tmp}/x.npy", f"{tmp}/out.npz"],
                       check=True, env=dict(os.environ, PYTHONPATH=str(HERE),
                                            WORKERPOOL_BENCH_MIB=str(size)))
        with np.load(f"{tmp}/out.npz") as out:
            return {name: out[name] for name in out.files}


def measure(size: int, workers: int, load_in: str, x: np.ndarray, expected: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="wp-server-bench-") as tmp:
        config = pathlib.Path(tmp) / "serve.toml"
        config.write_text("".join(f'[models.{name}]\nsource = "{source}"\n'
                                  for name, source in MODELS.items()))
        os.environ["WORKERPOOL_BENCH_MIB"] = str(size)  # the models' size, for load()
        start = time.perf_counter()
        process, port = start_server(config, load_in, workers)
        try:
            deadline = time.monotonic() + 600
            while get(port, "/v2/health/ready")[0] != 200:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the server never became ready")
                time.sleep(0.2)
            ready_s = time.perf_counter() - start
            outputs_equal = all(np.array_equal(infer(port, name, x), expected[name])
                                for name in MODELS)
            info = psutil.Process(process.pid).memory_full_info()
            tree = memory_of(tree_pids(process.pid))
            frameworks = mapped_frameworks(process.pid)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(120)
            process.stdout.close()
    return {"load_in": load_in, "model_mib_each": size, "workers_each": workers,
            "server_pss_mib": mib(info.pss), "server_uss_mib": mib(info.uss),
            "server_rss_mib": mib(info.rss), "frameworks_mapped_in_server": frameworks,
            "tree_pss_mib": mib(sum(m["pss"] for m in tree.values())),
            "processes": len(tree), "ready_s": round(ready_s, 2),
            "outputs_equal": outputs_equal}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="MiB of weights per model")
    parser.add_argument("--workers", type=int, default=2, help="workers per model")
    args = parser.parse_args()
    x = np.ones((2, mlp_shape(args.size)[0]), np.float32)
    expected = reference(args.size, x)
    rows = []
    for load_in in ("parent", "loader"):
        rows.append(measure(args.size, args.workers, load_in, x, expected))
        log(f"  --load-in {load_in}: server USS {rows[-1]['server_uss_mib']} MiB, "
            f"PSS {rows[-1]['server_pss_mib']} MiB, tree {rows[-1]['tree_pss_mib']} MiB")
    parent, loader = rows
    for r in rows:
        r["server_pss_vs_parent"] = round(r["server_pss_mib"] / parent["server_pss_mib"], 3)
    markdown = "\n\n".join([
        "# The server process with a torch and a Keras model "
        f"({args.size} MiB each, {args.workers} workers each; {os.cpu_count()} CPUs)",
        markdown_table(rows, list(rows[0])),
        f"load_in=loader: the server's PSS is {loader['server_pss_vs_parent']} x "
        f"load_in=parent's ({loader['server_pss_mib']} vs {parent['server_pss_mib']} MiB)."])
    emit({"rows": rows}, "server_memory", markdown)


if __name__ == "__main__":
    main()
