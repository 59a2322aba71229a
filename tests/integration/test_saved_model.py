"""SavedModel directories (TF Serving's format) served by path: the call users expect, outputs
equal to the SavedModel loaded in-process, one weight copy for N workers, version layouts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import workerpool as wp  # noqa: E402
from testkit import (kill_a_worker_and_wait_for_its_replacement,  # noqa: E402
                     one_tensorflow_thread)
from workerpool.frameworks import saved_model  # noqa: E402
from workerpool.serve import tf_warmup  # noqa: E402

one_tensorflow_thread(tf)  # references run as the workers do

MIB = 1024 * 1024
RNG = np.random.default_rng(0)


def call(model, x):
    return model(x)


def exported_mlp(path, seed: int = 0, width: int = 32, layers: int = 2) -> str:
    """A Keras MLP (one input named ``features``) written by ``model.export()``."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((width,), name="features")
    x = inputs
    for _ in range(layers):
        x = keras.layers.Dense(width, activation="relu")(x)
    keras.Model(inputs, keras.layers.Dense(4)(x)).export(str(path), verbose=False)
    return str(path)


def exported_two_inputs(path) -> str:
    """A Keras model of two inputs, declared (zeta, alpha): its signature sorts them."""
    keras.utils.set_random_seed(0)
    zeta, alpha = keras.Input((4,), name="zeta"), keras.Input((8,), name="alpha")
    joined = keras.layers.Concatenate()([zeta, alpha])
    keras.Model([zeta, alpha], keras.layers.Dense(3)(joined)).export(str(path), verbose=False)
    return str(path)


class Dense(tf.Module):
    def __init__(self, rng, width: int):
        super().__init__()
        self.kernel = tf.Variable(rng.standard_normal((width, width), np.float32) / 8)
        self.bias = tf.Variable(rng.standard_normal(width, np.float32))

    @tf.function
    def __call__(self, x):
        return tf.nn.relu(tf.matmul(x, self.kernel) + self.bias)


class NestedModule(tf.Module):
    """Variables read inside nested tf.functions, a gather from a variable (an embedding)
    and a while loop reading a variable: what TF's graph lowering must carry through."""

    def __init__(self, width: int = 64, depth: int = 3):
        super().__init__()
        rng = np.random.default_rng(3)
        self.blocks = [Dense(rng, width) for _ in range(depth)]
        self.table = tf.Variable(rng.standard_normal((100, width), np.float32))
        self.scale = tf.constant(np.linspace(0, 1, width, dtype=np.float32))

    @tf.function
    def body(self, x):
        for block in self.blocks:
            x = block(x)
        return x

    @tf.function(input_signature=[tf.TensorSpec([None, 64], tf.float32, name="features"),
                                  tf.TensorSpec([None], tf.int32, name="ids")])
    def __call__(self, features, ids):
        y = self.body(features) + tf.gather(self.table, ids) * self.scale
        _, y = tf.while_loop(lambda i, y: i < 2,
                             lambda i, y: (i + 1, tf.matmul(y, self.blocks[0].kernel)),
                             [tf.constant(0), y])
        return {"out": y, "mean": tf.reduce_mean(y, axis=1)}


def saved_module(path) -> str:
    module = NestedModule()
    tf.saved_model.save(module, str(path), signatures=module.__call__.get_concrete_function())
    return str(path)


class TwoSignatures(tf.Module):
    """Two signatures over the same weights, as TF Serving users export them: the default
    takes ``features`` and returns ``scores``; ``top`` takes ``pixels`` and returns each
    row's ``label`` and ``best`` score."""

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(5)
        self.kernel = tf.Variable(rng.standard_normal((64, 1024), np.float32) / 8)
        self.bias = tf.Variable(rng.standard_normal(1024, np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, 64], tf.float32, name="features")])
    def scores(self, features):
        return {"scores": tf.matmul(features, self.kernel) + self.bias}

    @tf.function(input_signature=[tf.TensorSpec([None, 64], tf.float32, name="pixels")])
    def top(self, pixels):
        scores = tf.matmul(pixels, self.kernel) + self.bias
        return {"label": tf.argmax(scores, axis=1), "best": tf.reduce_max(scores, axis=1)}


