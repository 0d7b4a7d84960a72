"""Reproducible benchmarks; results are quoted in docs/BENCHMARKS.md (`python -m bench`)."""
