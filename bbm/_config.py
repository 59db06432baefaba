"""Config dataclass fields that carry their own documentation and bounds.

``setting(default, help, within=..., choices=...)`` declares a field once: its default, the line ``train.py
--help`` shows, and the values it takes. ``check_fields(obj, prefix)`` checks an instance against those bounds,
naming the dotted key of a wrong value. No torch here: configs are checked before torch is imported."""
import dataclasses
import functools
import math
import typing

from bbm._checks import fail


def setting(default, help: str, *, within: str = None, choices: tuple = None):
    """A dataclass field. ``within``: an interval such as ``"(0, inf)"`` or ``"[0, 1)"`` that a number (each
    number of a list) lies in; ``choices``: the values it may take. ``None`` passes both where the type allows it."""
    meta = {"help": help, "within": within, "choices": choices}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def interval(text: str):
    """``"[0, 1)"`` -> (low, high, low included, high included)."""
    low, high = (float(x) for x in text[1:-1].split(","))
    return low, high, text[0] == "[", text[-1] == "]"


def inside(value, text: str) -> bool:
    low, high, low_in, high_in = interval(text)
    return math.isfinite(value) and (low < value or low_in and value == low) and (value < high or high_in and value == high)


@functools.cache
def value_type(cls, name: str):
    """The type of field ``name`` of dataclass ``cls``: inside Optional, the items of a list or tuple."""
    tp = typing.get_type_hints(cls)[name]
    while typing.get_args(tp):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def check_fields(obj, prefix: str):
    """Fails on the first field of dataclass ``obj`` whose value lies outside its ``within`` or ``choices``, naming
    ``prefix.field``."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}.{f.name}"
        choices, within = f.metadata.get("choices"), f.metadata.get("within")
        if value is None:
            continue
        if choices is not None and value not in choices:
            fail(key, f"one of {choices}", repr(value))
        if within is None:
            continue
        kind = value_type(type(obj), f.name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is None:  # a list's null entries (e.g. a global layer's window)
                continue
            if isinstance(item, bool) or not isinstance(item, int if kind is int else (int, float)):
                fail(key, f"{'an int' if kind is int else 'a number'} in {within}", repr(item), TypeError)
            if not inside(item, within):
                fail(key, f"a {'' if math.isfinite(item) else 'finite '}number in {within}", repr(item))


def describe(f: dataclasses.Field) -> str:
    """The help line of a setting: its meaning, then its bounds."""
    if f.metadata.get("within"):
        return f"{f.metadata['help']}; in {f.metadata['within']}"
    if f.metadata.get("choices"):
        return f"{f.metadata['help']}; one of {' | '.join(map(str, f.metadata['choices']))}"
    return f.metadata.get("help", "")
