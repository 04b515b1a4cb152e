"""Micro-benchmark of the per-request header codecs, before vs after (docs/measurements/codec.txt).

Times ``wire.encode`` / ``wire.decode`` and ``remote.encode`` / ``remote.decode`` on the
messages sent per request, for the code of a given commit (``--before``, extracted with
``git show`` into a temporary package) and for the working tree, side by side in one
process. Each figure is the best of ``--repeat`` runs of ``--number`` calls, in thread CPU
time (``time.thread_time``, so that other processes on a shared machine count less); the
runs of the two versions alternate, so that drift in the machine's load hits both alike.

    python benchmarks/codec.py --before 59826ef
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# the modules the old wire and remote import, and whatever they import in turn
FILES = ["errors.py", "deadlines.py", "transport/__init__.py", "transport/wire.py", "transport/remote.py"]


def extract(commit: str, into: Path) -> str:
    """Write the codec modules of ``commit`` as package ``codec_before`` under ``into``."""
    pkg = into / "codec_before"
    (pkg / "transport").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for name in FILES:
        text = subprocess.run(
            ["git", "show", f"{commit}:libtorchrt/{name}"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout
        (pkg / name).write_text(text)
    return "codec_before"


def cases(wire: Any, remote: Any) -> dict[str, tuple[Any, Any]]:
    """The per-request calls: name -> (function, argument)."""
    blob = bytes(64)
    one = [wire.TensorDesc("float32", (1, 16), wire.BLOB, 0)]
    four = [wire.TensorDesc("float32", (8, 3, 32, 32), wire.ARENA, 64 * i) for i in range(3)] + one
    request = wire.Request(12345, one, [], [blob])
    request4 = wire.Request(12345, four, [0, 4096], [blob])
    response = wire.Response(12345, one, [blob])
    response4 = wire.Response(12345, four, [blob])
    infer = remote.Infer(12345, "tiny", None, 5.0, None, one, [blob], [], True)
    result = remote.Result(12345, ["OUTPUT__0"], one, [blob])
    return {
        "wire.encode(Request), 1 blob tensor": (wire.encode, request),
        "wire.encode(Request), 4 tensors + releases": (wire.encode, request4),
        "wire.decode(Request), 1 blob tensor": (wire.decode, wire.encode(request)),
        "wire.encode(Response), 1 blob tensor": (wire.encode, response),
        "wire.decode(Response), 1 blob tensor": (wire.decode, wire.encode(response)),
        "wire.decode(Response), 4 tensors": (wire.decode, wire.encode(response4)),
        "remote.encode(Infer), 1 blob tensor": (remote.encode, infer),
        "remote.decode(Infer), 1 blob tensor": (remote.decode, remote.encode(infer)),
        "remote.encode(Result), 1 blob tensor": (remote.encode, result),
        "remote.decode(Result), 1 blob tensor": (remote.decode, remote.encode(result)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the commit whose codec is the baseline")
    parser.add_argument("--number", type=int, default=100_000, help="calls per timing (default 100000)")
    parser.add_argument("--repeat", type=int, default=7, help="timings per version; the best is kept (default 7)")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, tmp)
        old = extract(args.before, Path(tmp))
        versions = {
            "before": cases(
                importlib.import_module(f"{old}.transport.wire"), importlib.import_module(f"{old}.transport.remote")
            ),
            "after": cases(
                importlib.import_module("libtorchrt.transport.wire"),
                importlib.import_module("libtorchrt.transport.remote"),
            ),
        }
        for name, (fn, arg) in versions["before"].items():  # the two must agree, or the timing means nothing
            after_fn, after_arg = versions["after"][name]
            if type(arg) is bytes:
                assert arg == after_arg, f"{name}: the headers differ"
            else:
                assert fn(arg) == after_fn(after_arg), f"{name}: the encodings differ"

        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        command = f"--before {args.before} --number {args.number} --repeat {args.repeat}"
        print(f"# python benchmarks/codec.py {command}")
        print(
            f"# after: the working tree on HEAD {head.strip()}; {platform.python_version()}, "
            f"msgpack {importlib.import_module('msgpack').version}, {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.2f} at the start"
        )
        print(f"# best of {args.repeat} x {args.number} calls, thread CPU time, ns per call")
        print(f"{'call':46} {'before':>8} {'after':>8} {'after/before':>13}")
        for name in versions["before"]:
            best = {"before": float("inf"), "after": float("inf")}
            for _ in range(args.repeat):
                for side in ("before", "after"):
                    fn, arg = versions[side][name]
                    t = timeit.timeit(
                        "fn(arg)", globals={"fn": fn, "arg": arg}, number=args.number, timer=time.thread_time
                    )
                    best[side] = min(best[side], t)
            b, a = (best[s] / args.number * 1e9 for s in ("before", "after"))
            print(f"{name:46} {b:8.0f} {a:8.0f} {a / b:13.2f}")
        print(f"# load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
