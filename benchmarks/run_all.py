"""Run every benchmark, check the targets, and write docs/benchmarks.md + docs/benchmarks.json.

Each benchmark runs as its own subprocess (``python -m benchmarks.<name> --json ...``) so
that TensorFlow's thread pools, FAISS's 4 GB arrays and the service do not share one
process, and each has a time limit. Then the ratios to the bare model are computed and
every target of the benchmark issue is marked pass / fail / n/a.

    python -m benchmarks.run_all --model runs/resnet50-cifar10 --index indexes/resnet50-cifar10 \\
        --model runs/vgg16-cifar10 --index indexes/vgg16-cifar10
    python -m benchmarks.run_all --model /tmp/m --index /tmp/i --quick      # smoke run
    python -m benchmarks.run_all --render docs/benchmarks.json              # re-render the Markdown only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    DEFAULT_DATA,
    IMAGE_SOURCES,
    ROOT,
    busy_warning,
    die_with_parent,
    log,
    machine_info,
    sigterm_as_exit,
    write_json,
)

STEPS = ("model", "service", "indexer", "faiss")
TARGETS = {
    "c1_latency": 1.15,  # service p50 at c=1 <= 1.15 x (decode + preprocess + batch-1 forward)
    "c16_throughput": 0.9,  # service req/s at c=16 >= 0.9 x best batched forward img/s
    "indexer_throughput": 0.85,  # index img/s >= 0.85 x best batched forward img/s
}


# --------------------------------------------------------------------------- running the steps


def run_step(name: str, argv: list[str], timeout: float) -> dict[str, Any]:
    """``python -m benchmarks.<name> argv --json tmp``; its JSON, or {"error": ...}."""
    with tempfile.TemporaryDirectory(prefix=f"imgsim-bench-{name}-") as tmp:
        out = Path(tmp) / "result.json"
        module = "benchmarks.faiss_bench" if name == "faiss" else f"benchmarks.{name}"
        cmd = [sys.executable, "-m", module, *argv, "--json", str(out)]
        log(f"== {name}: {shlex.join(cmd[1:])}")
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            start_new_session=True,  # Ctrl-C reaches run_all, which stops the step in order
            preexec_fn=die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
        )
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            return {"error": f"timed out after {timeout:.0f} s", "command": shlex.join(cmd[1:])}
        except BaseException:
            _stop(proc)
            raise
        took = round(time.perf_counter() - start, 1)
        if code != 0 or not out.is_file():
            return {"error": f"exit code {code}", "command": shlex.join(cmd[1:]), "seconds": took}
        result = json.loads(out.read_text())
        result["command"] = shlex.join(["python", *cmd[1:-2]])
        result["seconds"] = took
        return result


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM our child (the service benchmark then stops its service), SIGKILL if needed."""
    for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)


