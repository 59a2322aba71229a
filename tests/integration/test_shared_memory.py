"""Triton's system shared memory extension, as Triton's shm client examples use it: the
client creates POSIX shared memory (tritonclient.utils.shared_memory), registers it, and
names regions for inputs and outputs; the worker reads the inputs in place and writes the
outputs there, so the tensors never pass through the server process (its RSS and CPU are
measured against the same tensor sent as binary HTTP). Over HTTP and gRPC, sync, async and
aio clients; regions unregistered and unlinked while a request uses them; the API key;
the refusals (unknown region, bad bounds, a region too small for an output); and through
``--http-workers`` front ends.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import textwrap
import uuid

import numpy as np
import psutil
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_grpc_aio
import tritonclient.http as triton_http
import tritonclient.http.aio as triton_http_aio
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import (InferenceServerException, serialize_byte_tensor,
                               serialized_byte_size)

from test_serve import Server, ready_server
from test_triton import SIMPLE, SIMPLE_STRING, A, B, model_table, simple_inputs
from triton_models import WAITING_SIZE

pytestmark = pytest.mark.module_pool

KEY = "s3cret"


def auth() -> dict:
    """The API key's header, a new dict each call: tritonclient's infer writes its
    Inference-Header-Content-Length into the dict it is given."""
    return {"authorization": f"Bearer {KEY}"}  # (gRPC metadata keys are lowercase)


MIB = 1 << 20
BIG = 64 * MIB

CONFIG = textwrap.dedent("""
    [server]
    grpc_port = 0
    api_key = "{key}"
    max_request_bytes = {max_request}
    """).format(key=KEY, max_request=BIG + MIB) + SIMPLE + SIMPLE_STRING + textwrap.dedent("""
    [models.scale]
    source = "triton_models:load"
    predict = "triton_models:scale"
    workers = 1
    inputs = [{name = "INPUT0", datatype = "FP32", shape = [-1]}]
    outputs = [{name = "OUTPUT0", datatype = "FP32", shape = [-1]}]

    [models.slow_sum]
    source = "triton_models:load"
    predict = "triton_models:slow_sum"
    workers = 1
    inputs = [{name = "INPUT0", datatype = "INT64", shape = [-1]}]
    outputs = [{name = "OUTPUT0", datatype = "INT64", shape = [1]}]
""") + model_table("simple_inline", "add_sub", "INT32").replace("workers = 1", "inline = true")


def start(tmp_path_factory, *args) -> Server:
    folder = tmp_path_factory.mktemp("shm")
    (folder / "serve.toml").write_text(CONFIG)
    (folder / "signals").mkdir()
    server = ready_server(["--config", str(folder / "serve.toml"), *args], grpc_lines=1,
                          env={"WP_TEST_SIGNALS": str(folder / "signals")})
    server.signals = folder / "signals"
    return server


@pytest.fixture(scope="module", autouse=True)
def resource_tracker():
    """tritonclient's regions are multiprocessing SharedMemory objects, whose first use
    starts multiprocessing's resource tracker process: ours to stop when the module ends."""
    yield
    from multiprocessing import resource_tracker as tracker

    tracker._resource_tracker._stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start(tmp_path_factory)
    yield server
    assert server.stop() == 0, server.stderr()


def client(module, server):
    if module in (triton_http, triton_http_aio):
        return module.InferenceServerClient(server.address)
    return module.InferenceServerClient(server.grpc["KServe v2"])


class Regions:
    """Shared memory a test creates (unique keys), destroyed afterwards whatever happens."""

    def __init__(self):
        self.handles = []

    def create(self, name: str, size: int):
        handle = shm.create_shared_memory_region(name, f"/wp_test_{uuid.uuid4().hex}", size)
        self.handles.append(handle)
        return handle

    def destroy(self, handle) -> None:
        shm.destroy_shared_memory_region(handle)
        self.handles.remove(handle)

    def close(self):
        for handle in list(self.handles):
            self.destroy(handle)


@pytest.fixture
def regions():
    made = Regions()
    yield made
    made.close()


