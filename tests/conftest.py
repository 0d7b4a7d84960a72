"""Shared fixtures. Each area keeps its fixtures in its own tests/fixtures_*.py module, listed here."""

pytest_plugins: list[str] = ["tests.fixtures_protection"]
