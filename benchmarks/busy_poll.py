"""``Pool(busy_poll_us=...)`` against the default (no polling), side by side in one run.

A thread that sleeps between requests wakes up slowly on this VM. With ``busy_poll_us``,
a worker polls for its next request that long before it sleeps (unless the front keeps
it busy: requests found waiting one behind the other), and a caller thread polls for its
reply while its request is the pool's only one in flight. This script measures what that
buys and costs, with ``realistic.py``'s callers (a clone of a prepared input in,
``float(y.sum())`` of every output) and tables, alternating within each round:

* ``latency`` -- tiny, 1 instance, 1 caller thread, and one thread calling the model in
  this process;
* ``two`` -- tiny, 2 instances, 2 caller threads (each worker mostly has one request:
  both poll, beside two callers, on as many CPUs as there are);
* ``tiny`` -- tiny, 2 instances, 8 caller threads (the workers are kept busy);
* ``cnn`` -- 2 instances, 8 caller threads (compute-bound workers), and the model called
  in this process.

At the end, per round and by the median of the rounds: each scenario's polled row
against its default row (req/s), and the latency rows' p50 over the direct call's.

    python benchmarks/busy_poll.py [--seconds 3] [--busy-poll-us 100] [--rounds 3]
                                   [--scenarios latency,two,tiny,cnn] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.front_cpus import FrontCpusRunner, parse_variants, run_variants, variants_parser
from benchmarks.realistic import Result
from libtorchrt import ModelConfig
from libtorchrt.transport import lanes

SCENARIOS = ("latency", "two", "tiny", "cnn")
HEADLINES = {
    "latency": "latency: tiny, 1 instance, 1 caller thread -- and the model called in this process",
    "two": "two: tiny, 2 instances, 2 caller threads",
    "tiny": "tiny: 2 instances, 8 caller threads",
    "cnn": "cnn: 2 instances, 8 caller threads -- and the model called in this process",
}
DEFAULT = "busy_poll_us=0"


class BusyPollRunner(FrontCpusRunner):
    """``realistic.py``'s rows, each scenario without and with ``busy_poll_us``."""

    def variants(self) -> list[tuple[str, dict[str, Any]]]:
        us = self.args.busy_poll_us
        return [(DEFAULT, {}), (polled(us), {"busy_poll_us": us})]

    def two(self) -> None:
        self.each_pool("two", ModelConfig("tiny", self.path("tiny"), instances=2), "threads", 2)

    def tiny(self) -> None:
        self.each_pool("tiny", ModelConfig("tiny", self.path("tiny"), instances=2), "threads", 8)

    def headline(self, name: str) -> str:
        return HEADLINES[name]


def polled(us: int) -> str:
    return f"busy_poll_us={us}"


def _row(rows: Sequence[Result], scenario: str, label: str) -> Result | None:
    return next((r for r in rows if (r.scenario, r.label) == (scenario, label) and r.ok), None)


def ratios_for(us: int) -> Any:
    """The ratios of one round's rows, with ``busy_poll_us=us`` as the polled rows'."""

    def ratios(rows: Sequence[Result]) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for name in SCENARIOS:
            a, b = _row(rows, name, polled(us)), _row(rows, name, DEFAULT)
            if a is not None and b is not None and b.req_per_s > 0:
                out[f"{name}: req/s, polled / default"] = a.req_per_s / b.req_per_s
        direct = _row(rows, "latency", "direct (in-process)")
        for label in (DEFAULT, polled(us)):
            row = _row(rows, "latency", label)
            if row is not None and direct is not None:
                out[f"latency: p50 over direct, {label} (µs)"] = row.p50_us - direct.p50_us
        return out

    return ratios


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = variants_parser(__doc__, SCENARIOS)
    p.add_argument("--busy-poll-us", type=int, default=100, help="busy_poll_us of the polled rows (default: 100)")
    args = parse_variants(p, argv, SCENARIOS)
    if not 0 < args.busy_poll_us <= lanes.MAX_SPIN_US:
        p.error(f"--busy-poll-us must be from 1 to {lanes.MAX_SPIN_US}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    title = f"Pool({polled(args.busy_poll_us)}) against the default"
    return run_variants(args, BusyPollRunner, title, ratios_for(args.busy_poll_us))


if __name__ == "__main__":
    raise SystemExit(main())
