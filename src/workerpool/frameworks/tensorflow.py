"""TensorFlow and Keras models: one weight copy for N workers, through TF's own mechanism
for memory-mapped graphs.

    parent: Keras model / tf.Module / concrete function / SavedModel signature
      └─ trace the serving function; inline its nested functions; every captured variable
         and big constant ──> its own sealed memfd, the node an ImmutableConst(
         memory_region_name="workerpool-region:<i>", made /proc/self/fd/<n> in each
         worker): TF maps the file read-only instead of holding the bytes (tf_freeze.py).
         A SavedModel's variables are read from its checkpoint one at a time, never
         restored (frameworks/saved_model.py); each of its signatures is frozen so, a
         variable several of them capture mapped once (FrozenSignatures)
      the GraphDef left (kilobytes) travels in the skeleton as a FrozenGraph
    worker (forked from a zygote that imported TensorFlow but never ran an op, since a fork
    after any op hangs): before READY, import the GraphDef into a session that holds each
    mapped constant.

``predict`` receives the FrozenGraph: call it like the model: one array for a model of one
input; for several, a dict by input name or a list in the model's order; a SavedModel's
signature other than serving_default as ``model(x, signature=NAME)``. Outputs come back
as numpy (a dict for dict outputs), whatever the engine. ``tf_engine="copy"`` instead loads
a private copy of a Keras model (saved once) or SavedModel directory in each worker (for
models that cannot be frozen); ``tf_engine="litert"`` converts a Keras model for LiteRT
(frameworks/litert.py).
``stats()["weights_source"]`` says which.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from ..errors import EncodeError, InputMismatch
from ..modules import imported
from . import tf_freeze
from .saved_model import SERVING_DEFAULT, SavedSignature


def reduce(obj, layout):
    if not _is_tf_model(obj):
        return NotImplemented
    engine = layout.options.get("tf_engine", "tensorflow")
    if engine == "copy" and isinstance(obj, SavedSignature):
        return CopiedSavedModel.reduce_model(obj, layout)
    if engine == "copy":
        return CopiedModel.reduce_model(obj, layout)
    if engine == "litert":
        from . import litert

        model = litert.convert(obj, layout.options["private_dir"])
        layout.notes.append(f"LiteRT model {model.path}, packed weights shared through the "
                            "XNNPACK weight cache file")
        return model.__reduce__()
    if isinstance(obj, SavedSignature) and len(obj.signatures) > 1:
        return FrozenSignatures.freeze(obj, layout).__reduce__()
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
    if isinstance(obj, SavedSignature):
        return True
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

    if isinstance(model, SavedSignature):
        return model.function
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


def input_names(model, function) -> tuple[list[str], list[str]] | None:
    """The names of ``function``'s inputs in the model's own order (a Keras model's inputs,
    a signature's keyword order, positional order) and in the order the function flattens
    them; None for one positional array."""
    args, kwargs = function.structured_input_signature
    keywords = list(getattr(function, "_arg_keywords", None) or ())
    if kwargs:  # a signature: named inputs only
        flat = sorted(kwargs)  # tf.nest flattens dicts by sorted key
    elif len(args) == 1 and isinstance(args[0], dict):
        flat = sorted(args[0])
    elif len(args) > 1 and all(hasattr(arg, "dtype") for arg in args):
        flat = [keywords[i] if i < len(keywords) else arg.name or f"input_{i}"
                for i, arg in enumerate(args)]
        return flat, flat
    else:
        return None
    keras = imported("keras")
    if keras is not None and isinstance(model, keras.Model):
        keywords = [t.name for t in model.inputs]
    ordered = [name for name in keywords if name in flat]
    return ordered + [name for name in flat if name not in ordered], flat


def ordered_inputs(keys: list[str], inputs) -> list:
    """A model's named inputs, in its order ``keys``: from a dict by name, a list in that
    order, or a bare array when the model has one input."""
    if isinstance(inputs, dict):
        missing = [key for key in keys if key not in inputs]
        unknown = sorted(str(key) for key in inputs if key not in keys)
        if missing or unknown:
            raise InputMismatch(
                f"this model takes the inputs {keys}; "
                + "; ".join(f"{what} {names}" for what, names in
                            (("missing", missing), ("unknown", unknown)) if names))
        return [inputs[key] for key in keys]
    if len(keys) == 1:
        return [inputs]
    if isinstance(inputs, (list, tuple)) and len(inputs) == len(keys):
        return list(inputs)
    raise InputMismatch(f"this model takes {len(keys)} inputs {keys}: pass a dict of them by "
                        "name, or a list in this order")


def signature_of(model, function, input_keys: list[str] | None) -> dict | None:
    """See ``_signature_of``; None rather than an error (metadata never stops a model)."""
    try:
        return _signature_of(model, function, input_keys)
    except Exception:  # noqa: BLE001 - an input structure this does not read
        return None


def _signature_of(model, function, input_keys: list[str] | None) -> dict | None:
    """What ``function`` (serving ``model``) takes and returns, as TensorSpec dicts in the
    model's input order: names, dtypes and shapes (-1 where any size goes), the way TF
    Serving describes a signature. A Keras model names its one input; dict outputs are
    named by their keys, others output_0..k. None where a shape's rank is unknown."""
    keras = imported("keras")
    is_keras = keras is not None and isinstance(model, keras.Model)
    args, kwargs = function.structured_input_signature
    by_name = dict(kwargs) if kwargs else (
        dict(args[0]) if len(args) == 1 and isinstance(args[0], dict) else None)
    if input_keys and by_name is not None:
        inputs = [(key, by_name[key]) for key in input_keys]
    elif input_keys:
        inputs = list(zip(input_keys, args))
    elif args:
        name = model.inputs[0].name if is_keras else (getattr(args[0], "name", None) or
                                                       "input_0")
        inputs = [(name, args[0])]
    else:
        return None
    structure = function.structured_outputs  # dict outputs by key; the rest as output_0..k,
    if isinstance(structure, dict):  # as Keras's own export names them and predict's are
        outputs = [(key, structure[key]) for key in sorted(structure)]
    elif isinstance(structure, (list, tuple)):
        outputs = [(f"output_{i}", value) for i, value in enumerate(structure)]
    else:
        outputs = [("output_0", structure)]
    return {"inputs": [_spec(name, value) for name, value in inputs],
            "outputs": [_spec(name, value) for name, value in outputs]}


def _spec(name: str, value) -> dict:
    from ..signature import datatype_of

    dims = value.shape.as_list()  # ValueError for an unknown rank
    dtype = value.dtype.as_numpy_dtype
    return {"name": str(name), "datatype": datatype_of(dtype),
            "shape": [-1 if size is None else int(size) for size in dims]}


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
        """``model``'s serving function frozen; its signature in ``layout.signature``."""
        graph, layout.signature = cls.frozen(model, serving_function(model), layout)
        _noted(model, layout)
        return graph

    @classmethod
    def frozen(cls, model, function, layout,
               mapped: dict | None = None) -> tuple["FrozenGraph", dict | None]:
        """``function`` (serving ``model``) frozen, and its signature (``signature_of``);
        ``mapped`` as tf_freeze.map_captures takes it."""
        graph_def = tf_freeze.flat_graph_def(function)
        value_of = model.value_of if isinstance(model, SavedSignature) else None
        captured = tf_freeze.map_captures(function, graph_def, layout, value_of, mapped)
        tf_freeze.map_constants(graph_def, layout)
        inputs = [t.name for t in function.inputs if t.op.name not in captured]
        outputs = [t.name for t in function.outputs]
        input_keys = None
        names = input_names(model, function)
        if names is not None:  # feed them in the order a list is given in
            input_keys, flat = names
            by_name = dict(zip(flat, inputs))
            inputs = [by_name[key] for key in input_keys]
        structure = function.structured_outputs
        output_keys = sorted(structure) if isinstance(structure, dict) else (
            len(structure) if isinstance(structure, (list, tuple)) else None)
        graph = cls(graph_def.SerializeToString(), inputs, outputs, input_keys, output_keys)
        return graph, signature_of(model, function, input_keys)

    def prepare_in_worker(self) -> None:
        """Build the session in the worker before it says READY (never in the zygote)."""
        if self._function is None:
            self._function = self._build()

    def __call__(self, inputs):
        self.prepare_in_worker()
        feeds = [inputs] if not self.input_keys else ordered_inputs(self.input_keys, inputs)
        outputs = self._function(feeds)
        if isinstance(self.output_keys, list):
            return dict(zip(self.output_keys, outputs))
        if isinstance(self.output_keys, int):
            return tuple(outputs)
        return outputs[0]

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
        tf_freeze.open_regions(graph_def)
        held = tf_freeze.hold_mapped_constants(graph_def)
        graph = tf.Graph()  # starts a thread: never in the zygote
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
        self._handles = session.run([f"{name}{tf_freeze.HANDLE}:0" for name in held])
        fixed = {graph.get_tensor_by_name(f"{name}{tf_freeze.HANDLE_FEED}:0"): handle.handle
                 for name, handle in zip(held, self._handles)}
        feeds = [graph.get_tensor_by_name(name) for name in self.inputs]
        fetches = [graph.get_tensor_by_name(name) for name in self.outputs]
        return lambda values: session.run(fetches, {**fixed, **dict(zip(feeds, values))})


def _noted(model, layout) -> None:
    if isinstance(model, SavedSignature):
        layout.notes.append(model.describe())
        layout.source = {"path": model.path, "version": model.version}
    layout.notes.append(f"TensorFlow graph frozen; {len(layout.region_fds)} constants "
                        f"({layout.region_bytes} bytes) in sealed memfds, mapped by "
                        "ImmutableConst")


def with_named_signatures(signatures: dict[str, dict | None]) -> dict:
    """The published signature of a model with several: ``serving_default``'s inputs and
    outputs, and every other one by name under "named" ({} where it is not known)."""
    default = signatures[SERVING_DEFAULT] or {}
    return {**default, "named": {name: described or {} for name, described
                                 in signatures.items() if name != SERVING_DEFAULT}}


class FrozenSignatures:
    """A SavedModel's several signatures, each a FrozenGraph over the one set of mapped
    weights they share. Called like its ``serving_default``; ``signature=NAME`` calls
    another (TF Serving's ``signature_name``)."""

    def __init__(self, graphs: dict[str, FrozenGraph]):
        self.graphs = graphs

    def __reduce__(self):
        return (FrozenSignatures, (self.graphs,))

    @classmethod
    def freeze(cls, model: SavedSignature, layout) -> "FrozenSignatures":
        mapped: dict = {}  # a variable captured by several signatures is mapped once
        graphs, described = {}, {}
        for name, function in model.signatures.items():
            graphs[name], described[name] = FrozenGraph.frozen(model, function, layout, mapped)
        layout.signature = with_named_signatures(described)
        _noted(model, layout)
        layout.notes.append(f"signatures {list(graphs)}")
        return cls(graphs)

    def prepare_in_worker(self) -> None:
        """Build every signature's session before the worker says READY."""
        for graph in self.graphs.values():
            graph.prepare_in_worker()

    def __call__(self, inputs, signature: str | None = None):
        return _signature_named(self.graphs, signature)(inputs)


def _signature_named(signatures: dict, name: str | None):
    try:
        return signatures[name or SERVING_DEFAULT]
    except KeyError:
        raise InputMismatch(f"this model has no signature {name!r}; it has "
                            f"{list(signatures)}") from None


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
            raise EncodeError("tf_engine='copy' serves Keras models and SavedModel "
                              "directories; save other TF models as a SavedModel and give "
                              "its path")
        with tempfile.TemporaryDirectory(prefix="workerpool-copy-") as directory:
            path = os.path.join(directory, "model.keras")
            model.save(path)
            with open(path, "rb") as saved:
                data = saved.read()
        layout.notes.append("Keras model loaded privately by each worker (tf_engine='copy')")
        function = serving_function(model)
        names = input_names(model, function)
        layout.signature = signature_of(model, function, names[0] if names else None)
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


class CopiedSavedModel:
    """tf_engine="copy" for a SavedModel directory: each worker loads its own copy with
    ``tf.saved_model.load`` and calls its signatures (for signatures that cannot be frozen:
    lookup tables, other resources). ``input_keys``: each signature's input names."""

    def __init__(self, path: str, input_keys: dict[str, list[str]]):
        self.path = path
        self.input_keys = input_keys
        self._signatures = None
        _import_tensorflow()

    def __reduce__(self):
        return (CopiedSavedModel, (self.path, self.input_keys))

    @classmethod
    def reduce_model(cls, model: SavedSignature, layout):
        keys, described = {}, {}
        for name, function in model.signatures.items():
            names = input_names(model, function)
            keys[name] = names[0] if names else []
            described[name] = signature_of(model, function, keys[name] or None)
        layout.notes.append(f"{model.describe()} loaded privately by each worker "
                            "(tf_engine='copy')")
        layout.source = {"path": model.path, "version": model.version}
        layout.signature = described[SERVING_DEFAULT] if len(described) == 1 else \
            with_named_signatures(described)
        return cls(model.path, keys).__reduce__()

    def prepare_in_worker(self) -> None:
        """Load this worker's copy before it says READY."""
        if self._signatures is None:
            import tensorflow as tf

            loaded = tf.saved_model.load(self.path)
            signatures = {name: loaded.signatures[name] for name in self.input_keys}
            for signature in signatures.values():
                signature._workerpool_owner = loaded  # its variables live with it
            self._signatures = signatures

    def __call__(self, inputs, signature: str | None = None):
        self.prepare_in_worker()
        function = _signature_named(self._signatures, signature)
        keys = self.input_keys[signature or SERVING_DEFAULT]
        values = ordered_inputs(keys, inputs)
        outputs = function(**dict(zip(keys, values)))
        return {key: np.asarray(value) for key, value in outputs.items()}
