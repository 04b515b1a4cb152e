"""``Pool(front_cpus=...)``'s CPU sets (libtorchrt/cpus.py): how the value splits the CPUs,
what it refuses, and the pin of this process's real threads, put back by restore()."""

from __future__ import annotations

import os
import threading

import pytest

from libtorchrt import ConfigError
from libtorchrt.cpus import FrontPin, allowed, split

FOUR = frozenset({0, 1, 2, 3})
SPARSE = frozenset({2, 5, 7})


@pytest.mark.parametrize(
    ("value", "cpus", "front", "workers"),
    [
        (1, FOUR, {0}, {1, 2, 3}),
        (3, FOUR, {0, 1, 2}, {3}),
        (1, SPARSE, {2}, {5, 7}),  # the lowest-numbered this process may run on
        ([3], FOUR, {3}, {0, 1, 2}),
        ((1, 2), FOUR, {1, 2}, {0, 3}),
        ({7}, SPARSE, {7}, {2, 5}),
        (range(2), FOUR, {0, 1}, {2, 3}),
    ],
)
def test_front_cpus_split_the_cpus_this_process_may_run_on(
    value: object, cpus: frozenset[int], front: set[int], workers: set[int]
) -> None:
    assert split(value, cpus) == (front, workers)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (0, "expected None, a number of CPUs from 1 to 3"),
        (-1, "expected None, a number of CPUs from 1 to 3"),
        (True, "front_cpus is True"),
        ("0", "front_cpus is '0'"),
        ([], "front_cpus is []"),
        ([0, 1.0], "CPU numbers out of [0, 1, 2, 3]"),
        (2.0, "front_cpus is 2.0"),
        ([4], "CPUs [4], on which this process may not run (it may run on [0, 1, 2, 3])"),
        (4, "front_cpus=4 leaves no CPU for the workers"),
        ([0, 1, 2, 3], "leaves no CPU for the workers: this process may run on [0, 1, 2, 3]"),
    ],
)
def test_a_bad_front_cpus_is_a_config_error_naming_it(value: object, says: str) -> None:
    with pytest.raises(ConfigError, match="front_cpus") as info:
        split(value, FOUR)  # type: ignore[arg-type]
    assert says in str(info.value)
    assert info.value.key == "front_cpus"


def masks() -> dict[int, frozenset[int]]:
    """Every thread of this process, and the CPUs it may run on."""
    return {int(t): frozenset(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}


needs_two = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to pin to one of them")


@needs_two
def test_the_pin_holds_every_thread_and_restore_gives_their_cpus_back() -> None:
    cpus = allowed()
    one = frozenset({min(cpus)})
    go, done = threading.Event(), threading.Event()
    seen: list[frozenset[int]] = []

    def before() -> None:  # a thread that exists when the pin is made
        go.wait(10)
        seen.append(frozenset(os.sched_getaffinity(0)))
        done.wait(10)

    old = threading.Thread(target=before)
    old.start()
    earlier = masks()
    pin = FrontPin([min(cpus)])
    try:
        go.set()
        started: list[frozenset[int]] = []
        late = threading.Thread(target=lambda: (started.append(frozenset(os.sched_getaffinity(0))), done.wait(10)))
        late.start()
        for _ in range(100):
            if seen and started:
                break
            threading.Event().wait(0.01)
        assert seen == [one] and started == [one]  # the old thread, and one started since
        assert set(masks().values()) == {one}
        with pytest.raises(ConfigError, match="set by another open pool"):
            FrontPin(1)
    finally:
        pin.restore()
    now = masks()
    assert all(now[tid] == cpus for tid in earlier if tid in now)
    assert now[late.native_id] == cpus  # (started while pinned: the process's CPUs before)
    pin.restore()  # (again: nothing to do)
    done.set()
    old.join()
    late.join()
    FrontPin(1).restore()  # (the first one let go: another may pin)
    assert set(masks().values()) == {cpus}


@needs_two
def test_restore_leaves_a_thread_pinned_elsewhere_meanwhile_alone() -> None:
    cpus = allowed()
    low, high = min(cpus), max(cpus)
    pin = FrontPin([low])
    os.sched_setaffinity(0, {high})  # this thread, by the application, while pinned
    try:
        pin.restore()
        assert os.sched_getaffinity(0) == {high}
    finally:
        os.sched_setaffinity(0, cpus)
