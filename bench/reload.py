"""Hot swap (``Pool.reload``) under load: how long, what it costs the callers, what memory.

For each model size (fp32 MLP), source and ``spare_zygote`` setting, a Pool of 2 workers
serves 4 caller threads that
submit back to back; then, with the callers still going, ``reload()`` swaps in a new version
``--swaps`` times. Reported per swap (medians):
- load_s: the new version's ``load()`` alone (building the model in this process; for the
  ``file`` source, opening the safetensors file: its pages are mapped, not copied);
- switch_s: reload() called -> the pool routes new requests to the new version (load,
  publish, new zygote and workers started and warmed up); returned_s: -> reload() returned
  (it also waits for the content hash that labels the version);
- all_new_s: reload() called -> the old version's last request answered, its workers gone
  and its segment released (stats()["retiring_versions"] empty): all traffic on the new one;
- caller latency p50/p99 while swapping vs steady (the same run, no swap);
- memory: total PSS of this process and its descendants (both versions' zygotes and
  workers, the starting one included), and the machine's used memory (MemTotal -
  MemAvailable: it also sees memfd pages nobody maps yet), sampled every 0.25 s:
  steady vs the peak during swaps, against one and two copies of the model.

Prints JSON and writes bench/results/reload.md.

    .venv/bin/python bench/reload.py [--sizes 16,1024] [--sources memory,file] [--swaps 3]
                                     [--spare off,on]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time

import numpy as np
import torch

import workerpool
from common import (build_mlp, emit, log, make_input, markdown_table, memory_of, mib, mlp_shape,
                    tree_pids)

CALLERS = 4
STEADY_S = 6.0
SPARE_READY_S = 6.0  # between swaps with spare_zygote: the next spare imports torch meanwhile


def predict(model, x):
    return float(model(x)[0, 0])


class Versions:
    """load() of each version: in memory (built here) or from a safetensors file."""

    def __init__(self, size: int, source: str, directory: str):
        self.size, self.source, self.directory = size, source, directory
        self.load_s: list[float] = []

    def path(self, version: int) -> str:
        return os.path.join(self.directory, f"v{version}.safetensors")

    def write(self, version: int) -> None:
        from safetensors.torch import save_file

        model = self.build(version)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, self.path(version))

    def build(self, version: int):
        model = build_mlp(self.size)
        with torch.no_grad():
            model[0].bias.add_(version)  # each version's outputs differ
        return model

    def builder(self):
        return build_mlp(self.size)

    def loader(self, version: int):
        def load():
            started = time.perf_counter()
            if self.source == "memory":
                model = self.build(version)
            else:
                from workerpool.sources import files

                model = files.loader_for(self.path(version), _meta_builder(self.size), False)()
            self.load_s.append(time.perf_counter() - started)
            return model
        return load


def _meta_builder(size: int):
    from common import mlp_skeleton

    def builder():
        return mlp_skeleton(*mlp_shape(size))
    return builder


class Callers:
    def __init__(self, pool, x):
        self.pool, self.x = pool, x
        self.samples: list[tuple[float, float]] = []  # (finished at, latency s)
        self.failures: list[BaseException] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run) for _ in range(CALLERS)]

    def run(self):
        while not self.stop.is_set():
            started = time.perf_counter()
            try:
                self.pool.submit(self.x).result()
            except BaseException as exc:  # noqa: BLE001 - counted and reported
                self.failures.append(exc)
                continue
            now = time.perf_counter()
            self.samples.append((now, now - started))

    def start(self):
        for t in self.threads:
            t.start()

    def join(self):
        self.stop.set()
        for t in self.threads:
            t.join()

    def latencies(self, windows) -> list[float]:
        return [lat for at, lat in self.samples if any(a <= at <= b for a, b in windows)]


class SwitchWatch(threading.Thread):
    """When the pool started routing new requests to another generation (polled every
    millisecond; reload() itself returns later, once the version's hash is done)."""

    def __init__(self, pool, serving):
        super().__init__(daemon=True)
        self.pool, self.serving = pool, serving
        self.switched_at: float | None = None
        self.start()

    def run(self):
        while self.pool._generation is self.serving:
            time.sleep(0.001)
        self.switched_at = time.perf_counter()

    def at(self) -> float:
        self.join()
        return self.switched_at


class MemorySampler(threading.Thread):
    """Total PSS of this process and every descendant: both versions' zygotes and workers,
    the one still starting included."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(0.25):
            total = sum(m["pss"] for m in memory_of(tree_pids()).values())
            self.samples.append((time.perf_counter(), total, system_used()))

    def peak(self, a: float, b: float, column: int = 1) -> int:
        return max((row[column] for row in self.samples if a <= row[0] <= b), default=0)

    def median(self, a: float, b: float, column: int = 1) -> int:
        values = [row[column] for row in self.samples if a <= row[0] <= b]
        return int(statistics.median(values)) if values else 0


def system_used() -> int:
    """MemTotal - MemAvailable: counts memfd pages no process maps yet (PSS does not) and
    the parent's private copy; page cache of weight files is 'available', so not here."""
    fields = {}
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            name, value = line.split(":")
            fields[name] = int(value.split()[0]) * 1024
    return fields["MemTotal"] - fields["MemAvailable"]


def percentile(values, q) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 2) if values else None


