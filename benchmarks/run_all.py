"""Run every benchmark, check the targets, and write docs/benchmarks.md + docs/benchmarks.json.

Each benchmark runs as its own subprocess (``python -m benchmarks.<name> --json ...``) so that
TensorFlow's thread pools, FAISS's large arrays and the service do not share one process,
and each has a time limit. The bare model is measured before and after the service step
(this machine drifts), then :mod:`benchmarks.targets` computes the ratios and verdicts and
``report.md.j2`` renders the Markdown.

    python -m benchmarks.run_all --model runs/resnet50-cifar10 --index indexes/resnet50-cifar10-hnsw16 \\
        --model runs/vgg16-cifar10 --index indexes/vgg16-cifar10-hnsw16
    python -m benchmarks.run_all --model /tmp/m --index /tmp/i --quick      # smoke run
    python -m benchmarks.run_all --render docs/benchmarks.json              # re-render the Markdown only
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jinja2

from benchmarks.common import DEFAULT_DATA, ROOT, busy_warning, die_with_parent, log, machine_info, write_json
from benchmarks.targets import evaluate

STEPS = ("model", "service", "runtimes", "indexer", "faiss")
TF = {"IMGSIM_RUNTIME": "tf"}  # the bare-model and service targets are TensorFlow fp32's
TEMPLATE = Path(__file__).with_name("report.md.j2")


def run_step(name: str, argv: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """``python -m benchmarks.<name> argv --json tmp``: its JSON, or {"error": ...}."""
    module = {"faiss": "benchmarks.faiss_bench", "runtimes": "benchmarks.runtimes_bench"}.get(
        name, f"benchmarks.{name}"
    )
    command = shlex.join(["python", "-m", module, *argv])
    log(f"== {name}: {command}")
    with tempfile.TemporaryDirectory(prefix=f"imgsim-bench-{name}-") as tmp:
        out = Path(tmp) / "result.json"
        start = time.perf_counter()
        try:
            code = subprocess.run(
                [sys.executable, "-m", module, *argv, "--json", str(out)], cwd=ROOT, timeout=timeout,
                preexec_fn=die_with_parent, env={**os.environ, **(env or {})},  # noqa: PLW1509
            ).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s", "command": command}
        if code != 0 or not out.is_file():
            return {"error": f"exit code {code}", "command": command}
        return {**json.loads(out.read_text()), "command": command, "seconds": round(time.perf_counter() - start, 1)}


def render(results: dict[str, Any]) -> str:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    steps = results["steps"]
    commands = [(n, s) for n in (*STEPS, "service_fastest") for s in (steps.get(n) if isinstance(steps.get(n), list) else [steps.get(n)])
                if s and s.get("command")]  # fmt: skip
    context = {**results, "m": results["machine"], "kept": results.get("kept", {}), "commands": commands}
    return env.from_string(TEMPLATE.read_text()).render(**context)


def keep_steps(results: dict[str, Any], earlier: dict[str, Any], skipped: list[str]) -> None:
    """Copy the skipped steps' results from an earlier run into ``results``, marked as kept."""
    m = earlier.get("machine", {})
    for step in skipped:
        if step in earlier.get("steps", {}):
            results["steps"][step] = earlier["steps"][step]
            when = f"{m.get('date', '?')}, commit {(m.get('git', {}).get('commit') or '?')[:12]}"
            results.setdefault("kept", {})[step] = earlier.get("kept", {}).get(step) or when


