"""Freezing a traced TensorFlow function into a GraphDef whose weights are memory-mapped.

    function.graph ── calls into nested functions (SavedModel signatures, tf.Module methods
    │                 calling other tf.functions)? Grappler's function optimizer inlines
    │                 them: one flat graph, still holding no weight, only variable handles
    ├─ each captured variable's placeholder ──> ImmutableConst over a sealed memfd of its
    │     value (read one variable at a time); the reads of it (ReadVariableOp, through any
    │     Identity/Enter/Switch/Merge on the way) become plain tensors of its dtype
    └─ each big Const ──> ImmutableConst the same way

TensorFlow's own freezer (convert_variables_to_constants_v2) puts every weight into the
GraphDef first: ~10x the model in peak memory at 1 GiB, and no GraphDef may pass 2 GB.
"""

from __future__ import annotations

import collections

import numpy as np

from ..errors import EncodeError
from .. import memfd
from .saved_model import TensorSlice

MIN_MAPPED_BYTES = 4096  # smaller constants stay inline in the GraphDef

# Ops that pass a resource handle along unchanged (control flow after lowering, inlined
# function arguments): they carry the value instead once the handle becomes a tensor.
_PASS_THROUGH = {"Identity", "Enter", "Exit", "Switch", "Merge", "NextIteration"}
_COPY_HINT = ("Pass tf_engine='copy' (Keras models) to load a private copy in each worker "
              "instead")


def flat_graph_def(function):
    """``function``'s GraphDef with every call into its function library inlined."""
    graph_def = function.graph.as_graph_def()
    if not graph_def.library.function:
        return graph_def
    from tensorflow.core.protobuf import config_pb2, meta_graph_pb2
    from tensorflow.python.grappler import tf_optimizer

    for nested in graph_def.library.function:
        if "api_implements" in nested.attr:  # a second implementation blocks inlining
            del nested.attr["api_implements"]
    meta_graph = meta_graph_pb2.MetaGraphDef()
    meta_graph.graph_def.CopyFrom(graph_def)
    meta_graph.collection_def["train_op"].node_list.value.extend(
        t.name for t in [*function.inputs, *function.outputs])  # what Grappler must keep
    config = config_pb2.ConfigProto()
    config.graph_options.rewrite_options.min_graph_nodes = -1  # small graphs too
    config.graph_options.rewrite_options.optimizers.append("function")
    try:
        flat = tf_optimizer.OptimizeGraph(config, meta_graph)
    except Exception as exc:
        raise EncodeError(f"cannot inline the model's nested functions: {exc}. "
                          f"{_COPY_HINT}") from exc
    calls = [node.name for node in flat.node if node.op in _CALL_OPS]
    if calls:
        raise EncodeError(f"cannot inline the model's nested function calls {calls[:3]}. "
                          f"{_COPY_HINT}")
    return flat


_CALL_OPS = {"PartitionedCall", "StatefulPartitionedCall"}


def map_captures(function, graph_def, layout, value_of=None,
                 mapped: dict | None = None) -> set[str]:
    """Turn each captured variable (or captured eager tensor) of ``function`` into a
    constant of its value: an ImmutableConst over a sealed memfd of its own when big. Values
    are read one at a time through ``value_of(variable)`` (default: ``variable.numpy()``), so
    the parent never holds a second copy of the whole model. ``mapped`` (id of a variable ->
    its region), shared by the functions of one model, maps a variable that several of them
    capture (a SavedModel's signatures) once. Returns the captured placeholders' names
    (inputs the caller no longer feeds)."""
    import tensorflow as tf

    variables = {id(v.handle): v for v in function.variables}
    captured = {}
    for external, internal in zip(function.graph.external_captures,
                                  function.graph.internal_captures):
        captured[internal.op.name] = variables.get(id(external), external)
    nodes = {node.name: node for node in graph_def.node}
    readers = _data_consumers(graph_def)
    used = {source.lstrip("^").split(":")[0] for node in graph_def.node
            for source in node.input}
    unused = set()
    for name, source in captured.items():
        node = nodes.get(name)
        if node is None:
            continue
        if name not in used:
            unused.add(name)  # read by nothing that serves (pruned): no memfd for it
            continue
        if isinstance(source, tf.Variable):
            _retype_reads(node, readers, source.dtype.as_datatype_enum, graph_def)
            if mapped is not None and id(source) in mapped:
                as_mapped(node, *mapped[id(source)])
                continue
            value = value_of(source) if value_of is not None else source.numpy()
        elif source.dtype == tf.resource:
            raise EncodeError(
                f"cannot freeze: the model captures a resource that is not a variable "
                f"({node.name!r}: a lookup table, a dataset?). {_COPY_HINT}")
        else:
            value = source.numpy()
        region = as_constant(node, value, layout)
        if region is not None and mapped is not None and isinstance(source, tf.Variable):
            mapped[id(source)] = region
        del value  # before the next one is read
    if unused:
        kept = [node for node in graph_def.node if node.name not in unused]
        del graph_def.node[:]
        graph_def.node.extend(kept)
    return set(captured)


def _data_consumers(graph_def) -> dict:
    """name of a node -> the nodes reading one of its outputs (control edges left out)."""
    readers = collections.defaultdict(list)
    for node in graph_def.node:
        for source in node.input:
            if not source.startswith("^"):
                readers[source.split(":")[0]].append(node)
    return readers


