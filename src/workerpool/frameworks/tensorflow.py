"""TensorFlow and Keras models: one weight copy for N workers, through TF's own mechanism
for memory-mapped graphs.

    parent: Keras model / tf.Module / SavedModel signature
      └─ trace the serving function ── freeze variables into constants
           └─ every constant >= MIN_MAPPED_BYTES ──> its own sealed memfd; the node becomes
              ImmutableConst(memory_region_name="/proc/self/fd/<n>"): TF maps the file
              read-only instead of holding the bytes
      the GraphDef left (kilobytes) travels in the skeleton as a FrozenGraph
    worker (forked from a zygote that imported TensorFlow but never ran an op, since a fork
    after any op hangs): on the first call, import the GraphDef and prune it to a callable.

``predict`` receives the FrozenGraph: call it with a numpy array (or a dict of them keyed by
the model's input names) and get numpy back (a dict for dict outputs), whatever the engine.
``tf_engine="copy"`` instead saves the model once and loads a private copy in each worker
(for models that cannot be frozen); ``tf_engine="litert"`` converts it for LiteRT
(frameworks/litert.py). ``stats()["weights_source"]`` says which.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from ..errors import EncodeError
from . import imported

MIN_MAPPED_BYTES = 4096  # smaller constants stay inline in the GraphDef


def reduce(obj, layout):
    if not _is_tf_model(obj):
        return NotImplemented
    engine = layout.options.get("tf_engine", "tensorflow")
    if engine == "copy":
        return CopiedModel.reduce_model(obj, layout)
    if engine == "litert":
        from . import litert

        model = litert.convert(obj, layout.options["private_dir"])
        layout.notes.append(f"LiteRT model {model.path}, packed weights shared through the "
                            "XNNPACK weight cache file")
        return model.__reduce__()
    return FrozenGraph.freeze(obj, layout).__reduce__()


def _import_tensorflow() -> None:
    """Import (never run) TensorFlow where a model is rebuilt: in the zygote, so forked
    workers start with it loaded and set their threads before their first op."""
    import tensorflow  # noqa: F401


_threads = 0  # intra/inter-op threads of frozen-graph sessions (0: TensorFlow decides)


def set_threads(threads: int) -> None:
    """Intra/inter-op threads of this worker; must come before its first TF op."""
    import tensorflow as tf

    global _threads
    _threads = threads
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        pass  # the runtime is already up in this process (the parent, in a test)


def _is_tf_model(obj) -> bool:
    keras = imported("keras")
    tf = imported("tensorflow")
    if keras is not None and isinstance(obj, keras.Model):
        return True
    if tf is None:
        return False
    from tensorflow.python.eager.polymorphic_function.concrete_function import ConcreteFunction

    return isinstance(obj, ConcreteFunction) or (
        isinstance(obj, tf.Module) and hasattr(getattr(obj, "__call__", None),
                                               "get_concrete_function"))


def serving_function(model):
    """The concrete function that serves ``model``, with its input names (None: one input)."""
    import tensorflow as tf
    from tensorflow.python.eager.polymorphic_function.concrete_function import ConcreteFunction

    if isinstance(model, ConcreteFunction):
        return model
    keras = imported("keras")
    if keras is not None and isinstance(model, keras.Model):
        inputs = getattr(model, "inputs", None)
        if not inputs:
            raise EncodeError(
                f"the Keras model {model.name!r} has no defined inputs: build it with "
                "keras.Input (functional) or call it once on a batch before serving it")
        specs = {t.name: tf.TensorSpec(t.shape, t.dtype, name=t.name) for t in inputs}
        if len(specs) == 1:
            (spec,) = specs.values()
            return tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
        return tf.function(lambda x: model(x, training=False)).get_concrete_function(specs)
    try:
        return model.__call__.get_concrete_function()
    except (TypeError, ValueError) as exc:
        raise EncodeError(f"cannot trace {type(model).__name__}.__call__: give its tf.function "
                          f"an input_signature ({exc})") from exc


class FrozenGraph:
    """A frozen serving graph whose big constants are memory-mapped; call it like the model."""

    def __init__(self, graph_def: bytes, inputs: list[str], outputs: list[str],
                 input_keys: list[str] | None, output_keys: list | None):
        self.graph_def = graph_def
        self.inputs = inputs
        self.outputs = outputs
        self.input_keys = input_keys
        self.output_keys = output_keys
        self._function = None  # built on first call, in the worker
        self._handles = []
        _import_tensorflow()

    def __reduce__(self):
        return (FrozenGraph, (self.graph_def, self.inputs, self.outputs, self.input_keys,
                              self.output_keys))

    @classmethod
    def freeze(cls, model, layout) -> "FrozenGraph":
        import tensorflow as tf
        from tensorflow.python.framework.convert_to_constants import (
            convert_variables_to_constants_v2)

        function = serving_function(model)
        graph_def = function.graph.as_graph_def()
        if graph_def.library.function:
            # Variables read inside nested functions (SavedModel signatures): TF's own
            # freezer inlines them, at the price of every weight in a GraphDef first.
            try:
                frozen = convert_variables_to_constants_v2(function)
            except Exception as exc:
                raise EncodeError(
                    f"cannot freeze {type(model).__name__}: {exc}. Pass tf_engine='copy' to "
                    "load a private copy in each worker instead") from exc
            graph_def = frozen.graph.as_graph_def()
            inputs, outputs = [t.name for t in frozen.inputs], [t.name for t in frozen.outputs]
        else:
            captured = _map_variables(function, graph_def, layout, tf)
            inputs = [t.name for t in function.inputs if t.op.name not in captured]
            outputs = [t.name for t in function.outputs]
        for node in graph_def.node:
            if node.op == "Const":
                _map_constant(node, layout, tf)
        layout.notes.append(f"TensorFlow graph frozen; {len(layout.region_fds)} constants "
                            "memory-mapped (ImmutableConst over sealed memfds)")
        args, kwargs = function.structured_input_signature
        input_keys = None  # one positional array
        if kwargs:  # a SavedModel signature: named inputs only
            input_keys = sorted(kwargs)  # the order tf.nest flattens them in
        elif len(args) == 1 and isinstance(args[0], dict):
            input_keys = sorted(args[0])
        structure = function.structured_outputs
        output_keys = sorted(structure) if isinstance(structure, dict) else (
            len(structure) if isinstance(structure, (list, tuple)) else None)
        return cls(graph_def.SerializeToString(), inputs, outputs, input_keys, output_keys)

    def prepare_in_worker(self) -> None:
        """Build the session in the worker before it says READY (never in the zygote)."""
        if self._function is None:
            self._function = self._build()

    def __call__(self, inputs):
        self.prepare_in_worker()
        feeds = [inputs] if not self.input_keys else self._feeds(inputs)
        outputs = self._function(feeds)
        if isinstance(self.output_keys, list):
            return dict(zip(self.output_keys, outputs))
        if isinstance(self.output_keys, int):
            return tuple(outputs)
        return outputs[0]

    def _feeds(self, inputs) -> list:
        """A signature's named inputs, in its order; a bare array for a one-input one."""
        if not isinstance(inputs, dict):
            if len(self.input_keys) == 1:
                return [inputs]
            raise ValueError(f"this model takes the named inputs {self.input_keys}: pass a "
                             "dict of them")
        missing = [key for key in self.input_keys if key not in inputs]
        if missing:
            raise ValueError(f"this model takes the inputs {self.input_keys}; missing "
                             f"{missing}")
        return [inputs[key] for key in self.input_keys]

    def _build(self):
        """A graph-mode session over the imported GraphDef.

        Constant folding and Grappler are off: folding would turn each ImmutableConst into
        a private Const copy in every worker (measured: +64 MiB per worker for a 64 MiB
        model), and Grappler's rewrites (batch norm folded into now-constant conv weights)
        change the low bits against the Keras call. Each mapped constant is evaluated once
        and kept in the session (GetSessionHandle); runs read it through GetSessionTensor,
        so its file stays mapped instead of being mapped and faulted in on every run
        (measured: 10.2 -> 6.4 ms for a 2 x 4096 @ 4096 x 4096 matmul)."""
        import tensorflow as tf
        from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2

        graph_def = tf.compat.v1.GraphDef()
        graph_def.ParseFromString(self.graph_def)
        held = _hold_mapped_constants(graph_def)
        graph = tf.Graph()
        with graph.as_default():
            tf.compat.v1.import_graph_def(graph_def, name="")
        optimizer = config_pb2.OptimizerOptions(opt_level=config_pb2.OptimizerOptions.L0,
                                                do_constant_folding=False)
        config = config_pb2.ConfigProto(
            intra_op_parallelism_threads=_threads, inter_op_parallelism_threads=_threads,
            graph_options=config_pb2.GraphOptions(
                optimizer_options=optimizer,
                rewrite_options=rewriter_config_pb2.RewriterConfig(
                    disable_meta_optimizer=True)))
        session = tf.compat.v1.Session(graph=graph, config=config)
        # A TensorHandle deletes its session tensor when collected: keep them alive here.
        self._handles = session.run([f"{name}{_HANDLE}:0" for name in held])
        fixed = {graph.get_tensor_by_name(f"{name}{_HANDLE_FEED}:0"): handle.handle
                 for name, handle in zip(held, self._handles)}
        feeds = [graph.get_tensor_by_name(name) for name in self.inputs]
        fetches = [graph.get_tensor_by_name(name) for name in self.outputs]
        return lambda values: session.run(fetches, {**fixed, **dict(zip(feeds, values))})


