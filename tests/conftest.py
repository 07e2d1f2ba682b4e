"""Shared fixtures. Each component's fixtures live in ``tests/fixtures/<name>.py``."""

import pytest

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.servers",
    "tests.fixtures.services",
    "tests.fixtures.search",
    "tests.fixtures.operators",
]


@pytest.fixture(autouse=True, scope="session")
def _two_torch_threads():
    """The test process is the entry point that owns torch's process-wide thread count."""
    import torch
    torch.set_num_threads(2)
