"""Shared fixtures. Each component's fixtures live in ``tests/fixtures/<name>.py``."""

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.servers",
    "tests.fixtures.services",
    "tests.fixtures.search",
]
