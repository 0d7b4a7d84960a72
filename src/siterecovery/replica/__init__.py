"""The built-in block replication engine used by the linux fabric, in two sides.

Host side (what `python -m siterecovery.replica.agent` loads on a host: stdlib, xxhash, zstandard):
engine (manifests, the delta stream, journaled apply, undo-log recovery points), nbd, qemu, process,
peer (send-to over the host's own ssh), protocol (every agent command and answer), agent, selfcheck.
Orchestrator side, orchestrator/: endpoints and transfers over paramiko; it imports the host side, never
the reverse (tests/replica/test_layout.py). docs/ENGINE.md describes the design.
"""
