"""What a server serves: models named on the command line or in a TOML file.

    workerpool serve SPEC [--predict SPEC] [--name NAME] [pool options]
    workerpool serve --model NAME=SPEC --model NAME2=SPEC2 [pool options for all]
    workerpool serve --config serve.toml        ([server] and one [models.NAME] table each)
    workerpool serve --model NAME=SPEC@1 --model NAME=SPEC2@2     (two live versions)

A SPEC is ``module:attr`` or ``path/to/file.py:attr`` (a ``load`` function, or for
``--predict`` a predict function), or a model path/URL that ``workerpool.sources.files``
serves. Model paths and functions come from the operator, never from a request.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable

import numpy as np

from .. import signature
from ..errors import ConfigError
from ..serving.inline import CANNOT_BATCH
from ..specs import FILE_ATTR, MODULE_ATTR, load_and_predict
from ..tensors import call_argument
from . import tf_warmup

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

_NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,127}$")
_VERSION = re.compile(r"^[A-Za-z0-9][\w.-]{0,63}$")

# Pool options a model may set (per model in TOML, for every model on the command line).
POOL_OPTIONS = ("workers", "min_workers", "idle_timeout", "max_batch_size", "max_wait_ms", "max_queue", "timeout",
                "start_method", "threads_per_worker", "tf_engine", "preload",
                "max_message_bytes", "heartbeat_timeout", "max_requests_per_worker",
                "spare_zygote", "load_in", "inline")
# What a [models.NAME] table may hold besides source/version or versions.
MODEL_KEYS = ("predict", "builder", "warmup", "inputs", "outputs", "trust_pickle",
              *POOL_OPTIONS)
# A server runs load() in a loader process, so its own process imports no framework and
# holds no weights, whatever models it serves.
SERVER_LOAD_IN = "loader"


@dataclasses.dataclass
class ModelSpec:
    """One model to serve: where it comes from and how its pool runs."""

    name: str
    source: str | Callable[[], Any]
    version: str = "1"
    predict: str | Callable[..., Any] | None = None
    builder: str | Callable[[], Any] | None = None
    warmup: str | list | None = None  # an .npz file (one call: its arrays by name), or inputs
    inputs: list | None = None
    outputs: list | None = None
    trust_pickle: bool = False
    pool_options: dict = dataclasses.field(default_factory=dict)

    def pool_arguments(self) -> tuple[Callable[[], Any], Callable[..., Any], dict]:
        """``(load, predict, keyword arguments)`` for ``workerpool.Pool``.

        With ``load_in="loader"`` (the default here) the functions named by spec are
        imported in the loader and the workers, never in this process (their modules
        may import torch or TensorFlow)."""
        options = dict(self.pool_options, inputs=self.inputs, outputs=self.outputs,
                       warmup=self.warmup_arguments(), numpy_results=True)
        options.setdefault("load_in", SERVER_LOAD_IN)
        # An inline model is called in this process (serving/inline.py): it loads here.
        import_here = bool(options.get("inline")) or options["load_in"] != "loader"
        load, predict = load_and_predict(self.source, self.predict, self.builder,
                                         trust_pickle=self.trust_pickle,
                                         import_here=import_here)
        return load, predict, options

    def warmup_arguments(self) -> list:
        """The warm-up inputs as predict's arguments (a pool's ``warmup``)."""
        return [call_argument(s) for s in self.warmup_samples()]

    def warmup_samples(self) -> list:
        """The warm-up inputs: from an .npz file, one sample: a dict of its arrays by name;
        a list is taken as it is (each item an array, or a dict of arrays by name). None:
        a SavedModel directory's TF Serving warm-up requests, if it has them."""
        warmup = self.warmup
        if warmup is None:
            recorded = tf_warmup.warmup_file(self.source)  # TF Serving's convention
            if recorded is None:
                return []
            try:
                return tf_warmup.read_samples(recorded)
            except tf_warmup.WarmupError as exc:
                raise ConfigError(str(exc)) from None
        if not isinstance(warmup, (str, os.PathLike)):
            return list(warmup)
        try:
            with np.load(warmup, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read warm-up inputs from {warmup}: {exc}") from exc
        if not arrays:
            raise ConfigError(f"{warmup} holds no arrays")
        return [arrays]


def check_version(version) -> str:
    if not isinstance(version, str) or not _VERSION.match(version):
        raise ConfigError(f"model version {version!r}: use letters, digits, '.', '_' and '-'")
    return version


def split_version(spec: str) -> tuple[str, str | None]:
    """``SPEC@VERSION`` -> (SPEC, VERSION); a SPEC without one -> (SPEC, None)."""
    head, sep, tail = spec.rpartition("@")
    if sep and head and _VERSION.match(tail):
        return head, tail
    return spec, None


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"model name {name!r}: use letters, digits, '.', '_' and '-'")
    return name