def run_one(size: int, source: str, swaps: int, directory: str, spare: bool) -> dict:
    versions = Versions(size, source, directory)
    if source == "file":
        for version in range(swaps + 1):
            versions.write(version)
    x = make_input(size)
    pool = workerpool.Pool(versions.loader(0), predict, workers=2, warmup=[x],
                           start_timeout=600, spare_zygote=spare)
    try:
        model_bytes = pool.stats(memory_usage=False)["model_bytes"]
        callers, sampler = Callers(pool, x), MemorySampler()
        callers.start()
        sampler.start()
        time.sleep(1.0)
        steady = (time.perf_counter(), time.perf_counter() + STEADY_S)
        time.sleep(STEADY_S)
        switch_s, all_new_s, swap_windows = [], [], []
        returned_s = []
        for version in range(1, swaps + 1):
            serving = pool._generation
            started = time.perf_counter()
            switch = SwitchWatch(pool, serving)
            pool.reload(versions.loader(version))
            returned = time.perf_counter()
            while pool.stats(memory_usage=False)["retiring_versions"]:
                time.sleep(0.002)
            done = time.perf_counter()
            switch_s.append(switch.at() - started)
            returned_s.append(returned - started)
            all_new_s.append(done - started)
            swap_windows.append((started, done))
            log(f"{size} MiB {source} spare={spare}: swap {version}: switch "
                f"{switch_s[-1]:.2f} s, all new {all_new_s[-1]:.2f} s")
            time.sleep(SPARE_READY_S if spare else 1.0)
        callers.join()
        sampler.stop.set()
        sampler.join()
        steady_lat = callers.latencies([steady])
        swap_lat = callers.latencies(swap_windows)
        return {
            "size_mib": size, "source": source, "spare_zygote": spare,
            "model_mib": mib(model_bytes),
            "swaps": swaps, "failed_requests": len(callers.failures),
            "load_s": round(statistics.median(versions.load_s[1:]), 3),
            "switch_s": round(statistics.median(switch_s), 3),
            "returned_s": round(statistics.median(returned_s), 3),
            "all_new_s": round(statistics.median(all_new_s), 3),
            "steady_p50_ms": percentile(steady_lat, 50),
            "steady_p99_ms": percentile(steady_lat, 99),
            "swap_p50_ms": percentile(swap_lat, 50),
            "swap_p99_ms": percentile(swap_lat, 99),
            "p99_ratio": round(percentile(swap_lat, 99) / percentile(steady_lat, 99), 2),
            "requests_steady": len(steady_lat), "requests_swapping": len(swap_lat),
            "steady_pss_mib": mib(sampler.median(*steady)),
            "swap_peak_pss_mib": mib(max(sampler.peak(a, b) for a, b in swap_windows)),
            "peak_over_steady_in_models": round(
                (max(sampler.peak(a, b) for a, b in swap_windows) - sampler.median(*steady))
                / model_bytes, 2),
            "system_peak_over_steady_in_models": round(
                (max(sampler.peak(a, b, 2) for a, b in swap_windows)
                 - sampler.median(*steady, 2)) / model_bytes, 2),
        }
    finally:
        pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="16,1024")
    parser.add_argument("--sources", default="memory,file")
    parser.add_argument("--swaps", type=int, default=3)
    parser.add_argument("--spare", default="off,on", help="spare_zygote settings to run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="wp-reload-bench-") as directory:
        for size in [int(s) for s in args.sizes.split(",")]:
            for source in args.sources.split(","):
                for spare in args.spare.split(","):
                    rows.append(run_one(size, source, args.swaps, directory, spare == "on"))
                    for name in os.listdir(directory):
                        os.remove(os.path.join(directory, name))
    columns = ["size_mib", "source", "spare_zygote", "model_mib", "swaps", "failed_requests",
               "load_s", "switch_s", "returned_s", "all_new_s", "steady_p50_ms",
               "steady_p99_ms", "swap_p50_ms", "swap_p99_ms", "p99_ratio", "steady_pss_mib",
               "swap_peak_pss_mib",
               "peak_over_steady_in_models", "system_peak_over_steady_in_models"]
    markdown = "\n".join([
        "# Hot swap: Pool.reload under load", "",
        f"2 workers, {CALLERS} callers submitting back to back, medians over the swaps; "
        "p99 during swaps vs steady (same run); total PSS sampled every 0.25 s. "
        "`.venv/bin/python bench/reload.py`", "",
        markdown_table(rows, columns)])
    emit(rows, "reload", markdown)


if __name__ == "__main__":
    main()
