"""Measurement scripts, run from the repository root as ``python -m benchmarks.NAME`` (not installed).

They time the product from outside: the product never imports this package; the tests may.
"""
