"""host.json as the Functions host reads it: the document, and its ``hh:mm:ss`` TimeSpans."""

from __future__ import annotations

import json
from typing import Any

from simulator import REPO_ROOT


def read_host_json() -> dict[str, Any]:
    """The repository's host.json."""
    document: dict[str, Any] = json.loads((REPO_ROOT / "host.json").read_text())
    return document


def timespan_seconds(text: str) -> float:
    """A host.json TimeSpan (``hh:mm:ss``, seconds may have a fraction) in seconds."""
    hours, minutes, seconds = text.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
