"""``benchmarks/realistic.py --rounds N``: each target judged by the median of its
rounds' values, each value from rows of the same round only. No workers: the rows are
made here, as the script makes them."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import realistic
from benchmarks.realistic import Result, combine_rounds, evaluate_targets


def row(scenario: str, label: str, callers: str, rps: float, k: int, use: str = "sum") -> Result:
    r = Result(scenario, label, callers, 64, 2, "clone + float(sum)", use, req_per_s=rps)
    r.round = k
    return r


def batching_rows(k: int, batching: float, alone: float) -> list[Result]:
    return [row("batching", "batching", "threads", batching, k), row("batching", "alone", "threads", alone, k)]


def target(targets: list[dict], name: str) -> dict:
    [t] = [t for t in targets if t["target"] == name]
    return t


THREADS = "batching vs alone, 64 threads req/s"


def test_each_round_is_judged_on_its_own_rows_and_the_target_by_their_median() -> None:
    rows = batching_rows(1, 12_000, 6_000) + batching_rows(2, 17_000, 4_000) + batching_rows(3, 15_000, 5_000)
    by_round = [evaluate_targets([r for r in rows if r.round == k], "sum") for k in (1, 2, 3)]
    assert [target(ts, THREADS)["value"] for ts in by_round] == [2.0, 4.25, 3.0]

    combined = target(combine_rounds(by_round), THREADS)
    assert combined["value"] == 3.0 and combined["status"] == "PASS"
    assert combined["rounds"] == [2.0, 4.25, 3.0]
    assert combined["measured"] == "median 3.0x (2.0x - 4.25x), met in 2 of 3"
    assert combined["goal"] == ">= 3.0x"


def test_a_median_below_the_goal_fails_though_one_round_met_it() -> None:
    rows = batching_rows(1, 10_000, 5_000) + batching_rows(2, 20_000, 5_000) + batching_rows(3, 11_000, 5_000)
    by_round = [evaluate_targets([r for r in rows if r.round == k], "sum") for k in (1, 2, 3)]
    combined = target(combine_rounds(by_round), THREADS)
    assert combined["status"] == "FAIL" and combined["value"] == 2.2
    assert combined["measured"].endswith("met in 1 of 3")


def test_an_upper_bound_is_met_by_a_median_at_or_below_it() -> None:
    by_round = [[realistic._target("gap", "<=", 200.0, "µs", gap, f"{gap} µs")] for gap in (150.0, 250.0, 190.0)]
    [combined] = combine_rounds(by_round)
    assert combined["status"] == "PASS" and combined["value"] == 190.0
    assert combined["measured"] == "median 190 µs (150 µs - 250 µs), met in 2 of 3"


def test_rounds_without_a_value_are_left_out_and_none_at_all_is_not_judged() -> None:
    some = [[realistic._target("r", ">=", 0.8, "%", v, "")] for v in (None, 0.9, 0.7)]
    [combined] = combine_rounds(some)
    assert combined["rounds"] == [0.9, 0.7] and combined["measured"].endswith("met in 1 of 2")
    none = [[realistic._target("r", ">=", 0.8, "%", None, "")] for _ in range(2)]
    [combined] = combine_rounds(none)
    assert combined["status"] == "n/a" and combined["value"] is None


def test_one_round_is_printed_and_recorded_as_before() -> None:
    rows = batching_rows(1, 12_000, 6_000)
    by_round = [evaluate_targets(rows, "sum")]
    assert combine_rounds(by_round) == by_round[0]
    t = target(by_round[0], THREADS)
    assert t["measured"] == "12,000 vs 6,000 = 2.00x" and t["status"] == "FAIL"


def test_the_runner_files_each_row_under_its_round(tmp_path: Path) -> None:
    runner = realistic.Runner(realistic.parse_args(["--rounds", "2"]), tmp_path)
    runner.add(row("latency", "libtorchrt", "threads", 1.0, 0))
    runner.round = 2
    runner.add(row("latency", "libtorchrt", "threads", 2.0, 0))
    assert [[r.req_per_s for r in rows] for rows in runner.rounds_done()] == [[1.0], [2.0]]


@pytest.mark.parametrize("bad", ["0", "-1"])
def test_fewer_than_one_round_is_refused(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        realistic.parse_args(["--rounds", bad])
    assert "--rounds must be >= 1" in capsys.readouterr().err
