"""Start and stop a private Azurite (from ``node_modules``) on free loopback ports."""

from __future__ import annotations

import contextlib
import os
import re
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


def _bound_ports(log_path: str, offset: int) -> tuple[int, int, int] | None:
    """Blob, queue and table ports, once the log (from ``offset``) says all three listen."""
    with open(log_path, "rb") as log:
        log.seek(offset)
        found = {m[1]: int(m[2]) for m in _LISTENING.finditer(log.read())}
    if len(found) < 3:
        return None
    return found[b"Blob"], found[b"Queue"], found[b"Table"]


# Azurite prints this once a service has bound its port (with the port it got).
_LISTENING = re.compile(rb"Azurite (Blob|Queue|Table) service is successfully listening at "
                        rb"http://127\.0\.0\.1:(\d+)")


class Azurite:
    """One Azurite process: blob, queue and table on three loopback ports of 127.0.0.1.

    The first ``start`` asks for port 0, so the kernel hands out three ports nobody holds, and reads
    the ports Azurite actually bound from its log: concurrent starts (parallel test workers, other
    runs on the machine) cannot collide, and a port another process holds can never pass for this
    Azurite. A later ``start`` (after ``stop``) binds the same ports again, so that connection
    strings taken before stay valid. ``in_memory=False`` keeps data in ``location`` so that such a
    restart finds it again.
    """

    def __init__(self, in_memory: bool = True, location: str | None = None) -> None:
        self.in_memory = in_memory
        self._own_location = location is None
        self.location = location or tempfile.mkdtemp(prefix="azurite-")
        self._ports: tuple[int, int, int] | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def ports(self) -> tuple[int, int, int]:
        """Blob, queue and table ports: known once it has started."""
        if self._ports is None:
            raise AzuriteError("Azurite has not started yet: its ports are not known")
        return self._ports

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
        blob, queue, table = self._ports or (0, 0, 0)
        args = [str(AZURITE_BIN), "--silent", "--skipApiVersionCheck", "--disableTelemetry",
                "--loose",
                "--blobHost", "127.0.0.1", "--blobPort", str(blob),
                "--queueHost", "127.0.0.1", "--queuePort", str(queue),
                "--tableHost", "127.0.0.1", "--tablePort", str(table)]
        # Azurite refuses --location together with --inMemoryPersistence.
        args += ["--inMemoryPersistence"] if self.in_memory else ["--location", self.location]
        log_path = os.path.join(self.location, "azurite.log")
        log = open(log_path, "ab")  # noqa: SIM115
        offset = log.tell()  # a restart appends: read only this start's lines
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while (bound := _bound_ports(log_path, offset)) is None:
            if self.process.poll() is not None:
                raise AzuriteError(f"Azurite exited with {self.process.returncode}; see "
                                   f"{log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise AzuriteError(f"Azurite did not listen within {timeout} s; see {log_path}")
            time.sleep(0.05)  # polls the log; the loop ends on a line, an exit or the deadline
        self._ports = bound
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
