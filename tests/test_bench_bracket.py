"""The benchmark's reference: the bare model measured before and after the service, averaged."""

from __future__ import annotations

from benchmarks.run_all import bracketed, keep_steps, queue_bound_ms


def _bare(b1_ms: float, b8_ms: float, ref_ms: float) -> dict:
    forward = {
        "1": {"batch": 1, "median_ms": b1_ms, "images_per_s": 1000 / b1_ms},
        "8": {"batch": 8, "median_ms": b8_ms, "images_per_s": 8000 / b8_ms},
    }
    best = max(forward.values(), key=lambda f: f["images_per_s"])
    return {"forward": forward, "best_batched": {"batch": best["batch"], "images_per_s": best["images_per_s"]},
            "c1_reference_ms": ref_ms}  # fmt: skip


def test_reference_is_the_mean_of_both_sides_and_keeps_them() -> None:
    before, after = _bare(20.0, 100.0, 20.5), _bare(30.0, 140.0, 30.5)
    r = bracketed(before, after)
    assert r["forward"]["1"]["median_ms"] == 25.0 and r["forward"]["8"]["median_ms"] == 120.0
    assert r["best_batched"] == {"batch": 8, "images_per_s": round(8000 / 120.0, 2)}
    assert r["c1_reference_ms"] == 25.5
    assert r["bracket"]["before"]["c1_reference_ms"] == 20.5 and r["bracket"]["after"]["c1_reference_ms"] == 30.5
    assert before["forward"]["1"]["median_ms"] == 20.0  # inputs untouched


def test_without_a_second_measurement_the_first_is_used() -> None:
    before = _bare(20.0, 100.0, 20.5)
    assert bracketed(before, None) is before
    assert bracketed(before, {}) is before


def test_two_call_reference_is_averaged_too() -> None:
    before, after = _bare(20.0, 100.0, 20.5), _bare(30.0, 140.0, 30.5)
    before["two_calls"] = {"8": {"batch": 8, "images_per_s": 80.0}}
    after["two_calls"] = {"8": {"batch": 8, "images_per_s": 60.0}}
    assert bracketed(before, after)["two_calls"]["8"]["images_per_s"] == 70.0


def test_queue_bound_counts_the_images_that_can_be_ahead() -> None:
    """(max_batch in the model + max_queue queued) at the level's rate, + one batch's answers + c=1."""
    settings = {"max_batch_size": 32, "max_queue": 32}
    level = {"ok_per_s": 80.0, "cpu_ms_per_request": {"event_loop": 1.0}}
    bound, how = queue_bound_ms({}, settings, level, fixed_ms=20.0)
    assert bound == 64 * 1000 / 80 + 32 * 1.0 + 20.0  # 800 + 32 + 20 ms
    assert "32 in the model + 32 queued" in how
    bigger, _ = queue_bound_ms({}, {**settings, "max_queue": 256}, level, fixed_ms=20.0)
    assert bigger == 288 * 1000 / 80 + 32 + 20.0  # the bound grows with the queue limit


def test_queue_time_limit_bounds_by_the_limit_plus_one_call() -> None:
    """With IMGSIM_MAX_QUEUE_MS the bound is that wait + the longest model call, not the count."""
    settings = {"max_batch_size": 32, "max_queue": 32, "max_queue_ms": 250.0}
    level = {
        "ok_per_s": 80.0,
        "cpu_ms_per_request": {"event_loop": 1.0},
        "server": {"longest_call_ms_at_most": 500.0},
    }
    bound, how = queue_bound_ms({}, settings, level, fixed_ms=20.0)
    assert bound == 250.0 + 500.0 + 32 * 1.0 + 20.0
    assert "IMGSIM_MAX_QUEUE_MS" in how
    # Without the call histogram (an old service) it falls back to the count.
    del level["server"]
    assert queue_bound_ms({}, settings, level, fixed_ms=20.0)[0] == 64 * 1000 / 80 + 32 + 20.0


def test_keeping_the_model_step_keeps_both_sides_of_its_bracket() -> None:
    earlier = {
        "machine": {"date": "2026-11-24T23:39", "git": {"commit": "027111d3945e00"}},
        "steps": {"model": {"side": "before"}, "model_after": {"side": "after"}, "faiss": {"sizes": []}},
    }
    results: dict = {"steps": {"faiss": {"sizes": [1]}}}
    keep_steps(results, earlier, ["model", "service"])  # no service results stored: nothing to keep
    assert results["steps"]["model"] == {"side": "before"} and results["steps"]["model_after"] == {"side": "after"}
    assert results["steps"]["faiss"] == {"sizes": [1]} and "service" not in results["steps"]
    assert results["kept"] == {"model": "2026-11-24T23:39, commit 027111d3945e"}
