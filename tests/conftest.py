"""Session fixtures: one private Azurite on free loopback ports for the whole test run."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from simulator.azurite import Azurite
from tests.helpers import Namespace

# The SDKs log every HTTP request and response at INFO: keep the app's INFO logs, not theirs.
logging.getLogger("azure").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    """A real Azurite, started for the session and stopped after it."""
    with Azurite(in_memory=True) as instance:
        yield instance


@pytest.fixture
def ns(azurite: Azurite) -> Namespace:
    """Storage names of this test alone."""
    return Namespace(azurite.connection_string)