_HANDLE = "/workerpool_handle"
_HANDLE_FEED = "/workerpool_handle_feed"
_HELD = "/workerpool_held"


def _hold_mapped_constants(graph_def) -> list[str]:
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
        handle = graph_def.node.add(name=f"{name}{_HANDLE}", op="GetSessionHandle",
                                    input=[name])
        handle.attr["T"].CopyFrom(dtypes[name])
        feed = graph_def.node.add(name=f"{name}{_HANDLE_FEED}", op="Placeholder")
        feed.attr["dtype"].type = 7  # DT_STRING
        tensor = graph_def.node.add(name=f"{name}{_HELD}", op="GetSessionTensor",
                                    input=[feed.name])
        tensor.attr["dtype"].CopyFrom(dtypes[name])
    return names


def _map_variables(function, graph_def, layout, tf) -> set[str]:
    """Turn each ReadVariableOp of a captured variable into an ImmutableConst over a memfd
    holding the variable's value, one variable at a time: the parent never holds a second
    copy of the whole model (TF's convert_variables_to_constants_v2 held ~10x the model
    for a 1 GiB MLP, and a GraphDef cannot pass 2 GB). Returns the captured placeholders."""
    variables = {id(v.handle): v for v in function.variables}
    captured = {internal.op.name: variables.get(id(external))
                for external, internal in zip(function.graph.external_captures,
                                              function.graph.internal_captures)}
    for node in graph_def.node:
        sources = [name.lstrip("^").split(":")[0] for name in node.input]
        if not any(source in captured for source in sources):
            continue
        variable = captured[sources[0]] if node.op == "ReadVariableOp" else None
        if variable is None:
            raise EncodeError(
                f"cannot freeze: op {node.name!r} ({node.op}) uses a captured resource that "
                "is not a plain read of a variable. Pass tf_engine='copy' to load a private "
                "copy in each worker instead")
        value = np.ascontiguousarray(variable.numpy())
        node.ClearField("input")
        if value.nbytes >= MIN_MAPPED_BYTES:
            _as_immutable_const(node, value, layout, tf)
        else:
            dtype = node.attr["dtype"]
            node.ClearField("attr")
            node.op = "Const"
            node.attr["dtype"].CopyFrom(dtype)
            node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))
    kept = [node for node in graph_def.node if node.name not in captured]
    del graph_def.node[:]
    graph_def.node.extend(kept)
    return set(captured)


