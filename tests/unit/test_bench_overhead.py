"""benchmarks/run_overhead.py without running sam-batch: its medians, ratio and validity, and its table."""

from __future__ import annotations

from benchmarks.run_overhead import Comparison, RunTiming, format_comparison


def _comparison(max_load: float) -> Comparison:
    runs = (
        RunTiming("local", 30.0, "local", 20.0, 19, 1.5),
        RunTiming("ray", 45.0, "ray", 21.0, 19, max_load),
        RunTiming("ray", 44.0, "ray", 22.0, 19, 1.5),
        RunTiming("local", 31.0, "local", 20.0, 19, 1.5),
    )
    return Comparison("photo in a run", ("local", "ray"), runs, cores=2)


def test_medians_and_ratio_are_per_variant_in_run_order() -> None:
    comparison = _comparison(max_load=2.0)
    assert [r.segment_seconds for r in comparison.of("ray")] == [21.0, 22.0]
    assert comparison.median("ray", "segment_seconds") == 21.5
    assert comparison.ratio("segment_seconds") == 21.5 / 20.0
    assert comparison.valid


def test_the_table_pairs_rounds_and_flags_a_loaded_comparison() -> None:
    lines = format_comparison(_comparison(max_load=3.0), "segment_seconds", "segment s")
    assert lines[2] == "| 0 | 20.00 | 30.00 | 21.00 | 45.00 | 3.00 |"
    assert lines[3] == "| 1 | 20.00 | 31.00 | 22.00 | 44.00 | 1.50 |"
    assert lines[-1].startswith("Medians: local 20.00 s, ray 21.50 s (ray / local = 1.075)")
    assert lines[-1].endswith("masks 19; NOT VALID (load 3.00 > 2 cores + 0.25).")


def test_the_fixed_cost_table_has_one_column_a_variant() -> None:
    lines = format_comparison(_comparison(max_load=1.0), "seconds", "s")
    assert lines[0] == "| round | local: s | ray: s | max load |"
    assert lines[2] == "| 0 | 30.00 | 45.00 | 1.50 |"
