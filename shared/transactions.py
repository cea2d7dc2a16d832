"""Entity-group transactions without the SDK's e-mail-package multipart code, for the commit path.

``TableClient.submit_transaction`` builds and parses the multipart ``$batch`` body with Python's
``email`` package: measured on the leader's drain, that is most of the leader's CPU per commit
(tens of milliseconds for 100 operations), and commits are the one strictly serial step. This
module writes the same request (the format the SDK sends, operation for operation) with string
joins and reads the answer with a regular expression, through the table client's own pipeline
(authentication, retries, request hooks and timeouts unchanged).

It handles the operations the ledger uses: ``create`` and ``update`` (replace, with or without
``If-Match``) of entities whose values are strings, booleans and 32-bit integers. Anything else,
a table client without the attributes it relies on, and a batch that the SDK refuses before
sending (an entity without keys, a second PartitionKey: ``ValueError``) go through
``submit_transaction`` unchanged, to be refused as the SDK refuses them. An ETag is refused as
``http.client`` refuses a header value for the SDK, whichever path the batch takes:
``UnicodeEncodeError`` outside Latin-1, ``ValueError`` with a CR or LF (which would end the
``If-Match`` line and make the rest of the ETag headers, ``If-Match: *`` say); so is a CR or LF
that folds the line, which ``http.client`` lets through. Refusals from storage are raised as the
SDK raises them: ``TableTransactionError`` with the failing operation's ``index`` and
``error_code`` (``RequestTooLargeError`` for a 413).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from azure.core import MatchConditions
from azure.core.exceptions import HttpResponseError
from azure.core.rest import HttpRequest
from azure.data.tables import RequestTooLargeError, TableClient, TableTransactionError, UpdateMode

_INT32 = range(-(2**31), 2**31)
_STATUS = re.compile(rb"HTTP/1\.1 (\d{3})")
_ETAG = re.compile(rb"(?im)^ETag:[ \t]*(.+?)[ \t]*\r?$")
_BOUNDARY = re.compile(rb"boundary=(changesetresponse_[^\s;]+)")


def submit_transaction(table: TableClient, operations: Sequence[Any],
                       **kwargs: Any) -> list[Mapping[str, Any]]:
    """Like ``table.submit_transaction(operations)``: each operation's metadata (its ``etag``).

    ``kwargs`` go to the pipeline (a ``raw_response_hook``, say), as the SDK's call takes them.
    """
    client = getattr(table, "_client", None)
    hostname = getattr(table, "_primary_hostname", None)
    table_url = f"{table.scheme}://{hostname}/{table.table_name}"
    entities = [operation[1] for operation in operations]
    if any("PartitionKey" not in entity or "RowKey" not in entity for entity in entities) \
            or len({entity["PartitionKey"] for entity in entities}) > 1:
        return list(table.submit_transaction(operations, **kwargs))  # refused before sending
    for operation in operations:
        _check_etag(operation[2] if len(operation) > 2 else {})
    parts = [_part(table_url, operation) for operation in operations]
    if client is None or hostname is None or any(part is None for part in parts):
        return list(table.submit_transaction(operations, **kwargs))
    changeset = f"changeset_{uuid.uuid4()}"
    batch = f"batch_{uuid.uuid4()}"
    body = "".join([
        f"--{batch}\r\nContent-Type: multipart/mixed; boundary={changeset}\r\n\r\n",
        *(f"--{changeset}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: "
          f"binary\r\nContent-ID: {index}\r\n\r\n{part}\r\n"
          for index, part in enumerate(parts)),
        f"--{changeset}--\r\n\r\n--{batch}--\r\n",
    ]).encode()
    request = HttpRequest("POST", f"{table.scheme}://{hostname}/$batch", headers={
        "x-ms-version": table.api_version, "DataServiceVersion": "3.0",
        "MaxDataServiceVersion": "3.0;NetFx", "Accept": "application/json",
        "Content-Type": f"multipart/mixed; boundary={batch}"}, content=body)
    response = client.send_request(request, stream=True, **kwargs)  # as the SDK: no JSON
    answer = response.read()
    if response.status_code != 202:
        refused = RequestTooLargeError if response.status_code == 413 else HttpResponseError
        raise refused(message=f"the transaction was refused as a whole "
                      f"({response.status_code}): {answer[:500]!r}", response=response)
    return _results(answer, len(operations), response)


def _check_etag(options: Mapping[str, Any]) -> None:
    """Refuse an ETag that must not go in a header (see the module docstring)."""
    etag = options.get("etag")
    if isinstance(etag, str):
        raw = etag.encode("latin-1")
        if b"\r" in raw or b"\n" in raw:
            raise ValueError(f"Invalid header value {raw!r}")


def _part(table_url: str, operation: Any) -> str | None:
    """One operation as the sub-request of a changeset, or None when this module cannot."""
    kind, entity = operation[0], operation[1]
    options: Mapping[str, Any] = operation[2] if len(operation) > 2 else {}
    payload = _payload(entity)
    if payload is None or not isinstance(entity["PartitionKey"], str) \
            or not isinstance(entity["RowKey"], str):
        return None
    headers = ["Content-Type: application/json", f"Content-Length: {len(payload.encode())}",
               "x-ms-version: 2019-02-02", "DataServiceVersion: 3.0"]
    if kind == "create" and not options:
        return "\r\n".join([f"POST {table_url} HTTP/1.1", *headers,
                            "Accept: application/json;odata=minimalmetadata", "", payload])
    if kind == "update" and options.get("mode", UpdateMode.MERGE) is UpdateMode.REPLACE \
            and set(options) <= {"mode", "etag", "match_condition"}:
        condition, etag = options.get("match_condition"), options.get("etag")
        if condition is MatchConditions.IfNotModified and etag:
            headers.append(f"If-Match: {etag}")
        elif condition in (None, MatchConditions.Unconditionally) and not etag:
            headers.append("If-Match: *")
        else:
            return None  # another condition, or an ETag without its condition: the SDK's rules
        key = (f"(PartitionKey='{_key(entity['PartitionKey'])}',"
               f"RowKey='{_key(entity['RowKey'])}')")
        return "\r\n".join([f"PUT {table_url}{key} HTTP/1.1", *headers,
                            "Accept: application/json", "", payload])
    return None


def _key(value: str) -> str:
    return quote(value.replace("'", "''"), safe="")


def _payload(entity: Mapping[str, Any]) -> str | None:
    properties: dict[str, Any] = {}
    for name, value in entity.items():
        if isinstance(value, bool) or (isinstance(value, int) and value in _INT32):
            properties[name] = value
        elif isinstance(value, str):
            properties[name] = value
            properties[f"{name}@odata.type"] = "Edm.String"
        else:
            return None
    return json.dumps(properties)


def _results(body: bytes, count: int, response: Any) -> list[Mapping[str, Any]]:
    boundary = _BOUNDARY.search(body)
    if boundary is None:
        raise HttpResponseError(message="the transaction's answer has no changeset; whether it "
                                "was applied is unknown", response=response)
    parts = [p for p in body.split(b"--" + boundary.group(1))[1:] if _STATUS.search(p)]
    results: list[Mapping[str, Any]] = []
    for part in parts:
        status = int(_STATUS.search(part).group(1))  # type: ignore[union-attr]
        if not 200 <= status < 300:
            raise _refusal(part, status)
        etag = _ETAG.search(part)
        results.append({"etag": etag.group(1).decode() if etag else None})
    if len(results) != count:
        raise HttpResponseError(message=f"the transaction's answer has {len(results)} results "
                                f"for {count} operations", response=response)
    return results


def _refusal(part: bytes, status: int) -> TableTransactionError:
    code, message = "", f"the transaction was refused ({status})"
    start = part.find(b"{")
    if start >= 0:
        try:
            error = json.loads(part[start:part.rfind(b"}") + 1])["odata.error"]
            code = str(error.get("code", ""))
            message = str(error.get("message", {}).get("value", message))
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
    # The message starts with the failing operation's index ("1:The specified entity..."),
    # which is where TableTransactionError reads it from, as the SDK does.
    refused = RequestTooLargeError if status == 413 else TableTransactionError
    refusal = refused(message=f"{message}\nErrorCode:{code}")
    refusal.error_code = code  # type: ignore[attr-defined]
    refusal.status_code = status
    return refusal
