"""Timeouts and poll waits: what a caller may give, and what reaches ``zmq_poll``."""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from libtorchrt import deadlines
from libtorchrt.deadlines import MAX_POLL_MS, MAX_TIMEOUT_S, check_timeout, poll_ms


def test_limits() -> None:
    assert MAX_POLL_MS == 60_000
    assert MAX_TIMEOUT_S == 30 * 86400.0
    # both stay far below what a C long of milliseconds holds
    assert MAX_POLL_MS < 2**31
    assert deadlines.__all__ == ["MAX_POLL_MS", "MAX_TIMEOUT_S", "check_timeout", "poll_ms"]


# -- check_timeout ---------------------------------------------------------------------


@pytest.mark.parametrize("allow_zero", [True, False])
def test_none_stays_none(allow_zero: bool) -> None:
    assert check_timeout(None, allow_zero=allow_zero) is None


@pytest.mark.parametrize(
    ("given", "want"),
    [(1, 1.0), (0.25, 0.25), (7.5, 7.5), (Fraction(1, 4), 0.25), (np.float64(2.5), 2.5), (np.int32(3), 3.0)],
)
def test_real_numbers_become_floats(given: object, want: float) -> None:
    got = check_timeout(given)
    assert got == want
    assert type(got) is float


def test_zero_is_accepted_by_default() -> None:
    got = check_timeout(0)
    assert got == 0.0
    assert type(got) is float
    assert check_timeout(0.0, allow_zero=True) == 0.0


@pytest.mark.parametrize("zero", [0, 0.0, -0.0])
def test_zero_is_refused_when_not_allowed(zero: object) -> None:
    with pytest.raises(ValueError) as info:
        check_timeout(zero, allow_zero=False)
    assert str(info.value) == f"expected a number of seconds > 0 or None, got {zero!r}"


def test_smallest_positive_is_accepted_when_zero_is_not() -> None:
    assert check_timeout(5e-324, allow_zero=False) == 5e-324
    assert check_timeout(1, allow_zero=False) == 1.0


@pytest.mark.parametrize("given", [-1, -0.001, -math.inf, Fraction(-1, 3)])
@pytest.mark.parametrize("allow_zero", [True, False])
def test_negative_is_refused(given: object, allow_zero: bool) -> None:
    bound = ">= 0" if allow_zero else "> 0"
    with pytest.raises(ValueError) as info:
        check_timeout(given, allow_zero=allow_zero)
    assert str(info.value) == f"expected a number of seconds {bound} or None, got {given!r}"


@pytest.mark.parametrize("allow_zero", [True, False])
def test_nan_is_refused(allow_zero: bool) -> None:
    with pytest.raises(ValueError, match=r"got nan$"):
        check_timeout(math.nan, allow_zero=allow_zero)
    with pytest.raises(ValueError, match=r"got np\.float64\(nan\)$|got nan$"):
        check_timeout(np.float64("nan"), allow_zero=allow_zero)


@pytest.mark.parametrize(
    ("given", "type_name"),
    [
        (True, "bool"),
        (False, "bool"),
        ("1", "str"),
        (b"1", "bytes"),
        (Decimal("1"), "Decimal"),  # not a numbers.Real
        (1j, "complex"),
        ([1], "list"),
        (object, "type"),
    ],
)
def test_non_numbers_are_refused_with_their_type(given: object, type_name: str) -> None:
    with pytest.raises(ValueError) as info:
        check_timeout(given)
    assert str(info.value) == f"expected a number of seconds >= 0 or None, got {given!r} ({type_name})"
    with pytest.raises(ValueError) as info:
        check_timeout(given, allow_zero=False)
    assert str(info.value) == f"expected a number of seconds > 0 or None, got {given!r} ({type_name})"


@pytest.mark.parametrize("huge", [MAX_TIMEOUT_S + 1, 10**12, 1e300, math.inf])
@pytest.mark.parametrize("allow_zero", [True, False])
def test_huge_is_capped(huge: object, allow_zero: bool) -> None:
    assert check_timeout(huge, allow_zero=allow_zero) == MAX_TIMEOUT_S


def test_the_cap_itself_passes_unchanged() -> None:
    assert check_timeout(MAX_TIMEOUT_S) == MAX_TIMEOUT_S
    below = math.nextafter(MAX_TIMEOUT_S, 0)
    assert check_timeout(below) == below


@given(st.floats(min_value=0, max_value=MAX_TIMEOUT_S))
def test_in_range_values_are_kept(seconds: float) -> None:
    assert check_timeout(seconds) == seconds


# -- poll_ms ---------------------------------------------------------------------------


def test_poll_none_waits_forever() -> None:
    assert poll_ms(None) is None


@pytest.mark.parametrize("due", [0, 0.0, -0.0, -1e-9, -1, -1e300, -math.inf])
def test_poll_past_or_now_does_not_wait(due: float) -> None:
    got = poll_ms(due)
    assert got == 0
    assert type(got) is int


@pytest.mark.parametrize("wait", [math.nan, math.inf, 60.0, 60.0001, 1e12, 1e300])
def test_poll_long_or_unknown_waits_are_capped(wait: float) -> None:
    got = poll_ms(wait)
    assert got == MAX_POLL_MS
    assert type(got) is int


@pytest.mark.parametrize(
    ("wait", "want"),
    [
        (1e-9, 1),  # never 0 for a deadline not yet due: the poll would spin
        (0.0004, 1),
        (0.0015, 2),
        (0.25, 251),
        (1.0, 1001),
        (59.5, 59_501),
        (math.nextafter(60.0, 0), MAX_POLL_MS),
    ],
)
def test_poll_rounds_up(wait: float, want: int) -> None:
    got = poll_ms(wait)
    assert got == want
    assert type(got) is int


@given(st.floats(min_value=1e-12, max_value=59.999, allow_nan=False))
def test_poll_wakes_no_earlier_than_due(wait: float) -> None:
    got = poll_ms(wait)
    assert got is not None
    assert wait * 1000 < got <= wait * 1000 + 1
    assert 1 <= got <= MAX_POLL_MS


def test_an_integer_beyond_any_float_is_capped_or_refused() -> None:
    # float(10**400) raises OverflowError: it must be capped (or refused when negative)
    # like any other huge value, not escape as an untyped error.
    assert check_timeout(10**400) == MAX_TIMEOUT_S
    with pytest.raises(ValueError, match="got -"):
        check_timeout(-(10**400))
