"""Performance benchmarks of esq-lightning: one command, `python -m benchmarks.run` (see docs/performance.md)."""
