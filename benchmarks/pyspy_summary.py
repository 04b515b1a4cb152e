"""Summarize a ``py-spy record -f raw`` profile: samples per thread, per function (self)
and per function including callees, as percentages of all samples.

    py-spy record -p PID -d 5 -r 1000 -f raw -o front.txt --threads --gil --nonblocking
    python benchmarks/pyspy_summary.py front.txt [TOP]
"""

from __future__ import annotations

import collections
import sys


def main(argv: list[str]) -> None:
    path, top = argv[0], int(argv[1]) if len(argv) > 1 else 25
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack:
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            threads[frames[0]] += n
            own[frames[-1]] += n
            for frame in set(frames):
                inclusive[frame] += n
    print(f"samples {total}")
    print("--- by thread")
    for name, n in threads.most_common(10):
        print(f"{100 * n / total:5.1f}%  {name[:100]}")
    print("--- self")
    for name, n in own.most_common(top):
        print(f"{100 * n / total:5.1f}%  {name[:140]}")
    print("--- inclusive")
    for name, n in inclusive.most_common(top):
        print(f"{100 * n / total:5.1f}%  {name[:140]}")


if __name__ == "__main__":
    main(sys.argv[1:])
