"""A leader process for the failover benchmark to SIGKILL: it runs elections until killed.

    python -m bench.victim CONNECTION_STRING PREFIX LATENCY_MS
"""

from __future__ import annotations

import logging
import sys
import time

from bench.cells import Names, leader_app
from bench.failover import FAST_LEASE
from shared.leadership.elections import run_election


def main() -> None:
    """Lead (and drain) on the given names until the parent kills this process."""
    logging.basicConfig(level=logging.WARNING)
    connection_string, prefix, latency_ms = sys.argv[1], sys.argv[2], float(sys.argv[3])
    names = Names(prefix)
    app = leader_app(connection_string, names, names.probe(latency_ms), "victim",
                     overrides=FAST_LEASE)
    while True:
        run_election(app)
        time.sleep(0.05)


if __name__ == "__main__":
    main()
