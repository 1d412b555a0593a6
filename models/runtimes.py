"""Which runtime runs a trained model: TensorFlow fp32, OpenVINO bfloat16 or OpenVINO int8.

Training stays in TensorFlow/Keras; only inference changes runtime. fp32 TensorFlow is
already near a CPU's fp32 peak, so the faster runtimes are the lower-precision ones, and
those need the CPU's BF16 (avx512_bf16, AMX) or VNNI instructions to be faster at all.
``auto`` takes the fastest runtime this CPU runs whose quality check passed
(models/openvino_runtime.py), falling back one step at a time down to TensorFlow.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Literal, TypeVar

from models.errors import ImgsimError

log = logging.getLogger(__name__)

Runtime = Literal["tf", "bf16", "int8"]
RuntimeChoice = Literal["auto", "tf", "bf16", "int8"]
FASTEST_FIRST: tuple[Runtime, ...] = ("int8", "bf16", "tf")
RUNTIME_CHOICES: tuple[str, ...] = ("auto", "tf", "bf16", "int8")
DESCRIPTIONS: dict[str, str] = {
    "auto": "the fastest runtime this CPU supports whose quality check passed",
    "tf": "TensorFlow fp32 (also the GPU path)",
    "bf16": "OpenVINO with bfloat16 inference",
    "int8": "OpenVINO with NNCF post-training int8 quantisation",
}

# A runtime is only worth running where the CPU has the instructions that make it fast;
# any one of the listed /proc/cpuinfo flags is enough.
CPU_NEEDS: dict[str, tuple[frozenset[str], str]] = {
    "bf16": (frozenset({"avx512_bf16", "amx_bf16"}), "BF16 instructions (avx512_bf16 or amx_bf16)"),
    "int8": (
        frozenset({"avx512_vnni", "avx_vnni", "amx_int8"}),
        "VNNI instructions (avx512_vnni, avx_vnni or amx_int8)",
    ),
}


class RuntimeUnavailable(Exception):
    """This runtime cannot run this model here; the caller falls back to the next one."""


def check_runtime(name: str) -> RuntimeChoice:
    """``name`` if it is a runtime choice, else an error that lists them."""
    if name not in RUNTIME_CHOICES:
        listed = "; ".join(f"{n}: {DESCRIPTIONS[n]}" for n in RUNTIME_CHOICES)
        raise ImgsimError(f"unknown runtime {name!r}; choose one of: {listed}")
    return name  # type: ignore[return-value]  # checked against RUNTIME_CHOICES above


@lru_cache
def cpu_flags(path: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (Linux; elsewhere empty, so only TensorFlow is chosen).

    Read by hand: the file has one ``flags : ...`` line per core, and a library (py-cpuinfo)
    would be one more dependency for one line of parsing.
    """
    try:
        text = path.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def missing_support(runtime: str, flags: frozenset[str]) -> str | None:
    """Why this CPU cannot run ``runtime`` fast (None: it can)."""
    if runtime not in CPU_NEEDS:
        return None
    needed, what = CPU_NEEDS[runtime]
    return None if flags & needed else f"this CPU lacks {what}"


def plan(requested: str, flags: frozenset[str], gpu: bool) -> tuple[list[Runtime], list[str]]:
    """(runtimes to try in order, log lines for the ones skipped).

    ``auto`` tries every runtime this CPU supports, fastest first; a named runtime is tried
    first and falls back to the slower ones. With a GPU, ``auto`` is TensorFlow (the GPU path).
    """
    choice = check_runtime(requested)
    if choice == "auto":
        if gpu:
            return ["tf"], []
        return [r for r in FASTEST_FIRST if missing_support(r, flags) is None], []
    order = list(FASTEST_FIRST[FASTEST_FIRST.index(choice) :])
    tried: list[Runtime] = []
    notes: list[str] = []
    for runtime in order:
        reason = missing_support(runtime, flags)
        if reason is None:
            tried.append(runtime)
        elif runtime == choice:
            notes.append(f"runtime {runtime} skipped: {reason}")
    return tried, notes


T = TypeVar("T")


def first_available(
    requested: str, build: Callable[[Runtime], T], what: str, flags: frozenset[str] | None = None, gpu: bool = False
) -> tuple[Runtime, T]:
    """(runtime, build(runtime)) for the first runtime of the plan that builds.

    Every fallback is one log line naming the reason (WARNING when the runtime was asked for
    by name, INFO under ``auto``); TensorFlow always builds.
    """
    runtimes, notes = plan(requested, cpu_flags() if flags is None else flags, gpu)
    pending = list(notes)
    for runtime in runtimes:
        try:
            built = build(runtime)
        except RuntimeUnavailable as exc:
            pending.append(f"runtime {runtime} unavailable: {exc}")
            continue
        for note in pending:  # expected under auto; a runtime asked for by name is worth a warning
            log.log(logging.INFO if requested == "auto" else logging.WARNING, "%s: %s; running %s", what, note, runtime)
        return runtime, built
    raise ImgsimError(f"{what}: no runtime could run it ({'; '.join(pending)})")
