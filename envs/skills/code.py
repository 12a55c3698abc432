"""Rendering API calls as literal, re-executable Python source (the code labels)."""

from __future__ import annotations


class Expr(str):
    """Source text inserted verbatim (a nested call or a ``pose_dict`` read)."""


def _arg(value) -> str:
    if isinstance(value, Expr):
        return str(value)
    if isinstance(value, float):
        return repr(round(value, 4))
    return repr(value)


def actor(name: str) -> Expr:
    return Expr(f"get_actor({name!r})")


def stored(key: str) -> Expr:
    return Expr(f"pose_dict[{key!r}]")


def call(fn: str, *args, **kwargs) -> str:
    """``call('pick', actor('red cube'))`` -> ``"pick(get_actor('red cube'))"``."""
    parts = [_arg(a) for a in args] + [f"{k}={_arg(v)}" for k, v in kwargs.items()]
    return f"{fn}({', '.join(parts)})"


def assign(key: str, expr: str) -> str:
    """``pose_dict['key'] = <expr>``: remember a pose for later lines."""
    return f"pose_dict[{key!r}] = {expr}"
