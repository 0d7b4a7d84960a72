"""The orchestrator's side of the replication engine: it reaches the hosts' agents and moves streams.

endpoints: one host's agent, in this process (local paths) or over a paramiko exec channel; transfer:
a cycle between two endpoints (a pipe, one channel, a relay of two channels, or the source host's own
ssh to the target). It imports the host side (replica.agent, replica.protocol); the host side never
imports it, so the agent stays free of paramiko and pydantic.
"""
