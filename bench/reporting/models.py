"""The report's models, built once from a seed into bench/.models/<name> (config.json and
model.safetensors, as bench/peers/peer_model.py writes them), with the request payload and
the in-process model's answer to it, against which every contender's answer is checked."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from reporting.venvs import BENCH, PEERS

MODELS = BENCH / ".models"

# name -> the peer_model expression of its config
CONFIGS = {
    "mlp256": "mlp_config(256)",
    "mlp1024": "mlp_config(1024)",
    "bert": "bert_config()",
}


def config_expression(name: str) -> str:
    if name in CONFIGS:
        return CONFIGS[name]
    if name.startswith("mlp") and name[3:].isdigit():  # any size: mlp8 for a smoke run
        return f"mlp_config({int(name[3:])})"
    raise ValueError(f"unknown model {name!r}: use mlp<MiB> or bert")


def ensure(name: str, seed: int = 0) -> pathlib.Path:
    """The model's directory, with input.json (the payload) and reference.json (the
    in-process answer's ``y``) beside the weights; built in a child process so this one
    never holds the weights. Another ``seed``: the same shape with other weights (the
    many-models trials serve several distinct models)."""
    directory = MODELS / (name if seed == 0 else f"{name}-seed{seed}")
    if (directory / "reference.json").exists():
        return directory
    code = f"""
import json, pathlib, sys
sys.path.insert(0, {str(PEERS)!r})
import peer_model as m
config = m.{config_expression(name)}
directory = m.make_model(config, {str(directory)!r}, seed={seed})
inputs = m.example_input(config)
(directory / "input.json").write_text(json.dumps(inputs))
answer = m.predict(m.load(directory), inputs)
(directory / "reference.json").write_text(json.dumps(answer["y"]))
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    return directory


def describe(directory: pathlib.Path) -> dict:
    """What the report says of a model: its kind, shape and weight bytes."""
    config = json.loads((directory / "config.json").read_text())
    size = (directory / "model.safetensors").stat().st_size
    return {"config": config, "mib": size / 2**20}


def reference(directory: pathlib.Path) -> list[float]:
    return json.loads((directory / "reference.json").read_text())
