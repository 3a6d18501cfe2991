"""Benchmarks: BROS vs full-space MA-SOBA vs the plain Trainer (memory, time, quality).

Entry point: ``python -m benchmarks.run --quick`` (see :mod:`benchmarks.run`). Every configuration
runs in its own subprocess (:mod:`benchmarks.worker`) so peak-memory numbers start from a fresh heap.
"""
