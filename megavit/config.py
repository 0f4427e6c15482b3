"""Typed configuration: YAML file, then dotted ``key=value`` overrides, then dataclasses.

Precedence (last wins): dataclass defaults < YAML file < command-line overrides such as
``filter.ensemble_size=40``. Every section is a dataclass; unknown keys, wrong types and
values outside a ``Literal`` set fail with a :class:`ConfigError` that names the dotted key
and the closest valid spellings. A field whose metadata carries ``registry`` is a
polymorphic section: its ``name`` key (else the default entry) picks the dataclass (``filter.name: ensf``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import sys
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")

DTYPES = {"float32": torch.float32, "float64": torch.float64}
"""The precisions a config or option may name, by name."""


class ConfigError(ValueError):
    """A configuration file or override that does not match the schema."""


def registry_field(registry: Mapping[str, type], default: str) -> Any:
    """A dataclass field whose section picks its schema from ``registry`` by ``name``."""
    return dataclasses.field(
        default_factory=lambda: registry[default](),
        metadata={"registry": registry, "default": default},
    )


def load_config(schema: type[T], path: str | Path | None, overrides: list[str] = ()) -> T:
    """Read ``path`` (YAML), apply dotted ``overrides`` and build a validated ``schema``."""
    return build(schema, load_mapping(path, overrides))


@contextlib.contextmanager
def config_errors(prog: str) -> Iterator[None]:
    """For a command-line tool: a :class:`ConfigError` raised inside prints ``prog: error: ...`` and
    exits with status 2, argparse's convention for a bad command line."""
    try:
        yield
    except ConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def load_mapping(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The YAML file ``path`` (none: empty) with dotted ``key=value`` overrides applied, as plain
    Python containers with interpolations resolved."""
    try:
        data = OmegaConf.load(path) if path is not None else OmegaConf.create({})
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OmegaConfBaseException, ValueError) as err:
        raise ConfigError(f"cannot parse config file {path}: {err}") from None
    if not isinstance(data, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        merged = OmegaConf.merge(data, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid override or interpolation: {err}") from None


def build(schema: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Construct dataclass ``schema`` from a plain mapping, checking keys and types."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, found {data!r}")
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    hints = typing.get_type_hints(schema)
    for key in data:
        if key not in fields:
            raise ConfigError(_unknown_key_message(_join(where, key), key, fields))
    kwargs = {}
    for name, value in data.items():
        field = fields[name]
        key = _join(where, name)
        if "registry" in field.metadata:
            kwargs[name] = _build_from_registry(field.metadata["registry"], field.metadata["default"], value, key)
        else:
            kwargs[name] = _coerce(hints[name], value, key)
    try:
        return schema(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where or 'config'}: {err}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a built config, with ``name`` for registry sections."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            section = to_dict(value)
            if "registry" in field.metadata:
                name = _registry_name(field.metadata["registry"], type(value))
                section = {"name": name, **section}
            value = section
        out[field.name] = value
    return out


def _build_from_registry(registry: Mapping[str, type], default: str, value: Any, key: str) -> Any:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a mapping with a 'name' key, one of {sorted(registry)}")
    name = value.get("name", default)
    if name not in registry:
        close = difflib.get_close_matches(str(name), list(registry), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"{key}.name: unknown value {name!r}; valid: {sorted(registry)}{hint}")
    rest = {k: v for k, v in value.items() if k != "name"}
    return build(registry[name], rest, key)


def _registry_name(registry: Mapping[str, type], cls: type) -> str:
    return next(name for name, entry in registry.items() if entry is cls)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        errors = []
        for candidate in candidates:
            try:
                return _coerce(candidate, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=3)
            hint_text = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}{hint_text}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, found {value!r}")
        item = args[0] if args else Any
        return origin(_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    if hint is int and isinstance(value, float) and value.is_integer():  # model.dim=1e7
        return int(value)
    raise ConfigError(f"{key}: expected {getattr(hint, '__name__', hint)}, found {value!r}")


def _unknown_key_message(key: str, name: str, fields: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(name, list(fields), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown config key {key!r}{hint} (valid here: {', '.join(sorted(fields))})"


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key
