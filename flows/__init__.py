"""Prefect flows: recovery plans, drills and the protection lifecycle. Imported from the repository root."""
