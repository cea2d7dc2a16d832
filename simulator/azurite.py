"""Start and stop a private Azurite (from ``node_modules``) on free loopback ports."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from types import TracebackType

from shared.storage.clients import azurite_connection_string
from simulator import REPO_ROOT

AZURITE_BIN = REPO_ROOT / "node_modules" / ".bin" / "azurite"


class AzuriteError(RuntimeError):
    """Azurite could not be started; the message says what to install or check."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Azurite:
    """One Azurite process: blob, queue and table on three free ports of 127.0.0.1.

    ``in_memory=False`` keeps data in ``location`` so that a restart (``stop`` then ``start``)
    finds it again.
    """

    def __init__(self, in_memory: bool = True, location: str | None = None) -> None:
        self.in_memory = in_memory
        self._own_location = location is None
        self.location = location or tempfile.mkdtemp(prefix="azurite-")
        self.ports = (free_port(), free_port(), free_port())
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def connection_string(self) -> str:
        """The explicit connection string of this instance."""
        blob, queue, table = self.ports
        return azurite_connection_string("127.0.0.1", blob, queue, table)

    def start(self, timeout: float = 60) -> Azurite:
        """Start it and wait, up to ``timeout`` seconds, until all three services listen."""
        if not AZURITE_BIN.exists():
            raise AzuriteError(f"{AZURITE_BIN} is missing: run 'npm ci' (or ./dev bootstrap) "
                               "in the repo root first")
        blob, queue, table = self.ports
        args = [str(AZURITE_BIN), "--silent", "--skipApiVersionCheck", "--disableTelemetry",
                "--loose",
                "--blobHost", "127.0.0.1", "--blobPort", str(blob),
                "--queueHost", "127.0.0.1", "--queuePort", str(queue),
                "--tableHost", "127.0.0.1", "--tablePort", str(table)]
        # Azurite refuses --location together with --inMemoryPersistence.
        args += ["--inMemoryPersistence"] if self.in_memory else ["--location", self.location]
        log = open(os.path.join(self.location, "azurite.log"), "ab")  # noqa: SIM115
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while not all(_listening(port) for port in self.ports):
            if self.process.poll() is not None:
                raise AzuriteError(f"Azurite exited with {self.process.returncode}; see "
                                   f"{self.location}/azurite.log")
            if time.monotonic() > deadline:
                self.stop()
                raise AzuriteError(f"Azurite did not listen on {self.ports} within {timeout} s")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Stop the process (its whole process group)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.process = None

    def close(self) -> None:
        """Stop it and remove its files if this object made the folder."""
        self.stop()
        if self._own_location:
            shutil.rmtree(self.location, ignore_errors=True)

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