def key_of(handle) -> str:
    return handle._shm_key


def simple_request(module, input_region: str, output_region: str):
    """Triton's simple_*_shm_client: INPUT0 and INPUT1 one after the other in one region,
    OUTPUT0 and OUTPUT1 likewise in another."""
    size = A.nbytes
    inputs = [module.InferInput("INPUT0", [1, 16], "INT32"),
              module.InferInput("INPUT1", [1, 16], "INT32")]
    inputs[0].set_shared_memory(input_region, size)
    inputs[1].set_shared_memory(input_region, size, offset=size)
    outputs = [module.InferRequestedOutput("OUTPUT0"), module.InferRequestedOutput("OUTPUT1")]
    outputs[0].set_shared_memory(output_region, size)
    outputs[1].set_shared_memory(output_region, size, offset=size)
    return inputs, outputs


def simple_regions(regions: Regions, prefix: str):
    inputs = regions.create(f"{prefix}_input", 2 * A.nbytes)
    outputs = regions.create(f"{prefix}_output", 2 * A.nbytes)
    shm.set_shared_memory_region(inputs, [A, B])
    return inputs, outputs


def check_simple(result, output_handle):
    for index, (name, expected) in enumerate((("OUTPUT0", A + B), ("OUTPUT1", A - B))):
        described = result.get_output(name)
        shape = list(described["shape"] if isinstance(described, dict) else described.shape)
        datatype = described["datatype"] if isinstance(described, dict) else described.datatype
        assert (shape, datatype) == ([1, 16], "INT32")
        got = shm.get_contents_as_numpy(output_handle, np.int32, shape, offset=index * A.nbytes)
        np.testing.assert_array_equal(got, expected)


# -- Triton's shm client examples, each client kind ------------------------------------------
@pytest.mark.parametrize("module", [triton_http, triton_grpc], ids=["http", "grpc"])
def test_simple_in_shared_memory_sync_and_async(server, regions, module):
    triton = client(module, server)
    try:
        triton.unregister_system_shared_memory(headers=auth())
        triton.unregister_cuda_shared_memory(headers=auth())
        in_handle, out_handle = simple_regions(regions, module.__name__.replace(".", "_"))
        triton.register_system_shared_memory("input_data", key_of(in_handle), 2 * A.nbytes,
                                             headers=auth())
        triton.register_system_shared_memory("output_data", key_of(out_handle), 2 * A.nbytes,
                                             headers=auth())
        status = triton.get_system_shared_memory_status(headers=auth())
        if module is triton_grpc:
            status = [{"name": r.name, "key": r.key, "offset": r.offset,
                       "byte_size": r.byte_size} for r in status.regions.values()]
        assert sorted(status, key=lambda r: r["name"]) == [
            {"name": "input_data", "key": key_of(in_handle), "offset": 0,
             "byte_size": 2 * A.nbytes},
            {"name": "output_data", "key": key_of(out_handle), "offset": 0,
             "byte_size": 2 * A.nbytes}]

        inputs, outputs = simple_request(module, "input_data", "output_data")
        result = triton.infer("simple", inputs, outputs=outputs, headers=auth())
        check_simple(result, out_handle)
        described = result.get_output("OUTPUT0")
        if module is triton_http:  # its data is in the region only
            assert "data" not in described and "binary_data_size" not in described.get(
                "parameters", {}), described
        else:
            assert len(result.get_response().raw_output_contents) == 0

        shm.set_shared_memory_region(out_handle, [np.zeros((2, 16), np.int32)])
        if module is triton_http:
            result = triton.async_infer("simple", inputs, outputs=outputs,
                                        headers=auth()).get_result()
        else:
            answers = []
            triton.async_infer("simple", inputs,
                               lambda result, error: answers.append((result, error)),
                               outputs=outputs, headers=auth())
            assert _wait_for(lambda: answers)
            result, error = answers[0]
            assert error is None, error
        check_simple(result, out_handle)

        triton.unregister_system_shared_memory("input_data", headers=auth())
        status = triton.get_system_shared_memory_status(headers=auth())
        names = [r["name"] for r in status] if module is triton_http else list(status.regions)
        assert names == ["output_data"]
        with pytest.raises(InferenceServerException,
                           match="Unable to find system shared memory region: 'input_data'"):
            triton.infer("simple", inputs, outputs=outputs, headers=auth())
        triton.unregister_system_shared_memory(headers=auth())
        status = triton.get_system_shared_memory_status(headers=auth())
        cuda = triton.get_cuda_shared_memory_status(headers=auth())
        if module is triton_grpc:
            status, cuda = list(status.regions), list(cuda.regions)
        assert status == [] and cuda == []
    finally:
        triton.close()


