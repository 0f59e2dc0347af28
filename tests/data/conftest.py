"""Data-stage fixtures live in tests/conftest.py (shared with the integration tests)."""

from tests.conftest import DEMO_INPUTS  # noqa: F401