def measure(args: argparse.Namespace) -> dict[str, Any]:
    machine = machine_info()
    results: dict[str, Any] = {
        "machine": machine, "busy_warning": busy_warning(machine), "quick": args.quick, "steps": {},
        "regenerate": shlex.join(["python", "-m", "benchmarks.run_all", *sys.argv[1:]]),
    }  # fmt: skip
    start, steps, quick = time.perf_counter(), results["steps"], ["--quick"] if args.quick else []
    pairs = list(zip(map(str, args.model), map(str, args.index), strict=False))
    bare = [a for m, i in pairs for a in ("--model", m, "--index", i)] + ["--data", args.data, *quick]
    if "model" not in args.skip:
        steps["model"] = run_step("model", bare, args.step_timeout, TF)
    if "service" not in args.skip:
        extra = ["--requests", str(args.requests), *quick]
        extra += [a for kv in ["IMGSIM_RUNTIME=tf", *args.service_env] for a in ("--env", kv)]
        overload = ["--overload-queue", str(args.overload_queue)]
        steps["service"] = [
            run_step("service", ["--model", m, "--index", i, "--data", args.data, *extra, *overload], args.step_timeout)
            for m, i in pairs
        ]
        if "model" not in args.skip:
            steps["model_after"] = run_step("model", bare, args.step_timeout, TF)
        fastest = [*extra, "--env", "IMGSIM_RUNTIME=auto", "--concurrency", "1,16"]  # later --env wins
        steps["service_fastest"] = [
            run_step("service", ["--model", m, "--index", i, "--data", args.data, *fastest], args.step_timeout)
            for m, i in pairs
        ]
    if "runtimes" not in args.skip:
        steps["runtimes"] = run_step("runtimes", [a for m, _ in pairs for a in ("--model", m)] + quick,
                                     args.step_timeout)  # fmt: skip
    if "indexer" not in args.skip:
        models = [a for m, _ in pairs for a in ("--model", m)]
        ix = [*models, "--data", args.data, "--max-per-class", str(args.max_per_class), *quick]
        ix += ["--runtime", "bf16", "--runtime", "int8"]
        steps["indexer"] = run_step("indexer", ix, args.step_timeout, TF)
    if "faiss" not in args.skip:
        steps["faiss"] = run_step("faiss", ["--sizes", args.faiss_sizes, *quick], args.step_timeout)
    if args.keep:
        keep_steps(results, json.loads(args.keep.read_text()), args.skip)
    results["seconds"] = round(time.perf_counter() - start, 1)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, action="append", default=[], help="MODEL_DIR (repeat, paired with --index)")
    p.add_argument("--index", type=Path, action="append", default=[], help="INDEX_DIR of the preceding --model")
    p.add_argument("--out", type=Path, default=None, help="Markdown (default docs/benchmarks.md; --quick: out/)")
    p.add_argument("--quick", action="store_true", help="small sizes and few requests everywhere (smoke run)")
    p.add_argument("--skip", action="append", choices=STEPS, default=[], help="leave a step out (repeatable)")
    p.add_argument("--keep", type=Path, default=None, metavar="JSON", help="take skipped steps from an earlier JSON")
    p.add_argument("--render", type=Path, default=None, metavar="JSON", help="only re-render an earlier JSON")
    p.add_argument("--data", default=DEFAULT_DATA, help="CIFAR-10 JPEG archive (default %(default)s)")
    p.add_argument("--requests", type=int, default=400, help="service: requests per level (default %(default)s)")
    p.add_argument("--overload-queue", type=int, default=32, help="service: IMGSIM_MAX_QUEUE of the overload run")
    p.add_argument("--service-env", action="append", default=[], metavar="KEY=VALUE", help="service environment")
    p.add_argument("--max-per-class", type=int, default=500, help="indexer: images per class (default 500)")
    p.add_argument("--faiss-sizes", default="10k,100k,1M", help="default %(default)s")
    p.add_argument("--step-timeout", type=float, default=3600.0, help="s per step (default %(default)s)")
    args = p.parse_args(argv)
    out = args.out or ROOT / ("out/benchmarks-quick.md" if args.quick else "docs/benchmarks.md")
    if args.render:
        results = json.loads(args.render.read_text())
    else:
        if len(args.model) != len(args.index) or not args.model:
            p.error("give --model and --index in pairs")
        if args.quick and args.faiss_sizes == "10k,100k,1M":
            args.faiss_sizes = "2k,10k"
        results = measure(args)
        write_json(out.with_suffix(".json"), results)
    results["targets"] = evaluate(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(results))
    log(f"wrote {out}")
    for t in results["targets"]:
        log(f"  {t['verdict']:5s} {t['target']} [{t['model']}]: {t['measured']} vs {t['reference']} -> {t['ratio']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
