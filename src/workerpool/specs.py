"""SPECs: how a command line or a config file names a model and its functions.

    module:attr | path/to/file.py:attr   a load (or predict, builder) function
    a model path or URL                  a file or directory sources/files.py serves

Used by every front end that takes a model by name (``workerpool serve``, ``workerpool
score``, the Ray helpers): turning a SPEC into ``load`` and ``predict`` happens here, once.
A function a SPEC names can be imported where it runs only (``Named``): the loader process
and the workers, never a server that must not import torch or TensorFlow.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Any, Callable

from .errors import ConfigError
from .sources import files

MODULE_ATTR = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
FILE_ATTR = re.compile(r"^(?P<file>.+\.py):(?P<attr>[A-Za-z_][\w.]*)$")


def is_function_spec(spec: str) -> bool:
    return bool(MODULE_ATTR.match(spec) or FILE_ATTR.match(spec))


class Named:
    """The function a ``module:attr`` or ``file.py:attr`` spec names, imported wherever it
    is unpickled (a loader process, the zygote) or first called, not where it is named.
    Pickles as its spec."""

    def __init__(self, spec: str):
        self.spec = spec
        locate(spec)  # a bad spec or a missing file fails here, at once

    def __call__(self, *args, **kwargs):
        return resolve(self.spec)(*args, **kwargs)

    def __reduce__(self):
        return (resolve, (self.spec,))

    def __repr__(self) -> str:
        return f"Named({self.spec!r})"


def locate(spec: str) -> tuple[str, str]:
    """``(module name, attribute)`` of a ``module:attr`` or ``file.py:attr`` spec. A file's
    directory joins sys.path, so its functions reach the workers by reference like any
    module's."""
    file_match = FILE_ATTR.match(spec)
    if file_match:
        path = os.path.abspath(file_match["file"])
        if not os.path.isfile(path):
            raise ConfigError(f"{spec}: no file {path}")
        directory, module_name = os.path.split(path[:-3])
        if directory not in sys.path:
            sys.path.insert(0, directory)
        return module_name, file_match["attr"]
    if MODULE_ATTR.match(spec):
        module_name, attr = spec.split(":")
        return module_name, attr
    raise ConfigError(f"{spec!r} is not module:attr or path/to/file.py:attr")


def resolve(spec: str):
    """The object a ``module:attr`` or ``file.py:attr`` names (imported here)."""
    module_name, attr = locate(spec)
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{spec}: cannot import {module_name}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{spec}: {module_name} has no attribute {attr}") from None
    return obj


def load_and_predict(source: str | Callable[[], Any], predict=None, builder=None, *,
                     trust_pickle: bool = False,
                     import_here: bool = False) -> tuple[Callable[[], Any], Callable[..., Any]]:
    """``(load, predict)`` for a Pool from SPECs: ``source`` a load function, its SPEC, or
    a model path/URL (with ``builder`` for state-dict files); ``predict`` a function, its
    SPEC, or None (the model is called). Functions named by SPEC are imported where they
    run (``Named``) unless ``import_here`` (``load_in="parent"``: load() runs here)."""
    named = resolve if import_here else Named
    load = source if callable(source) else None
    builder = named(builder) if isinstance(builder, str) else builder
    if load is None:
        load = named(source) if is_function_spec(source) else \
            files.loader_for(source, builder, trust_pickle)
    if isinstance(predict, str):
        predict = named(predict)
    return load, predict or files.default_predict
