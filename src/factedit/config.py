"""Typed configuration: dataclass defaults < preset file < ``key=value`` overrides.

Unknown keys are rejected; values are coerced by the field's declared type, so YAML's ``1e-1``
(a string to YAML 1.1) becomes a float and ``layers=3-7`` becomes ``[3, 4, 5, 6, 7]``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from importlib import resources
from typing import Any

import yaml

from .errors import FactEditError


def parse_int_list(value: Any) -> list[int]:
    """'3-7' -> [3..7]; '3,5,7' -> [3,5,7]; 4 -> [4]; [3, '4'] -> [3, 4]."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    out: list[int] = []
    for part in str(value).replace(" ", "").strip("[]").split(","):
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


@dataclasses.dataclass(frozen=True)
class Domain:
    """The allowed range of a numeric config value, attached with ``Annotated[float, Domain(...)]``."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself is not allowed

    def check(self, value: Any, key: str) -> None:
        if value is None:
            return
        bad = (self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo))) or \
            (self.hi is not None and value > self.hi)
        if bad or (isinstance(value, float) and value != value):
            lo = "" if self.lo is None else f"{'>' if self.lo_open else '>='} {self.lo:g}"
            hi = "" if self.hi is None else f"<= {self.hi:g}"
            raise FactEditError(f"config key '{key}': {value!r} is out of range (must be {' and '.join(x for x in (lo, hi) if x)})")


POSITIVE = Domain(0, lo_open=True)  # learning rates, steps, batch sizes, token counts
NON_NEGATIVE = Domain(0)  # loss weights, thresholds
PROBABILITY = Domain(0, 1)
PosInt = typing.Annotated[int, POSITIVE]
PosFloat = typing.Annotated[float, POSITIVE]
NonNegInt = typing.Annotated[int, NON_NEGATIVE]
NonNegFloat = typing.Annotated[float, NON_NEGATIVE]
Probability = typing.Annotated[float, PROBABILITY]


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        out = _coerce(value, args[0], key)
        for meta in args[1:]:
            if isinstance(meta, Domain):
                for v in out if isinstance(out, (list, tuple)) else [out]:
                    meta.check(v, key)
        return out
    if origin is typing.Literal:
        for option in args:  # "bf16" from the command line, True from YAML, ... compared as the option's type
            try:
                if _coerce(value, type(option), key) == option:
                    return option
            except FactEditError:
                continue
        raise FactEditError(f"config key '{key}': {value!r} is not one of {', '.join(map(repr, args))}")
    try:
        if origin is typing.Union or origin is types.UnionType:
            if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
                if type(None) in args:
                    return None
            inner = [a for a in args if a is not type(None)]
            return _coerce(value, inner[0], key)
        if origin in (list, tuple) and args and args[0] is int:
            vals = parse_int_list(value)
            return tuple(vals) if origin is tuple else vals
        if origin in (list, tuple):
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            inner = args[0] if args else str
            vals = [_coerce(v, inner, key) for v in value]
            return tuple(vals) if origin is tuple else vals
        if tp is bool:
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(s)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise FactEditError(f"config key '{key}': cannot read {value!r} as {getattr(tp, '__name__', tp)}") from None
    return value


def parse_sets(pairs: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise FactEditError(f"--set expects key=value, got {pair!r}")
        k, v = pair.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def build(cls: type, *layers: dict[str, Any] | None, what: str = "config") -> Any:
    """Instantiate dataclass ``cls`` from successive override dicts (later wins). Every value, defaults
    included, is checked against its declared type: ``Literal`` options and ``Domain`` ranges."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for layer in layers:
        for k, v in (layer or {}).items():
            if k not in fields:
                raise FactEditError(f"unknown {what} key '{k}' (known: {', '.join(sorted(fields))})")
            values[k] = v
    out = {}
    for k, f in fields.items():
        if k in values:
            out[k] = _coerce(values[k], hints[k], k)
        elif f.default is not dataclasses.MISSING:  # defaults are checked too (a wrong default is a bug)
            _coerce(f.default, hints[k], k)
    return cls(**out)


def to_dict(cfg: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def load_preset(method: str, family: str, n_layers: int | None = None) -> tuple[dict[str, Any], str | None]:
    """The preset for (method, model family). Presets hold hyper-parameters only, never module paths.

    Files live in ``factedit/presets/<method>/<name>.yaml``; ``<name>`` is tried as
    ``<family>-<n_layers>l`` (size-specific) and then ``<family>``.
    """
    base = resources.files("factedit") / "presets" / method
    names = ([f"{family}-{n_layers}l"] if n_layers else []) + [family]
    for name in names:
        f = base / f"{name}.yaml"
        if f.is_file():
            data = yaml.safe_load(f.read_text()) or {}
            if not isinstance(data, dict):
                raise FactEditError(f"preset {f} is not a mapping")
            return data, f"{method}/{name}.yaml"
    return {}, None
