"""The targets: each measurement against its bare-model reference, with a verdict and a note.

Pure functions of the results ``run_all`` collected, so a report can be re-rendered (and
the rules checked) without measuring anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LIMITS = {
    "c1_latency": 1.15,  # service p50 at c=1 <= 1.15 x (decode + preprocess + batch-1 forward)
    "c16_throughput": 0.88,  # service req/s at c=16 >= 0.88 x best batched forward img/s
    "indexer_throughput": 0.85,  # index img/s >= 0.85 x best batched forward img/s
}
# Runtimes against TensorFlow fp32 of the same model (issue: inference past the fp32 peak).
RUNTIME_LIMITS = {"bf16": 1.5, "int8": 2.5}  # bare batched forward
FASTEST_SERVICE_LIMIT = 1.4  # service req/s at c=16 on the fastest runtime vs the TensorFlow service


def _same(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def bracketed(before: dict[str, Any], after: dict[str, Any] | None) -> dict[str, Any]:
    """The bare-model figures as the mean of the runs before and after the service step.

    This machine's speed drifts by 5-15 % over minutes, so the service is compared with the
    mean of the measurements on either side of it; both sides are kept under "bracket".
    """
    if not after:
        return before
    forward = {}
    for b, f in before["forward"].items():
        ms = (f["median_ms"] + after["forward"].get(b, f)["median_ms"]) / 2
        forward[b] = {**f, "median_ms": round(ms, 3), "images_per_s": round(f["batch"] / (ms / 1000.0), 2)}
    best = max(forward.values(), key=lambda f: f["images_per_s"])
    out = {**before, "forward": forward, "best_batched": {"batch": best["batch"], "images_per_s": best["images_per_s"]}}
    if "c1_reference_ms" in before and "c1_reference_ms" in after:
        out["c1_reference_ms"] = round((before["c1_reference_ms"] + after["c1_reference_ms"]) / 2, 3)
    out["bracket"] = {side: {k: run.get(k) for k in ("c1_reference_ms", "best_batched")} for side, run in
                      (("before", before), ("after", after))}  # fmt: skip
    return out


def queue_bound_ms(settings: dict[str, Any], level: dict[str, Any], fixed_ms: float) -> tuple[float | None, str]:
    """Longest an admitted request should take under the queue limits, and how it was computed.

    With a time limit (``max_queue_ms``): no request starts its model call after waiting
    longer, so it is answered within that limit plus the level's longest model call.
    Otherwise from the count: at most ``max_batch`` images in the model and ``max_queue``
    queued are ahead of it, at this level's wall time per answered image. Both add the event
    loop answering one full batch (max_batch x its CPU per request) and the c=1 median.
    """
    b, q = settings["max_batch_size"], settings["max_queue"]
    loop_ms = (level.get("cpu_ms_per_request") or {}).get("event_loop") or 0.0
    tail = f"{b * loop_ms:.0f} ms (loop answers a batch: {b} x {loop_ms:.2f} ms) + {fixed_ms:.0f} ms (c=1 p50)"
    longest = (level.get("server") or {}).get("longest_call_ms_at_most")
    if settings.get("max_queue_ms") and longest:
        limit = settings["max_queue_ms"]
        how = f"{limit:.0f} ms (IMGSIM_MAX_QUEUE_MS) + {longest:.0f} ms (longest model call, bucket edge) + {tail}"
        return limit + longest + b * loop_ms + fixed_ms, how
    if not level.get("ok_per_s"):
        return None, "no answers"
    per_image = 1000.0 / level["ok_per_s"]
    work = (b + q) * per_image
    how = f"({b} in the model + {q} queued) x {per_image:.2f} ms/image (this level's rate) = {work:.0f} ms + {tail}"
    return work + b * loop_ms + fixed_ms, how


def _row(target: str, model: str, measured: str, reference: str, ratio: float | None, limit: str, ok: bool | None,
         note: str) -> dict[str, Any]:  # fmt: skip
    verdict = "info" if limit == "" else ("n/a" if ok is None else ("PASS" if ok else "FAIL"))
    return {"target": target, "model": model, "measured": measured, "reference": reference,
            "ratio": None if ratio is None else round(ratio, 3), "limit": limit, "verdict": verdict,
            "note": note}  # fmt: skip


def _c1(svc: dict, bare: dict, name: str) -> list[dict]:
    lv = next((x for x in svc["levels"] if x["concurrency"] == 1), None)
    ref = bare.get("c1_reference_ms")
    if not (lv and ref and lv["latency_ok"].get("n")):
        return []
    p50, limit = lv["latency_ok"]["p50_ms"], LIMITS["c1_latency"]
    br = bare.get("bracket", {})
    note = "reference = decode + preprocess + batch-1 forward, in-process"
    if br:
        before, after = br["before"]["c1_reference_ms"], br["after"]["c1_reference_ms"]
        note += f" before / after the service ({before:.1f} / {after:.1f} ms, mean used)"
    timing = lv.get("server_timing_p50_ms") or {}
    if "total" in timing:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in timing.items())
        note += f"; Server-Timing p50: {parts} ms; {p50 - timing['total']:.2f} ms beyond its total (HTTP, client)"
    return [_row("c=1 median latency <= 1.15 x reference", name, f"{p50:.1f} ms", f"{ref:.1f} ms", p50 / ref,
                 f"<= {limit}", p50 / ref <= limit, note)]  # fmt: skip


def _throughput(svc: dict, bare: dict, name: str) -> list[dict]:
    best, rows = bare.get("best_batched", {}), []
    for c, limit in ((16, LIMITS["c16_throughput"]), (64, None)):
        lv = next((x for x in svc["levels"] if x["concurrency"] == c), None)
        if not (lv and best.get("images_per_s")):
            continue
        ratio = lv["ok_per_s"] / best["images_per_s"]
        note = f"best batched forward at batch {best['batch']}; service mean batch {lv['server']['mean_batch']}"
        two = max((bare.get("two_calls") or {}).values(), key=lambda t: t["images_per_s"], default=None)
        if two and two["images_per_s"] > best["images_per_s"]:
            note += f"; against two concurrent calls of batch {two['batch']} ({two['images_per_s']:.1f} img/s): "
            note += f"{lv['ok_per_s'] / two['images_per_s']:.3f}"
        target = f"c={c} throughput" + (f" >= {limit} x best batched forward" if limit else " (info)")
        rows.append(_row(target, name, f"{lv['ok_per_s']:.1f} req/s", f"{best['images_per_s']:.1f} img/s", ratio,
                         f">= {limit}" if limit else "", ratio >= limit if limit else None, note))  # fmt: skip
    return rows


def _overload(svc: dict, name: str) -> list[dict]:
    rows = []
    c1 = next((x for x in svc["levels"] if x["concurrency"] == 1), {})
    fixed = (c1.get("latency_ok") or {}).get("p50_ms", 0.0)
    top = next((x for x in svc["levels"] if x["concurrency"] == 64), None)
    overload = svc.get("overload")
    for label, lv, settings in (
        ("c=64", top, svc["settings"]),
        ("c=64 overload", overload, (overload or {}).get("settings")),
    ):
        if not lv or not settings:
            continue
        bound, how = queue_bound_ms(settings, lv, fixed)
        p99 = lv["latency_ok"].get("p99_ms")
        ok = lv["other_errors"] == 0 and (bound is None or p99 is None or p99 <= bound)
        queue = f"queue {settings['max_queue']}" + (
            f" / {settings['max_queue_ms']:.0f} ms" if settings.get("max_queue_ms") else ""
        )
        rows.append(_row(f"{label}: only 503s, p99 <= queue bound", name,
                         f"{lv['other_errors']} errors, {lv['rejected_503']} x 503, p99 {p99} ms",
                         f"bound {bound:.0f} ms" if bound else "n/a", p99 / bound if bound and p99 else None,
                         "<= 1", ok, f"{queue}, max batch {settings['max_batch_size']}: bound = {how}"))  # fmt: skip
    return rows


def _runtimes(steps: dict[str, Any]) -> list[dict]:
    """Each runtime's bare forward and batch-1 latency against TensorFlow fp32; the service on
    the fastest runtime against the TensorFlow service; the indexer per runtime."""
    rows = []
    for m in (steps.get("runtimes") or {}).get("models", []):
        name, tf = f"{m['backbone']} {m['input_size']} px", m["runtimes"]["tf"]
        for r, row in m["runtimes"].items():
            if r == "tf":
                continue
            limit, ran = RUNTIME_LIMITS.get(r), row["ran"]
            ratio = row["forward_ratio_vs_tf"] if ran == r else None
            rows.append(_row(f"{r} batched forward >= {limit} x TensorFlow fp32", name,
                             f"{row['best_batched']['images_per_s']:.1f} img/s", f"{tf['best_batched']['images_per_s']:.1f} img/s",
                             ratio, f">= {limit}", None if ratio is None else ratio >= limit,
                             f"batch {row['best_batched']['batch']} vs {tf['best_batched']['batch']}; alternating rounds"
                             + ("" if ran == r else f"; fell back to {ran}")))  # fmt: skip
            rows.append(_row(f"{r} batch-1 latency (info)", name, f"{row['batch1_ms']:.2f} ms", f"{tf['batch1_ms']:.2f} ms",
                             row["batch1_speedup_vs_tf"], "", None, "speed-up = TensorFlow ms / this ms"))  # fmt: skip
    plain = {svc.get("model_dir"): svc for svc in steps.get("service", []) if "error" not in svc}
    for svc in steps.get("service_fastest", []):
        base = next((b for d, b in plain.items() if "error" not in svc and _same(d, svc["model_dir"])), None)
        level = lambda s: next((x for x in s["levels"] if x["concurrency"] == 16), None)  # noqa: E731
        if not base or not level(svc) or not level(base):
            continue
        fast, slow = level(svc)["ok_per_s"], level(base)["ok_per_s"]
        rows.append(_row(f"c=16 throughput, fastest runtime >= {FASTEST_SERVICE_LIMIT} x TensorFlow service",
                         f"{svc['backbone']} {svc['input_size']} px", f"{fast:.1f} req/s ({svc.get('runtime', '?')})",
                         f"{slow:.1f} req/s (tf)", fast / slow, f">= {FASTEST_SERVICE_LIMIT}",
                         fast / slow >= FASTEST_SERVICE_LIMIT, "IMGSIM_RUNTIME=auto vs IMGSIM_RUNTIME=tf"))  # fmt: skip
    for ix in (steps.get("indexer") or {}).get("models", []):
        runs = ix.get("full_model_by_runtime") or {}
        for r, run in runs.items():
            if r != "tf" and runs.get("tf"):
                rows.append(_row(f"indexer on {r} (info)", f"{ix['backbone']} {ix['input_size']} px",
                                 f"{run['embed_images_per_s']:.1f} img/s", f"{runs['tf']['embed_images_per_s']:.1f} img/s (tf)",
                                 run["embed_images_per_s"] / runs["tf"]["embed_images_per_s"], "", None,
                                 f"full-model build, {run['count']} images, ran {run.get('runtime')}"))  # fmt: skip
    return rows


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (target, model)."""
    steps = results["steps"]
    before = steps.get("model", {}).get("models", [])
    after = (steps.get("model_after") or {}).get("models", [])

    def bare_for(model_dir: str) -> dict[str, Any]:
        b = next((m for m in before if _same(m["model_dir"], model_dir)), None)
        a = next((m for m in after if _same(m["model_dir"], model_dir)), None)
        return bracketed(b, a) if b else {}

    rows: list[dict[str, Any]] = []
    for svc in steps.get("service", []):
        if "error" in svc:
            rows.append(_row("service", svc.get("model_dir", "?"), "", "", None, "-", None, svc["error"]))
            continue
        bare, name = bare_for(svc["model_dir"]), f"{svc['backbone']} {svc['input_size']} px"
        rows += _c1(svc, bare, name) + _throughput(svc, bare, name) + _overload(svc, name)
    for ix in (steps.get("indexer") or {}).get("models", []):
        best = bare_for(ix["model_dir"]).get("best_batched", {})
        full = ix["full_model"]
        if best.get("images_per_s"):
            ratio, limit = full["embed_images_per_s"] / best["images_per_s"], LIMITS["indexer_throughput"]
            rows.append(_row("indexer >= 0.85 x best batched forward", f"{ix['backbone']} {ix['input_size']} px",
                             f"{full['embed_images_per_s']:.1f} img/s", f"{best['images_per_s']:.1f} img/s", ratio,
                             f">= {limit}", ratio >= limit,
                             f"full-model path, {full['count']} images, batch {ix['batch_size']} "
                             "(embedding phase)"))  # fmt: skip
    return rows + _runtimes(steps)
