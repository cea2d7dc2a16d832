"""One simulated Functions host instance: the queue listener and timer, as host.json sets them.

It dequeues from the real (Azurite) queues like the host's queue listener, one listener per
queue trigger (every intake queue of ``INTAKE_QUEUES``, binding expressions such as
``%COMPLETIONS_QUEUE_NAME%-2`` resolved as the host resolves them, and the wake-up queue), each
with its own poison queue ``{queue}-poison``: any instance takes any message,
whatever shard it concerns, and the app finds the shard itself (a completion's home from its
ids, an alarm's from its ``shard`` field). On each queue: batches of
``batchSize``, a new batch when in-flight work drops to ``newBatchThreshold``, exponential
polling back-off up to ``maxPollingInterval``, base64 decoding, delete on success, and on failure
a retry after ``visibilityTimeout`` or, past ``maxDequeueCount``, a move to the poison queue. It
invokes the app's real decorated functions (``simulator.functions``).

Run as a process: ``python -m simulator instance --index N``; it prints one JSON event per line
on stdout for the supervisor (``simulator.demo``).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from azure.functions.queue import QueueMessage
from azure.functions.timer import TimerRequest

from shared import wiring as runtime
from shared.config.names import poison_queue_name
from shared.config.settings import SETTINGS, load_config
from shared.election.elector import ElectionCallbacks
from shared.errors import NotFound, StorageError
from shared.storage.clients import ensure_queues
from shared.storage.ports import Handle, Message, MessageQueue
from shared.wiring import get_app
from simulator import REPO_ROOT
from simulator.faults import plan_from_environment
from simulator.functions import COMPLETIONS_FUNCTION, QueueTrigger, indexed, resolve_setting
from simulator.hostjson import timespan_seconds

logger = logging.getLogger(__name__)

ERROR_PREVIEW_CHARS = 200  # how much of an error an event line carries to the supervisor


@dataclass(frozen=True)
class QueueOptions:
    """The queues extension settings of host.json that the listener honours."""

    batch_size: int = 16
    new_batch_threshold: int = 8
    max_dequeue_count: int = 5
    visibility_timeout: float = 0.0
    max_polling_interval: float = 60.0
    message_encoding: str = "base64"

    @classmethod
    def from_host_json(cls, path: Path = REPO_ROOT / "host.json") -> QueueOptions:
        """Read ``extensions.queues`` the way the host does (with the host's defaults)."""
        queues: dict[str, Any] = json.loads(path.read_text())["extensions"]["queues"]
        return cls(
            batch_size=int(queues.get("batchSize", 16)),
            new_batch_threshold=int(queues.get("newBatchThreshold", 8)),
            max_dequeue_count=int(queues.get("maxDequeueCount", 5)),
            visibility_timeout=timespan_seconds(queues.get("visibilityTimeout", "00:00:00")),
            max_polling_interval=timespan_seconds(queues.get("maxPollingInterval", "00:01:00")),
            message_encoding=str(queues.get("messageEncoding", "base64")),
        )


def emit(event: str, **fields: Any) -> None:
    """One event line for the supervisor."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


MAX_EXTEND_FAILURES = 5  # failed updates in a row before a keeper gives its message up


class VisibilityKeeper:
    """Keeps a message invisible from its receipt until it is settled, as the host's listener does.

    The real host starts renewing a message's visibility as soon as it hands the message to the
    worker, so a message waiting in the worker's queue for a free thread stays invisible too. A
    keeper started only when the invocation begins would let a message that waited longer than
    the lock come back to another instance, again and again under load, until its dequeue count
    passed ``maxDequeueCount`` and a valid message went to the poison queue.
    """

    def __init__(self, queue: MessageQueue, message: Message, seconds: float) -> None:
        self.queue = queue
        self.message_id = message.handle.message_id
        self.handle = message.handle
        self.seconds = seconds
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> VisibilityKeeper:
        self._thread.start()
        return self

    def _run(self) -> None:
        failures = 0
        while not self._stop.wait(self.seconds / 2 if not failures else 1.0):
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    self.handle = self.queue.update(self.handle,
                                                    visibility_timeout=int(self.seconds))
                    failures = 0
                except StorageError as exc:
                    # Storage restarting, say: try again each second, as the host's renewal
                    # does; a handle that went stale (the update landed, its answer was lost)
                    # keeps failing, and the message then comes back as after a crash.
                    failures += 1
                    logger.warning("could not extend message %s (%d): %s", self.message_id,
                                   failures, exc)
                    if failures >= MAX_EXTEND_FAILURES:
                        return

    def stop(self) -> None:
        with self._lock:
            self._stop.set()


class QueueListener:
    """The host's listener on one queue: receives, invokes its function, settles or poisons."""

    def __init__(self, host: InstanceHost, trigger: QueueTrigger, queue: MessageQueue,
                 poison: MessageQueue) -> None:
        self.host = host
        self.trigger = trigger
        self.queue = queue
        self.poison = poison
        self.in_flight: set[Future[None]] = set()
        self.lock = threading.Lock()

    def run(self) -> None:
        """Poll until the host stops (running invocations finish in the host's pool)."""
        host, options = self.host, self.host.options
        idle = 0.1
        while not host.stopping.is_set():
            with self.lock:
                busy = len(self.in_flight)
            if busy > options.new_batch_threshold:
                time.sleep(0.01)
                continue
            wanted = min(32, options.batch_size)
            try:
                messages = self.queue.receive(max_messages=wanted,
                                              visibility_timeout=int(host.lock_seconds))
            except StorageError as exc:  # storage unreachable: the host's listener keeps polling
                logger.warning("instance %d: receiving failed: %s", host.index, exc)
                emit("receive_failed", error=str(exc)[:200])
                host.stopping.wait(idle)
                idle = min(idle * 2, options.max_polling_interval)
                continue
            if not messages:
                host.stopping.wait(idle)
                idle = min(idle * 2, options.max_polling_interval)
                continue
            idle = 0.1
            for message in messages:
                keeper = VisibilityKeeper(self.queue, message, host.lock_seconds).start()
                future = host.pool.submit(self._invoke, message, keeper)
                with self.lock:
                    self.in_flight.add(future)
                future.add_done_callback(self._done)

    def _done(self, future: Future[None]) -> None:
        with self.lock:
            self.in_flight.discard(future)

    def _decode(self, message: Message) -> bytes:
        content = message.text  # as on the wire: the listener's queue is raw
        if self.host.options.message_encoding == "base64":
            return base64.b64decode(content, validate=True)
        return content.encode()

    def _invoke(self, message: Message, keeper: VisibilityKeeper) -> None:
        options, index = self.host.options, self.host.index
        message_id = message.handle.message_id
        count = message.dequeue_count or 1
        if count > options.max_dequeue_count:
            keeper.stop()
            self._poison(message, "dequeue count above maxDequeueCount", keeper.handle)
            return
        try:
            body = self._decode(message)
        except (binascii.Error, ValueError) as exc:  # the extension poisons these at once
            keeper.stop()
            self._poison(message, f"message is not valid base64: {exc}", keeper.handle)
            return
        try:
            self.trigger.handler(QueueMessage(  # type: ignore[no-untyped-call]
                id=message_id, body=body, dequeue_count=count,
                pop_receipt=message.handle.pop_receipt))
        except Exception as exc:  # the host catches everything
            keeper.stop()
            logger.warning("instance %d: invocation of message %s failed (dequeue count %d): "
                           "%s", index, message_id, count, exc)
            emit("failed", message=message_id, dequeueCount=count,
                 error=str(exc)[:ERROR_PREVIEW_CHARS])
            if count >= options.max_dequeue_count:
                self._poison(message, str(exc), keeper.handle)
            else:
                self._settle(lambda: self.queue.update(
                    keeper.handle, visibility_timeout=int(options.visibility_timeout)),
                    message_id)
            return
        keeper.stop()
        if self._settle(lambda: self.queue.delete(keeper.handle), message_id):
            emit("done", message=message_id, function=self.trigger.name)

    def _settle(self, action: Callable[[], object], message_id: str) -> bool:
        """Acknowledge or release a message; a lost pop receipt means it was redelivered."""
        try:
            action()
        except StorageError as exc:
            logger.warning("instance %d: could not settle message %s: %s", self.host.index,
                           message_id, exc)
            emit("unsettled", message=message_id, error=str(exc)[:ERROR_PREVIEW_CHARS])
            return False
        return True

    def _poison(self, message: Message, why: str, handle: Handle | None = None) -> None:
        try:
            self.poison.send(message.text)  # as it came: both queues are raw
        except NotFound:  # the host creates the poison queue with the first message it poisons
            ensure_queues(get_app().clients, [self.poison.name])
            self.poison.send(message.text)
        message_id = message.handle.message_id
        if self._settle(lambda: self.queue.delete(handle or message.handle), message_id):
            emit("poisoned", message=message_id, error=why[:ERROR_PREVIEW_CHARS])


class InstanceHost:
    """The queue listeners (one per queue trigger) and optionally the timer of one instance."""

    def __init__(self, index: int, options: QueueOptions, threads: int,
                 lock_seconds: float, sweep_seconds: float | None) -> None:
        self.index = index
        self.options = options
        self.lock_seconds = lock_seconds
        self.sweep_seconds = sweep_seconds
        self.stopping = threading.Event()
        self.functions = indexed()
        env = dict(os.environ)
        defaults = {s.name: s.default for s in SETTINGS}
        app = get_app()  # the same clients the functions use
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"i{index}")
        self.listeners = []
        for trigger in self.functions.queues:  # each intake queue, its poison queue its own
            name = resolve_setting(trigger.queue_name_setting, env, defaults)
            self.listeners.append(QueueListener(self, trigger, app.queue(name, raw=True),
                                                app.queue(poison_queue_name(name), raw=True)))
        # The completions queue's listener (the one the supervisor and tests look at).
        completions = next(listener for listener in self.listeners
                           if listener.trigger.name == COMPLETIONS_FUNCTION)
        self.queue = completions.queue
        self.poison = completions.poison

    def run(self) -> None:
        """Listen until SIGTERM/SIGINT, then let running invocations (and a sweep) finish."""
        timer = threading.Thread(target=self._timer, name=f"timer-i{self.index}")
        if self.sweep_seconds:
            timer.start()
        threads = [threading.Thread(target=listener.run, name=f"listen-{listener.trigger.name}")
                   for listener in self.listeners]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.pool.shutdown(wait=True)
        if timer.is_alive():
            timer.join()

    def _timer(self) -> None:
        assert self.sweep_seconds
        while not self.stopping.wait(self.sweep_seconds):
            try:
                self.functions.timer_handler(TimerRequest(past_due=False))
                emit("swept")
            except Exception:
                logger.exception("instance %d: sweep failed", self.index)