def _map_constant(node, layout, tf) -> None:
    """Move a big Const node's bytes into a sealed memfd and make it an ImmutableConst."""
    value = tf.make_ndarray(node.attr["value"].tensor)
    if value.nbytes >= MIN_MAPPED_BYTES and value.dtype != object:
        _as_immutable_const(node, np.ascontiguousarray(value), layout, tf)


def _as_immutable_const(node, value: np.ndarray, layout, tf) -> None:
    """``node`` becomes an ImmutableConst reading ``value`` from a sealed memfd of its own."""
    dtype = node.attr["dtype"]
    node.op = "ImmutableConst"
    node.ClearField("attr")
    node.attr["dtype"].CopyFrom(dtype)
    node.attr["shape"].shape.CopyFrom(tf.TensorShape(value.shape).as_proto())
    # The same fd number is open in the zygote and every worker (pass_fds, fork).
    node.attr["memory_region_name"].s = f"/proc/self/fd/{layout.add_region(value)}".encode()


class CopiedModel:
    """tf_engine="copy": the model saved once; each worker loads its own copy on first use
    (never in the zygote, which must run no TF op)."""

    def __init__(self, data: bytes):
        self.data = data
        self._model = None
        _import_tensorflow()

    def __reduce__(self):
        return (CopiedModel, (self.data,))

    @classmethod
    def reduce_model(cls, model, layout):
        keras = imported("keras")
        if keras is None or not isinstance(model, keras.Model):
            raise EncodeError("tf_engine='copy' serves Keras models; save other TF models "
                              "as a SavedModel and give its path")
        with tempfile.TemporaryDirectory(prefix="workerpool-copy-") as directory:
            path = os.path.join(directory, "model.keras")
            model.save(path)
            with open(path, "rb") as saved:
                data = saved.read()
        layout.notes.append("Keras model loaded privately by each worker (tf_engine='copy')")
        return cls(data).__reduce__()

    def prepare_in_worker(self) -> None:
        """Load this worker's copy before it says READY."""
        if self._model is None:
            self._model = self._load()

    def __call__(self, inputs):
        self.prepare_in_worker()
        outputs = self._model(inputs, training=False)
        if isinstance(outputs, dict):
            return {key: np.asarray(value) for key, value in outputs.items()}
        if isinstance(outputs, (list, tuple)):
            return tuple(np.asarray(value) for value in outputs)
        return np.asarray(outputs)

    def _load(self):
        import keras

        with tempfile.TemporaryDirectory(prefix="workerpool-copy-") as directory:
            path = os.path.join(directory, "model.keras")
            with open(path, "wb") as saved:
                saved.write(self.data)
            return keras.saving.load_model(path)