@pytest.mark.parametrize("module", [triton_http_aio, triton_grpc_aio],
                         ids=["http-aio", "grpc-aio"])
def test_simple_in_shared_memory_aio(server, regions, module):
    in_handle, out_handle = simple_regions(regions, module.__name__.replace(".", "_"))

    async def run():
        triton = client(module, server)
        try:
            await triton.register_system_shared_memory(
                "aio_input", key_of(in_handle), 2 * A.nbytes, headers=auth())
            await triton.register_system_shared_memory(
                "aio_output", key_of(out_handle), 2 * A.nbytes, headers=auth())
            inputs, outputs = simple_request(module, "aio_input", "aio_output")
            results = await asyncio.gather(*[
                triton.infer("simple", inputs, outputs=outputs, headers=auth())
                for _ in range(4)])
            await triton.unregister_system_shared_memory(headers=auth())
            return results
        finally:
            await triton.close()

    for result in asyncio.run(run()):
        check_simple(result, out_handle)


@pytest.mark.parametrize("module", [triton_http, triton_grpc], ids=["http", "grpc"])
def test_bytes_tensors_in_shared_memory(server, regions, module):
    """Triton's simple_*_shm_string_client: BYTES tensors serialized into the region
    (4-byte lengths, then the bytes), outputs serialized back by the worker."""
    a = np.array([str(v).encode() for v in range(16)], dtype=object).reshape(1, 16)
    b = np.array([b"1"] * 16, dtype=object).reshape(1, 16)
    serialized = [serialize_byte_tensor(a), serialize_byte_tensor(b)]
    sizes = [serialized_byte_size(s) for s in serialized]
    in_handle = regions.create("strings_in", sum(sizes))
    out_handle = regions.create("strings_out", 1024)
    shm.set_shared_memory_region(in_handle, serialized)
    triton = client(module, server)
    try:
        triton.register_system_shared_memory("strings_in", key_of(in_handle), sum(sizes),
                                             headers=auth())
        triton.register_system_shared_memory("strings_out", key_of(out_handle), 1024,
                                             headers=auth())
        inputs = [module.InferInput("INPUT0", [1, 16], "BYTES"),
                  module.InferInput("INPUT1", [1, 16], "BYTES")]
        inputs[0].set_shared_memory("strings_in", sizes[0])
        inputs[1].set_shared_memory("strings_in", sizes[1], offset=sizes[0])
        outputs = [module.InferRequestedOutput("OUTPUT0"),
                   module.InferRequestedOutput("OUTPUT1")]
        outputs[0].set_shared_memory("strings_out", 512)
        outputs[1].set_shared_memory("strings_out", 512, offset=512)
        result = triton.infer("simple_string", inputs, outputs=outputs, headers=auth())
        expected = {"OUTPUT0": [str(v + 1).encode() for v in range(16)],
                    "OUTPUT1": [str(v - 1).encode() for v in range(16)]}
        for index, name in enumerate(("OUTPUT0", "OUTPUT1")):
            got = shm.get_contents_as_numpy(out_handle, np.object_, [1, 16],
                                            offset=index * 512)
            assert got.reshape(-1).tolist() == expected[name]
        assert result.get_output("OUTPUT0") is not None
    finally:
        triton.unregister_system_shared_memory(headers=auth())
        triton.close()