def _retype_reads(handle_node, readers, dtype: int, graph_def) -> None:
    """Everything that reads the variable behind ``handle_node`` reads its value instead:
    pass-through ops change their type, reads and gathers become their plain forms."""
    pending, done = [handle_node.name], set()
    while pending:
        name = pending.pop()
        for node in readers.get(name, ()):
            if node.name in done:
                continue
            done.add(node.name)
            if node.op in _PASS_THROUGH:
                node.attr["T"].type = dtype
                pending.append(node.name)
            elif node.op == "ReadVariableOp":
                node.op = "Identity"
                node.ClearField("attr")
                node.attr["T"].type = dtype
            elif node.op in ("ResourceGather", "ResourceGatherNd"):
                _as_plain_gather(node, dtype, graph_def)
            else:
                raise EncodeError(
                    f"cannot freeze: op {node.name!r} ({node.op}) uses a variable other than "
                    f"by reading or gathering it. {_COPY_HINT}")


def _as_plain_gather(node, dtype: int, graph_def) -> None:
    """ResourceGather(handle, indices) -> GatherV2(value, indices, axis 0) (and the Nd
    form -> GatherNd), the rewrite TensorFlow's own freezer makes."""
    indices_type = node.attr["Tindices"].type
    batch_dims = node.attr["batch_dims"].i if "batch_dims" in node.attr else 0
    node.ClearField("attr")
    node.attr["Tparams"].type = dtype
    node.attr["Tindices"].type = indices_type
    if node.op == "ResourceGatherNd":
        node.op = "GatherNd"
        return
    node.op = "GatherV2"
    axis = graph_def.node.add(name=f"{node.name}/workerpool_axis", op="Const")
    axis.attr["dtype"].type = 3  # DT_INT32
    axis.attr["value"].tensor.dtype = 3
    axis.attr["value"].tensor.int_val.append(batch_dims)
    node.input.insert(2, axis.name)
    node.attr["Taxis"].type = 3
    node.attr["batch_dims"].i = batch_dims


def map_constants(graph_def, layout) -> None:
    """Every big Const node's bytes move into a sealed memfd: it becomes an ImmutableConst."""
    import tensorflow as tf

    for node in graph_def.node:
        if node.op != "Const":
            continue
        value = tf.make_ndarray(node.attr["value"].tensor)
        if value.nbytes >= MIN_MAPPED_BYTES and value.dtype != object:
            as_constant(node, value, layout)


def as_constant(node, value, layout) -> tuple | None:
    """``node`` becomes a constant holding ``value`` (a numpy array, or a TensorSlice of a
    file): an ImmutableConst reading a sealed memfd of its own when big (a file's bytes go
    there without passing through this process), an inline Const otherwise. Returns the
    region as ``as_mapped`` takes it (None: inline)."""
    import tensorflow as tf

    if isinstance(value, TensorSlice) and value.nbytes < MIN_MAPPED_BYTES:
        value = value.read()
    dtype = tf.as_dtype(value.dtype).as_datatype_enum
    node.ClearField("input")
    node.ClearField("attr")
    node.attr["dtype"].type = dtype
    if isinstance(value, TensorSlice):
        region = layout.add_region_from_file(value.path, value.offset, value.nbytes)
    elif value.nbytes < MIN_MAPPED_BYTES or value.dtype == object:
        node.op = "Const"
        node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))
        return None
    else:
        region = layout.add_region(np.ascontiguousarray(value))
    mapped = (region, dtype, tuple(value.shape))
    as_mapped(node, *mapped)
    return mapped


def as_mapped(node, region: str, dtype: int, shape: tuple) -> None:
    """``node`` becomes an ImmutableConst of ``shape`` and ``dtype`` (a DataType enum)
    reading the memory region ``region``."""
    import tensorflow as tf

    node.ClearField("input")
    node.ClearField("attr")
    node.op = "ImmutableConst"
    node.attr["dtype"].type = dtype
    node.attr["shape"].shape.CopyFrom(tf.TensorShape(shape).as_proto())
    node.attr["memory_region_name"].s = region.encode()  # resolved by open_regions


def open_regions(graph_def) -> None:
    """Point each ImmutableConst of ``graph_def`` at this process's fd of its region."""
    for node in graph_def.node:
        if node.op == "ImmutableConst":
            name = node.attr["memory_region_name"].s.decode()
            node.attr["memory_region_name"].s = memfd.region_path(name).encode()


HANDLE = "/workerpool_handle"
HANDLE_FEED = "/workerpool_handle_feed"
_HELD = "/workerpool_held"


def hold_mapped_constants(graph_def) -> list[str]:
    """Rewrite ``graph_def`` so every ImmutableConst is read through a session handle:
    W -> GetSessionHandle(W) (run once), and consumers of W read GetSessionTensor(feed)."""
    names = [node.name for node in graph_def.node if node.op == "ImmutableConst"]
    if not names:
        return []
    dtypes = {node.name: node.attr["dtype"] for node in graph_def.node if node.name in names}
    held = set(names)
    for node in graph_def.node:
        for index, source in enumerate(node.input):
            control = source.startswith("^")
            base = source.lstrip("^").split(":")[0]
            if base in held and source.lstrip("^") in (base, f"{base}:0"):
                node.input[index] = f"{'^' if control else ''}{base}{_HELD}"
    for name in names:
        handle = graph_def.node.add(name=f"{name}{HANDLE}", op="GetSessionHandle",
                                    input=[name])
        handle.attr["T"].CopyFrom(dtypes[name])
        feed = graph_def.node.add(name=f"{name}{HANDLE_FEED}", op="Placeholder")
        feed.attr["dtype"].type = 7  # DT_STRING
        tensor = graph_def.node.add(name=f"{name}{_HELD}", op="GetSessionTensor",
                                    input=[feed.name])
        tensor.attr["dtype"].CopyFrom(dtypes[name])
    return names
