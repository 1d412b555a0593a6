"""The benchmark's reference: the bare model measured before and after the service, averaged."""

from __future__ import annotations

from benchmarks.run_all import bracketed


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