TWO_SIGNATURES_WEIGHT_BYTES = (64 * 1024 + 1024) * 4


def saved_two_signatures(path) -> str:
    module = TwoSignatures()
    tf.saved_model.save(module, str(path),
                        signatures={"serving_default": module.scores, "top": module.top})
    return str(path)


def in_process(path: str, inputs: dict, signature: str = "serving_default") -> dict:
    """The SavedModel loaded here with tf.saved_model.load, its signature called by name."""
    function = tf.saved_model.load(path).signatures[signature]
    return {k: v.numpy() for k, v in function(**{k: tf.constant(v)
                                                  for k, v in inputs.items()}).items()}


def equal(got: dict, want: dict) -> bool:
    return set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)


def module_inputs(rows: int = 5) -> dict:
    return {"features": RNG.standard_normal((rows, 64)).astype(np.float32),
            "ids": RNG.integers(0, 100, rows).astype(np.int32)}


def test_exported_keras_model_takes_a_bare_array_and_a_dict(tmp_path):
    path = exported_mlp(tmp_path / "mlp")
    x = RNG.standard_normal((6, 32)).astype(np.float32)
    want = in_process(path, {"features": x})
    with wp.Pool(path, call, workers=2, threads_per_worker=1) as pool:
        assert equal(pool.submit(x).result(timeout=120), want)  # the Keras call's way
        assert equal(pool.submit({"features": x}).result(timeout=120), want)
        with pytest.raises(wp.InputMismatch, match=r"\['features'\].*unknown \['x'\]"):
            pool.submit({"x": x}).result(timeout=120)
        assert equal(pool.submit(x).result(timeout=120), want)  # still serving


def test_module_with_nested_functions_equals_the_saved_model_loaded_in_process(tmp_path):
    path = saved_module(tmp_path / "module")
    batches = [module_inputs(rows) for rows in (1, 5, 9)]
    wants = [in_process(path, inputs) for inputs in batches]
    with wp.Pool(path, call, workers=2, threads_per_worker=1) as pool:
        for inputs, want in zip(batches, wants):
            assert equal(pool.submit(inputs).result(timeout=120), want)
            # a list in the signature's order: its keyword order
            assert equal(pool.submit([inputs["features"], inputs["ids"]]).result(120), want)
        with pytest.raises(wp.InputMismatch, match=r"\['features', 'ids'\]; missing \['ids'\]"):
            pool.submit({"features": batches[0]["features"]}).result(timeout=120)
        with pytest.raises(wp.InputMismatch, match="2 inputs"):
            pool.submit(batches[0]["features"]).result(timeout=120)
        with pytest.raises(wp.InputMismatch, match="2 inputs"):
            pool.submit([batches[0]["features"]]).result(timeout=120)
        stats = pool.stats(memory_usage=False)
    assert stats["model_source"] == {"path": path, "version": None}
    assert stats["restarts"] == 0  # bad calls fail their caller, never a worker


def test_several_inputs_take_a_dict_or_a_list_in_signature_order(tmp_path):
    path = exported_two_inputs(tmp_path / "two")
    inputs = {"zeta": RNG.standard_normal((3, 4)).astype(np.float32),
              "alpha": RNG.standard_normal((3, 8)).astype(np.float32)}
    want = in_process(path, inputs)
    with wp.Pool(path, call, workers=1, threads_per_worker=1) as pool:
        assert equal(pool.submit(inputs).result(timeout=120), want)
        # TF Serving's signatures are maps: their order is the keyword (sorted) order
        assert equal(pool.submit([inputs["alpha"], inputs["zeta"]]).result(120), want)


