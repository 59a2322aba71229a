"""TensorFlow and Keras: one weight copy for N workers, outputs equal to the Keras call."""

from __future__ import annotations

import re

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import workerpool as wp  # noqa: E402
from testkit import (Traffic, kill_a_worker_and_wait_for_its_replacement,  # noqa: E402
                     one_tensorflow_thread, wait_until)

one_tensorflow_thread(tf)  # references run as the workers do

MIB = 1024 * 1024


def dense_mlp(seed: int = 0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32,), name="x")
    hidden = keras.layers.Dense(256, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(8)(hidden))


def conv_net():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Conv2D(16, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(5)(x))


def two_inputs_dict_output():
    keras.utils.set_random_seed(0)
    a = keras.Input((8,), name="a")
    b = keras.Input((4,), name="b")
    joined = keras.layers.Concatenate()([a, b])
    hidden = keras.layers.Dense(64, activation="tanh")(joined)
    return keras.Model({"a": a, "b": b},
                       {"score": keras.layers.Dense(1)(hidden),
                        "embedding": keras.layers.Dense(16)(hidden)})


def big_mlp():
    """About 64 MiB of fp32 weights."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((1024,), name="x")
    x = inputs
    for _ in range(16):
        x = keras.layers.Dense(1024, activation="relu")(x)
    return keras.Model(inputs, x)


def call(model, x):
    return model(x)


RNG = np.random.default_rng(0)
INPUTS = {
    "dense_mlp": lambda: RNG.standard_normal((4, 32)).astype(np.float32),
    "conv_net": lambda: RNG.standard_normal((2, 16, 16, 3)).astype(np.float32),
    "two_inputs_dict_output": lambda: {"a": RNG.standard_normal((3, 8)).astype(np.float32),
                                       "b": RNG.standard_normal((3, 4)).astype(np.float32)},
}
MODELS = {"dense_mlp": dense_mlp, "conv_net": conv_net,
          "two_inputs_dict_output": two_inputs_dict_output}


def keras_reference(load, x):
    out = load()(x, training=False)
    return {k: np.asarray(v) for k, v in out.items()} if isinstance(out, dict) else np.asarray(out)


def assert_same(got, want, tolerance=0.0):
    if isinstance(want, dict):
        assert sorted(got) == sorted(want)
        for key in want:
            assert_same(got[key], want[key], tolerance)
    elif tolerance:
        assert got.shape == want.shape and np.abs(got - want).max() <= tolerance
    else:
        assert np.array_equal(got, want)


ENGINES = ["tensorflow", "copy"]
try:
    import ai_edge_litert  # noqa: F401
    ENGINES.append("litert")
except ImportError:  # the LiteRT engine's tests skip cleanly without the package
    pass

SOURCES = {"tensorflow": "mapped by ImmutableConst", "copy": "privately by each worker",
           "litert": "XNNPACK weight cache"}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", list(MODELS))
def test_outputs_equal_the_keras_call(name, engine):
    inputs = [INPUTS[name]() for _ in range(4)]
    expected = [keras_reference(MODELS[name], x) for x in inputs]
    with wp.Pool(MODELS[name], call, workers=2, tf_engine=engine,
                 threads_per_worker=1) as pool:
        results = [f.result(timeout=120) for f in [pool.submit(x) for x in inputs]]
        source = pool.stats(memory_usage=False)["weights_source"]
    for got, want in zip(results, expected):
        # LiteRT's XNNPACK kernels sum in another order: equal within float32 rounding
        assert_same(got, want, tolerance=1e-5 if engine == "litert" else 0.0)
    assert SOURCES[engine] in source


@pytest.mark.parametrize("engine", [e for e in ENGINES if e != "copy"])
def test_sixty_four_mib_model_is_shared_by_four_workers(engine):
    x = RNG.standard_normal((2, 1024)).astype(np.float32)
    expected = keras_reference(big_mlp, x)
    tolerance = 1e-5 if engine == "litert" else 0.0
    totals = {}
    for n_workers in (1, 4):
        with wp.Pool(big_mlp, call, workers=n_workers, threads_per_worker=1,
                     tf_engine=engine) as pool:
            for _ in range(50):
                for y in pool.map([x] * (4 * n_workers)):
                    assert_same(y, expected, tolerance)
                stats = pool.stats()
                if all(w["requests_served"] for w in stats["workers"]):
                    break
            # The test process's own heap drifts between the two pools (it built and froze
            # the model twice); what workers cost is in the zygote's and workers' PSS.
            totals[n_workers] = stats["total_pss"] - stats["parent"]["pss"]
            if engine == "tensorflow":
                assert stats["model_bytes"] >= 64 * MIB
                for worker in stats["workers"]:  # the constants stay mapped, not copied
                    assert worker["weights_mapped"] >= 64 * MIB * 0.95
                    assert worker["weights_copied"] == 0
                    # TF's own runtime state after a request is ~30-35 MiB here; a copy of
                    # the weights would add 64 more
                    assert worker["private"] < 48 * MIB, worker
            for worker in stats["workers"] if n_workers > 1 else []:
                # pages only one process maps count as its USS, hence n > 1; a private copy
                # of the weights in a worker would be >= 64 MiB of USS on top of the runtime's
                assert worker["uss"] < 48 * MIB, worker
    added = totals[4] - totals[1]
    assert added < 3 * 60 * MIB, f"4 workers cost {added / MIB:.0f} MiB more than 1"


def test_copy_engine_workers_hold_their_model_before_they_say_ready():
    with wp.Pool(big_mlp, call, workers=1, tf_engine="copy", threads_per_worker=1) as pool:
        (worker,) = pool.stats()["workers"]  # no request yet
    assert worker["uss"] >= 64 * MIB  # its private copy is already loaded


def test_killed_worker_is_replaced_and_answers_the_same():
    x = INPUTS["conv_net"]()
    expected = keras_reference(conv_net, x)
    with wp.Pool(conv_net, call, workers=2, threads_per_worker=1) as pool:
        kill_a_worker_and_wait_for_its_replacement(pool)
        answers = list(pool.map([x] * 8))
        assert len(answers) == 8 and all(np.array_equal(y, expected) for y in answers)
        assert pool.stats(memory_usage=False)["restarts"] == 1


class Unbuilt(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(2)

    def call(self, x):
        return self.dense(x)


def test_a_model_that_cannot_be_traced_says_what_to_do():
    with pytest.raises(wp.EncodeError, match="keras.Input"):
        wp.Pool(Unbuilt, call, workers=1)


def test_saved_model_and_keras_files_are_served_by_path(tmp_path):
    x = INPUTS["dense_mlp"]()
    model = dense_mlp()
    expected = np.asarray(model(x, training=False))
    keras_path = str(tmp_path / "mlp.keras")
    model.save(keras_path)
    saved_dir = str(tmp_path / "saved")
    model.export(saved_dir)  # a SavedModel with a serving_default signature
    with wp.Pool(keras_path, call, workers=1, threads_per_worker=1) as pool:
        assert np.array_equal(pool.submit(x).result(timeout=120), expected)
    with wp.Pool(saved_dir, call, workers=1, threads_per_worker=1) as pool:
        (got,) = pool.submit({"x": x}).result(timeout=120).values()  # named like the input
        assert "mapped by ImmutableConst" in pool.stats(memory_usage=False)["weights_source"]
    assert np.array_equal(got, expected)


def dense_mlp_retrained():
    """dense_mlp's architecture with other weights: its next version."""
    return dense_mlp(seed=1)


