"""Entity-group transactions without the SDK's e-mail-package multipart code, for the commit path.

``TableClient.submit_transaction`` builds and parses the multipart ``$batch`` body with Python's
``email`` package: measured on the leader's drain, that is most of the leader's CPU per commit
(tens of milliseconds for 100 operations), and commits are the one strictly serial step (the
background deletes of consumed rows take the same process's CPU from them). This
module writes the same request (the format the SDK sends, operation for operation) with string
joins and reads the answer with a regular expression, through the table client's own pipeline
(authentication, retries, request hooks and timeouts unchanged).

It handles the operations the ledger and the completion store use, each written as the SDK's
``TableBatchOperations`` writes it (verb, URL, headers in its order, ``x-ms-date`` and ``Date``):
``create`` (POST); ``update`` (PUT to replace, PATCH to merge, ``If-Match`` the ETag or ``*``);
``upsert`` (insert or replace: PUT, insert or merge: PATCH, the SDK's default; no ``If-Match``);
``delete`` (DELETE, ``If-Match`` the ETag or ``*``, no body). Keys must be ``str`` and values
(a delete sends none) strings, enums (written as strings), booleans, 32-bit integers or None
(left out); an ETag is quoted as the SDK quotes one that is not quoted yet. Each result
is what the SDK returns for the operation: ``{"etag": ...}``, or ``{}`` for a delete, whose
answer has no ETag. Anything else (other types, options or conditions, a merge on a Cosmos
endpoint, which the SDK sends as a POST), an empty batch, a table client without the
attributes this module relies on, and a batch that the SDK refuses before sending (an entity
without keys, a second PartitionKey: ``ValueError``) go through
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
import time
import uuid
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any
from urllib.parse import quote
from wsgiref.handlers import format_date_time

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
    """Like ``table.submit_transaction(operations)``: each operation's metadata, as the SDK's
    (``{"etag": ...}``, or ``{}`` for a delete, whose answer has no ETag).

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
    if client is None or hostname is None or not operations:
        return list(table.submit_transaction(operations, **kwargs))
    date = format_date_time(time.time())
    cosmos = getattr(table, "_cosmos_endpoint", True)
    parts = [_part(table_url, operation, table.api_version, date, cosmos)
             for operation in operations]
    if any(part is None for part in parts):
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


def _part(table_url: str, operation: Any, version: str, date: str, cosmos: bool) -> str | None:
    """One operation as the sub-request of a changeset, or None when this module cannot.

    Each is the request ``TableBatchOperations`` builds (``_table_batch.py``), headers in its
    order, with the ``x-ms-date`` and ``Date`` its ``StorageHeadersPolicy`` adds.
    """
    kind = operation[0].lower() if isinstance(operation[0], str) else None
    entity: Mapping[str, Any] = operation[1]
    options: Mapping[str, Any] = operation[2] if len(operation) > 2 else {}
    partition, row = entity["PartitionKey"], entity["RowKey"]
    if type(partition) is not str or type(row) is not str:
        return None  # the SDK quotes other keys in ways of its own (or refuses them)
    if kind == "create":
        payload = _payload(entity)
        if options or payload is None:
            return None
        return _request("POST", table_url, version, date, payload=payload, minimal=True)
    url = f"{table_url}(PartitionKey='{_key(partition)}',RowKey='{_key(row)}')"
    if kind == "delete":
        if_match = _if_match(options) if set(options) <= {"etag", "match_condition"} else None
        if if_match is None:
            return None
        return _request("DELETE", url, version, date, if_match=if_match, minimal=True)
    if kind == "update" and set(options) <= {"mode", "etag", "match_condition"}:
        if_match = _if_match(options)  # an update without an ETag is "If-Match: *"
        if if_match is None:
            return None
    elif kind == "upsert" and set(options) <= {"mode"}:
        if_match = None  # insert or replace/merge: no condition at all
    else:
        return None
    mode = options.get("mode", UpdateMode.MERGE)  # the SDK's default, for both
    payload = _payload(entity)
    if payload is None:
        return None
    if mode == UpdateMode.REPLACE:
        return _request("PUT", url, version, date, payload=payload, if_match=if_match)
    if mode == UpdateMode.MERGE and not cosmos:  # Cosmos gets a POST with X-HTTP-Method
        return _request("PATCH", url, version, date, payload=payload, if_match=if_match)
    return None  # another mode: the SDK's ValueError


def _if_match(options: Mapping[str, Any]) -> str | None:
    """The ``If-Match`` the SDK sends for an update or a delete, or None for its other rules."""
    condition, etag = options.get("match_condition"), options.get("etag")
    if condition is MatchConditions.IfNotModified and etag and isinstance(etag, str):
        return _quote_etag(etag)
    if condition in (None, MatchConditions.Unconditionally) and not etag:
        return "*"
    return None  # another condition, or an ETag without its condition: the SDK's rules


def _quote_etag(etag: str) -> str:
    """As azure-data-tables' ``quote_etag``: an ETag that is not quoted yet gets quotes."""
    if etag == "*" or etag.startswith("W/") or (etag.startswith('"') and etag.endswith('"')) \
            or (etag.startswith("'") and etag.endswith("'")):
        return etag
    return f'"{etag}"'


def _request(verb: str, url: str, version: str, date: str, *, payload: str | None = None,
             if_match: str | None = None, minimal: bool = False) -> str:
    lines = [f"{verb} {url} HTTP/1.1"]
    if payload is not None:  # Content-Type and Content-Length only where there is a body
        lines += ["Content-Type: application/json", f"Content-Length: {len(payload.encode())}"]
    lines += [f"x-ms-version: {version}", "DataServiceVersion: 3.0",
              "Accept: application/json;odata=minimalmetadata" if minimal
              else "Accept: application/json"]
    if if_match is not None:
        lines.append(f"If-Match: {if_match}")
    lines += [f"x-ms-date: {date}", f"Date: {date}", "", payload or ""]
    return "\r\n".join(lines)


def _key(value: str) -> str:
    return quote(value.replace("'", "''"), safe="")


def _payload(entity: Mapping[str, Any]) -> str | None:
    """The entity's JSON as the SDK's ``_add_entity_properties`` writes it, or None for types
    this module leaves to the SDK (which it converts or refuses)."""
    properties: dict[str, Any] = {}
    for name, value in entity.items():
        if value is None:
            continue  # the SDK leaves it out
        if isinstance(value, Enum):
            properties[name] = str(value)
            properties[f"{name}@odata.type"] = "Edm.String"
        elif type(value) is str:
            properties[name] = value
            properties[f"{name}@odata.type"] = "Edm.String"
        elif type(value) is bool or (type(value) is int and value in _INT32):
            properties[name] = value
        else:
            return None
    return json.dumps(properties)


def _results(body: bytes, count: int, response: Any) -> list[Mapping[str, Any]]:
    boundary = _BOUNDARY.search(body)
    if boundary is None:
        raise HttpResponseError(message="the transaction's answer has no changeset; whether it "
                                "was applied is unknown", response=response)
    parts = [(p, line) for p in body.split(b"--" + boundary.group(1))[1:]
             if (line := _STATUS.search(p))]
    results: list[Mapping[str, Any]] = []
    for part, line in parts:
        status = int(line.group(1))
        if not 200 <= status < 300:
            raise _refusal(part, status)
        headers_end = part.find(b"\r\n\r\n", line.end())  # the sub-response's headers only
        etag = _ETAG.search(part, line.end(), headers_end if headers_end >= 0 else len(part))
        results.append({"etag": etag.group(1).decode()} if etag else {})  # none for a delete
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
