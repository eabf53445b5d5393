"""Shared pytest fixtures."""

import pytest

from hub_server import HubServer


@pytest.fixture(scope="session")
def hub_server():
    """A local Hub-compatible server (see `tests/hub_server.py`), shared by the session; failures reset per test."""
    with HubServer() as server:
        yield server


@pytest.fixture
def hub(hub_server):
    """`hub_server` with no injected failures left over from another test."""
    hub_server.reset_failures()
    yield hub_server
    hub_server.reset_failures()
