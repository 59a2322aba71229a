"""Models whose module imports no framework: torch and TensorFlow are imported inside the
functions, so a process that only names them (a pool with load_in="loader") never does."""

from __future__ import annotations

import os
import signal
import time

import numpy as np


def torch_mlp():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(),
                               torch.nn.Linear(512, 8)).eval()


def torch_predict(model, x):
    import torch

    return model(torch.from_numpy(x))  # a tensor: numpy_results makes it an array


def torch_reference(x):
    import torch

    with torch.inference_mode():
        return torch_predict(torch_mlp(), x).numpy()


def keras_mlp():
    """Some constants above tf_freeze.MIN_MAPPED_BYTES: mapped regions, not inline."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,), name="x")
    hidden = keras.layers.Dense(512, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(8)(hidden))


def keras_call(model, x):
    return model(x)


def keras_reference(x):
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    return np.asarray(keras_mlp()(x, training=False))


LOADS = {"torch": (torch_mlp, torch_predict, torch_reference),
         "tensorflow": (keras_mlp, keras_call, keras_reference)}


class BadWeights(Exception):
    pass


def raises():
    raise BadWeights("checkpoint truncated at byte 12")


def dies():
    os.kill(os.getpid(), signal.SIGKILL)


def hangs(pid_file):
    def load():
        with open(pid_file, "w") as out:
            out.write(str(os.getpid()))
        time.sleep(600)
    return load


def echo(model, x):
    return x
