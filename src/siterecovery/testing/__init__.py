"""Test doubles users can run too: simulated fabrics for dry runs, flow tests and benchmarks."""
