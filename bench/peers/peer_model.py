"""The one model every contender of bench/report.py serves, and the one predict they all run.

This file is imported inside each contender's own virtual environment, so it needs only
torch, safetensors and the standard library. A model is a directory holding
``config.json`` (what to build) and ``model.safetensors`` (its seeded weights):

- ``mlp``: square Linear layers of fp32 with ReLU between them, ``width`` wide, ``layers`` deep;
- ``bert``: a BERT-base-sized encoder (token and position embeddings, 12 post-norm
  layers of 768 with 12 heads and a 3072 GELU feed-forward), random weights from a seed.

The request payload is a fixed list (``example_input``): floats for an MLP, token ids for
the encoder. ``predict`` answers the head of the output and the pid of the process that
ran it, so the harness can tell workers apart and check outputs against the model run in
its own process. With dynamic batching on (a ``+batch`` contender: PEER_MAX_BATCH above 1)
a server hands ``predict_batch`` the requests it gathered, or, stacked as rows,
``predict_rows``: one forward pass for all of them.
"""

from __future__ import annotations

import json
import os
import pathlib

HEAD = 16  # output values each response carries: enough to check, cheap to encode
BERT = {"vocab": 30522, "hidden": 768, "layers": 12, "heads": 12, "ffn": 3072,
        "max_len": 512, "seq": 128}


def mlp_config(mib: int) -> dict:
    """Width and depth of square layers holding about ``mib`` MiB of fp32 weights."""
    width = min(4096, int((mib * 2**20 / 4) ** 0.5) // 64 * 64)
    return {"kind": "mlp", "width": width,
            "layers": max(1, round(mib * 2**20 / (4 * width * width)))}


def bert_config() -> dict:
    return {"kind": "bert", **BERT}


def skeleton(config: dict):
    """The empty module a config describes (weights still random)."""
    import torch
    from torch import nn

    if config["kind"] == "mlp":
        layers: list[nn.Module] = []
        for _ in range(config["layers"]):
            layers += [nn.Linear(config["width"], config["width"]), nn.ReLU()]
        return nn.Sequential(*layers[:-1]).eval()  # no ReLU last: outputs worth checking

    class Encoder(nn.Module):
        def __init__(self, c: dict):
            super().__init__()
            self.tokens = nn.Embedding(c["vocab"], c["hidden"])
            self.positions = nn.Embedding(c["max_len"], c["hidden"])
            self.norm = nn.LayerNorm(c["hidden"])
            layer = nn.TransformerEncoderLayer(c["hidden"], c["heads"], c["ffn"],
                                               activation="gelu", batch_first=True)
            self.layers = nn.TransformerEncoder(layer, c["layers"],
                                                enable_nested_tensor=False)

        def forward(self, ids):
            positions = torch.arange(ids.shape[1]).unsqueeze(0)
            return self.layers(self.norm(self.tokens(ids) + self.positions(positions)))

    return Encoder(config).eval()


def make_model(config: dict, directory: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Build the model from a seed and save it as ``directory``/model.safetensors."""
    import torch
    from safetensors.torch import save_file

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = skeleton(config)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def read_config(directory: str | os.PathLike) -> dict:
    return json.loads((pathlib.Path(directory) / "config.json").read_text())


def load(directory: str | os.PathLike | None = None):
    """The model in ``directory`` (default: $PEER_MODEL_DIR), ready for ``predict``.

    Every contender runs its workers on one intra-op thread each (workerpool's peer and the
    embedded Pool set threads_per_worker=1: its default gives one worker every core), so
    N workers on a small machine compete for cores the same way in every row."""
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    directory = pathlib.Path(directory or os.environ["PEER_MODEL_DIR"])
    model = skeleton(read_config(directory))
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def example_input(config: dict) -> list:
    """The fixed request payload: one row of floats for an MLP, 128 token ids for BERT."""
    if config["kind"] == "mlp":
        return [((i * 7919) % 1000) / 1000.0 for i in range(config["width"])]
    return [(i * 7919) % config["vocab"] for i in range(config["seq"])]


def as_tensor(inputs, config: dict):
    import torch

    if config["kind"] == "mlp":
        return torch.tensor([inputs], dtype=torch.float32)
    return torch.tensor([inputs], dtype=torch.int64)


def predict(model, inputs) -> dict:
    """One request: ``inputs`` as ``example_input`` gives it (a list, or an array of it).
    Returns {"y": the first HEAD output values, "pid": this process}."""
    import torch

    config = getattr(model, "peer_config", None) or _config_of(model)
    with torch.inference_mode():
        out = model(as_tensor(_flat(inputs), config))
    if out.dim() == 3:  # the encoder: the first token's vector, as BERT's pooler reads
        out = out[:, 0, :]
    return {"y": [float(v) for v in out.reshape(-1)[:HEAD]], "pid": os.getpid()}


def predict_batch(model, requests: list) -> list[dict]:
    """Several requests in one forward pass: ``predict``'s answer for each, in order, and
    how many shared that pass ("batch": the harness counts it)."""
    rows = [_flat(inputs) for inputs in requests]
    answers = predict_rows(model, rows)
    return [{"y": [float(v) for v in answers["y"][i]], "pid": os.getpid(),
             "batch": len(rows)} for i in range(len(rows))]


def predict_rows(model, rows) -> dict:
    """Requests stacked as rows (an array, or a list of ``example_input`` lists): one
    forward pass; {"y": the first HEAD values of each row's output, "pid": this process
    and "batch": the rows of this pass, for each row}, as arrays split by rows (a server
    that batches cuts them back)."""
    import numpy as np
    import torch

    config = getattr(model, "peer_config", None) or _config_of(model)
    dtype = torch.float32 if config["kind"] == "mlp" else torch.int64
    with torch.inference_mode():
        out = model(torch.as_tensor(np.asarray(rows)).to(dtype))
    if out.dim() == 3:
        out = out[:, 0, :]
    return {"y": out[:, :HEAD].numpy().astype(np.float32),
            "pid": np.full(out.shape[0], os.getpid(), np.int64),
            "batch": np.full(out.shape[0], out.shape[0], np.int64)}


def batch_settings() -> tuple[int, float]:
    """(max batch size, max wait in ms) this server was started with (PEER_MAX_BATCH,
    PEER_BATCH_WAIT_MS; 1: no batching)."""
    return (int(os.environ.get("PEER_MAX_BATCH", "1")),
            float(os.environ.get("PEER_BATCH_WAIT_MS", "5")))


def served_models() -> dict[str, str]:
    """{name: model directory} of a many-models trial (PEER_MODELS, JSON, which the harness
    sets for ``peer.command_many``'s server); {} when the server serves the one model of
    PEER_MODEL_DIR."""
    return json.loads(os.environ.get("PEER_MODELS") or "{}")


def _config_of(model) -> dict:
    if hasattr(model, "tokens"):
        return {"kind": "bert"}
    return {"kind": "mlp"}


def _flat(inputs):
    if hasattr(inputs, "reshape"):  # numpy or torch
        return inputs.reshape(-1).tolist()
    if inputs and isinstance(inputs[0], list):
        return [v for row in inputs for v in row]
    return inputs
