"""Test and demo helpers that users may also find useful: a real Prefect server launcher, and (from
the fabric work) simulators. Nothing here imports prefect; the server runs as a subprocess."""