def election_events(index: int, shard: int) -> ElectionCallbacks:
    """Callbacks that report one shard's election as event lines (the shard named)."""
    return ElectionCallbacks(
        on_started_leading=lambda lease_id: emit("leading", index=index, shard=shard,
                                                 lease=lease_id),
        on_stopped_leading=lambda lease_id, state: emit("stopped_leading", index=index,
                                                        shard=shard, lease=lease_id,
                                                        state=str(state)),
        on_refused=lambda _instance: emit("refused", index=index, shard=shard),
    )


def run_instance(index: int, threads: int, lock_seconds: float,
                 sweep_seconds: float | None) -> None:
    """Entry point of one instance process (``simulator.__main__`` configured its logging)."""
    plan = plan_from_environment(os.environ, load_config(os.environ), salt=index)
    if plan is not None:  # a chaos run: this instance's storage calls go through the plan
        runtime.set_transport_factory(plan.transport)
    host = InstanceHost(index, QueueOptions.from_host_json(), threads, lock_seconds,
                        sweep_seconds)
    # Observe every shard's election for the supervisor (the functions return nothing).
    for shard, acting in enumerate(get_app().each_shard()):
        acting.elector.callbacks = election_events(index, shard)

    def stop(signum: int, frame: object) -> None:
        host.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    emit("started", index=index, pid=os.getpid())
    host.run()
    if plan is not None:
        emit("faults", index=index, injected=dict(plan.injected))
    emit("stopped", index=index)

