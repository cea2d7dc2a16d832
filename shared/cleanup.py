"""Deleting consumed completion rows off the commit's critical path, batched per partition.

The leader hands a request's rows to ``RowCleaner.consumed`` only after the transaction that
wrote the request's outcome has returned: the outcome is durable before any of its rows can go.
The rows are then deleted by background threads, up to 100 rows of one partition per
transaction, while the next commit runs. A crash before a delete lands leaves the rows: the next
leader finds them again, sees the outcome (``OutcomeExists``, or this process's
``recently_decided``) and deletes them as late, as it always has; nothing is applied twice.

While their delete is queued or in flight, the rows are *pending*: the leader's scans skip them,
so a committed request is not proposed a second time. The cleaner also remembers the last
``REMEMBERED`` rows it deleted (key and storage timestamp), so a read that raced with a delete
does not bring the same row back; a step recorded again later (a late duplicate) has a new
timestamp and is seen. Rows whose delete failed are forgotten, to be found and settled again.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from shared.completions import MAX_BATCH_ROWS, CompletionStore, RecordedStep

logger = logging.getLogger(__name__)

RowId = tuple[str, str]  # (PartitionKey, RowKey)
REMEMBERED = 100_000


class RowCleaner:
    """Batches and runs deletes of consumed completion rows in the background (thread-safe)."""

    def __init__(self, store: CompletionStore, workers: int = 4) -> None:
        self.store = store
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="cleanup")
        self._lock = threading.Lock()
        self._waiting: dict[str, list[RecordedStep]] = defaultdict(list)  # partition -> rows
        self._pending: set[RowId] = set()
        self._consumed: OrderedDict[RowId, object] = OrderedDict()  # row -> its recorded_at
        self._futures: set[Future[None]] = set()

    def consumed(self, steps: Iterable[RecordedStep]) -> None:
        """Queue rows whose request's outcome is durable; full partitions go at once."""
        full: list[list[RecordedStep]] = []
        with self._lock:
            for step in steps:
                row = (step.partition_key, step.row_key)
                if row in self._pending:
                    continue
                self._pending.add(row)
                self._consumed[row] = step.recorded_at
                self._consumed.move_to_end(row)
                if len(self._consumed) > REMEMBERED:
                    self._consumed.popitem(last=False)
                rows = self._waiting[step.partition_key]
                rows.append(step)
                if len(rows) >= MAX_BATCH_ROWS:
                    full.append(rows[:])
                    rows.clear()
        for chunk in full:
            self._submit(chunk)

    def flush(self) -> None:
        """Send every partly filled partition's rows now (does not wait)."""
        with self._lock:
            chunks = [rows[:] for rows in self._waiting.values() if rows]
            self._waiting.clear()
        for chunk in chunks:
            self._submit(chunk)

    def drain(self, timeout: float) -> bool:
        """Flush and wait up to ``timeout`` s for every delete; True when none is left."""
        self.flush()
        with self._lock:
            futures = set(self._futures)
        _, not_done = wait(futures, timeout=timeout)
        return not not_done

    def handled(self, step: RecordedStep) -> bool:
        """True for this very row (same key, same storage timestamp) once handed over here."""
        with self._lock:
            row = (step.partition_key, step.row_key)
            return row in self._pending or self._consumed.get(row) == step.recorded_at

    def _submit(self, chunk: list[RecordedStep]) -> None:
        # In the submitter's context, so the delete's span joins the invocation that queued it.
        context = contextvars.copy_context()
        future = self._executor.submit(context.run, self._delete, chunk)
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._forget)

    def _forget(self, future: Future[None]) -> None:
        with self._lock:
            self._futures.discard(future)

    def _delete(self, chunk: list[RecordedStep]) -> None:
        try:
            self.store.delete(chunk)
        except Exception:
            # Left in the table: the next scan sees them again and deletes them as late.
            logger.exception("deleting %d consumed completion rows failed; a later drain "
                             "removes them", len(chunk))
            with self._lock:
                for step in chunk:
                    self._consumed.pop((step.partition_key, step.row_key), None)
        finally:
            with self._lock:
                self._pending.difference_update((s.partition_key, s.row_key) for s in chunk)
