"""Request timeouts and poll waits, checked and bounded (any process).

Every deadline that reaches a poll call passes through here. ``zmq_poll`` takes its wait
as a C ``long`` of milliseconds and pyzmq converts it as an ``int``: a wait beyond
``2**31`` ms raised ``OverflowError`` in the thread that owned the sockets, which then
died and took the pool (or the client's connection) with it. So:

- a timeout given by a caller (``Pool.infer``, ``Client.infer``, HTTP's ``timeout``
  parameter, ``ModelConfig(timeout=...)``) is checked by :func:`check_timeout`: not a
  number, NaN or negative is the caller's error; a huge one (``inf`` included) is capped
  at :data:`MAX_TIMEOUT_S`, which no request can outlive anyway;
- a wait handed to ``poll`` is made by :func:`poll_ms`, which never exceeds
  :data:`MAX_POLL_MS` (the loop then wakes, finds nothing due, and waits again).
"""

from __future__ import annotations

import math
import numbers
import operator

__all__ = ["MAX_POLL_MS", "MAX_TIMEOUT_S", "check_timeout", "poll_ms"]

#: the longest single wait handed to a poll call (one minute): a loop that wakes for
#: nothing once a minute costs nothing, and any wait stays far from C int limits
MAX_POLL_MS = 60_000

#: the longest request deadline, in seconds (30 days): longer ones, ``inf`` included,
#: are capped here rather than refused (they mean "no practical limit")
MAX_TIMEOUT_S = 30 * 86400.0


def check_timeout(value: object, *, allow_zero: bool = True) -> float | None:
    """A caller's timeout in seconds, checked: None stays None, a huge value is capped.

    Args:
        value: the timeout as given (None, an int or a float; a bool or a string is
            refused, as Python would not do arithmetic on it either).
        allow_zero: whether 0 is accepted (a deadline that has already passed).

    Returns:
        The timeout as a float, at most :data:`MAX_TIMEOUT_S`, or None.

    Raises:
        ValueError: not a real number, NaN, negative (or zero when not allowed). The
            message says what was expected; callers wrap it in their typed error.
    """
    if value is None:
        return None
    if type(value) is float and 0.0 < value <= MAX_TIMEOUT_S:  # (the common case, at once)
        return value
    expected = "a number of seconds " + (">= 0" if allow_zero else "> 0") + " or None"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"expected {expected}, got {value!r} ({type(value).__name__})")
    try:
        seconds = float(value)
    except OverflowError:  # an int (or Fraction) beyond any float: as huge as it gets
        seconds = math.inf if operator.gt(value, 0) else -math.inf
    if math.isnan(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        raise ValueError(f"expected {expected}, got {value!r}")
    return min(seconds, MAX_TIMEOUT_S)


def poll_ms(wait_s: float | None) -> int | None:
    """The millisecond wait to hand to ``poll`` for ``wait_s`` seconds (None: forever).

    Rounded up (a poll that wakes a little early finds its deadline not yet due and
    polls again for nothing), never negative, never above :data:`MAX_POLL_MS`; NaN and
    infinities are treated as the longest wait.
    """
    if wait_s is None:
        return None
    if not wait_s > 0:  # (NaN falls through to the cap below)
        if wait_s <= 0:
            return 0
        return MAX_POLL_MS
    if wait_s * 1000 >= MAX_POLL_MS:
        return MAX_POLL_MS
    return int(wait_s * 1000) + 1
