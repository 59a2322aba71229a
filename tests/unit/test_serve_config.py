"""What `workerpool serve` reads: versions on the command line and in TOML, and what a
repository load/unload request may say."""

from __future__ import annotations

import dataclasses
import json
import textwrap

import pytest

pytest.importorskip("uvicorn")

from workerpool.serve.config import ConfigError, models_from_toml, split_version  # noqa: E402
from workerpool.serving.errors import BadRequest  # noqa: E402
from workerpool.serve.main import models_and_settings, parser  # noqa: E402
from workerpool.serve.registry import load_parameters  # noqa: E402
from workerpool.serve.watch import fingerprint  # noqa: E402


@pytest.mark.parametrize("spec, expected", [
    ("model.pt@2", ("model.pt", "2")),
    ("app:load@v1.0", ("app:load", "v1.0")),
    ("model.pt", ("model.pt", None)),
    ("s3://bucket/a@b/model.pt", ("s3://bucket/a@b/model.pt", None)),  # not a version: a path
    ("user@host:model.pt", ("user@host:model.pt", None)),
    ("@3", ("@3", None)),
])
def test_split_version(spec, expected):
    assert split_version(spec) == expected


def test_the_same_model_twice_on_the_command_line_is_two_versions():
    args = parser().parse_args(["--model", "m=a.pt@1", "--model", "m=b.pt@2",
                                "--allow-source", "/models"])
    specs, settings = models_and_settings(args)
    assert [(s.name, s.source, s.version) for s in specs] == [("m", "a.pt", "1"),
                                                               ("m", "b.pt", "2")]
    assert settings.allow_sources == ("/models",)
    with pytest.raises(ConfigError, match="once"):
        models_and_settings(parser().parse_args(["--model", "m=a.pt", "--model", "m=b.pt"]))


def test_pool_options_on_the_command_line_reach_every_models_pool():
    args = parser().parse_args(["--model", "a=a.pt", "--model", "b=b.pt", "--workers", "3",
                                "--threads-per-worker", "1", "--max-queue", "8"])
    specs, _ = models_and_settings(args)
    for spec in specs:
        assert spec.pool_options == {"workers": 3, "threads_per_worker": 1, "max_queue": 8}
        assert spec.pool_arguments()[2]["threads_per_worker"] == 1


def test_elastic_workers_per_model_in_toml_and_for_every_model_on_the_command_line(tmp_path):
    config = tmp_path / "serve.toml"
    config.write_text(textwrap.dedent("""
        [models.awake]
        source = "a.pt"

        [models.sleepy]
        source = "b.pt"
        workers = 4
        min_workers = 0
        idle_timeout = 2.5
    """))
    specs, _ = models_and_settings(parser().parse_args(["--config", str(config)]))
    options = {spec.name: spec.pool_arguments()[2] for spec in specs}
    assert "min_workers" not in options["awake"]
    assert (options["sleepy"]["workers"], options["sleepy"]["min_workers"],
            options["sleepy"]["idle_timeout"]) == (4, 0, 2.5)
    specs, _ = models_and_settings(parser().parse_args(
        ["a.pt", "--min-workers", "1", "--idle-timeout", "30"]))
    assert specs[0].pool_options == {"min_workers": 1, "idle_timeout": 30.0}


def test_toml_versions_and_allow_sources(tmp_path):
    config = tmp_path / "serve.toml"
    config.write_text(textwrap.dedent("""
        [server]
        allow_sources = ["staging"]

        [models.m]
        versions = {"1" = "v1.pt", "2" = "/abs/v2.pt"}
        workers = 3

        [models.n]
        source = "n.pt"
        version = "7"
    """))
    specs, settings = models_from_toml(str(config), {})
    assert [(s.name, s.version, s.source, s.pool_options) for s in specs] == [
        ("m", "1", str(tmp_path / "v1.pt"), {"workers": 3}),
        ("m", "2", "/abs/v2.pt", {"workers": 3}),
        ("n", "7", str(tmp_path / "n.pt"), {})]
    assert settings["allow_sources"] == [str(tmp_path / "staging")]
    config.write_text('[models.m]\nsource = "a.pt"\nversions = {"1" = "b.pt"}\n')
    with pytest.raises(ConfigError, match="not both"):
        models_from_toml(str(config), {})


@pytest.mark.parametrize("parameters, expected", [
    (None, {}),
    ({"version": 3}, {"version": "3"}),
    ({"config": json.dumps({"source": "/m/v2.pt"})}, {"source": "/m/v2.pt"}),
    ({"unload_dependents": False}, {}),
])
def test_load_parameters(parameters, expected):
    assert load_parameters(parameters) == expected


@pytest.mark.parametrize("parameters, message", [
    ("v2", "JSON object"),
    ({"config": "{not json"}, "not JSON"),
    ({"file:1/model.pt": "AAAA"}, "does not take model files"),
    ({"version": "../../etc"}, "model version"),
    ({"version": True}, "model version"),
    ({"path": "/etc/passwd"}, "unknown parameters"),
])
def test_bad_load_parameters_are_refused(parameters, message):
    with pytest.raises(BadRequest, match=message):
        load_parameters(parameters)


def test_unload_takes_only_a_version():
    with pytest.raises(BadRequest, match="unknown parameters"):
        load_parameters({"source": "/m/v2.pt"}, unload=True)


def test_fingerprint_changes_with_a_renamed_in_file_of_the_same_size(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"a" * 3_000_000)
    before = fingerprint(str(path))
    staged = tmp_path / "staged"
    staged.write_bytes(b"a" * 2_999_999 + b"b")  # differs only in the last MiB
    staged.rename(path)
    assert fingerprint(str(path)) != before
    assert fingerprint(str(tmp_path / "missing")) is None
    directory_print = fingerprint(str(tmp_path))
    (tmp_path / "extra").write_bytes(b"x")
    assert fingerprint(str(tmp_path)) != directory_print


@pytest.mark.parametrize("argv, toml, message", [
    (["--port", "70000"], "", "port must be a port number"),
    ([], "max_request_bytes = -1", "max_request_bytes must be a positive integer"),
    ([], "header_timeout = 'soon'", "header_timeout must be a positive number"),
    ([], "debug = 'yes'", "debug must be a bool"),
    ([], "colour = 'red'", "unknown [server] settings ['colour']"),
    ([], "allow_sources = '/models'", "allow_sources must be a list"),
])
def test_server_settings_are_checked_once(tmp_path, argv, toml, message):
    config = tmp_path / "serve.toml"
    config.write_text(f'[server]\n{toml}\n\n[models.m]\nsource = "a.pt"\n')
    with pytest.raises(ConfigError) as caught:
        models_and_settings(parser().parse_args(["--config", str(config), *argv]))
    assert message in str(caught.value)


def test_server_settings_take_the_command_line_over_the_file(tmp_path):
    config = tmp_path / "serve.toml"
    config.write_text('[server]\nport = 9000\nmax_models = 3\n\n[models.m]\nsource = "a.pt"\n')
    _, settings = models_and_settings(parser().parse_args(["--config", str(config),
                                                           "--port", "9100"]))
    assert (settings.port, settings.max_models, settings.host) == (9100, 3, "127.0.0.1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1


def test_port_zero_on_the_command_line_means_any_free_port_not_the_default():
    _, settings = models_and_settings(parser().parse_args(["--port", "0", "--grpc-port", "0"]))
    assert (settings.port, settings.grpc_port, settings.tf_serving_port) == (0, 0, None)
