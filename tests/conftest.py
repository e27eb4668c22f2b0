"""Fixtures shared by the whole suite; the heavier ones live in tests/support/."""

pytest_plugins = [
    "tests.support.model_cache", "tests.support.redis_server", "tests.support.tiny_model",
]
