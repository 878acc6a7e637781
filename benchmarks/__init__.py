"""Benchmarks: one command each, printing a table and writing JSON (see docs/PERFORMANCE.md)."""
