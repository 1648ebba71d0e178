"""The generic half of vpo_ray.config: YAML + `key=value` overrides -> a typed, frozen dataclass.

`load_config(Cls, path, overrides)` reads the YAML file (optional), applies dotted
`key=value` overrides, and checks every key and type: an unknown key or a value of the
wrong type raises `ConfigError` naming the key. The job dataclasses live in vpo_ray.config,
which re-exports everything here.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config key is unknown, missing or of the wrong type; the message names it."""


# ---------------------------------------------------------------------------- loading

def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert `value` to type `tp`; raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return _build(tp, value, prefix=key + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in kwargs]
    if missing:
        raise ConfigError(f"missing config key '{prefix}{missing[0]}'")
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a section's own check names its field; say which section it is
        if prefix and not str(e).startswith(prefix):
            raise ConfigError(f"{prefix}{e}") from None
        raise


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", yaml-parsed value). Values parse as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{key}': '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def read_yaml_mapping(path: str | Path) -> dict:
    """The mapping at the top of YAML file `path`; ConfigError naming the file if it is not one."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as e:
        why = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else (e.strerror or str(e))
        raise ConfigError(f"config file {p} cannot be read: {why}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {p} must hold a mapping at top level, got {type(loaded).__name__}")
    return loaded


def load_config(cls: type, path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                **fields: Any) -> Any:
    """Build `cls` from YAML file `path`, then keyword `fields`, then `key=value` overrides."""
    data: dict = read_yaml_mapping(path) if path else {}
    for k, v in fields.items():
        if v is not None:
            _set_dotted(data, k, v)
    for o in overrides or []:
        k, v = parse_override(o)
        _set_dotted(data, k, v)
    return _build(cls, data)


def replace(cfg: Any, **changes: Any) -> Any:
    """dataclasses.replace with dotted keys: replace(cfg, **{"video.fps": 4})."""
    data = to_dict(cfg)
    for k, v in changes.items():
        _set_dotted(data, k, v)
    return _build(type(cfg), data)


def given_keys(path: Optional[str | Path], overrides: list[str], fields: dict) -> set[str]:
    """Dotted keys set by the YAML file, keyword fields or key=value overrides."""
    def flatten(d: dict, prefix: str = ""):
        for k, v in d.items():
            yield prefix + k
            if isinstance(v, dict):
                yield from flatten(v, prefix + k + ".")

    keys = set(flatten(read_yaml_mapping(path))) if path else set()
    keys |= {k for k, v in fields.items() if v is not None}
    for o in overrides:
        k, v = parse_override(o)
        keys |= {k} | (set(flatten(v, k + ".")) if isinstance(v, dict) else set())
    return keys


def load_config_with_defaults(cls: type, path: Optional[str | Path], overrides: Optional[list[str]],
                              defaults: dict, **fields: Any) -> Any:
    """load_config, then `defaults` ({dotted key: value}) for every key the user did not set.

    Presets use it: `--preset tiny` brings the tiny models' own clip size and short
    generations unless the YAML, a flag or an override says otherwise. A default for a
    key `cls` does not have (a generate-only setting, for eval) is skipped.
    """
    overrides = list(overrides or [])
    given = given_keys(path, overrides, fields)
    own = {f.name for f in dataclasses.fields(cls)}
    extra = [f"{k}={v}" for k, v in defaults.items() if k not in given and k.split(".")[0] in own]
    return load_config(cls, path, extra + overrides, **fields)
