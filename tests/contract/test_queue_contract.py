"""The ``MessageQueue`` port's contract: each case is a behaviour Azure's documentation gives
Queue storage ("Put Message", "Get Messages", "Update Message", "Delete Message"), run on
``MemoryQueue`` and on ``AzureQueue`` over Azurite. Waits are real on Azurite (a second or so:
visibility timeouts are whole seconds) and instant on the fake clock."""

from __future__ import annotations

import pytest

from shared.errors import ConditionFailed, NotFound, StorageRefused
from shared.storage.ports import MAX_MESSAGE_BYTES, MAX_RECEIVE, MessageQueue
from tests.contract.conftest import Backend

PAST_A_SECOND = 1.2  # visibility timeouts and times to live are whole seconds
SEVEN_DAYS = 7 * 24 * 3600


def test_send_receive_delete(queue: MessageQueue) -> None:
    queue.send("héllo \U0001f680 {\"json\": true}")
    assert queue.approximate_count() == 1
    [message] = queue.receive()
    assert message.text == "héllo \U0001f680 {\"json\": true}"
    assert message.dequeue_count == 1
    queue.delete(message.handle)
    assert queue.approximate_count() == 0
    assert queue.receive() == []


def test_a_message_sent_hidden_comes_due(queue: MessageQueue, backend: Backend) -> None:
    queue.send("later", visibility_timeout=1)
    assert queue.receive() == []
    assert queue.approximate_count() == 1  # hidden messages count
    backend.wait(PAST_A_SECOND)
    assert [m.text for m in queue.receive()] == ["later"]


def test_a_receive_hides_and_the_message_comes_back(queue: MessageQueue,
                                                    backend: Backend) -> None:
    queue.send("again")
    [first] = queue.receive(visibility_timeout=1)
    assert queue.receive() == []
    backend.wait(PAST_A_SECOND)
    [second] = queue.receive(visibility_timeout=30)
    assert second.handle.message_id == first.handle.message_id
    assert second.handle.pop_receipt != first.handle.pop_receipt
    assert second.dequeue_count == 2
    with pytest.raises(ConditionFailed):  # received again since: the old receipt is stale
        queue.delete(first.handle)
    assert queue.approximate_count() == 1
    queue.delete(second.handle)
    assert queue.approximate_count() == 0


def test_the_send_handle_deletes_and_updates(queue: MessageQueue) -> None:
    sent = queue.send("alarm", visibility_timeout=30)
    moved = queue.update(sent, visibility_timeout=0)  # due now
    assert moved.message_id == sent.message_id
    assert moved.pop_receipt != sent.pop_receipt
    with pytest.raises(ConditionFailed):
        queue.update(sent, visibility_timeout=5)
    [message] = queue.receive()
    assert message.text == "alarm"  # an update without text keeps it
    assert message.dequeue_count == 1
    queue.delete(message.handle)
    other = queue.send("disarmed", visibility_timeout=30)
    queue.delete(other)
    assert queue.approximate_count() == 0


def test_update_postpones(queue: MessageQueue, backend: Backend) -> None:
    sent = queue.send("alarm", visibility_timeout=1)
    queue.update(sent, visibility_timeout=30)
    backend.wait(PAST_A_SECOND)
    assert queue.receive() == []
    assert queue.approximate_count() == 1


def test_a_message_that_is_gone(queue: MessageQueue) -> None:
    sent = queue.send("once")
    queue.delete(sent)
    with pytest.raises(NotFound) as caught:
        queue.delete(sent)
    assert caught.value.status == 404
    with pytest.raises(NotFound):
        queue.update(sent, visibility_timeout=1)


def test_time_to_live(queue: MessageQueue, backend: Backend) -> None:
    queue.send("brief", time_to_live=1)
    queue.send("stays", time_to_live=-1)  # never expires
    assert queue.approximate_count() == 2
    backend.wait(PAST_A_SECOND)
    assert [m.text for m in queue.receive(max_messages=MAX_RECEIVE)] == ["stays"]
    assert queue.approximate_count() == 1


def test_receive_takes_up_to_32(queue: MessageQueue) -> None:
    for i in range(MAX_RECEIVE + 2):
        queue.send(f"m{i}")
    taken = queue.receive(max_messages=3)
    assert len(taken) == 3
    assert len({m.handle.message_id for m in taken}) == 3
    assert len(queue.receive(max_messages=MAX_RECEIVE)) == MAX_RECEIVE - 1
    with pytest.raises(StorageRefused) as caught:
        queue.receive(max_messages=MAX_RECEIVE + 1)
    assert caught.value.status == 400


def test_a_message_is_at_most_64_kib_as_sent(queue: MessageQueue) -> None:
    fits = "x" * (MAX_MESSAGE_BYTES // 4 * 3)  # base64: exactly 64 KiB
    queue.send(fits)
    [message] = queue.receive()
    assert message.text == fits
    with pytest.raises(StorageRefused) as caught:
        queue.send(fits + "x")  # 4 more bytes as sent
    assert caught.value.status in (400, 413)
    assert queue.approximate_count() == 1


@pytest.mark.parametrize(("visibility", "ttl"), [(SEVEN_DAYS + 1, None), (10, 5), (-1, None)],
                         ids=["over-seven-days", "after-expiry", "negative"])
def test_visibility_timeouts_out_of_range(queue: MessageQueue, visibility: int,
                                          ttl: int | None) -> None:
    with pytest.raises(StorageRefused) as caught:
        queue.send("x", visibility_timeout=visibility, time_to_live=ttl)
    assert caught.value.status == 400
    assert queue.approximate_count() == 0
