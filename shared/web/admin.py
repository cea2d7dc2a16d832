"""Operator actions over HTTP (auth level ADMIN: only the app's master key may call them).

``POST /api/reshard?to=K`` runs ``shared/leadership/reshard.py`` in the invocation, as
``./dev cli reshard --to K`` does from an operator's machine. It answers with the reshard's
report (200), 400 for a ``to`` that is not 1-64, 409 when it was refused (another reshard with
another target is open, or ``resume=true`` found none open), 503 when it stopped (storage, a
lease that stayed held): its journal keeps where it stopped, and calling again resumes it. An
HTTP call must answer within 230 s in Azure (and the function within ``functionTimeout``): a
ledger too large for that finishes over several calls, each resuming the journal.
"""

from __future__ import annotations

from collections.abc import Mapping

from shared.config.names import MAX_SHARDS
from shared.errors import StorageError
from shared.leadership.instance import LedgerApp
from shared.leadership.reshard import ReshardError, ReshardRefused, reshard
from shared.web.api import Reply

RESUME_HINT = "its journal keeps where it stopped: call again to resume it"


def reshard_reply(app: LedgerApp, params: Mapping[str, str]) -> Reply:
    """``POST /api/reshard?to=K[&resume=true]``."""
    text = params.get("to", "")
    if not text.isdigit() or not 1 <= int(text) <= MAX_SHARDS:
        return Reply(400, {"error": f"to={text!r}: give the number of shards, 1-{MAX_SHARDS}"})
    resume = params.get("resume", "").lower() in ("1", "true", "yes")
    try:
        report = reshard(app, int(text), resume=resume)
    except ReshardRefused as exc:
        return Reply(409, {"error": str(exc)})
    except (ReshardError, StorageError) as exc:
        return Reply(503, {"error": f"{exc}; {RESUME_HINT}"})
    app.topology.reload()  # this worker reads by the new map at once (the others within 5 s)
    return Reply(200, report.as_json())
