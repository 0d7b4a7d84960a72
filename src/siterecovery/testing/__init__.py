"""Test and demo helpers that users may also find useful: a real Prefect server launcher and simulated
fabrics (dry runs, flow tests, benchmarks). Nothing here imports prefect; the server runs as a subprocess."""
