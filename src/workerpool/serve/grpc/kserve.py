"""KServe Open Inference Protocol v2 over gRPC (``inference.GRPCInferenceService``), with
Triton's additions to the same service (its grpc_service.proto: proto/triton.py).

    ServerLive, ServerReady, ServerMetadata, ModelReady, ModelMetadata: as the HTTP routes
    ModelInfer: inputs[i] {name, datatype, shape, contents}  or  raw_input_contents[i]
                -> the data plane -> outputs in raw_output_contents, whatever the request
                   used (as Triton answers: clients read them there)
    ModelStreamInfer (Triton, bidirectional): each request of the stream runs as it arrives
                (several at once); every item its model yields is a response carrying the
                request's id and triton_final_response=false; with the request
                parameter triton_enable_empty_final_response, an empty response with
                triton_final_response=true ends it. An error is a response with
                error_message; the stream goes on. tritonclient.grpc's start_stream /
                async_stream_infer speak this.
    RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload (Triton): as the HTTP
                repository routes (load's parameters: version, source, config)
    ModelStatistics, ModelConfig (Triton's extensions): serving/triton.py's, as over HTTP
    SystemSharedMemoryStatus / Register / Unregister (Triton): serving/shared_memory.py, as
                over HTTP; an input or requested output whose parameters name a
                shared_memory_region is read (written) there by the worker, and has no raw
                contents entry. CudaSharedMemory*: none (register refused)
    Metadata: the data plane's KServe form parsed into the message (the HTTP route's fields)

Raw contents are little-endian bytes as in the HTTP binary extension (BYTES: 4-byte lengths
and the bytes), read as numpy views of the message without a copy.
"""

from __future__ import annotations

import asyncio

import numpy as np
from google.protobuf import json_format

from ...errors import OutputEncodeError
from ...ipc.regions import PlacedOutput
from ...serving.errors import BadRequest
from ...serving.kserve import buffer_of, from_binary
from ...serving.limits import check_shape, narrow
from ...serving.shared_memory import BYTE_SIZE, OFFSET, REGION, shared_input, shared_use
from ...signature import DATATYPES, datatype_of
from ...tensors import bytes_tensor
from .server import Front, failure

SERVICE = "inference.GRPCInferenceService"
# datatype -> the InferTensorContents field holding its typed values
CONTENTS_FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
                  "INT32": "int_contents", "INT64": "int64_contents",
                  "UINT8": "uint_contents", "UINT16": "uint_contents",
                  "UINT32": "uint_contents", "UINT64": "uint64_contents",
                  "FP32": "fp32_contents", "FP64": "fp64_contents",
                  "BYTES": "bytes_contents"}  # FP16 travels raw only