def _same(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


# --------------------------------------------------------------------------- targets


def _forward_ms(bare: dict[str, Any], batch: int) -> float | None:
    f = bare.get("forward", {})
    if str(batch) in f:
        return f[str(batch)]["median_ms"]
    best = bare.get("best_batched", {}).get("images_per_s")
    return 1000.0 * batch / best if best else None


def _best_two_calls(bare: dict[str, Any]) -> dict[str, Any] | None:
    calls = list((bare.get("two_calls") or {}).values())
    return max(calls, key=lambda c: c["images_per_s"]) if calls else None


def bracketed(before: dict[str, Any], after: dict[str, Any] | None) -> dict[str, Any]:
    """The bare-model figures as the mean of the runs before and after the service step.

    Keeps ``before`` and ``after`` under "bracket" so the report can show the drift.
    """
    if not after:
        return before
    out = dict(before)
    forward = {}
    for b, f in before.get("forward", {}).items():
        g = after.get("forward", {}).get(b)
        if g is None:
            forward[b] = f
            continue
        ms = (f["median_ms"] + g["median_ms"]) / 2
        forward[b] = {**f, "median_ms": round(ms, 3), "images_per_s": round(f["batch"] / (ms / 1000.0), 2)}
    out["forward"] = forward
    if forward:
        best = max(forward.values(), key=lambda f: f["images_per_s"])
        out["best_batched"] = {"batch": best["batch"], "images_per_s": best["images_per_s"]}
    two = {}
    for b, f in (before.get("two_calls") or {}).items():
        g = (after.get("two_calls") or {}).get(b)
        two[b] = f if g is None else {**f, "images_per_s": round((f["images_per_s"] + g["images_per_s"]) / 2, 2)}
    out["two_calls"] = two
    if "c1_reference_ms" in before and "c1_reference_ms" in after:
        out["c1_reference_ms"] = round((before["c1_reference_ms"] + after["c1_reference_ms"]) / 2, 3)
    out["bracket"] = {
        "before": {"c1_reference_ms": before.get("c1_reference_ms"), "best_batched": before.get("best_batched")},
        "after": {"c1_reference_ms": after.get("c1_reference_ms"), "best_batched": after.get("best_batched")},
    }
    return out


def _level(svc: dict[str, Any], c: int) -> dict[str, Any] | None:
    return next((lv for lv in svc.get("levels", []) if lv["concurrency"] == c), None)


def queue_bound_ms(
    bare: dict[str, Any], settings: dict[str, Any], level: dict[str, Any], fixed_ms: float, search_ms: float = 0.0
) -> tuple[float | None, str]:
    """Longest an admitted request should take, from the queue limits, and how it was computed.

    With a time limit (``max_queue_ms``): that limit, plus the longest model call of the
    level, plus the answers and the fixed cost below. Otherwise, from the count: ahead of a newly admitted request: at most ``max_batch`` images in the running model
    call(s) and ``max_queue - 1`` queued, so it is answered once ``max_batch + max_queue``
    images have gone through the model (its own included), plus the per-request cost
    outside the model (HTTP, parsing, decode), taken as the c=1 median latency (which also
    holds one batch-1 forward: generous on purpose). The loop then answers the last batch's
    requests one by one (max_batch x its CPU per request). The time per image is this
    level's wall time per answered image (the service's throughput under this level's load;
    with two model streams a call's own duration would count shared time twice); the bare
    batch-``max_batch`` forward (+ FAISS) when the level has no answers.
    """
    b, q = settings["max_batch_size"], settings["max_queue"]
    # The event loop answers a finished batch one request after the other: the last answer
    # waits for the loop's work on the whole batch (measured loop CPU per request, this level).
    loop_ms = (level.get("cpu_ms_per_request") or {}).get("event_loop") or 0.0
    drain = b * loop_ms
    drain_how = f"{drain:.0f} ms (loop answers a batch: {b} x {loop_ms:.2f} ms) + {fixed_ms:.0f} ms (c=1 p50)"
    wait_limit = settings.get("max_queue_ms") or 0.0
    longest = (level.get("server") or {}).get("longest_call_ms_at_most")
    if wait_limit and longest:
        # IMGSIM_MAX_QUEUE_MS: no request starts its model call after waiting longer (the
        # batcher refuses it with 503), so it is answered within that wait plus one call.
        return (
            wait_limit + longest + drain + fixed_ms,
            f"{wait_limit:.0f} ms (IMGSIM_MAX_QUEUE_MS, the longest a request may wait) + {longest:.0f} ms "
            f"(longest model call of this level, upper edge of its histogram bucket) + {drain_how}",
        )
    rate = level.get("ok_per_s")
    if rate:
        per_image, how = 1000.0 / rate, f"{1000.0 / rate:.2f} ms/image = 1 / this level's {rate:.1f} answers/s"
    else:
        t0 = _forward_ms(bare, b)
        if t0 is None:
            return None, "no batch time"
        per_image, how = (t0 + search_ms) / b, f"bare batch-{b} forward + FAISS"
    work = (b + q) * per_image
    return work + drain + fixed_ms, f"({b} in the model + {q} queued) x {how} = {work:.0f} ms + {drain_how}"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (target, model): measured, reference, ratio, limit, verdict, note."""
    rows: list[dict[str, Any]] = []
    model_step = results["steps"].get("model", {})
    bare_models = model_step.get("models", []) if "error" not in model_step else []
    after_step = results["steps"].get("model_after") or {}
    after_models = after_step.get("models", []) if "error" not in after_step else []
    services = results["steps"].get("service", [])
    indexer_step = results["steps"].get("indexer", {})
    indexers = indexer_step.get("models", []) if "error" not in indexer_step else []

    def bare_for(model_dir: str) -> dict[str, Any] | None:
        before = next((m for m in bare_models if _same(m["model_dir"], model_dir)), None)
        after = next((m for m in after_models if _same(m["model_dir"], model_dir)), None)
        return bracketed(before, after) if before else None

    for svc in services:
        if "error" in svc:
            rows.append({"target": "service", "model": svc.get("model_dir"), "verdict": "n/a", "note": svc["error"]})
            continue
        bare = bare_for(svc["model_dir"])
        name = f"{svc['backbone']} {svc['input_size']} px"
        search = (bare or {}).get("faiss_search", {})
        s1 = search.get("batch1_1thread", {}).get("median_ms")
        s32 = search.get("batch32_1thread", {}).get("median_ms")
        # c=1 latency
        lv = _level(svc, 1)
        ref = (bare or {}).get("c1_reference_ms")
        if lv and ref and lv["latency_ok"].get("n"):
            p50 = lv["latency_ok"]["p50_ms"]
            ratio = p50 / ref
            note = "reference = decode + preprocess + batch-1 forward, measured in-process"
            br = (bare or {}).get("bracket")
            if br:
                note += (
                    f" before and after the service ({br['before']['c1_reference_ms']:.1f} / "
                    f"{br['after']['c1_reference_ms']:.1f} ms; the mean is used)"
                )
            note += f"; client {lv.get('client_kind', svc['client'].get('kind', '?'))}"
            cross = svc.get("cross_check")
            if cross and cross["latency_ok"].get("n"):
                cp50 = cross["latency_ok"]["p50_ms"]
                note += f"; with the {cross['client_kind']} client: p50 {cp50:.1f} ms, ratio {cp50 / ref:.2f}"
            if s1 is not None:
                note += f"; incl. the FAISS search ({s1:.2f} ms) the ratio would be {p50 / (ref + s1):.2f}"
            idle = (bare or {}).get("forward_batch1_after_10ms_idle", {}).get("median_ms")
            if idle is not None and "1" in (bare or {}).get("forward", {}):
                alt = ref - bare["forward"]["1"]["median_ms"] + idle + (s1 or 0.0)
                note += f"; with batch 1 timed after 10 ms idle (+ FAISS) it would be {p50 / alt:.2f}"
            timing = lv.get("server_timing_p50_ms") or {}
            if "total" in timing:
                parts = ", ".join(f"{k} {v:.2f}" for k, v in timing.items())
                note += (
                    f"; the service's Server-Timing, p50 of each part: {parts} ms, and {p50 - timing['total']:.2f} ms "
                    "beyond its total (HTTP, routing, the response, the client)"
                )
            rows.append(
                {
                    "target": "c=1 median latency <= 1.15 x reference",
                    "model": name,
                    "measured": f"{p50:.1f} ms",
                    "reference": f"{ref:.1f} ms",
                    "ratio": round(ratio, 3),
                    "limit": f"<= {TARGETS['c1_latency']}",
                    "verdict": _verdict(ratio <= TARGETS["c1_latency"]),
                    "note": note,
                }
            )
        # c=16 (and 64) throughput
        best = (bare or {}).get("best_batched", {})
        for c, limit in ((16, TARGETS["c16_throughput"]), (64, None)):
            lv = _level(svc, c)
            if not (lv and best.get("images_per_s")):
                continue
            ratio = lv["ok_per_s"] / best["images_per_s"]
            mean_batch = (lv.get("server") or {}).get("mean_batch")
            bs = (bare or {}).get("forward", {})
            note = f"best batched forward at batch {best['batch']}; service mean batch {mean_batch}"
            br = (bare or {}).get("bracket")
            if br:
                note += (
                    f"; bare best before / after the service {br['before']['best_batched']['images_per_s']:.1f} / "
                    f"{br['after']['best_batched']['images_per_s']:.1f} img/s (per batch size, the mean is used)"
                )
            if mean_batch and bs:
                # The forward throughput at the batch size the service actually formed.
                near = min(bs.values(), key=lambda s: abs(s["batch"] - mean_batch))
                note += f"; bare forward at batch {near['batch']}: {near['images_per_s']:.1f} img/s"
            two = _best_two_calls(bare or {})
            if two and two["images_per_s"] > best["images_per_s"]:
                note += (
                    f"; stricter, against two concurrent calls of batch {two['batch']} "
                    f"({two['images_per_s']:.1f} img/s): {lv['ok_per_s'] / two['images_per_s']:.3f}"
                )
            rows.append(
                {
                    "target": f"c={c} throughput" + (f" >= {limit} x best batched forward" if limit else " (info)"),
                    "model": name,
                    "measured": f"{lv['ok_per_s']:.1f} req/s",
                    "reference": f"{best['images_per_s']:.1f} img/s",
                    "ratio": round(ratio, 3),
                    "limit": f">= {limit}" if limit else "",
                    "verdict": _verdict(ratio >= limit) if limit else "info",
                    "note": note,
                }
            )
        # c=64: errors and p99 bound, with the default queue and in the overload run
        for label, lv, settings in (
            ("c=64", _level(svc, 64), svc.get("settings")),
            ("c=64 overload", svc.get("overload"), (svc.get("overload") or {}).get("settings")),
        ):
            if not lv or not settings:
                continue
            c1 = _level(svc, 1)
            fixed = c1["latency_ok"].get("p50_ms", 0.0) if c1 else (bare or {}).get("c1_reference_ms", 0.0)
            bound, how = queue_bound_ms(bare or {}, settings, lv, fixed or 0.0, s32 or 0.0)
            p99 = lv["latency_ok"].get("p99_ms")
            errors_ok = lv["other_errors"] == 0
            within = None if bound is None or p99 is None else p99 <= bound
            ok = errors_ok and (within is not False)
            rows.append(
                {
                    "target": f"{label}: only 503s, p99 <= queue bound",
                    "model": name,
                    "measured": f"{lv['other_errors']} errors, {lv['rejected_503']} x 503, p99 "
                    + (f"{p99:.0f} ms" if p99 is not None else "n/a"),
                    "reference": f"bound {bound:.0f} ms" if bound else "bound n/a",
                    "ratio": round(p99 / bound, 3) if bound and p99 else None,
                    "limit": "<= 1",
                    "verdict": _verdict(ok) if bound is not None or not errors_ok else "n/a",
                    "note": f"queue {settings['max_queue']}"
                    + (f" images / {settings['max_queue_ms']:.0f} ms" if settings.get("max_queue_ms") else "")
                    + f", max batch {settings['max_batch_size']}: bound = {how}",
                }
            )
    for ix in indexers:
        bare = bare_for(ix["model_dir"])
        best = (bare or {}).get("best_batched", {})
        full = ix.get("full_model", {})
        name = f"{ix['backbone']} {ix['input_size']} px"
        if best.get("images_per_s") and full.get("embed_images_per_s"):
            ratio = full["embed_images_per_s"] / best["images_per_s"]
            rows.append(
                {
                    "target": "indexer >= 0.85 x best batched forward",
                    "model": name,
                    "measured": f"{full['embed_images_per_s']:.1f} img/s",
                    "reference": f"{best['images_per_s']:.1f} img/s",
                    "ratio": round(ratio, 3),
                    "limit": f">= {TARGETS['indexer_throughput']}",
                    "verdict": _verdict(ratio >= TARGETS["indexer_throughput"]),
                    "note": f"full-model path, {full['count']} images, batch {ix['batch_size']} "
                    f"(embedding phase, as `imgsim index` reports it)",
                }
            )
    return rows


# --------------------------------------------------------------------------- Markdown


def _fmt(x: Any, nd: int = 1) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _kept(results: dict[str, Any], step: str) -> list[str]:
    when = results.get("kept", {}).get(step)
    return (
        [f"*Not re-measured in this run: results kept from the run of {when} (`--skip {step} --keep`).*", ""]
        if when
        else []
    )


def _cpu_split(ms: dict[str, float] | None) -> str:
    if not ms:
        return "–"
    return " / ".join(f"{ms[k]:.2f}" for k in ("event_loop", "other_threads", "client"))


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return out + [""]


def _mb(kb: int | None) -> str:
    return f"{kb / 1024:,.0f} MB" if kb else "–"


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    steps = results["steps"]
    L: list[str] = [
        "# Benchmarks",
        "",
        "<!-- Generated by benchmarks/run_all.py: edit the generator, not this file. -->",
        "",
        f"Measured {m['date']} on `{m['hostname']}`, commit `{(m['git']['commit'] or '?')[:12]}`"
        + (" (with uncommitted changes)" if m["git"].get("dirty") else "")
        + ". Regenerate with:",
        "",
        "```",
        results["regenerate"],
        "```",
        "",
        "(or `make bench`). Method, caveats and how to run each part alone: `benchmarks/README.md`; what the profiles showed and why targets are missed: [performance.md](performance.md).",
        "",
    ]
    if results.get("quick"):
        L += [
            (
                "> **Smoke run (`--quick`)**: few repetitions, small sizes. These numbers only show that the "
                "harness works; they are not results."
            ),
            "",
        ]
    if results.get("busy_warning"):
        L += [f"> **Warning**: {results['busy_warning']}.", ""]

    L += ["## Machine", ""]
    pk = m.get("packages", {})
    tf = pk.get("tensorflow-cpu") or pk.get("tensorflow")
    L += _table(
        ["", ""],
        [
            ["CPU", f"{m['cpu_model']} ({', '.join(m.get('cpu_flags') or []) or 'flags n/a'})"],
            ["cores", f"{m['logical_cpus']} logical, {m['usable_cpus']} usable by this process"],
            ["RAM", f"{m['ram_gb']} GB"],
            ["OS", m["os"]],
            ["Python", m["python"]],
            ["TensorFlow / Keras", f"{tf} / {pk.get('keras')}"],
            ["FAISS / NumPy / Pillow", f"{pk.get('faiss-cpu')} / {pk.get('numpy')} / {pk.get('pillow')}"],
            ["FastAPI / uvicorn / httpx", f"{pk.get('fastapi')} / {pk.get('uvicorn')} / {pk.get('httpx')}"],
            [
                "CPU busy before start",
                f"{m['cpu_busy_before_start']:.0%} (load average {m['load_average']})"
                if m.get("cpu_busy_before_start") is not None
                else "–",
            ],
            ["wall time of this run", f"{results.get('seconds', 0) / 60:.1f} min"],
        ],
    )

    L += ["## Targets", ""]
    if results["targets"]:
        L += _table(
            ["target", "model", "measured", "reference", "ratio", "limit", "verdict", "notes"],
            [
                [
                    t["target"],
                    t.get("model") or "",
                    t.get("measured", ""),
                    t.get("reference", ""),
                    _fmt(t.get("ratio"), 3),
                    t.get("limit", ""),
                    f"**{t['verdict']}**",
                    t.get("note", ""),
                ]
                for t in results["targets"]
            ],
        )
    else:
        L += ["No target could be evaluated (see the errors below).", ""]

    # (1) bare model
    L += ["## 1. Bare model (in-process forward pass)", ""] + _kept(results, "model")
    ms = steps.get("model")
    if not ms:
        L += ["Not run.", ""]
    elif "error" in ms:
        L += [f"Failed: {ms['error']} (`{ms.get('command')}`)", ""]
    else:
        img = ms["images"]
        L += [
            (
                f"`Embedder` call = preprocess + one tf.function returning (embedding, probabilities), as the "
                f"service and indexer run it; median of several calls after warm-up. TF threads: intra-op "
                f"{ms['tf_threads']['intra_op'] or 'default'}, inter-op {ms['tf_threads']['inter_op'] or 'default'} "
                f"(0 = TensorFlow picks, one per core). JPEGs: {img['source']} ({img['count']} files, median {img['bytes_median']:,} "
                f"bytes, {', '.join(img['pixels'])})."
            ),
            "",
        ]
        rows = []
        for b in ms["models"]:
            for f in b["forward"].values():
                rows.append(
                    [
                        f"{b['backbone']} {b['input_size']} px",
                        f["batch"],
                        f["median_ms"],
                        f["p10_ms"],
                        f["p90_ms"],
                        f["images_per_s"],
                        f["n"],
                    ]
                )
        L += _table(["model", "batch", "ms/batch (median)", "p10", "p90", "images/s", "reps"], rows)
        after = steps.get("model_after") or {}
        if after.get("models"):
            L += [
                "The same, measured again after the service step. The targets compare the service with "
                "the mean of the two, since this machine's speed drifts over minutes:",
                "",
            ]
            rows = []
            for a in after["models"]:
                b = next((x for x in ms["models"] if _same(x["model_dir"], a["model_dir"])), None)
                for key, f in a["forward"].items():
                    f0 = (b or {}).get("forward", {}).get(key)
                    drift = f"{(f['median_ms'] / f0['median_ms'] - 1) * 100:+.1f} %" if f0 else "–"
                    rows.append(
                        [f"{a['backbone']} {a['input_size']} px", f["batch"], f["median_ms"], f["images_per_s"], drift]
                    )
            L += _table(["model", "batch", "ms/batch (median), after", "images/s, after", "ms/batch change"], rows)
        elif after.get("error"):
            L += [f"Re-measuring after the service step failed: {after['error']}", ""]
        rows = []
        for b in ms["models"]:
            fs = b.get("faiss_search", {})
            rows.append(
                [
                    f"{b['backbone']} {b['input_size']} px",
                    f"{b['decode_image']['median_ms']:.2f}",
                    f"{b['decode_upload']['median_ms']:.2f}",
                    f"{b['preprocess_batch1']['median_ms']:.3f}",
                    f"{b['forward']['1']['median_ms']:.2f}" if "1" in b["forward"] else "–",
                    _fmt(b.get("forward_batch1_after_10ms_idle", {}).get("median_ms"), 2),
                    f"**{b['c1_reference_ms']:.2f}**" if "c1_reference_ms" in b else "–",
                    (
                        f"{fs['batch1_1thread']['median_ms']:.2f} / {fs['batch32_1thread']['median_ms']:.2f} "
                        f"({fs['index_type']}, {fs['count']:,})"
                    )
                    if fs
                    else "–",
                    f"{b['best_batched']['images_per_s']:.1f} at {b['best_batched']['batch']}",
                    " / ".join(f"{t['images_per_s']:.1f}" for t in (b.get("two_calls") or {}).values()) or "–",
                ]
            )
        L += _table(
            [
                "model",
                "decode_image ms",
                "decode_upload ms",
                "preprocess ms (1 img)",
                "batch-1 forward ms",
                "batch 1 after 10 ms idle",
                "c=1 reference ms",
                "FAISS search ms, 1 / 32 queries (index)",
                "best batched img/s",
                "2 calls at once, img/s (batch " + "/".join((ms["models"][0].get("two_calls") or {}).keys()) + ")",
            ],
            rows,
        )
        L += [
            (
                "c=1 reference = decode_image + batch-1 `Embedder` call (which includes preprocess). "
                "decode_upload is the service's decode (header check + decode_image). FAISS search: "
                "`IndexStore.search` on the service's index with 1 OpenMP thread (the service default). "
                "Batch 1 after 10 ms idle: how a lone request meets the model (TensorFlow's threads asleep); "
                "information only, the reference uses back-to-back calls. 2 calls at once: two threads each "
                "calling the model back to back (the service's two model streams, `IMGSIM_MODEL_STREAMS`); "
                "the targets use the single-call best, as the issue defines it, and the c=16 and c=64 "
                "notes give the ratio against this stricter figure too."
            ),
            "",
        ]

    # (2) service
    L += ["## 2. Service over HTTP", ""] + _kept(results, "service")
    svcs = steps.get("service")
    if not svcs:
        L += ["Not run.", ""]
    for svc in svcs or []:
        if "error" in svc:
            L += [f"Failed: {svc['error']} (`{svc.get('command')}`)", ""]
            continue
        st, cl = svc["settings"], svc["client"]
        L += [
            f"### {svc['backbone']} {svc['input_size']} px",
            "",
            f"`POST {svc['endpoint']}` (k={svc['k']}) with {svc['images']['source']} JPEGs; service settings: "
            f"max batch {st['max_batch_size']}, queue {st['max_queue']}, "
            f"FAISS threads {st['faiss_threads']}"
            + (f", env {svc['env']}" if svc.get("env") else "")
            + f". Index: {svc.get('ready', {}).get('models')}. Started and ready in {svc['startup_seconds']} s.",
            (
                f"Client: {cl['http']}, {cl['event_loop']} event loop, closed loop (each worker sends its next "
                f"request when the previous one is answered), up to {cl['requests_per_level']} requests or "
                f"{cl['max_seconds_per_level']} s per level. **The client runs on the same machine** and its CPU use "
                f"is shown."
            ),
            "",
        ]
        rows = []
        extra = [{**svc["overload"], "overload": True}] if svc.get("overload") else []
        extra += [{**svc["cross_check"], "cross": True}] if svc.get("cross_check") else []
        for lv in svc["levels"] + extra:
            lat, srv = lv["latency_ok"], lv.get("server") or {}
            c = f"{lv['concurrency']}" + (f" (queue {lv['settings']['max_queue']})" if lv.get("overload") else "")
            c += f" ({lv['client_kind']} client)" if lv.get("cross") else ""
            rows.append(
                [
                    c,
                    lv["ok"],
                    lv["rejected_503"],
                    lv["other_errors"],
                    lat.get("p50_ms"),
                    lat.get("p95_ms"),
                    lat.get("p99_ms"),
                    lv["ok_per_s"],
                    srv.get("mean_batch"),
                    ", ".join(f"{k}: {v}" for k, v in (srv.get("batch_sizes") or {}).items()) or "–",
                    f"{srv['model_busy_fraction']:.0%}" if srv.get("model_busy_fraction") is not None else "–",
                    lv.get("server_cpu_cores"),
                    lv.get("client_cpu_cores"),
                    _cpu_split(lv.get("cpu_ms_per_request")),
                    "yes" if lv.get("stopped_by_time_cap") else "",
                ]
            )
        L += _table(
            [
                "concurrency",
                "200",
                "503",
                "other errors",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "req/s",
                "mean batch",
                "model calls by batch size",
                "model busy",
                "service CPU cores",
                "client CPU cores",
                "CPU ms per request: loop / model+other threads / client",
                "time cap hit",
            ],
            rows,
        )
        L += [
            "CPU ms per request: CPU time of the service's event-loop thread (HTTP, multipart parsing, "
            "small-image decoding, JSON), of its other threads (TensorFlow's pools, the inference thread, "
            "FAISS, large-image decoding) and of the client, each divided by the answered requests "
            "(from `/proc/PID/task/*/stat`). On 2 cores, loop and client CPU is taken from the model.",
            "",
            (
                f"Resident memory of the service: {_mb(svc['rss_kb_idle'].get('VmRSS'))} when ready, "
                f"{_mb(svc.get('rss_kb_final', {}).get('VmRSS'))} after the run, peak "
                f"{_mb(svc.get('rss_kb_final', {}).get('VmHWM'))} (VmRSS / VmHWM)."
            ),
            "",
        ]
        errs = [e for lv in svc["levels"] + [svc.get("overload") or {}] for e in lv.get("error_samples", [])]
        if errs:
            L += ["Error samples: " + "; ".join(f"`{e}`" for e in errs[:5]), ""]

    # (3) indexer
    L += ["## 3. Indexer", ""] + _kept(results, "indexer")
    ix = steps.get("indexer")
    if not ix:
        L += ["Not run.", ""]
    elif "error" in ix:
        L += [f"Failed: {ix['error']} (`{ix.get('command')}`)", ""]
    else:
        rows = []
        for r in ix["models"]:
            f, c = r["full_model"], r["cached_features"]
            rows.append(
                [
                    f"{r['backbone']} {r['input_size']} px",
                    "full model",
                    r["subset"],
                    f["count"],
                    f["embed_seconds"],
                    f["embed_images_per_s"],
                    f["wall_seconds"],
                    f["wall_images_per_s"],
                ]
            )
            if "not_run" in c:
                rows.append(
                    [
                        f"{r['backbone']} {r['input_size']} px",
                        "cached features",
                        f"not run: {c['not_run']}",
                        "",
                        "",
                        "",
                        "",
                        "",
                    ]
                )
            else:
                rows.append(
                    [
                        f"{r['backbone']} {r['input_size']} px",
                        "cached features",
                        c["subset"],
                        c["count"],
                        c["embed_seconds"],
                        c["embed_images_per_s"],
                        c["wall_seconds"],
                        c["wall_images_per_s"],
                    ]
                )
        L += _table(
            [
                "model",
                "path",
                "images",
                "count",
                "embedding s",
                "embedding img/s",
                "whole build s",
                "whole build img/s",
            ],
            rows,
        )
        L += [
            (
                "`build_index` as `imgsim index` runs it (batch "
                f"{ix['models'][0]['batch_size'] if ix['models'] else '?'}). Embedding = reading the archive, "
                "decoding (2 threads) and the model; the whole build adds the dataset listing, model load, FAISS "
                "and the SQLite item table with the image bytes."
            ),
            "",
        ]

    # (4) FAISS
    L += ["## 4. FAISS", ""] + _kept(results, "faiss")
    fb = steps.get("faiss")
    if not fb:
        L += ["Not run.", ""]
    elif "error" in fb:
        L += [f"Failed: {fb['error']} (`{fb.get('command')}`)", ""]
    else:
        th = [str(t) for t in fb["threads_compared"]]
        L += [
            f"FAISS {fb['faiss_version']}, {fb['sizes'][0]['dim'] if fb['sizes'] else '?'}-d {fb['data']} random "
            f"unit vectors"
            + (f" ({fb['clusters']} clusters)" if fb.get("clusters") else "")
            + f", {fb['queries']} queries, k={fb['k']}; indexes from `new_faiss_index` with `imgsim index` "
            f"defaults. Latency = median ms; build with all cores.",
            "",
        ]
        header = ["n", "index", "build s", "recall@5"]
        for t in th:
            header += [f"1 query, {t} thr", f"32 queries, {t} thr"]
        rows = []
        for size in fb["sizes"]:
            for name, e in size["types"].items():
                if "skipped" in e:
                    rows.append([size["n"], name, f"skipped: {e['skipped']}", ""] + [""] * (2 * len(th)))
                    continue
                extra = f" (nlist {e['nlist']}, nprobe {e['nprobe']})" if "nlist" in e else ""
                row = [size["n"], name + extra, e["build_seconds"], _fmt(e.get("recall_at_5"), 3)]
                for t in th:
                    s = e["search"].get(t, {})
                    row += [
                        _fmt(s.get("batch1", {}).get("median_ms"), 3),
                        _fmt(s.get("batch32", {}).get("median_ms"), 2),
                    ]
                rows.append(row)
        L += _table(header, rows)

    L += ["## Commands of each step", ""]
    for name in STEPS:
        step = steps.get(name)
        for s in step if isinstance(step, list) else [step] if step else []:
            if s.get("command"):
                L.append(f"- {name} ({_fmt(s.get('seconds'))} s): `{s['command']}`")
    L.append("")
    return "\n".join(L)


def keep_steps(results: dict[str, Any], earlier: dict[str, Any], skipped: list[str]) -> None:
    """Copy the skipped steps' results from an earlier run into ``results``, marked as kept.

    A kept ``model`` step brings its after-service measurement (``model_after``) along:
    without it the ratios would lose their bracket and use one side only.
    """
    m = earlier.get("machine", {})
    stored = earlier.get("steps", {})
    for step in skipped:
        if step not in stored:
            continue
        results["steps"][step] = stored[step]
        if step == "model" and "model_after" in stored:
            results["steps"]["model_after"] = stored["model_after"]
        results.setdefault("kept", {})[step] = earlier.get("kept", {}).get(step) or (
            f"{m.get('date', '?')}, commit {(m.get('git', {}).get('commit') or '?')[:12]}"
        )


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run_all",
        description="Run the bare-model, service, indexer and FAISS benchmarks, check the targets, and "
        "write docs/benchmarks.md and docs/benchmarks.json.",
    )
    p.add_argument("--model", type=Path, action="append", default=[], help="MODEL_DIR (repeat, paired with --index)")
    p.add_argument("--index", type=Path, action="append", default=[], help="INDEX_DIR built from the preceding --model")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="Markdown file (default docs/benchmarks.md; with --quick out/benchmarks-quick.md)",
    )
    p.add_argument("--json", type=Path, default=None, help="JSON file (default: --out with .json)")
    p.add_argument("--quick", action="store_true", help="small sizes and few requests everywhere (smoke run)")
    p.add_argument("--skip", action="append", choices=STEPS, default=[], help="leave a step out (repeatable)")
    p.add_argument(
        "--images", choices=IMAGE_SOURCES, default="cifar", help="JPEGs for model + service (default %(default)s)"
    )
    p.add_argument("--data", default=DEFAULT_DATA, help="CIFAR-10 JPEG archive (default %(default)s)")
    p.add_argument("--requests", type=int, default=400, help="service: requests per level (default %(default)s)")
    p.add_argument(
        "--overload-queue",
        type=int,
        default=32,
        help="service: rerun c=64 with this IMGSIM_MAX_QUEUE to provoke 503s; 0 = off (default %(default)s)",
    )
    p.add_argument(
        "--overload-queue-ms",
        type=float,
        default=250.0,
        help="service: and with this IMGSIM_MAX_QUEUE_MS, the queue's time limit; 0 = none (default %(default)s)",
    )
    p.add_argument(
        "--client",
        choices=("httpx", "raw"),
        default="raw",
        help="service client (default %(default)s; httpx runs at concurrency 1 as a cross-check)",
    )
    p.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for the service, e.g. IMGSIM_MAX_WAIT_MS=5 (repeatable)",
    )
    p.add_argument(
        "--max-per-class",
        type=int,
        default=500,
        help="indexer: images per class for the full-model path (default %(default)s)",
    )
    p.add_argument("--faiss-sizes", default="10k,100k,1M", help="default %(default)s")
    p.add_argument(
        "--step-timeout", type=float, default=3600.0, help="s per step before it is stopped (default %(default)s)"
    )
    p.add_argument(
        "--no-bracket",
        action="store_true",
        help="measure the bare model only before the service, not also after it",
    )
    p.add_argument(
        "--keep",
        type=Path,
        default=None,
        metavar="JSON",
        help="take the steps left out with --skip from this earlier JSON (marked as such in the Markdown)",
    )
    p.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="JSON",
        help="only re-render the Markdown from an earlier JSON (to --out)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out is None:
        args.out = ROOT / ("out/benchmarks-quick.md" if args.quick else "docs/benchmarks.md")
    if args.json is None:
        args.json = args.out.with_suffix(".json")
    if args.render:
        results = json.loads(args.render.read_text())
        results["targets"] = evaluate(results)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render(results))
        log(f"wrote {args.out}")
        return 0
    if len(args.model) != len(args.index):
        print("give --model and --index in pairs", file=sys.stderr)
        return 2
    needs_models = [s for s in ("model", "service", "indexer") if s not in args.skip]
    if needs_models and not args.model:
        print(f"--model/--index needed for: {', '.join(needs_models)} (or --skip them)", file=sys.stderr)
        return 2
    for path in [*args.model, *args.index]:
        if not path.is_dir():
            print(f"not a directory: {path}", file=sys.stderr)
            return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    with sigterm_as_exit():
        return _run(args, argv)


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    start = time.perf_counter()
    machine = machine_info()
    warning = busy_warning(machine)
    if warning:
        log(f"WARNING: {warning}")
    regenerate = shlex.join(["python", "-m", "benchmarks.run_all", *(argv if argv is not None else sys.argv[1:])])
    results: dict[str, Any] = {
        "machine": machine,
        "busy_warning": warning,
        "quick": args.quick,
        "regenerate": regenerate,
        "steps": {},
    }
    quick = ["--quick"] if args.quick else []
    models = [str(m) for m in args.model]
    if "model" not in args.skip:
        argv_m = [a for m, i in zip(models, args.index) for a in ("--model", m, "--index", str(i))]
        results["steps"]["model"] = run_step(
            "model", [*argv_m, "--images", args.images, "--data", args.data, *quick], args.step_timeout
        )
    if "service" not in args.skip:
        results["steps"]["service"] = [
            run_step(
                "service",
                [
                    "--model",
                    m,
                    "--index",
                    str(i),
                    "--images",
                    args.images,
                    "--data",
                    args.data,
                    "--requests",
                    str(args.requests),
                    "--overload-queue",
                    str(args.overload_queue),
                    "--overload-queue-ms",
                    str(args.overload_queue_ms),
                    "--client",
                    args.client,
                    *[a for kv in args.service_env for a in ("--env", kv)],
                    *quick,
                ],
                args.step_timeout,
            )
            for m, i in zip(models, args.index)
        ]
        for s, m in zip(results["steps"]["service"], models):
            s.setdefault("model_dir", m)
        if "model" not in args.skip and not args.no_bracket:
            # The bare model again: this 2-core VM's speed drifts by 10-20 % over minutes, so
            # the service is compared with the mean of the measurements on either side of it.
            results["steps"]["model_after"] = run_step(
                "model", [*argv_m, "--images", args.images, "--data", args.data, *quick], args.step_timeout
            )
    if "indexer" not in args.skip:
        argv_i = [a for m in models for a in ("--model", m)]
        results["steps"]["indexer"] = run_step(
            "indexer",
            [*argv_i, "--data", args.data, "--max-per-class", str(args.max_per_class), *quick],
            args.step_timeout,
        )
    if "faiss" not in args.skip:
        sizes = args.faiss_sizes if not args.quick or args.faiss_sizes != "10k,100k,1M" else "2k,10k"
        results["steps"]["faiss"] = run_step("faiss", ["--sizes", sizes, *quick], args.step_timeout)
    if args.keep:
        keep_steps(results, json.loads(args.keep.read_text()), args.skip)
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["targets"] = evaluate(results)

    write_json(args.json, results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(results))
    log(f"wrote {args.out} and {args.json} in {results['seconds'] / 60:.1f} min")
    for t in results["targets"]:
        log(
            f"  {t['verdict']:5s} {t['target']} [{t.get('model')}]: {t.get('measured', '')} vs "
            f"{t.get('reference', '')} -> {_fmt(t.get('ratio'), 3)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
