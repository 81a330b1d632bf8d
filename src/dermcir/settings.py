"""Checks that a settings dataclass runs on when it is made: each field's type from its annotation, then ranges.

A bad value (``--set epochs=-3``, ``--set beta=2``, ``--set k=abc``) is then a ``ValueError`` naming the setting
before any image is read. Left alone it surfaced as a traceback deep in a run, or as a run that finished and wrote
nonsense. The composed model's configs (``dermcir.config``) and the baselines' (``dermcir.baselines``) use it alike.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any

#: A setting's range check: (test of the value, what the value must be). Types are checked first, from the field's
#: annotation, so a test may assume the type.
Rule = tuple[Callable[[Any], bool], str]


def check_settings(obj: Any, rules: dict[str, Rule]) -> None:
    """Raise ``ValueError("setting NAME=VALUE: expected ...")`` for the first field of the dataclass ``obj`` whose
    value has the wrong type for its annotation or fails its rule in ``rules``."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _type_ok(value, hints[f.name]):
            raise ValueError(f"setting {f.name}={value!r}: expected {_type_name(hints[f.name])}")
    for name, (ok, expected) in rules.items():
        value = getattr(obj, name)
        if not ok(value):
            raise ValueError(f"setting {name}={value!r}: expected {expected}")


def _type_ok(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # bool is an int to Python, never to a user
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # NaN or inf would run to the end and write NaN results
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(hint))
    if origin is not None:  # list[str], tuple[float, ...], dict[str, Any]: the container's kind
        return isinstance(value, origin)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
             type(None): "null"}
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is not None:
        return f"a {origin.__name__}"
    return names.get(hint, str(hint))
