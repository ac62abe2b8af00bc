"""Throughput / latency / memory measurements, written as JSON + markdown (never timed assertions in tests)."""
