"""How a fast lane request ends for its caller (front): its outputs, its error, or a
hand-over to the router; shared by ``fastlane.py`` and ``groups.py``."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, cast

from ..errors import TimeoutError

if TYPE_CHECKING:
    from .call import Call
    from .future import RequestFuture

__all__ = ["BY_ROUTER", "deadline_passed", "expired", "outcome"]

#: what settling a ticket returns when the router is to run its request after all
BY_ROUTER = object()


def deadline_passed(call: Call) -> TimeoutError:
    return TimeoutError(f"model {call.model.name!r}: the request's deadline passed before it completed")


def expired(call: Call) -> bool:
    """Fail ``call`` if its deadline has passed already (a timeout of 0): it is not sent."""
    if call.deadline is None or call.deadline > time.monotonic():
        return False
    call.fail(deadline_passed(call))
    return True


def outcome(call: Call) -> Any:
    """``call``'s outputs once its (concurrent) future is done; raises its error."""
    return cast("RequestFuture[Any]", call.future).result()