def test_four_workers_share_one_copy_of_a_saved_model(tmp_path):
    path = exported_mlp(tmp_path / "big", width=2048, layers=6)  # ~96 MiB of weights
    x = RNG.standard_normal((2, 2048)).astype(np.float32)
    want = in_process(path, {"features": x})
    pools = {}
    for n_workers in (1, 4):
        with wp.Pool(path, call, workers=n_workers, threads_per_worker=1) as pool:
            for _ in range(50):
                answers = list(pool.map([x] * (4 * n_workers)))
                assert len(answers) == 4 * n_workers and all(equal(y, want) for y in answers)
                stats = pool.stats()
                if all(w["requests_served"] for w in stats["workers"]):
                    break
            pools[n_workers] = stats
    model_bytes = pools[4]["model_bytes"]
    assert model_bytes >= 96 * MIB
    for stats in pools.values():
        for worker in stats["workers"]:
            assert worker["weights_mapped"] >= 0.95 * model_bytes, worker  # reads the copy
            assert worker["weights_copied"] == 0
            # its runtime (~30 MiB: TensorFlow's session, the interpreter), no copy of its own
            assert worker["private"] < model_bytes / 2, worker
    # zygote + workers: the test process's own heap drifts between the two pools
    cost = {n: s["total_pss"] - s["parent"]["pss"] for n, s in pools.items()}
    added = (cost[4] - cost[1]) / 3
    assert added < model_bytes / 2, f"each extra worker adds {added / MIB:.0f} MiB"


PARENT_PEAK = """
import json, sys
import numpy as np, tensorflow
import workerpool as wp

def status(field):  # kB in /proc/self/status
    with open("/proc/self/status") as lines:
        return next(int(l.split()[1]) * 1024 for l in lines if l.startswith(field + ":"))

before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # the high-water mark restarts from here (ru_maxrss would include
                      # the RSS of the process that started this one)
with wp.Pool(sys.argv[1], lambda m, x: m(x), workers=1, threads_per_worker=1) as pool:
    peak = status("VmHWM")
    model_bytes = pool.stats()["model_bytes"]
print(json.dumps({"growth": peak - before, "model_bytes": model_bytes}))
"""