# -- a large tensor: not through the server ------------------------------------------------
def _server_cost(server, call) -> tuple[float, int]:
    """(CPU seconds, growth of peak RSS in bytes) of the server's own process over call()."""
    process = psutil.Process(server.process.pid)
    before_cpu, before_peak = sum(process.cpu_times()[:2]), _peak_rss(process)
    call()
    return sum(process.cpu_times()[:2]) - before_cpu, _peak_rss(process) - before_peak


def _peak_rss(process: psutil.Process) -> int:
    with open(f"/proc/{process.pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_large_tensor_goes_around_the_server(server, regions):
    """64 MiB in and 64 MiB out through shared memory: right values, and the server's
    process neither grows nor works for them; the same tensor as binary HTTP, afterwards
    (its peak RSS would hide the first), costs the server its copies."""
    x = np.random.default_rng(0).standard_normal(BIG // 4).astype(np.float32)
    in_handle = regions.create("big_in", BIG)
    out_handle = regions.create("big_out", BIG)
    shm.set_shared_memory_region(in_handle, [x])
    triton = triton_http.InferenceServerClient(server.address, network_timeout=120)
    try:
        triton.register_system_shared_memory("big_in", key_of(in_handle), BIG,
                                             headers=auth())
        triton.register_system_shared_memory("big_out", key_of(out_handle), BIG,
                                             headers=auth())
        inputs = [triton_http.InferInput("INPUT0", [x.size], "FP32")]
        inputs[0].set_shared_memory("big_in", BIG)
        outputs = [triton_http.InferRequestedOutput("OUTPUT0")]
        outputs[0].set_shared_memory("big_out", BIG)
        triton.infer("scale", inputs, outputs=outputs, headers=auth())  # (warm)
        shm.set_shared_memory_region(out_handle, [np.zeros_like(x)])

        shared_cpu, shared_growth = _server_cost(server, lambda: triton.infer(
            "scale", inputs, outputs=outputs, headers=auth()))
        got = shm.get_contents_as_numpy(out_handle, np.float32, [x.size])
        np.testing.assert_array_equal(got, x * np.float32(2))

        binary_inputs = [triton_http.InferInput("INPUT0", [x.size], "FP32")]
        binary_inputs[0].set_data_from_numpy(x, binary_data=True)
        binary_outputs = [triton_http.InferRequestedOutput("OUTPUT0", binary_data=True)]
        answers = []
        binary_cpu, binary_growth = _server_cost(server, lambda: answers.append(triton.infer(
            "scale", binary_inputs, outputs=binary_outputs, headers=auth())))
        np.testing.assert_array_equal(answers[0].as_numpy("OUTPUT0"), x * np.float32(2))
    finally:
        triton.unregister_system_shared_memory(headers=auth())
        triton.close()
    # The server's copy of the tensor is what shared memory saves: its peak RSS may not grow
    # by a quarter of the tensor, where binary HTTP holds the body and the answer.
    print(f"server: shared memory {shared_cpu:.3f} s CPU, peak RSS +{shared_growth} B; "
          f"binary HTTP {binary_cpu:.3f} s, +{binary_growth} B")
    assert shared_growth < BIG // 4, (shared_growth, binary_growth)
    assert binary_growth > BIG // 2, binary_growth  # (the measure can see a copy)
    assert shared_cpu < binary_cpu / 4, (shared_cpu, binary_cpu)


# -- regions that go away -----------------------------------------------------------------
def test_unregister_and_unlink_while_a_request_uses_the_region(server, regions):
    """The worker mapped the region before predict began: unregistering it and unlinking
    the object meanwhile changes nothing for that request; a later request naming the
    region is refused with Triton's words, one naming a registered but unlinked object
    with ours; the model keeps serving."""
    x = np.arange(WAITING_SIZE, dtype=np.int64)
    handle = regions.create("busy", x.nbytes)
    shm.set_shared_memory_region(handle, [x])
    triton = triton_http.InferenceServerClient(server.address)
    try:
        triton.register_system_shared_memory("busy", key_of(handle), x.nbytes,
                                             headers=auth())
        inputs = [triton_http.InferInput("INPUT0", [x.size], "INT64")]
        inputs[0].set_shared_memory("busy", x.nbytes)
        with concurrent.futures.ThreadPoolExecutor(1) as thread:
            # (tritonclient.http's async_infer is a gevent greenlet: it would not run
            # while this thread waits for it)
            pending = thread.submit(_infer_alone, server, "slow_sum", inputs)
            assert _wait_for(lambda: (server.signals / "started").exists() or pending.done())
            assert not pending.done(), pending.result()  # predict waits, the region mapped
            triton.unregister_system_shared_memory("busy", headers=auth())
            regions.destroy(handle)  # unlinked: the name is gone
            (server.signals / "go").touch()
            assert pending.result().as_numpy("OUTPUT0").tolist() == [int(x.sum())]

        with pytest.raises(InferenceServerException, match="Unable to find system shared"):
            triton.infer("slow_sum", inputs, headers=auth())
        # registered, then unlinked before use: the worker cannot open it, and says so
        again = regions.create("again", x.nbytes)
        shm.set_shared_memory_region(again, [x])
        triton.register_system_shared_memory("busy", key_of(again), x.nbytes,
                                             headers=auth())
        regions.destroy(again)
        with pytest.raises(InferenceServerException, match="does not exist") as refused:
            triton.infer("slow_sum", inputs, headers=auth())
        assert refused.value.status() == "400"
        triton.unregister_system_shared_memory(headers=auth())
        plain = [triton_http.InferInput("INPUT0", [4], "INT64")]
        plain[0].set_data_from_numpy(np.arange(4, dtype=np.int64))
        assert triton.infer("slow_sum", plain, headers=auth()).as_numpy(
            "OUTPUT0").tolist() == [6]
        assert _crashes(server, "slow_sum") == 0  # nothing crashed a worker
    finally:
        triton.unregister_system_shared_memory(headers=auth())
        triton.close()


def _infer_alone(server, model: str, inputs):
    """One inference on a client of its own (for another thread)."""
    triton = triton_http.InferenceServerClient(server.address)
    try:
        return triton.infer(model, inputs, headers=auth())
    finally:
        triton.close()


def _crashes(server, model: str) -> int:
    status, _, body = server.get("/status", auth())
    assert status == 200, body
    (entry,) = [m for m in json.loads(body)["models"] if m["name"] == model]
    return entry["crashes"]


def _wait_for(condition, timeout: float = 30) -> bool:
    from test_serve import wait_until

    return wait_until(condition, timeout)


# -- refusals -----------------------------------------------------------------------------
@pytest.mark.parametrize("module", [triton_http, triton_grpc], ids=["http", "grpc"])
def test_registration_and_use_are_checked(server, regions, module):
    handle = regions.create("checked", 256)
    triton = client(module, server)

    def refused(match, call, *args, **kwargs):
        with pytest.raises(InferenceServerException, match=match):
            call(*args, headers=auth(), **kwargs)

    try:
        refused("does not exist", triton.register_system_shared_memory, "r", "/wp_no_such",
                64)
        refused("not a POSIX shared-memory name", triton.register_system_shared_memory, "r",
                "/../../etc/passwd", 64)
        refused("holds 256 bytes", triton.register_system_shared_memory, "r",
                key_of(handle), 200, offset=100)
        triton.register_system_shared_memory("r", key_of(handle), 96, offset=64,
                                             headers=auth())
        refused("already in manager", triton.register_system_shared_memory, "r",
                key_of(handle), 64)
        refused("Unable to find system shared memory region: 'nope'",
                triton.get_system_shared_memory_status, "nope")
        refused("CUDA shared memory is not supported", triton.register_cuda_shared_memory,
                "c", base64.b64encode(b"handle"), 0, 64)

        inputs, outputs = simple_request(module, "r", "r")
        refused("Invalid offset \\+ byte size", triton.infer, "simple", inputs,
                outputs=outputs)  # INPUT1 at 64 + 64 bytes passes the region's 96
        small = [module.InferInput("INPUT0", [1, 16], "INT32"),
                 module.InferInput("INPUT1", [1, 16], "INT32")]
        small[0].set_shared_memory("r", 32)
        small[1].set_shared_memory("r", 64)
        refused("unexpected shared-memory byte size 32, expecting 64", triton.infer,
                "simple", small)
        fine = simple_inputs(module)
        tight = [module.InferRequestedOutput("OUTPUT0")]
        tight[0].set_shared_memory("r", 16)  # 64 bytes will not fit in 16
        refused("takes 64 bytes but its shared memory gives it 16", triton.infer, "simple",
                fine, outputs=tight)
        check = triton.infer("simple", simple_inputs(module), headers=auth())
        np.testing.assert_array_equal(check.as_numpy("OUTPUT0"), A + B)  # still serving
    finally:
        triton.unregister_system_shared_memory(headers=auth())
        triton.close()


@pytest.mark.parametrize("module", [triton_http, triton_grpc], ids=["http", "grpc"])
def test_shared_memory_needs_the_api_key(server, regions, module):
    handle = regions.create("keyed", 64)
    triton = client(module, server)
    try:
        for call in (lambda h: triton.register_system_shared_memory(
                         "keyed", key_of(handle), 64, headers=h),
                     lambda h: triton.get_system_shared_memory_status(headers=h),
                     lambda h: triton.unregister_system_shared_memory(headers=h)):
            with pytest.raises(InferenceServerException, match="API key"):
                call({})
            with pytest.raises(InferenceServerException, match="API key"):
                call({"authorization": "Bearer wrong"})
        triton.register_system_shared_memory("keyed", key_of(handle), 64, headers=auth())
        status = triton.get_system_shared_memory_status("keyed", headers=auth())
        assert (status[0]["name"] if module is triton_http else list(status.regions)[0]) \
            == "keyed"
    finally:
        triton.unregister_system_shared_memory(headers=auth())
        triton.close()


# -- through front-end processes ----------------------------------------------------------
@pytest.mark.parametrize("module", [triton_http, triton_grpc], ids=["http", "grpc"])
def test_an_inline_model_reads_and_writes_regions_in_the_servers_process(server, regions,
                                                                         module):
    triton = client(module, server)
    prefix = f"inline_{module.__name__.replace('.', '_')}"
    try:
        in_handle, out_handle = simple_regions(regions, prefix)
        triton.register_system_shared_memory(f"{prefix}_in", key_of(in_handle), 2 * A.nbytes,
                                             headers=auth())
        triton.register_system_shared_memory(f"{prefix}_out", key_of(out_handle),
                                             2 * A.nbytes, headers=auth())
        inputs, outputs = simple_request(module, f"{prefix}_in", f"{prefix}_out")
        check_simple(triton.infer("simple_inline", inputs, outputs=outputs, headers=auth()),
                     out_handle)
    finally:
        triton.unregister_system_shared_memory(headers=auth())
        triton.close()


def test_shared_memory_through_http_workers(tmp_path_factory, regions):
    """Front ends decode the request and relay the regions' names; the server's process
    resolves them against its one table (registered through a front end too). An inline
    model too: a front end holds its own copy, but a request naming regions goes to the
    server's process, which holds them."""
    server = start(tmp_path_factory, "--http-workers", "2")
    try:
        in_handle, out_handle = simple_regions(regions, "relay")
        triton = triton_http.InferenceServerClient(server.address)
        try:
            triton.register_system_shared_memory("relay_in", key_of(in_handle),
                                                 2 * A.nbytes, headers=auth())
            triton.register_system_shared_memory("relay_out", key_of(out_handle),
                                                 2 * A.nbytes, headers=auth())
            inputs, outputs = simple_request(triton_http, "relay_in", "relay_out")
            for model in ("simple", "simple_inline"):
                for _ in range(4):  # (both front ends, whichever the connection lands on)
                    shm.set_shared_memory_region(out_handle, [np.zeros((2, 16), np.int32)])
                    check_simple(triton.infer(model, inputs, outputs=outputs,
                                              headers=auth()), out_handle)
        finally:
            triton.close()
    finally:
        assert server.stop() == 0, server.stderr()
