"""Reproducible benchmarks; figures go to docs/BENCHMARKS.md with the command that made them."""
