"""Typed configs: nested frozen dataclasses built from YAML plus ``key=value`` overrides.

Unknown or misspelled keys are errors that name the nearest valid key; values are checked
against the field types (``int``, ``float``, ``bool``, ``str``, ``Optional``, ``Literal``
-like string choices are the dataclass's own ``__post_init__`` business). YAML is read with
``yaml.safe_load`` only.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml


class ConfigError(ValueError):
    """A config that cannot be built; the message names the key and the fix."""


def _nearest(name: str, options: Sequence[str]) -> str:
    near = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args, True
    return [tp], False


def _coerce(value: Any, tp: Any, where: str):
    """Check / convert ``value`` to the annotated type ``tp``."""
    if tp is Any:
        return value
    candidates, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: null is not allowed (expected {tp})")
    errors = []
    for cand in candidates:
        origin = typing.get_origin(cand) or cand
        if dataclasses.is_dataclass(cand):
            if isinstance(value, cand):
                return value
            if isinstance(value, Mapping):
                return build(cand, value, prefix=where + ".")
            errors.append(f"a mapping for {cand.__name__}")
            continue
        if origin is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            errors.append("true/false")
        elif origin is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str):
                try:
                    return int(value)
                except ValueError:
                    pass
            errors.append("an integer")
        elif origin is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            errors.append("a number")
        elif origin is str:
            if isinstance(value, str):
                return value
            errors.append("a string")
        elif origin in (tuple, list):
            if isinstance(value, (list, tuple)):
                args = typing.get_args(cand)
                item = args[0] if args else Any
                return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
            errors.append("a list")
        else:
            return value
    raise ConfigError(f"{where}: got {value!r} ({type(value).__name__}), expected "
                      + " or ".join(errors))


def build(cls, data: Mapping[str, Any] | None, *, prefix: str = ""):
    """Instantiate dataclass ``cls`` from a (nested) mapping, rejecting unknown keys."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"unknown config key {prefix}{key!r}{_nearest(key, fields)}; "
                              f"valid keys here: {sorted(fields)}")
        kwargs[key] = _coerce(value, hints.get(key, Any), f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        # a message that starts with its key ("rollout.top_p=5.0: ...") needs no prefix
        message, where = str(e), prefix.rstrip(".") or cls.__name__
        named = message.startswith(prefix) if prefix else \
            re.match(r"\w*", message).group(0) in fields
        raise ConfigError(message if named else f"{where}: {message}") from e


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> nested dict; values parsed as YAML scalars (safe)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. step.micro_batches=4)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: Mapping) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(merged.get(k), Mapping):
            merged[k] = _merge(dict(merged[k]), v)
        else:
            merged[k] = v
    return merged


# the repository's configs/ shipped inside the package (amrsd_jax/configs links to it), so
# `configs/quickstart.yaml` is found from any working directory and from an installed wheel
BUNDLED_CONFIGS = Path(__file__).resolve().parent / "configs"


def find_config(path: str | Path) -> Path:
    """``path`` if it exists, else the bundled config it names (``configs/x.yaml`` or
    ``x.yaml``, relative to :data:`BUNDLED_CONFIGS`), else ``path`` unchanged."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    bundled = BUNDLED_CONFIGS.joinpath(*parts)
    return bundled if parts and bundled.is_file() else path


def read_yaml(path: str | Path, _seen: tuple = ()) -> dict[str, Any]:
    """A YAML mapping (``safe_load``); a top-level ``base: other.yaml`` (relative to this
    file) is loaded first and this file's keys are merged over it, so a per-method config
    can differ from a shared one in a single line. A relative ``path`` that does not exist
    is looked up among the bundled configs (:func:`find_config`)."""
    path = find_config(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in _seen:
        raise ConfigError(f"config {path} includes itself through 'base'")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:  # e.g. a !!python tag: safe_load refuses to construct it
        where = getattr(e, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{line}: {problem}; configs are plain YAML (no tags)") \
            from None
    if loaded is not None and not isinstance(loaded, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    data = dict(loaded or {})
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: 'base' must be a path to another YAML config")
        data = _merge(read_yaml(path.parent / base, _seen + (path.resolve(),)), data)
    return data


def load_config(cls, path: str | Path | None = None, overrides: Sequence[str] = ()):
    """Build ``cls`` from a YAML file (``safe_load``, with ``base:`` inheritance) and
    ``key=value`` overrides."""
    data = read_yaml(path) if path is not None else {}
    return build(cls, _merge(data, parse_overrides(overrides)))


def to_dict(config) -> dict[str, Any]:
    """Plain nested dict of a config (for logs and checkpoints)."""
    return dataclasses.asdict(config)