def default_name(spec: str) -> str:
    """A model's name from its SPEC: the attribute, or the file or directory name."""
    file_match = FILE_ATTR.match(spec)
    if file_match or MODULE_ATTR.match(spec):
        module = file_match["file"] if file_match else spec.split(":")[0]
        base = os.path.basename(module)
        return re.sub(r"[^\w.-]", "_", base[:-3] if base.endswith(".py") else base)
    base = os.path.basename(spec.rstrip("/")) or "model"
    return re.sub(r"[^\w.-]", "_", base.split(".")[0]) or "model"


def models_from_toml(path: str, cli_options: dict) -> tuple[list[ModelSpec], dict]:
    """The models of a serve.toml and its [server] settings."""
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    unknown = set(document) - {"server", "models"}
    if unknown:
        raise ConfigError(f"{path}: unknown tables {sorted(unknown)} (use [server] and "
                          "[models.NAME])")
    models = document.get("models") or {}
    if not models:
        raise ConfigError(f"{path} declares no [models.NAME] table")
    base = os.path.dirname(os.path.abspath(path))
    specs = []
    for name, table in models.items():
        table = dict(table)
        versions = table.pop("versions", None)
        if versions is None:
            if "source" not in table:
                raise ConfigError(f"{path}: [models.{name}] needs a source (or versions)")
            versions = {str(table.pop("version", "1")): table.pop("source")}
        elif "source" in table or "version" in table:
            raise ConfigError(f"{path}: [models.{name}]: give source (and version) or "
                              "versions, not both")
        if not isinstance(versions, dict) or not versions or not all(
                isinstance(v, str) for v in versions.values()):
            raise ConfigError(f"{path}: [models.{name}] versions must be a table of "
                              'version = "source"')
        known = set(MODEL_KEYS)
        if set(table) - known:
            raise ConfigError(f"{path}: [models.{name}] has unknown keys "
                              f"{sorted(set(table) - known)}; known: {sorted(known)}")
        warmup = table.get("warmup")
        if isinstance(warmup, str) and not os.path.isabs(warmup):
            warmup = os.path.join(base, warmup)
        options = dict(cli_options)
        options.update({key: table[key] for key in POOL_OPTIONS if key in table})
        for version, source in versions.items():
            specs.append(ModelSpec(
                name=check_name(name), source=_relative(source, base),
                version=check_version(str(version)),
                predict=_relative(table.get("predict"), base),
                builder=_relative(table.get("builder"), base), warmup=warmup,
                inputs=table.get("inputs"), outputs=table.get("outputs"),
                trust_pickle=bool(table.get("trust_pickle", False)), pool_options=options))
    settings = dict(document.get("server") or {})
    if "allow_sources" in settings:
        if not isinstance(settings["allow_sources"], list):
            raise ConfigError(f"{path}: allow_sources must be a list of paths, got "
                              f"{settings['allow_sources']!r}")
        settings["allow_sources"] = [_relative(p, base) for p in settings["allow_sources"]]
    for key in ("tls_cert", "tls_key"):
        if isinstance(settings.get(key), str):
            settings[key] = os.path.join(base, settings[key])  # (an absolute path stays)
    return specs, settings


def _relative(spec: str | None, base: str) -> str | None:
    """A relative file path in the TOML is relative to the TOML file's directory."""
    if spec is None or "://" in spec:
        return spec
    file_match = FILE_ATTR.match(spec)
    if file_match and not os.path.isabs(file_match["file"]):
        return os.path.join(base, file_match["file"]) + ":" + file_match["attr"]
    if not file_match and not MODULE_ATTR.match(spec) and not os.path.isabs(spec):
        return os.path.join(base, spec)
    return spec


def check_declarations(spec: ModelSpec) -> None:
    """Refuse a bad inputs/outputs declaration, or an inline model asked to batch, before
    anything loads."""
    options = spec.pool_options
    if options.get("inline") and (options.get("max_batch_size") or 1) > 1:
        raise ConfigError(f"model {spec.name}: {CANNOT_BATCH}")
    for field in ("inputs", "outputs"):
        try:
            signature.specs(getattr(spec, field))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model {spec.name}: bad {field}: {exc}") from exc
