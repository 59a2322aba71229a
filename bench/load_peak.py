"""Peak memory of the parent while loading a model file: workerpool vs the usual ways.

For a fp32 MLP of each size, saved once as safetensors and as a torch.save state dict, a
fresh interpreter per measurement reports its RSS after imports (the runtime) and its peak
RSS (VmHWM) once the model is loaded; the growth is peak - runtime:
- workerpool: ``Pool.from_file(path, builder=...)`` with one worker, after a first request;
- safetensors ``load_file`` + ``load_state_dict(assign=True)`` into a module built normally;
- ``torch.load`` without mmap + ``load_state_dict``: what most servers do.

    .venv/bin/python bench/load_peak.py [--sizes 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import save_file

from common import MIB, build_mlp, emit, log, markdown_table, mib, mlp_shape, mlp_skeleton

METHODS = ("workerpool safetensors", "workerpool checkpoint", "safetensors load_file",
           "torch.load (no mmap)")


def builder(size: int):
    return mlp_skeleton(*mlp_shape(size))


def predict(model, x):
    return model(x)


def rss() -> dict:
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM")}


def measure_here(method: str, path: str, size: int) -> dict:
    """Runs in the child interpreter."""
    import functools

    import workerpool
    from safetensors.torch import load_file

    runtime = rss()["VmRSS"]
    if method.startswith("workerpool"):
        with workerpool.Pool.from_file(path, predict, workers=1,
                                       builder=functools.partial(builder, size)) as pool:
            pool.submit(torch.zeros(1, mlp_shape(size)[0])).result()
            peak = rss()["VmHWM"]
    else:
        model = builder(size)
        state = load_file(path) if method.startswith("safetensors") else torch.load(
            path, weights_only=True)
        model.load_state_dict(state, assign=True)
        peak = rss()["VmHWM"]
    return {"runtime": runtime, "peak": peak}


def measure(method: str, path: str, size: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", method, path, str(size)],
                         capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    growth = result["peak"] - result["runtime"]
    return {"model_mib": size, "method": method, "runtime_mib": mib(result["runtime"]),
            "peak_mib": mib(result["peak"]), "growth_mib": mib(growth),
            "growth_vs_model": round(growth / (size * MIB), 3)}


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        method, path, size = sys.argv[2], sys.argv[3], int(sys.argv[4])
        print(json.dumps(measure_here(method, path, size)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1024", help="model sizes in MiB")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as directory:
        for size in [int(s) for s in args.sizes.split(",")]:
            state = build_mlp(size).state_dict()
            files = {"safetensors": os.path.join(directory, f"{size}.safetensors"),
                     "checkpoint": os.path.join(directory, f"{size}.pt")}
            save_file(state, files["safetensors"])
            torch.save(state, files["checkpoint"])
            del state
            for method in METHODS:
                path = files["checkpoint" if "checkpoint" in method or "torch.load" in method
                             else "safetensors"]
                rows.append(measure(method, path, size))
                log(rows[-1])
    columns = list(rows[0])
    emit(rows, "load_peak", "# Parent's peak memory while loading a model file\n\n" +
         markdown_table(rows, columns))


if __name__ == "__main__":
    main()
