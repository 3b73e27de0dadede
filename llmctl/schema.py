"""Typed dataclasses from YAML, strictly: declared domains, nested mappings, `key.path=value` overrides.

A field's domain (`choice`, `bounded`) travels in its metadata, so a recipe value (`from_dict`) and a ModelConfig
built in code (`check_fields`) are checked the same way, and an error names the dotted key. An unknown key is an
error with the closest known one suggested; a value of the wrong type is an error (YAML 1.1's `1e-3` string is
read as the number it means; a number where a path is expected, as its text)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from llmctl.errors import UserError


def choice(default, *options):
    """A field whose value must be one of `options`."""
    return field(default=default, metadata={"choices": options})


def bounded(default, *, ge=None, gt=None, le=None, lt=None):
    """A numeric field whose value (unless None) must lie in the range given by ge (>=), gt (>), le (<=), lt (<).
    A subclass that only changes the default may redeclare the field plainly: the range is inherited."""
    return field(default=default, metadata={"range": (ge, gt, le, lt)})


def optional_file(default=None):
    """A path to a file the run can do without (see config.load_recipe)."""
    return field(default=default, metadata={"optional_file": True})


def _fmt(x) -> str:
    if isinstance(x, int) and x >= 2**20 and not (x + 1) & x:
        return f"2**{(x + 1).bit_length() - 1} - 1"
    return f"{x:g}" if isinstance(x, float) else str(x)


def _range_text(ge, gt, le, lt) -> str:
    lo = (ge, "[") if ge is not None else (gt, "(") if gt is not None else None
    hi = (le, "]") if le is not None else (lt, ")") if lt is not None else None
    if lo and hi:
        return f"in {lo[1]}{_fmt(lo[0])}, {_fmt(hi[0])}{hi[1]}"
    if lo:
        return f"{'>=' if lo[1] == '[' else '>'} {_fmt(lo[0])}"
    return f"{'<=' if hi[1] == ']' else '<'} {_fmt(hi[0])}"


def _type_name(tp) -> str:
    return {int: "an integer", float: "a number", bool: "a boolean (true/false)", str: "a string"}.get(tp, str(tp))


def check_value(key: str, tp, value, meta) -> Any:
    """`value` of declared type `tp` (Optional allowed), converted where YAML misreads it, checked against the
    field metadata's choices and range; a UserError names the key and what it must be."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return check_value(key, args[0], value, meta)
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
        if ok and not math.isfinite(value):
            raise UserError(f"{key}: must be a finite number, got {value}")
    elif tp is str:
        ok = isinstance(value, str)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "choices" not in meta:
            value, ok = str(value), True  # a path or name that YAML read as a number
    elif tp in (dict, tuple):
        ok = isinstance(value, dict) if tp is dict else isinstance(value, (list, tuple))
    else:
        raise TypeError(f"unsupported recipe field type {tp} for {key}")
    if not ok:
        raise UserError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    choices, rng = meta.get("choices"), meta.get("range")
    if choices and value not in choices:
        raise UserError(f"{key}: must be one of {', '.join(map(str, choices))}; got {value!r}")
    if rng and not ((rng[0] is None or value >= rng[0]) and (rng[1] is None or value > rng[1])
                    and (rng[2] is None or value <= rng[2]) and (rng[3] is None or value < rng[3])):  # fmt: skip
        raise UserError(f"{key}: must be {_range_text(*rng)}, got {_fmt(value)}")
    return value


@lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def check_fields(obj, prefix: str, error=ValueError) -> None:
    """Every field of dataclass instance `obj` through check_value (its type and domain), as `error`."""
    for f in dataclasses.fields(obj):
        try:
            check_value(prefix + f.name, _hints(type(obj))[f.name], getattr(obj, f.name), f.metadata)
        except UserError as e:
            raise error(str(e)) from None


def field_meta(cls, name: str) -> dict:
    """A field's metadata, merged over the class's dataclass bases: a subclass that redeclares a field to change
    its default keeps the base's range and flags (and may replace them)."""
    out: dict = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            for f in dataclasses.fields(klass):
                if f.name == name and f.metadata:
                    out.update(f.metadata)
    return out


def keys_of(cls, prefix="", sections=False) -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out += [prefix + f.name] if sections else []
            out += keys_of(tp, f"{prefix}{f.name}.", sections)
        else:
            out.append(prefix + f.name)
    return out


def unknown_key(key: str, root_cls, where: str) -> UserError:
    close = difflib.get_close_matches(key, keys_of(root_cls, sections=True), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"unknown key '{key}'{where}{hint}")


def from_dict(cls, data: dict, *, root_cls=None, prefix: str = "", where: str = ""):
    """Build dataclass `cls` from a nested dict, strictly."""
    root_cls = root_cls or cls
    if not isinstance(data, dict):
        raise UserError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise unknown_key(key, root_cls, where)
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = from_dict(tp, v if v is not None else {}, root_cls=root_cls, prefix=key + ".", where=where)
        else:
            kwargs[k] = check_value(key, tp, v, field_meta(cls, k))
    return cls(**kwargs)


def set_path(d: dict, path: list[str], value, root_cls, raw_key: str):
    for i, part in enumerate(path[:-1]):
        nxt = d.get(part)
        if nxt is None:
            nxt = d[part] = {}
        if not isinstance(nxt, dict):
            raise unknown_key(raw_key, root_cls, " in overrides")
        d = nxt
    d[path[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise UserError(f"override {text!r} is not of the form key.path=value")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key:
        raise UserError(f"override {text!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def load_yaml(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"no such recipe file: {path}")
    if path.is_dir():
        raise UserError(f"recipe is a directory, not a YAML file: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{loc}: malformed YAML ({problem})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping of keys to values")
    return data


def is_section(cls, key: str) -> bool:
    hints = _hints(cls)
    head, _, rest = key.partition(".")
    if head not in hints or not dataclasses.is_dataclass(hints[head]):
        return False
    return not rest or is_section(hints[head], rest)


def get_path(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg
