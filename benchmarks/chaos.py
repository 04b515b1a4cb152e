"""Chaos benchmark: SIGKILL workers under load, and measure what callers see.

Run from the repository root::

    python benchmarks/chaos.py                                   # 30 s, 2 instances, 16 threads
    python benchmarks/chaos.py --duration 10 --kill-every 0.5 --json chaos.json
    python benchmarks/chaos.py --duration 10 --start-method spawn   # fresh interpreters

It serves the ``tiny`` workload (``benchmarks/workloads.py``) from a ``libtorchrt.Pool``
with ``--instances`` workers and ``max_retries=--max-retries``, and runs for
``--duration`` seconds:

* ``--threads`` closed-loop caller threads; each request sends one of 512 distinct
  random inputs, and its result is checked against the model run in this process, so a
  result delivered to the wrong caller, or a corrupted one, counts as *mismatched*;
* a killer thread that SIGKILLs a random *ready* worker every ``--kill-every`` seconds
  (never one still starting: that would test the start-up backoff instead), and
  polls ``pool.workers()`` every 5 ms until that instance has a new pid in state
  ``ready``: the *recovery time* of that restart.

It then prints requests served, failures by exception type, the retries (estimated:
restarts minus ``WorkerDiedError`` failures; a kill of an idle worker retries nothing,
so it is an upper bound), restarts per instance from ``pool.health()``, recovery times,
request latency (p50/p99) and the request arena's occupancy once the callers stopped,
which must be 0: every request's slot was freed, however its worker died.

By default ``--inline-threshold 0`` sends every input through the request arena (the
library's default, 64 KiB, would carry the 256-byte ``tiny`` input inside the message,
and the arena check would say nothing).

Exit status: 0 if nothing was mismatched, every kill recovered, the arena ended empty
and no process was left behind; 1 otherwise. It stops by itself: requests have a
deadline (``--request-timeout``) and every wait is bounded.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

# ``python benchmarks/chaos.py``: make the ``benchmarks`` package importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import workloads

MODEL = "tiny"
BANK_SIZE = 512
POLL_S = 0.005
#: a kill not recovered within this long is reported as unrecovered
RECOVERY_LIMIT_S = 30.0
RTOL, ATOL = 1e-4, 1e-5


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load and kills (default 30)")
    p.add_argument("--instances", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--threads", type=int, default=16, help="closed-loop caller threads (default 16)")
    p.add_argument("--kill-every", type=float, default=0.2, help="seconds between kills (default 0.2)")
    p.add_argument("--max-retries", type=int, default=1, help="ModelConfig.max_retries (default 1)")
    p.add_argument(
        "--inline-threshold",
        type=int,
        default=0,
        help="Pool inline_threshold; 0 (default) puts every input in the request arena",
    )
    p.add_argument("--request-timeout", type=float, default=30.0, help="each request's deadline, s (default 30)")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs and of the killer's choices")
    p.add_argument(
        "--start-method",
        choices=["forkserver", "spawn"],
        default="forkserver",
        help="Pool start_method: replacements forked from the template, or fresh interpreters (default forkserver)",
    )
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures as JSON")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.instances < 1 or args.threads < 1 or args.kill_every <= 0:
        p.error("--duration, --instances, --threads and --kill-every must be positive")
    if args.max_retries < 0 or args.inline_threshold < 0 or args.request_timeout <= 0:
        p.error("--max-retries and --inline-threshold must be >= 0, --request-timeout > 0")
    return args


# ──────────────────────────────────────────────────────────────────── callers


@dataclass
class CallerStats:
    """What one caller thread saw (merged at the end: no lock on the hot path)."""

    served: int = 0
    mismatched: int = 0
    latencies: list[float] = field(default_factory=list)
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    #: a few examples of each failure's message
    examples: dict[str, str] = field(default_factory=dict)


def caller(
    pool: Any,
    bank: list[torch.Tensor],
    refs: list[torch.Tensor],
    stop: threading.Event,
    timeout: float,
    seed: int,
    stats: CallerStats,
) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        i = rng.randrange(len(bank))
        start = time.perf_counter()
        try:
            out = pool.infer(MODEL, [bank[i]], timeout=timeout)
        except Exception as e:
            name = type(e).__name__
            stats.failures[name] += 1
            stats.examples.setdefault(name, str(e).splitlines()[0][:300])
            time.sleep(0.001)  # an error that comes back at once must not spin
            continue
        stats.latencies.append(time.perf_counter() - start)
        y = out["OUTPUT__0"]
        if y.shape == refs[i].shape and torch.allclose(y, refs[i], rtol=RTOL, atol=ATOL):
            stats.served += 1
        else:
            stats.mismatched += 1
        del out, y  # frees the response slot: its offset rides back to the worker


# ──────────────────────────────────────────────────────────────────── killer


@dataclass
class KillerStats:
    kills: collections.Counter[int] = field(default_factory=collections.Counter)
    #: per instance: seconds from a kill until a new pid of it was ready
    recoveries: dict[int, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    #: seconds from a kill until the replacement process existed (death noticed, respawned)
    respawns: list[float] = field(default_factory=list)
    unrecovered: list[str] = field(default_factory=list)
    #: kill times that found no ready worker to kill (all restarting)
    no_target: int = 0
    errors: list[str] = field(default_factory=list)


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def _is_ours(pid: int) -> bool:
    """A child of this process, or of its child (a worker forked by the pool's template)."""
    parent = _parent(pid)
    return parent == os.getpid() or (parent > 0 and _parent(parent) == os.getpid())


def _sigkill(pid: int) -> bool:
    """SIGKILL ``pid`` if it still is a worker of this process (never a reused pid)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        # The pidfd pins this very process: check it is ours, then signal through it.
        if not _is_ours(pid):
            return False
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def killer(pool: Any, every: float, stop: threading.Event, seed: int, stats: KillerStats) -> None:
    """Kill a random ready worker every ``every`` s; time each instance's recovery.

    After ``stop`` it kills no more, and waits (bounded) for the pending recoveries.
    """
    rng = random.Random(seed)
    pending: dict[int, list[Any]] = {}  # instance -> [killed pid, kill time, time a new pid showed]
    next_kill = time.monotonic() + every
    try:
        while True:
            now = time.monotonic()
            workers = pool.workers()
            for instance, (old, killed_at, spawned_at) in list(pending.items()):
                new = [w for w in workers if w.instance == instance and w.pid != old]
                if new and spawned_at is None:
                    pending[instance][2] = spawned_at = now
                if any(w.state == "ready" for w in new):
                    stats.recoveries[instance].append(now - killed_at)
                    stats.respawns.append((spawned_at or now) - killed_at)
                    del pending[instance]
                elif now - killed_at > RECOVERY_LIMIT_S:
                    limit = RECOVERY_LIMIT_S
                    stats.unrecovered.append(f"instance {instance} (pid {old} killed): not ready {limit:g} s later")
                    del pending[instance]
            if stop.is_set():
                if not pending:
                    return
            elif now >= next_kill:
                targets = [w for w in workers if w.state == "ready" and w.instance not in pending]
                if not targets:
                    stats.no_target += 1
                else:
                    w = rng.choice(targets)
                    killed_at = time.monotonic()
                    if _sigkill(w.pid):
                        pending[w.instance] = [w.pid, killed_at, None]
                        stats.kills[w.instance] += 1
                # The next kill is due ``every`` after this one; kills that found no
                # target are not made up for later.
                next_kill = max(next_kill + every, now)
            time.sleep(POLL_S)
    except Exception as e:  # report it, but let the run end normally
        stats.errors.append(f"{type(e).__name__}: {e}")


# ──────────────────────────────────────────────────────────────────── helpers


class LogCounter(logging.Handler):
    """Counts the library's log records by level and message template (instead of
    printing each of them among the figures)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        key = f"{record.levelname} {record.name}: {record.msg}"
        self.counts[key] += 1
        if key not in self.examples:
            try:
                self.examples[key] = record.getMessage()[:300]
            except Exception:
                self.examples[key] = str(record.msg)[:300]


def children() -> set[int]:
    """PIDs of this process's live (non-zombie) children."""
    me = str(os.getpid())
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            out.add(int(entry))
    return out


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f} ms"


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def make_bank(path: Path, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Distinct inputs and their outputs computed in this process."""
    model = workloads.load(path)
    example = workloads.example_input(MODEL)
    gen = torch.Generator().manual_seed(seed)
    bank = [example] + [torch.randn(example.shape, generator=gen) for _ in range(BANK_SIZE - 1)]
    with torch.inference_mode():
        refs = [model(x).clone() for x in bank]
    return bank, refs


# ──────────────────────────────────────────────────────────────────── main


def run(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """Run the storm; the library's log records are counted, not printed."""
    logger = logging.getLogger("libtorchrt")
    counter = LogCounter()
    saved = logger.level, logger.propagate
    logger.addHandler(counter)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        result = _run(args, model_dir)
    finally:
        logger.removeHandler(counter)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
    result["library_log"] = {k: {"count": n, "example": counter.examples[k]} for k, n in counter.counts.most_common()}
    return result


def _run(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    import libtorchrt
    from libtorchrt import ModelConfig, Pool

    path = workloads.build(MODEL, model_dir)
    bank, refs = make_bank(path, args.seed)
    cfg = ModelConfig(MODEL, path, instances=args.instances, max_retries=args.max_retries)
    started = time.monotonic()
    pool = Pool(models=[cfg], inline_threshold=args.inline_threshold, start_method=args.start_method)
    start_s = time.monotonic() - started
    interrupted = False
    stop_calls = threading.Event()
    stop_kills = threading.Event()
    callers = [CallerStats() for _ in range(args.threads)]
    kstats = KillerStats()
    try:
        first_pids = sorted(w.pid for w in pool.workers())
        print(
            f"pool of {args.instances} x {MODEL} ({args.start_method}) ready in {start_s:.1f} s (pids {first_pids}); "
            f"{args.threads} callers, a kill every {args.kill_every:g} s for {args.duration:g} s",
            flush=True,
        )
        threads = [
            threading.Thread(
                target=caller,
                args=(pool, bank, refs, stop_calls, args.request_timeout, args.seed * 1000 + k, callers[k]),
                name=f"chaos-caller-{k}",
                daemon=True,
            )
            for k in range(args.threads)
        ]
        kthread = threading.Thread(
            target=killer,
            args=(pool, args.kill_every, stop_kills, args.seed, kstats),
            name="chaos-killer",
            daemon=True,
        )
        t0 = time.monotonic()
        for t in threads:
            t.start()
        kthread.start()
        try:
            end = t0 + args.duration
            while (left := end - time.monotonic()) > 0:
                time.sleep(min(5.0, left))
                served = sum(c.served for c in callers)
                failed = sum(sum(c.failures.values()) for c in callers)
                kills = sum(kstats.kills.values())
                print(f"  {time.monotonic() - t0:5.1f} s: {served} served, {failed} failed, {kills} kills", flush=True)
        except KeyboardInterrupt:
            interrupted = True
            print("interrupted: stopping", flush=True)
        # Stop killing, let the pool heal, then stop the callers.
        stop_kills.set()
        kthread.join(RECOVERY_LIMIT_S + 5)
        stop_calls.set()
        load_s = time.monotonic() - t0
        deadline = time.monotonic() + args.request_timeout + 10
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        hung = [t.name for t in [*threads, kthread] if t.is_alive()]
        # Arena occupancy once every request finished (a slot is freed when its
        # request resolves; give the router a moment for the last ones).
        allocator = pool._router.default[MODEL].allocator
        settle = time.monotonic() + 5
        while allocator.used and time.monotonic() < settle:
            time.sleep(0.01)
        arena_used, arena_slots = allocator.used, len(allocator)
        health = pool.health()[MODEL]
    finally:
        stop_kills.set()
        stop_calls.set()
        pool.close()
    deadline = time.monotonic() + 5
    while (left_behind := children()) and time.monotonic() < deadline:
        time.sleep(0.05)

    latencies = sorted(x for c in callers for x in c.latencies)
    failures: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    for c in callers:
        failures.update(c.failures)
        for k, v in c.examples.items():
            examples.setdefault(k, v)
    served = sum(c.served for c in callers)
    mismatched = sum(c.mismatched for c in callers)
    died = failures.get(libtorchrt.WorkerDiedError.__name__, 0)
    restarts = {i.instance: i.restarts for i in health.instances}
    total_restarts = sum(restarts.values())
    recoveries = {i: sorted(v) for i, v in kstats.recoveries.items()}
    all_recoveries = sorted(x for v in recoveries.values() for x in v)
    problems = []
    if mismatched:
        problems.append(f"{mismatched} results did not match the model run in-process")
    if kstats.unrecovered:
        problems.append(f"{len(kstats.unrecovered)} kills never recovered: {kstats.unrecovered}")
    if arena_used:
        problems.append(f"the request arena still holds {arena_slots} slots ({arena_used} bytes)")
    if left_behind:
        problems.append(f"processes left behind: {sorted(left_behind)}")
    if hung:
        problems.append(f"threads still running after the bounded waits: {hung}")
    if kstats.errors:
        problems.append(f"the killer thread failed: {kstats.errors}")
    return {
        "config": {
            "duration_s": args.duration,
            "instances": args.instances,
            "threads": args.threads,
            "kill_every_s": args.kill_every,
            "max_retries": args.max_retries,
            "inline_threshold": args.inline_threshold,
            "request_timeout_s": args.request_timeout,
            "seed": args.seed,
            "start_method": args.start_method,
        },
        "interrupted": interrupted,
        "pool_start_s": start_s,
        "load_s": load_s,
        "served": served,
        "throughput_rps": served / load_s if load_s > 0 else None,
        "mismatched": mismatched,
        "failed": sum(failures.values()),
        "failed_by_type": dict(failures),
        "failure_examples": examples,
        "worker_died_errors": died,
        "retried_estimate": max(0, total_restarts - died),
        "kills": sum(kstats.kills.values()),
        "kills_per_instance": {str(i): n for i, n in sorted(kstats.kills.items())},
        "kill_times_without_target": kstats.no_target,
        "restarts_per_instance": {str(i): n for i, n in sorted(restarts.items())},
        "final_state": health.state,
        "final_instance_states": {str(i.instance): i.state for i in health.instances},
        "recovery_s": {
            "count": len(all_recoveries),
            "min": all_recoveries[0] if all_recoveries else None,
            "p50": percentile(all_recoveries, 50),
            "p99": percentile(all_recoveries, 99),
            "max": all_recoveries[-1] if all_recoveries else None,
            "mean": sum(all_recoveries) / len(all_recoveries) if all_recoveries else None,
            "per_instance": {str(i): v for i, v in sorted(recoveries.items())},
            "until_respawned_p50": percentile(sorted(kstats.respawns), 50),
            "until_respawned_max": max(kstats.respawns) if kstats.respawns else None,
        },
        "unrecovered": kstats.unrecovered,
        "latency_s": {
            "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99),
            "max": latencies[-1] if latencies else None,
        },
        "request_arena_used_bytes": arena_used,
        "request_arena_slots": arena_slots,
        "processes_left_behind": sorted(left_behind),
        "problems": problems,
    }


def report(r: dict[str, Any]) -> None:
    rec = r["recovery_s"]
    lat = r["latency_s"]
    print()
    print(f"requests served      {r['served']}  ({r['throughput_rps']:.0f}/s over {r['load_s']:.1f} s)")
    print(f"results mismatched   {r['mismatched']}")
    by_type = ", ".join(f"{k} {v}" for k, v in sorted(r["failed_by_type"].items())) or "none"
    print(f"requests failed      {r['failed']}  ({by_type})")
    for name, text in sorted(r["failure_examples"].items()):
        print(f"    e.g. {name}: {text}")
    print(
        f"retried (estimate)   {r['retried_estimate']}  "
        f"(restarts {sum(r['restarts_per_instance'].values())} - WorkerDiedError {r['worker_died_errors']})"
    )
    idle = r["kill_times_without_target"]
    print(
        f"kills                {r['kills']}  per instance {r['kills_per_instance']}"
        + (f"; {idle} kill times found no ready worker (all restarting)" if idle else "")
    )
    print(f"restarts (health)    per instance {r['restarts_per_instance']}; final state {r['final_state']}")
    print(
        f"recovery per restart {rec['count']} measured: min {_ms(rec['min'])}, p50 {_ms(rec['p50'])}, "
        f"p99 {_ms(rec['p99'])}, max {_ms(rec['max'])}"
    )
    print(
        f"    of which until the new process existed: p50 {_ms(rec['until_respawned_p50'])}, "
        f"max {_ms(rec['until_respawned_max'])} (the rest is its start-up: import torch, load, READY)"
    )
    for instance, values in rec["per_instance"].items():
        mean = sum(values) / len(values)
        print(f"    instance {instance}: {len(values)} restarts, mean {_ms(mean)}, max {_ms(max(values))}")
    if r["unrecovered"]:
        print(f"    unrecovered: {r['unrecovered']}")
    print(f"latency              p50 {_ms(lat['p50'])}, p99 {_ms(lat['p99'])}, max {_ms(lat['max'])}")
    print(f"request arena        {r['request_arena_used_bytes']} bytes in {r['request_arena_slots']} slots at the end")
    print(f"processes left       {len(r['processes_left_behind'])}")
    if r["library_log"]:
        print("library log (warnings and errors, by message)")
        for entry in r["library_log"].values():
            print(f"  {entry['count']:6d} x {entry['example']}")
    if r["problems"]:
        print("\nPROBLEMS:\n  " + "\n  ".join(r["problems"]))
    else:
        print("\nOK: no mismatched result, every kill recovered, arena empty, nothing left behind")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="libtorchrt-chaos-") as tmp:
        result = run(args, Path(tmp))
    report(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
