"""Typed configuration: YAML file, then dotted ``key=value`` overrides, then dataclasses.

Precedence (last wins): dataclass defaults < YAML file < command-line overrides such as
``filter.ensemble_size=40``. Every section is a dataclass; unknown keys, wrong types and
values outside a ``Literal`` set fail with a :class:`ConfigError` that names the dotted key
and the closest valid spellings. A field whose metadata carries ``registry`` is a
polymorphic section: its ``name`` key (else the default entry) picks the dataclass (``filter.name: ensf``).

Numbers have one set of rules for every tool: a config value or a command-line option given
as a float must be finite (NaN never passes; infinity only where a field says so), and a
field declared with :func:`bounded` (or an argparse option typed with :func:`number`) must lie
in its :class:`Bound`; the message names the key or option, the value and the allowed range.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import math
import sys
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")

DTYPES = {"float32": torch.float32, "float64": torch.float64}
"""The precisions a config or option may name, by name."""


class ConfigError(ValueError):
    """A configuration file or override that does not match the schema."""


@dataclasses.dataclass(frozen=True)
class Bound:
    """The allowed range of a number: limits inclusive (``ge``/``le``) or strict (``gt``/``lt``).

    Infinity passes only with ``infinite=True`` (and the limits); NaN never does.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    infinite: bool = False

    def holds(self, value: float) -> bool:
        if math.isnan(value) or (math.isinf(value) and not self.infinite):
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self, integer: bool = False) -> str:
        """The range in words: ``an integer >= 1``, ``a finite number in [0, 1)``, ``a number > 0 or inf``."""
        low = ("[", ">=", self.ge) if self.ge is not None else ("(", ">", self.gt) if self.gt is not None else None
        high = ("]", "<=", self.le) if self.le is not None else (")", "<", self.lt) if self.lt is not None else None
        kind = "an integer" if integer else "a number" if self.infinite or high else "a finite number"
        if low and high:
            text = f"{kind} in {low[0]}{_text(low[2])}, {_text(high[2])}{high[0]}"
        elif low or high:
            _, relation, limit = low or high
            text = f"{kind} {relation} {_text(limit)}"
        else:
            text = kind
        return f"{text} or inf" if self.infinite else text

    def check(self, value: Any, name: str, nullable: bool = False) -> None:
        """Raise ValueError ``name=value is out of range: must be ...`` unless ``value`` holds (None passes)."""
        if value is None:
            return
        integer = isinstance(value, int) and not isinstance(value, bool)
        if not self.holds(float(value)):
            allowed = self.describe(integer) + (", or null" if nullable else "")
            raise ValueError(f"{name}={value!r} is out of range: must be {allowed}")


FINITE = Bound()
"""Any finite number: the rule for every float without a declared range."""


def bounded(default: Any = dataclasses.MISSING, **limits: Any) -> Any:
    """A dataclass field whose value must satisfy ``Bound(**limits)``, checked when a config is built."""
    return dataclasses.field(default=default, metadata={"bound": Bound(**limits)})


def check_bounds(instance: Any, prefix: str = "") -> None:
    """Raise ValueError naming the first number field of dataclass ``instance`` outside its range.

    For ``__post_init__``: objects built in code obey the same rules as those built from a config
    (where :func:`build` has already checked each value under its dotted key).
    """
    hints = typing.get_type_hints(type(instance))
    for field in dataclasses.fields(instance):
        _check_number(field, getattr(instance, field.name), _join(prefix, field.name), hints[field.name])


def _check_number(field: dataclasses.Field, value: Any, key: str, hint: Any) -> None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        field.metadata.get("bound", FINITE).check(value, key, nullable=type(None) in typing.get_args(hint))


def number(kind: type[int] | type[float] = float, **limits: Any) -> Callable[[str], int | float]:
    """An argparse ``type=`` for a number in ``Bound(**limits)``: the same rule and words as a config field."""
    bound = Bound(**limits)

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not bound.holds(float(value)):
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: must be {bound.describe(kind is int)}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _text(limit: float) -> str:
    return str(int(limit)) if float(limit).is_integer() else str(limit)


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
    if path is not None and Path(path).is_dir():
        raise ConfigError(f"config file {path} is a directory; give a YAML file")
    try:
        data = OmegaConf.load(path) if path is not None else OmegaConf.create({})
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except (OmegaConfBaseException, ValueError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot parse config file {path}: {' '.join(str(err).split())}") from None
    if not isinstance(data, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    if path is not None and not data:
        raise ConfigError(f"config file {path} is empty; give at least one setting (the defaults are not run "
                          f"silently)")
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
                _check_number(field, kwargs[name], key, hints[name])
            except ValueError as err:
                raise ConfigError(str(err)) from None
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
