"""Prefect tasks: one side effect each. Imported from the repository root."""
