"""Helpers the GPU benchmarks report with, checked on CPU (the benchmarks themselves need a GPU)."""

from __future__ import annotations

from bench.train_throughput import busy_and_span


def test_busy_and_span_merges_overlapping_kernels():
    # two overlapping kernels (0-4, 2-5), one nested (3-4), a gap, then one more (7-8): busy 6 of a 8-long span
    assert busy_and_span([(7.0, 8.0), (0.0, 4.0), (3.0, 4.0), (2.0, 5.0)]) == (6.0, 8.0)
    assert busy_and_span([(1.0, 2.0)]) == (1.0, 1.0)
    assert busy_and_span([]) == (0.0, 0.0)
