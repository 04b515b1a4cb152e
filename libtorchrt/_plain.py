"""Errors and snapshots as plain msgpack data, and back (client and server processes).

A remote client raises the same typed error the pool raised in the server, with the
same fields, and gets the same ``ModelStatus`` / ``ModelHealth`` snapshots. They cross
the wire as plain data only -- a class *name* looked up in a fixed table, and
attributes that are None, bool, int, float, str or lists of them -- never pickled, so
a hostile peer can make the client build nothing but those errors and dataclasses.
"""

from __future__ import annotations

import builtins
import dataclasses
import traceback
from typing import Any

from . import errors
from .errors import ProtocolError, TorchRTError
from .info import InstanceHealth, ModelHealth, ModelStatus

__all__ = [
    "error_from_plain",
    "error_to_plain",
    "health_from_plain",
    "health_to_plain",
    "statuses_from_plain",
    "statuses_to_plain",
]

#: The errors that cross as themselves: libtorchrt's own, and a few builtins that a
#: pool's ``submit`` raises for malformed arguments.
_ERRORS: dict[str, type[BaseException]] = {
    name: getattr(errors, name) for name in errors.__all__ if isinstance(getattr(errors, name), type)
}
_BUILTINS: dict[str, type[BaseException]] = {
    name: getattr(builtins, name) for name in ("ValueError", "TypeError", "KeyError", "IndexError")
}


def _plain(value: Any) -> bool:
    if value is None or type(value) in (bool, int, float, str):
        return True
    if isinstance(value, (list, tuple)):
        return all(v is None or type(v) in (bool, int, float, str) for v in value)
    return False


def error_to_plain(exc: BaseException) -> tuple[str, str, dict[str, Any], str]:
    """``(error_type, message, fields, traceback)`` for sending ``exc`` to a client.

    ``message`` is the error's first argument (what its constructor made of its
    fields), ``fields`` its plain public attributes. An error of another type goes
    by its class name with ``str(exc)`` and the server's traceback as text.
    """
    name = type(exc).__name__
    message = str(exc.args[0]) if exc.args and isinstance(exc.args[0], str) else str(exc)
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(exc).items() if not k.startswith("_")}
    fields = {k: v for k, v in fields.items() if _plain(v)}
    tb = ""
    if _ERRORS.get(name) is not type(exc) and _BUILTINS.get(name) is not type(exc):
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return name, message, fields, tb


def error_from_plain(error_type: str, message: str, fields: dict[str, Any], tb: str = "") -> BaseException:
    """The error a server sent, rebuilt: the same libtorchrt class with the same fields
    (and so the same ``str()``), or for an error of no known type a
    :class:`TorchRTError` that names it and carries the server's traceback text."""
    cls = _ERRORS.get(error_type) or _BUILTINS.get(error_type)
    if cls is None:
        text = f"the server failed with {error_type}: {message}"
        if tb:
            text += f"\n\nServer traceback:\n{tb.rstrip()}"
        return TorchRTError(text)
    exc = cls.__new__(cls)
    BaseException.__init__(exc, message)  # what the class's __init__ passed on
    for key, value in fields.items():
        if not key.startswith("_"):
            setattr(exc, key, value)
    return exc


def _to_plain(obj: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, tuple):
            value = [_to_plain(v) if dataclasses.is_dataclass(v) else v for v in value]
        out[f.name] = value
    return out


def _from_plain(cls: type, raw: Any) -> Any:
    """``cls(**raw)`` for the fields ``cls`` has (a newer server may send more; an older
    one fewer, which take their defaults)."""
    if not isinstance(raw, dict):
        raise ProtocolError(f"expected a {cls.__name__} as a map, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in raw.items() if k in names})
    except TypeError as e:
        raise ProtocolError(f"malformed {cls.__name__}: {e}") from None


def statuses_to_plain(statuses: list[ModelStatus]) -> list[dict[str, Any]]:
    """``Pool.models()`` as plain data."""
    return [_to_plain(s) for s in statuses]


def statuses_from_plain(raw: Any) -> list[ModelStatus]:
    """The inverse of :func:`statuses_to_plain`.

    Raises:
        ProtocolError: ``raw`` is not a list of model statuses.
    """
    if not isinstance(raw, list):
        raise ProtocolError("malformed answer to models(): not a list")
    return [_from_plain(ModelStatus, s) for s in raw]


def health_to_plain(health: dict[str, ModelHealth]) -> dict[str, dict[str, Any]]:
    """``Pool.health()`` as plain data."""
    return {key: _to_plain(h) for key, h in health.items()}


def health_from_plain(raw: Any) -> dict[str, ModelHealth]:
    """The inverse of :func:`health_to_plain`.

    Raises:
        ProtocolError: ``raw`` is not a map of model health.
    """
    if not isinstance(raw, dict):
        raise ProtocolError("malformed answer to health(): not a map")
    out = {}
    for key, h in raw.items():
        if not isinstance(h, dict) or not isinstance(h.get("instances", []), list):
            raise ProtocolError(f"malformed health of {key!r}")
        h = dict(h)
        h["instances"] = tuple(_from_plain(InstanceHealth, i) for i in h.get("instances", []))
        out[key] = _from_plain(ModelHealth, h)
    return out
