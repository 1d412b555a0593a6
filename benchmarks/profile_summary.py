"""Where the service's threads spend their samples, from a py-spy raw profile.

    .venv/bin/py-spy record --pid PID --duration 12 --rate 500 --threads --format raw -o profile.txt
    python -m benchmarks.profile_summary profile.txt --top 40

Prints, for every function seen on the event-loop thread's stacks, the samples in which it
appears (inclusive), and its share of all the loop's samples (docs/performance.md).

With ``--by-thread``: the samples of every thread, and the innermost frames of each thread
but the loop. Recorded with ``--gil``, a sample counts only while its thread holds the GIL,
so this shows who keeps the event loop waiting for it:

    .venv/bin/py-spy record --pid PID --duration 12 --rate 200 --threads --gil --nonblocking \\
        --format raw -o gil.txt
    python -m benchmarks.profile_summary gil.txt --by-thread
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path


def _parse(line: str) -> tuple[list[str], int] | None:
    stack, _, count = line.rstrip().rpartition(" ")
    return (stack.split(";"), int(count)) if count.isdigit() else None


def _is_loop(frames: list[str]) -> bool:
    return any("uv_run" in f or "Runner.run" in f for f in frames)


def _short(frame: str) -> str:
    name, _, where = frame.partition(" (")
    return f"{name} ({where.split(':')[0]})" if where else name


def summarise(lines: list[str]) -> tuple[int, collections.Counter[str]]:
    total, inclusive = 0, collections.Counter[str]()
    for line in lines:
        parsed = _parse(line)
        if parsed is None or not _is_loop(parsed[0]):
            continue  # not the event loop's thread
        frames, n = parsed
        total += n
        for key in {_short(f) for f in frames[1:]}:
            inclusive[key] += n
    return total, inclusive


def by_thread(lines: list[str], depth: int = 3) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """Samples per thread, and per innermost ``depth`` frames of the threads other than the loop."""
    threads, leaves = collections.Counter[str](), collections.Counter[str]()
    for line in lines:
        parsed = _parse(line)
        if parsed is None:
            continue
        frames, n = parsed
        thread = frames[0].split(": ", 1)[-1].rstrip(")")
        threads[thread] += n
        if thread != "MainThread" and not _is_loop(frames):  # --gil stacks may lack the loop's frames
            leaves[f"{thread}: " + " <- ".join(_short(f) for f in frames[:0:-1][:depth])] += n
    return threads, leaves


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profile", type=Path, help="py-spy --format raw output")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--by-thread", action="store_true", help="samples per thread, and the other threads' hot frames")
    args = p.parse_args()
    lines = args.profile.read_text().splitlines()
    if args.by_thread:
        threads, leaves = by_thread(lines)
        for name, n in threads.most_common():
            print(f"{n:7d}  thread {name}")
        for name, n in leaves.most_common(args.top):
            print(f"{n:7d}  {name}")
        return
    total, inclusive = summarise(lines)
    print(f"{total} event-loop samples")
    for name, n in inclusive.most_common(args.top):
        print(f"{n:7d} {n / max(total, 1):6.1%}  {name}")


if __name__ == "__main__":
    main()
