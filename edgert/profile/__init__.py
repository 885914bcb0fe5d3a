"""Latency measurement: repeated runs, medians, peak memory, reports."""

from edgert.profile.bench import bench_generator, bench_verify, peak_rss_mb

__all__ = ["bench_generator", "bench_verify", "peak_rss_mb"]
