"""The messages between the front and its template process (both sides).

The front (``launcher.py``) and the template (``template.py``) talk over one
``SOCK_SEQPACKET`` socket pair: each message is one datagram of JSON (never pickle),
an object whose ``kind`` names it; a spawn request carries the worker's descriptors
as ``SCM_RIGHTS`` ancillary data, in the order its ``fds`` field names them. The
front asks, the template answers, one message at a time; the template speaks first
only once, to say it is READY.

The socket is private to the two processes (a socket pair the front made), so a peer
is never hostile; decoding is strict anyway, and a malformed message is an error
(``TemplateWireError``), never a crash of the other side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = [
    "MAX_FDS",
    "MAX_MESSAGE",
    "Exited",
    "Refused",
    "Spawn",
    "Spawned",
    "Status",
    "TemplateReady",
    "TemplateWireError",
    "decode",
    "encode",
]

#: The largest message (a spawn request carries the worker's whole environment).
MAX_MESSAGE = 1 << 20
#: The most descriptors one spawn request carries (stderr and the spec's ``*_fd``).
MAX_FDS = 16


class TemplateWireError(ValueError):
    """A message that is not one of this module's, or whose fields are wrong."""


@dataclass
class TemplateReady:
    """template → front, once: torch is imported; ``threads`` is its thread count."""

    KIND: ClassVar[str] = "ready"
    pid: int
    threads: int


@dataclass
class Spawn:
    """front → template: fork a worker that runs ``spec`` (``WorkerSpec`` JSON) with
    exactly ``env`` as its environment. ``fds`` names the attached descriptors in
    order: ``"stderr"`` (the write end of the worker's stderr pipe), then the spec's
    descriptor fields (``request_fd``, ...), which the template rewrites to the numbers
    they arrive with."""

    KIND: ClassVar[str] = "spawn"
    spec: str
    env: dict[str, str] = field(default_factory=dict)
    fds: list[str] = field(default_factory=list)


@dataclass
class Spawned:
    """template → front: the forked worker's pid."""

    KIND: ClassVar[str] = "spawned"
    pid: int


@dataclass
class Status:
    """front → template: how did worker ``pid`` end (the front's pidfd said it did)?"""

    KIND: ClassVar[str] = "status"
    pid: int


@dataclass
class Exited:
    """template → front: the exit status of ``pid`` as ``Popen.returncode`` has it
    (negative: killed by that signal); None while it runs. ``known`` is False for a pid
    that is not the template's child (already asked, or never one)."""

    KIND: ClassVar[str] = "exited"
    pid: int
    code: int | None
    known: bool = True


@dataclass
class Refused:
    """template → front: the request was not carried out, and why."""

    KIND: ClassVar[str] = "refused"
    reason: str


Message = TemplateReady | Spawn | Spawned | Status | Exited | Refused

_TYPES: dict[str, type[Any]] = {t.KIND: t for t in (TemplateReady, Spawn, Spawned, Status, Exited, Refused)}
#: each field's accepted types (JSON's), checked on decode
_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "ready": {"pid": (int,), "threads": (int,)},
    "spawn": {"spec": (str,), "env": (dict,), "fds": (list,)},
    "spawned": {"pid": (int,)},
    "status": {"pid": (int,)},
    "exited": {"pid": (int,), "code": (int, type(None)), "known": (bool,)},
    "refused": {"reason": (str,)},
}


def encode(msg: Message) -> bytes:
    """One datagram's bytes for ``msg``."""
    return json.dumps({"kind": msg.KIND, **msg.__dict__}).encode()


def decode(data: bytes) -> Message:
    """The message in one datagram.

    Raises:
        TemplateWireError: not JSON, an unknown kind, a missing, extra or mistyped field.
    """
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise TemplateWireError(f"not a JSON message: {e}") from None
    if not isinstance(obj, dict):
        raise TemplateWireError("a message is a JSON object")
    kind = obj.pop("kind", None)
    fields = _FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise TemplateWireError(f"unknown message kind {kind!r}")
    for name, value in obj.items():
        types = fields.get(name)
        if types is None:
            raise TemplateWireError(f"{kind}: unexpected field {name!r}")
        # (bool is an int to isinstance; a pid or a code never is one)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise TemplateWireError(f"{kind}: field {name!r} is {type(value).__name__}")
    if kind == "spawn":
        env, fds = obj.get("env", {}), obj.get("fds", [])
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise TemplateWireError("spawn: env maps strings to strings")
        if not all(isinstance(n, str) for n in fds) or len(fds) > MAX_FDS:
            raise TemplateWireError(f"spawn: fds is a list of at most {MAX_FDS} names")
    try:
        msg: Message = _TYPES[kind](**obj)
    except TypeError as e:
        raise TemplateWireError(f"{kind}: {e}") from None
    return msg
