"""The process-wide ``LedgerApp`` the Functions host's worker uses, built on first use."""

from __future__ import annotations

import logging
import os
import threading

from shared.config.settings import load_config
from shared.leadership.instance import LedgerApp
from shared.observability import telemetry
from shared.storage.clients import TransportFactory, clients_from_settings

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_app: LedgerApp | None = None
_transport_factory: TransportFactory | None = None


def set_transport_factory(factory: TransportFactory | None) -> None:
    """Build the next app's clients on transports from ``factory`` (the simulator's faults)."""
    global _transport_factory
    _transport_factory = factory


def get_app() -> LedgerApp:
    """The app for this process, from the environment (validated: a bad setting raises here)."""
    global _app
    with _lock:
        if _app is None:
            config = load_config(os.environ)
            telemetry.configure(os.environ)
            clients = clients_from_settings(os.environ, config.storage_timeout_seconds,
                                            None, _transport_factory)
            app = LedgerApp.create(config, clients)
            app.ensure_resources(queues=False)
            logger.info("instance %s ready (lease %g s, renew every %g s)", config.instance_id,
                        config.election.lease_seconds, config.election.renew_interval_seconds)
            _app = app
        return _app


def validate_environment() -> None:
    """Fail fast, at indexing time, on a setting the app cannot run with (no network call)."""
    load_config(os.environ)
    telemetry.console_requested(os.environ)


def reset() -> None:
    """Forget the app so the next ``get_app`` reads the environment again (tests, simulator)."""
    global _app
    with _lock:
        _app = None