def test_publishing_a_saved_model_never_holds_its_weights_in_the_parent(tmp_path):
    """Variables are not restored: each goes from the checkpoint file to its memfd inside
    the kernel, so the parent's peak RSS grows by far less than the model (~22 MiB: the
    loaded object graph and functions; restoring the variables alone would be 1x)."""
    path = exported_mlp(tmp_path / "big", width=2048, layers=6)
    out = subprocess.run([sys.executable, "-c", PARENT_PEAK, path], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    assert measured["model_bytes"] >= 96 * MIB
    assert measured["growth"] < 0.5 * measured["model_bytes"], measured


def test_the_highest_numbered_version_is_served_and_named(tmp_path):
    base = tmp_path / "model"
    exported_mlp(base / "1", seed=0)
    exported_mlp(base / "2", seed=1)
    (base / "10-not-a-version").mkdir()
    x = RNG.standard_normal((3, 32)).astype(np.float32)
    old, new = (in_process(str(base / v), {"features": x}) for v in ("1", "2"))
    assert not equal(old, new)
    with wp.Pool(str(base), call, workers=1, threads_per_worker=1) as pool:
        assert equal(pool.submit(x).result(timeout=120), new)
        stats = pool.stats(memory_usage=False)
    assert stats["model_source"] == {"path": str(base / "2"), "version": 2}
    assert "version 2" in stats["weights_source"]
    # TF Serving's warm-up file is looked up in the version served
    warmup = base / "2" / tf_warmup.WARMUP_FILE
    warmup.parent.mkdir()
    warmup.write_bytes(b"")
    assert tf_warmup.warmup_file(str(base)) == str(warmup)
    assert saved_model.versions(str(base)) == [1, 2]


def test_a_base_path_without_versions_says_what_it_expects(tmp_path):
    (tmp_path / "empty" / "1").mkdir(parents=True)
    with pytest.raises(wp.ModelSourceError, match="without config.json or saved_model.pb"):
        wp.Pool(str(tmp_path / "empty"), call, workers=1)
    with pytest.raises(wp.ModelSourceError, match="numbered version"):
        saved_model.resolve(str(tmp_path / "empty"))


def test_killed_worker_is_replaced_and_answers_the_same(tmp_path):
    path = saved_module(tmp_path / "module")
    inputs = module_inputs()
    want = in_process(path, inputs)
    with wp.Pool(path, call, workers=2, threads_per_worker=1) as pool:
        kill_a_worker_and_wait_for_its_replacement(pool)
        answers = list(pool.map([inputs] * 8))
        assert len(answers) == 8 and all(equal(y, want) for y in answers)
        assert pool.stats(memory_usage=False)["restarts"] == 1


def call_signature(model, x, signature=None):
    return model(x, signature=signature)


@pytest.mark.parametrize("engine", ["tensorflow", "copy"])
def test_each_signature_is_served_by_name_over_one_copy_of_the_weights(tmp_path, engine):
    path = saved_two_signatures(tmp_path / "two")
    x = RNG.standard_normal((3, 64)).astype(np.float32)
    want = in_process(path, {"features": x})
    want_top = in_process(path, {"pixels": x}, "top")
    with wp.Pool(path, call_signature, workers=1, threads_per_worker=1,
                 tf_engine=engine) as pool:
        assert equal(pool.submit(x).result(timeout=120), want)
        assert equal(pool.submit(x, signature="serving_default").result(timeout=120), want)
        assert equal(pool.submit(x, signature="top").result(timeout=120), want_top)
        assert equal(pool.submit({"pixels": x}, signature="top").result(timeout=120),
                     want_top)
        with pytest.raises(wp.InputMismatch, match=r"no signature 'nope'; it has "
                           r"\['serving_default', 'top'\]"):
            pool.submit(x, signature="nope").result(timeout=120)
        with pytest.raises(wp.InputMismatch, match=r"takes the inputs \['pixels'\]"):
            pool.submit({"features": x}, signature="top").result(timeout=120)
        assert equal(pool.submit(x, signature="top").result(timeout=120), want_top)
        signature, stats = pool.signature, pool.stats(memory_usage=False)
    assert [s.as_dict() for s in signature.inputs] == \
        [{"name": "features", "datatype": "FP32", "shape": [-1, 64]}]
    assert sorted(signature.named) == ["top"] and signature.names == ["serving_default", "top"]
    top = signature.named["top"]
    assert [s.as_dict() for s in top.inputs] == \
        [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    assert [s.as_dict() for s in top.outputs] == \
        [{"name": "best", "datatype": "FP32", "shape": [-1]},
         {"name": "label", "datatype": "INT64", "shape": [-1]}]
    if engine == "tensorflow":  # both signatures read one mapping of each variable
        assert TWO_SIGNATURES_WEIGHT_BYTES <= stats["model_bytes"] \
            < 1.5 * TWO_SIGNATURES_WEIGHT_BYTES, stats


def test_copy_engine_loads_the_saved_model_in_each_worker(tmp_path):
    """For signatures that cannot be frozen: each worker's own tf.saved_model.load."""
    path = saved_module(tmp_path / "module")
    inputs = module_inputs()
    want = in_process(path, inputs)
    with wp.Pool(path, call, workers=1, threads_per_worker=1, tf_engine="copy") as pool:
        assert equal(pool.submit(inputs).result(timeout=120), want)
        assert equal(pool.submit([inputs["features"], inputs["ids"]]).result(120), want)
        with pytest.raises(wp.InputMismatch, match="missing"):
            pool.submit({"ids": inputs["ids"]}).result(timeout=120)
        stats = pool.stats(memory_usage=False)
    assert "loaded privately by each worker" in stats["weights_source"]
    assert stats["model_source"] == {"path": path, "version": None}


def test_checkpoint_index_places_every_tensor_where_tensorflow_reads_it(tmp_path):
    path = saved_module(tmp_path / "module")
    prefix = os.path.join(path, "variables", "variables")
    index = saved_model.CheckpointIndex(prefix)
    reader = tf.train.load_checkpoint(prefix)
    placed = 0
    for key, dtype in reader.get_variable_to_dtype_map().items():
        found = index.get(key)
        if dtype == tf.string:
            assert found is None  # read through TensorFlow instead
            continue
        assert found is not None, key
        assert np.array_equal(found.read(), reader.get_tensor(key)), key
        placed += 1
    assert placed == 2 * 3 + 1  # three kernels and biases, the table