class KServeGrpc(Front):
    protocol = "kserve_grpc"
    descriptors = "triton"

    def methods(self) -> dict:
        def method(handler, name: str):
            return (handler, self.message(f"inference.{name}Request"),
                    self.message(f"inference.{name}Response"))

        return {SERVICE: {
            "ServerLive": method(self.server_live, "ServerLive"),
            "ServerReady": method(self.server_ready, "ServerReady"),
            "ServerMetadata": method(self.server_metadata, "ServerMetadata"),
            "ModelReady": method(self.model_ready, "ModelReady"),
            "ModelMetadata": method(self.model_metadata, "ModelMetadata"),
            "ModelInfer": method(self.model_infer, "ModelInfer"),
            "ModelStreamInfer": (self.model_stream_infer,
                                 self.message("inference.ModelInferRequest"),
                                 self.message("inference.ModelStreamInferResponse")),
            "ModelStatistics": method(self.model_statistics, "ModelStatistics"),
            "ModelConfig": method(self.model_config, "ModelConfig"),
            "RepositoryIndex": method(self.repository_index, "RepositoryIndex"),
            "RepositoryModelLoad": method(self.repository_load, "RepositoryModelLoad"),
            "RepositoryModelUnload": method(self.repository_unload, "RepositoryModelUnload"),
            **{f"{kind}SharedMemory{action}": method(
                getattr(self, f"{kind.lower()}_shared_memory_{action.lower()}"),
                f"{kind}SharedMemory{action}")
               for kind in ("System", "Cuda") for action in ("Status", "Register", "Unregister")},
        }}

    streaming = frozenset({"ModelStreamInfer"})

    async def server_live(self, request, context):
        return self.message("inference.ServerLiveResponse")(live=True)

    async def server_ready(self, request, context):
        return self.message("inference.ServerReadyResponse")(ready=self.plane.ready)

    async def server_metadata(self, request, context):
        metadata = dict(self.plane.server_metadata(), extensions=[
            "model_repository", "statistics", "model_configuration", "system_shared_memory"])
        return json_format.ParseDict(metadata,
                                     self.message("inference.ServerMetadataResponse")())

    async def model_ready(self, request, context):
        model = self.plane.model(request.name, request.version or None)
        return self.message("inference.ModelReadyResponse")(ready=model.ready)

    async def model_metadata(self, request, context):
        """The data plane's KServe metadata, parsed from its JSON form: the same fields
        the HTTP route answers."""
        return json_format.ParseDict(
            self.plane.model_metadata(request.name, request.version or None),
            self.message("inference.ModelMetadataResponse")())

    async def model_infer(self, request, context):
        with self.plane.inference(request.model_name, request.model_version or None,
                                  self.protocol) as call:
            inputs = decode_inputs(request, self.plane.max_tensor_bytes)
            placed = placed_outputs(request)
            outputs = await call.run(inputs, [o.name for o in request.outputs],
                                     timeout=context.time_remaining(), placed=placed)
            response = self.message("inference.ModelInferResponse")(
                model_name=call.model.name, model_version=call.model.version, id=request.id)
            return serialized_with_raw(response, encode_outputs(response, outputs, placed))


    async def model_stream_infer(self, requests, context):
        """Triton's ModelStreamInfer: see the module docstring. The call ending (the client
        closed it, its deadline) cancels what still runs: each stream's generator stops."""
        responses: asyncio.Queue = asyncio.Queue()
        running: set[asyncio.Task] = set()

        async def answer(request):
            try:
                async for response in self.stream_responses(request, context):
                    responses.put_nowait(response)
            except Exception as error:  # noqa: BLE001 - its answer; the stream goes on
                responses.put_nowait(self.stream_error(request, error))

        async def read():
            try:
                async for request in requests:
                    task = asyncio.create_task(answer(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                while running:
                    await asyncio.wait(set(running))
                responses.put_nowait(_END)
            except Exception as error:  # noqa: BLE001 - ends the call with its status
                responses.put_nowait(error)

        reader = asyncio.create_task(read())
        try:
            while (response := await responses.get()) is not _END:
                if isinstance(response, Exception):
                    raise response
                yield response
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    async def stream_responses(self, request, context):
        """The responses to one request of a ModelStreamInfer call, item by item."""
        response_class = self.message("inference.ModelInferResponse")
        final = request.parameters["triton_enable_empty_final_response"] \
            if "triton_enable_empty_final_response" in request.parameters else None
        with self.plane.inference(request.model_name, request.model_version or None,
                                  self.protocol) as call:
            inputs = decode_inputs(request, self.plane.max_tensor_bytes)
            if placed_outputs(request):
                raise BadRequest("a stream's outputs cannot be written into shared memory; "
                                 "ask for them without shared_memory_region")
            model = call.model
            items = call.stream(inputs, [o.name for o in request.outputs],
                                timeout=context.time_remaining())
            async for outputs in items:
                response = response_class(model_name=model.name, model_version=model.version,
                                          id=request.id)
                raw = encode_outputs(response, outputs)
                response.raw_output_contents.extend(map(bytes, raw))
                response.parameters["triton_final_response"].bool_param = False
                yield self.message("inference.ModelStreamInferResponse")(
                    infer_response=response)
            if final is not None and final.bool_param:
                response = response_class(model_name=model.name, model_version=model.version,
                                          id=request.id)
                response.parameters["triton_final_response"].bool_param = True
                yield self.message("inference.ModelStreamInferResponse")(
                    infer_response=response)

    def stream_error(self, request, error: BaseException):
        """A failed request of a stream, as Triton answers it: error_message, and the id."""
        _, message = failure(self, "ModelStreamInfer", error)
        return self.message("inference.ModelStreamInferResponse")(
            error_message=message,
            infer_response=self.message("inference.ModelInferResponse")(
                model_name=request.model_name, model_version=request.model_version,
                id=request.id))

    # -- Triton's statistics and model configuration extensions -------------------------
    async def model_statistics(self, request, context):
        statistics = await asyncio.to_thread(self.plane.statistics, request.name,
                                             request.version or None)
        return json_format.ParseDict(statistics,
                                     self.message("inference.ModelStatisticsResponse")())

    async def model_config(self, request, context):
        config = self.plane.config(request.name, request.version or None)
        return self.message("inference.ModelConfigResponse")(config=json_format.ParseDict(
            config, self.message("inference.ModelConfig")()))

    # -- the model repository (Triton's RPCs for KServe's repository extension) ----------
    async def repository_index(self, request, context):
        response = self.message("inference.RepositoryIndexResponse")()
        for row in self.plane.models.index(request.ready):
            response.models.add(**row)
        return response

    async def repository_load(self, request, context):
        await asyncio.to_thread(self.plane.models.load, request.model_name,
                                repository_parameters(request.parameters))
        return self.message("inference.RepositoryModelLoadResponse")()

    async def repository_unload(self, request, context):
        await asyncio.to_thread(self.plane.models.unload, request.model_name,
                                repository_parameters(request.parameters))
        return self.message("inference.RepositoryModelUnloadResponse")()


    # -- Triton's system shared memory extension (and no CUDA shared memory) -------------
    async def system_shared_memory_status(self, request, context):
        response = self.message("inference.SystemSharedMemoryStatusResponse")()
        for region in self.plane.shared_memory.status(request.name or None):
            response.regions[region["name"]].CopyFrom(self.message(
                "inference.SystemSharedMemoryStatusResponse.RegionStatus")(**region))
        return response

    async def system_shared_memory_register(self, request, context):
        self.plane.shared_memory.register(request.name, request.key, request.offset,
                                          request.byte_size)
        return self.message("inference.SystemSharedMemoryRegisterResponse")()

    async def system_shared_memory_unregister(self, request, context):
        self.plane.shared_memory.unregister(request.name or None)
        return self.message("inference.SystemSharedMemoryUnregisterResponse")()

    async def cuda_shared_memory_status(self, request, context):
        if request.name:
            raise BadRequest(f"Unable to find cuda shared memory region: '{request.name}'")
        return self.message("inference.CudaSharedMemoryStatusResponse")()

    async def cuda_shared_memory_register(self, request, context):
        raise BadRequest("CUDA shared memory is not supported: this server runs its models "
                         "on CPUs; register system shared memory instead")

    async def cuda_shared_memory_unregister(self, request, context):
        return self.message("inference.CudaSharedMemoryUnregisterResponse")()


_END = object()  # (ModelStreamInfer: every request of the call is answered)


def parameter_values(parameters) -> dict:
    """A map of InferParameter (or ModelRepositoryParameter) as plain values by name."""
    values = {}
    for name, parameter in parameters.items():
        kind = parameter.WhichOneof("parameter_choice")
        if kind is not None:
            values[name] = getattr(parameter, kind)
    return values


def placed_outputs(request) -> dict | None:
    """The requested outputs to be written into shared memory, by name (None: none)."""
    placed = {}
    for output in request.outputs:
        if output.parameters:
            use = shared_use(f"output {output.name!r}", parameter_values(output.parameters))
            if use is not None:
                placed[output.name] = use
    return placed or None


def repository_parameters(parameters) -> dict | None:
    """A repository request's parameters (ModelRepositoryParameter by name) as the plain
    values registry.load and unload take; None when there are none."""
    values = parameter_values(parameters)
    if isinstance(values.get("config"), bytes):
        values["config"] = values["config"].decode()
    return values or None


def decode_inputs(request, max_tensor_bytes: int) -> dict:
    """A ModelInferRequest's inputs by name: arrays (BYTES: object arrays of bytes).
    ``max_tensor_bytes``: the bound of limits.check_shape (--max-request-bytes)."""
    if not request.inputs:
        raise BadRequest("the request has no inputs")
    raw = request.raw_input_contents
    shared = {tensor.name: use for tensor in request.inputs if tensor.parameters and (
        use := shared_use(f"input {tensor.name!r}", parameter_values(tensor.parameters)))}
    carried = len(request.inputs) - len(shared)  # (raw contents: one per input not shared)
    if raw and len(raw) != carried:
        raise BadRequest(f"raw_input_contents has {len(raw)} entries for {carried} inputs "
                         "not in shared memory; give one per input, in order")
    decoded, index = {}, 0
    for tensor in request.inputs:
        name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
        if not name:
            raise BadRequest("an input has no name")
        if name in decoded:
            raise BadRequest(f"input {name!r} is given twice")
        if datatype not in DATATYPES:
            raise BadRequest(f"input {name!r}: datatype {datatype!r} is not one of "
                             f"{sorted(DATATYPES)}")
        if any(d < 0 for d in shape):
            raise BadRequest(f"input {name!r}: shape {shape} has a negative dimension")
        count = check_shape(name, shape, DATATYPES[datatype].itemsize, max_tensor_bytes)
        if name in shared:
            decoded[name] = shared_input(name, datatype, shape, shared[name])
        elif raw:
            if tensor.HasField("contents"):
                raise BadRequest(f"input {name!r}: give its data either in contents or in "
                                 "raw_input_contents, not both")
            decoded[name] = from_binary(name, datatype, shape, count, memoryview(raw[index]))
            index += 1
        else:
            decoded[name] = _from_contents(name, datatype, shape, count, tensor.contents)
    return decoded


def _from_contents(name: str, datatype: str, shape: list, count: int, contents):
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise BadRequest(f"input {name!r}: {datatype} has no typed contents; send it in "
                         "raw_input_contents")
    values = getattr(contents, field)
    if len(values) != count:
        raise BadRequest(f"input {name!r}: shape {shape} needs {count} values, "
                         f"{field} has {len(values)}")
    if datatype == "BYTES":
        return bytes_tensor(list(values), shape)
    dtype = DATATYPES[datatype]
    if field in ("int_contents", "uint_contents") and dtype.itemsize < 4:
        return narrow(name, values, dtype, datatype).reshape(shape)
    return np.array(values, dtype=dtype).reshape(shape)


def encode_outputs(response, arrays: dict, placed: dict | None = None) -> list:
    """Named outputs described in a ModelInferResponse; their contents returned, in order,
    as buffers (views of the arrays where they can be) for ``raw_output_contents``: always
    raw, as Triton answers (clients that send typed contents read the answer there too).
    Those written into shared memory (``placed``: their regions by name) are described
    only, with no raw entry (as Triton does)."""
    try:
        datatypes = {name: datatype_of(array.dtype) for name, array in arrays.items()}
    except ValueError as exc:
        raise OutputEncodeError(f"the model's output cannot be sent: {exc}") from None
    raw = []
    for name, array in arrays.items():
        datatype = datatypes[name]
        tensor = response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        if type(array) is PlacedOutput:
            use = placed[name]
            tensor.parameters[REGION].string_param = use.region
            tensor.parameters[BYTE_SIZE].int64_param = array.nbytes
            if use.offset:
                tensor.parameters[OFFSET].int64_param = use.offset
        else:
            raw.append(buffer_of(array, datatype))
    return raw


def serialized_with_raw(response, raw: list) -> bytes:
    """``response`` serialized with ``raw`` as its ``raw_output_contents``: the tensors'
    bytes are copied once, into the answer. (Set on the message, each would be copied into
    a bytes and then again by the serializer: 0.22 s per 64 MiB here, against 0.035.) A
    repeated field's entries may follow the rest of the message on the wire."""
    field = response.DESCRIPTOR.fields_by_name["raw_output_contents"].number
    tag = _varint(field << 3 | 2)  # (wire type 2: length-delimited)
    parts = [response.SerializeToString()]
    for buffer in raw:
        parts += [tag, _varint(memoryview(buffer).nbytes), buffer]
    return b"".join(parts)


def _varint(value: int) -> bytes:
    """Protobuf's base-128 varint (protobuf's own encoder is internal API)."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