def test_reload_swaps_a_keras_model_with_no_request_lost():
    x = INPUTS["dense_mlp"]()
    old, new = keras_reference(dense_mlp, x), keras_reference(dense_mlp_retrained, x)
    assert not np.array_equal(old, new)
    with wp.Pool(dense_mlp, call, workers=1, threads_per_worker=1) as pool:
        # floor 1: sent after reload() returned, so only the new version may answer
        with Traffic(lambda _: pool.submit(x).result(timeout=120), 2) as traffic:
            old_version = pool.version
            pool.reload(dense_mlp_retrained)
            traffic.floor = 1
            assert wait_until(lambda: sum(floor for floor, _ in traffic.answers) >= 5)
        assert pool.version != old_version
    answers, failures = traffic.answers, traffic.failures
    assert not failures, failures[:3]
    for after_swap, y in answers:
        assert np.array_equal(y, new) or (not after_swap and np.array_equal(y, old))
    assert any(np.array_equal(y, old) for _, y in answers)


ABSL_INFO = re.compile(r"^(\[[^]]*\] )?I\d{4} [\d:.]+ +(\d+) \S+:\d+\]")


def info_lines_from(err: str, pids: set[int]) -> list[str]:
    """TensorFlow's INFO lines in ``err`` written by one of ``pids`` (their main thread)."""
    return [line for line in err.splitlines()
            if (m := ABSL_INFO.match(line)) and int(m[2]) in pids]


def test_zygote_and_workers_leave_out_tensorflow_info_unless_a_level_is_set(capfd,
                                                                            monkeypatch):
    """Importing TensorFlow prints INFO lines before any log level applies; a pool's zygote
    and workers drop them, unless the user chose TF_CPP_MIN_LOG_LEVEL themselves."""
    x = INPUTS["dense_mlp"]()
    seen = {}
    for level in (None, "0"):
        if level is None:
            monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
        else:
            monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", level)
        capfd.readouterr()
        with wp.Pool(dense_mlp, call, workers=1) as pool:
            pool.submit(x).result()
            pids = {pool.zygote_pid, *pool.pids}
        seen[level] = info_lines_from(capfd.readouterr().err, pids)
    assert seen[None] == []
    assert seen["0"], "the zygote's import of TensorFlow printed no INFO line to drop"
