"""Deleting consumed completion rows and markers off the commit's critical path, batched.

The leader hands a request's rows (and its ready marker) to ``RowCleaner.consumed`` only after
the transaction that wrote the request's outcome has returned: the outcome is durable before any
of its rows can go. A decided request leaves a *tombstone* in its key range (written in the
same transaction as its rows' deletes), so that a recorder that records a late step of it knows
at once; the cleaner deletes each tombstone ``TOMBSTONE_SECONDS`` later (the sweeper's full scan
removes those of a process that stopped first). The rows are deleted by background threads, up
to 100 rows of one partition per transaction, while the next commit runs. A crash before a
delete lands leaves the rows: the next leader finds them again (through the marker, or the
sweeper's full scan), sees the outcome and deletes them as late; nothing is applied twice.

Every delete names the version that was read (``RowRef``, ``If-Match`` its ETag), so a delete
that lands late, after the row was recorded anew, leaves the new row alone
(``CompletionStore.delete``).

While their delete is queued or in flight, the rows are *pending*: the leader's reads skip them,
so a committed request is not proposed a second time. The cleaner also remembers the last
``REMEMBERED`` versions it deleted, so a read that raced with a delete does not bring the same
version back; a row recorded again (a new ETag) is seen. Versions whose delete failed are
forgotten, to be found and settled again.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from shared.domain.model import RowRef
from shared.storage.completions import (
    MAX_BATCH_ROWS,
    READY_PARTITION,
    TOMBSTONE_SECONDS,
    CompletionStore,
    Tombstone,
)

logger = logging.getLogger(__name__)

REMEMBERED = 100_000
PARTIAL_ROWS = MAX_BATCH_ROWS // 2  # a step-row partition goes after a round once this full


class RowCleaner:
    """Batches and runs deletes of consumed rows in the background (thread-safe)."""

    def __init__(self, store: CompletionStore, workers: int = 4,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.clock = clock
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="cleanup")
        self._lock = threading.Lock()
        self._waiting: dict[str, list[RowRef | Tombstone]] = defaultdict(list)  # by partition
        self._tombstones: deque[tuple[float, RowRef]] = deque()  # written, to delete later
        self._pending: set[RowRef] = set()
        self._deleted: OrderedDict[RowRef, None] = OrderedDict()
        self._futures: set[Future[None]] = set()

    def delete(self, refs: Iterable[RowRef], decided: Iterable[Tombstone] = ()) -> None:
        """Queue row versions whose request's outcome is durable, and the decided requests'
        tombstones; full partitions go at once."""
        full: list[list[RowRef | Tombstone]] = []
        with self._lock:
            items: list[RowRef | Tombstone] = []
            for ref in refs:
                if ref in self._pending or ref in self._deleted:
                    continue
                self._pending.add(ref)
                self._deleted[ref] = None
                self._deleted.move_to_end(ref)
                if len(self._deleted) > REMEMBERED:
                    self._deleted.popitem(last=False)
                items.append(ref)
            items += decided
            for item in items:
                rows = self._waiting[item.partition_key]
                rows.append(item)
                if len(rows) >= MAX_BATCH_ROWS:
                    full.append(rows[:])
                    rows.clear()
        for chunk in full:
            self._submit(chunk)

    def flush(self, everything: bool = True) -> None:
        """Send queued rows now (does not wait), and the deletes of tombstones kept
        ``TOMBSTONE_SECONDS``.

        ``everything=False`` (after each round of a term) sends the ready index's markers
        first, and of the step rows only partitions holding ``PARTIAL_ROWS``: the markers
        are what the leader's next read would read again, while a step-row partition sent
        partly filled each round costs a call for a few rows. The term's end sends the rest
        (``wait_until_done``).
        """
        with self._lock:
            now = self.clock()
            while self._tombstones and now - self._tombstones[0][0] >= TOMBSTONE_SECONDS:
                _, ref = self._tombstones.popleft()
                self._waiting[ref.partition_key].append(ref)
            ready = sorted(self._waiting, key=lambda partition: partition != READY_PARTITION)
            chunks = []
            for partition in ready:
                rows = self._waiting[partition]
                if rows and (everything or partition == READY_PARTITION
                             or len(rows) >= PARTIAL_ROWS):
                    chunks.append(rows[:])
                    rows.clear()
        for chunk in chunks:
            self._submit(chunk)

    def wait_until_done(self, timeout: float) -> bool:
        """Send what is queued and wait up to ``timeout`` s for every delete; True when done."""
        self.flush(everything=True)
        with self._lock:
            futures = set(self._futures)
        _, not_done = wait(futures, timeout=timeout)
        return not not_done

    def has_taken(self, ref: RowRef) -> bool:
        """True for this very version once handed over here (queued, in flight or deleted)."""
        with self._lock:
            return ref in self._pending or ref in self._deleted

    def _submit(self, chunk: list[RowRef | Tombstone]) -> None:
        # In the submitter's context, so the delete's span joins the invocation that queued it.
        context = contextvars.copy_context()
        future = self._executor.submit(context.run, self._delete, chunk)
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._forget_future)

    def _forget_future(self, future: Future[None]) -> None:
        with self._lock:
            self._futures.discard(future)

    def _delete(self, chunk: list[RowRef | Tombstone]) -> None:
        refs = [item for item in chunk if isinstance(item, RowRef)]
        try:
            written = self.store.delete(
                refs, [item for item in chunk if isinstance(item, Tombstone)])
            with self._lock:  # each deleted TOMBSTONE_SECONDS later, as written
                self._tombstones.extend((self.clock(), ref) for ref in written)
        except Exception:
            # Left in the table: a later read finds them again and deletes them as late.
            logger.exception("deleting %d consumed completion rows failed; a later drain "
                             "removes them", len(refs))
            with self._lock:
                for ref in refs:
                    self._deleted.pop(ref, None)
        finally:
            with self._lock:
                self._pending.difference_update(refs)
