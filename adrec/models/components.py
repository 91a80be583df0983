"""Components named by ``_target_``: how a config names a model, a user encoder or a loss.

A component is a mapping ``{_target_: <dotted path>, <option>: <value>, ...}``, plus
``_partial_: true`` when the target also takes arguments known only at run time (a model's
builder takes the feature map). Its options are the target's keyword-only parameters: a builder
function's (``build_two_tower(feature_map, *, embedding_dim, ...)``) or an options dataclass's
fields (``GRUEncoderOptions(hidden=32)``). ``instantiate`` builds nested components first and
refuses, naming the key:
  - a key that is not an option (a misspelling), with the closest option and all of them;
  - a missing option, and a value of the wrong type;
  - a target that is not in COMPONENTS. A config comes from YAML, but also from the training
    config an exported model stores (retraining rebuilds its champion from it), so building one
    must never import or call anything but adrec's own components.
Defaults have one home each: a model builder has none (its conf/model/*.yaml states every
option), an options dataclass holds its own (conf/model/user_encoder/*.yaml lists the same
values so that they can be overridden; a test keeps the two equal).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
from collections.abc import Mapping
from types import NoneType, UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

# The only targets a config may name. Strings, checked before anything is imported.
COMPONENTS = (
    "adrec.models.two_tower.build_two_tower",
    "adrec.models.ranker.build_dcn",
    "adrec.models.sequence.MeanEncoderOptions",
    "adrec.models.sequence.ConvEncoderOptions",
    "adrec.models.sequence.GRUEncoderOptions",
    "adrec.models.sequence.AttentionEncoderOptions",
    "adrec.train.losses.LossConfig",
)
SPECIAL = ("_target_", "_partial_")


class ConfigError(ValueError):
    """A component config names an unknown target, an unknown option, or a value of the wrong type."""


def target_of(component: Any) -> str:
    """The ``_target_`` that names a class or function: ``adrec.models.sequence.GRUEncoderOptions``."""
    return f"{component.__module__}.{component.__qualname__}"


def instantiate(config: Any, where: str) -> Any:
    """``config`` with every ``{_target_: ...}`` mapping in it built; ``where`` is its key path (``model``)."""
    if isinstance(config, Mapping) and "_target_" in config:
        return _component(config, where)
    if isinstance(config, Mapping):
        return {key: instantiate(value, f"{where}.{key}") for key, value in config.items()}
    if isinstance(config, (list, tuple)):
        return type(config)(instantiate(value, f"{where}[{i}]") for i, value in enumerate(config))
    return config


def build_options(cls: type, values: Mapping, where: str) -> Any:
    """``cls(**values)`` for an options dataclass, each key and value checked as ``instantiate`` does."""
    return cls(**_checked(cls, values, where, partial=False))


def _component(config: Mapping, where: str) -> Any:
    target = config["_target_"]
    if target not in COMPONENTS:
        raise ConfigError(
            f"{where}._target_={target!r} is not one of adrec's components; a config, and the training config a model "
            f"artifact stores, can build only these: {', '.join(COMPONENTS)}"
        )
    module, _, name = target.rpartition(".")
    component = getattr(importlib.import_module(module), name)
    partial = bool(config.get("_partial_", False))
    options = _checked(component, {k: instantiate(v, f"{where}.{k}") for k, v in config.items() if k not in SPECIAL}, where, partial)
    if partial:
        return functools.partial(component, **options)
    return component(**options)


def _checked(component: Any, values: Mapping, where: str, partial: bool) -> dict:
    """``values`` as ``component``'s keyword-only options: each key one of them, none missing, each of its type."""
    parameters = inspect.signature(component).parameters.values()
    options = {p.name: p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
    runtime = [p.name for p in parameters if p.kind is not inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty]
    name = target_of(component)
    for key in values:
        if key not in options:
            close = difflib.get_close_matches(str(key), list(options), n=1)
            hint = f" (did you mean {where}.{close[0]}?)" if close else ""
            raise ConfigError(f"{where}.{key} is not an option of {name}{hint}; known: {', '.join(options) or 'none'}")
    missing = [f"{where}.{n}" for n, p in options.items() if p.default is inspect.Parameter.empty and n not in values]
    if missing:
        raise ConfigError(f"{', '.join(missing)} missing: {name} has no default for it")
    if runtime and not partial:
        raise ConfigError(f"{where}: {name} also takes {', '.join(runtime)} at run time, so its config needs _partial_: true")
    hints = get_type_hints(component)
    return {key: _typed(f"{where}.{key}", value, hints.get(key, Any)) for key, value in values.items()}


def _typed(key: str, value: Any, hint: Any) -> Any:
    """``value`` as the annotation ``hint``: int, float, bool, str, list[...] / tuple[..., ...], a class, or X | None."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, UnionType):
        if value is None and NoneType in args:
            return None
        hint = next(a for a in args if a is not NoneType) if len(args) == 2 and NoneType in args else Any
        origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        item = args[0] if args else Any
        return origin(_typed(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (bool, str) and isinstance(value, hint):
        return value
    if origin is None and isinstance(hint, type) and hint not in (int, float, bool, str, list, tuple) and isinstance(value, hint):
        return value
    expected = getattr(origin or hint, "__name__", str(hint))
    if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
        raise ConfigError(f"{key} is {value!r}: name the component with a _target_ ({target_of(hint)} or a subclass)")
    raise ConfigError(f"{key}={value!r}: expected {expected}")
