"""Where the service's event-loop thread spends its samples, from a py-spy raw profile.

    .venv/bin/py-spy record --pid PID --duration 12 --rate 500 --threads --format raw -o profile.txt
    python -m benchmarks.profile_summary profile.txt --top 40

Prints, for every function seen on the event-loop thread's stacks, the samples in which it
appears (inclusive), and its share of all the loop's samples (docs/performance.md).
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path


def summarise(lines: list[str]) -> tuple[int, collections.Counter[str]]:
    total, inclusive = 0, collections.Counter[str]()
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not count.isdigit() or ("uv_run" not in stack and "Runner.run" not in stack):
            continue  # not the event loop's thread
        n = int(count)
        total += n
        seen = set()
        for frame in stack.split(";")[1:]:
            name, _, where = frame.partition(" (")
            key = f"{name} ({where.split(':')[0]})" if where else name
            if key not in seen:
                inclusive[key] += n
                seen.add(key)
    return total, inclusive


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profile", type=Path, help="py-spy --format raw output")
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args()
    total, inclusive = summarise(args.profile.read_text().splitlines())
    print(f"{total} event-loop samples")
    for name, n in inclusive.most_common(args.top):
        print(f"{n:7d} {n / max(total, 1):6.1%}  {name}")


if __name__ == "__main__":
    main()
