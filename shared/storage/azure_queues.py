"""``AzureQueue``: the ``MessageQueue`` port over the SDK's ``QueueClient``.

Message text is sent base64-encoded, as ``TextBase64EncodePolicy`` encodes it and as the
Functions host decodes queue triggers (``LedgerApp.queue_client``), and decoded back when
received. The adapter does the encoding itself, so the client it wraps must carry no encode or
decode policy (``StorageClients.queue`` builds it so); one that does is refused rather than
encoding twice. A received message that is not base64 text (sent by something else) comes back
as it is. A ``raw`` queue moves message text as it is on the wire, neither encoded nor decoded
(moving poisoned messages back unchanged, peeking at them as the host received them). Every
call translates the SDK's exceptions (``shared/storage/errors.py``).
"""

from __future__ import annotations

import base64
import binascii

from azure.storage.queue import QueueClient, QueueMessage

from shared.storage.errors import translating
from shared.storage.ports import Handle, Message, Peeked


def encode(text: str) -> str:
    """``text`` as ``TextBase64EncodePolicy`` sends it."""
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def decode(content: str) -> str:
    """A received message's text: base64 of UTF-8 decoded, anything else as it is."""
    try:
        return base64.b64decode(content, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return content


def _handle(message: QueueMessage) -> Handle:
    return Handle(str(message.id), str(message.pop_receipt))


class AzureQueue:
    """The ``MessageQueue`` port over one ``QueueClient`` without encode or decode policy."""

    def __init__(self, client: QueueClient, *, raw: bool = False) -> None:
        for policy in ("_message_encode_policy", "_message_decode_policy"):
            kind = type(getattr(client, policy, None)).__name__
            if kind not in ("NoEncodePolicy", "NoDecodePolicy", "NoneType"):
                raise ValueError(f"AzureQueue encodes messages itself: give it a client without "
                                 f"{policy.strip('_').replace('_', ' ')} (this one has {kind})")
        self.client = client
        self.raw = raw

    def _encode(self, text: str) -> str:
        return text if self.raw else encode(text)

    def _decode(self, content: str) -> str:
        return content if self.raw else decode(content)

    @property
    def name(self) -> str:
        return str(self.client.queue_name)

    def send(self, text: str, *, visibility_timeout: int | None = None,
             time_to_live: int | None = None) -> Handle:
        with translating():
            sent = self.client.send_message(self._encode(text),
                                            visibility_timeout=visibility_timeout,
                                            time_to_live=time_to_live)
        return _handle(sent)

    def receive(self, *, max_messages: int = 1,
                visibility_timeout: int | None = None) -> list[Message]:
        with translating():  # one call (one page): storage refuses more than 32, as documented
            received = list(self.client.receive_messages(max_messages=max_messages,
                                                         messages_per_page=max_messages,
                                                         visibility_timeout=visibility_timeout))
        return [Message(_handle(m), self._decode(str(m.content)), int(m.dequeue_count or 0))
                for m in received]

    def update(self, handle: Handle, *, visibility_timeout: int) -> Handle:
        with translating():
            updated = self.client.update_message(handle.message_id, handle.pop_receipt,
                                                 visibility_timeout=visibility_timeout)
        return Handle(handle.message_id, str(updated.pop_receipt))

    def delete(self, handle: Handle) -> None:
        with translating():
            self.client.delete_message(handle.message_id, handle.pop_receipt)

    def approximate_count(self) -> int:
        with translating():
            return int(self.client.get_queue_properties().approximate_message_count or 0)

    def peek(self, *, max_messages: int = 1) -> list[Peeked]:
        with translating():
            peeked = self.client.peek_messages(max_messages=max_messages)
        return [Peeked(str(m.id), self._decode(str(m.content)), m.inserted_on,
                       int(m.dequeue_count or 0)) for m in peeked]
