"""The built-in block replication engine used by the linux fabric.

engine: manifests, the delta stream, journaled apply, undo-log recovery points; agent: the host-side
command line the fabric runs; transport: where each side runs and how the stream flows; selfcheck:
kill -9 crash trials. docs/ENGINE.md describes the design.
"""
