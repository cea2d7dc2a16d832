"""Azure Functions entry points (v2 programming model): triggers and bindings only.

All logic lives in ``shared/``; each function hands its trigger's payload to it.
"""

import json
import os

import azure.functions as func

from shared.config.names import intake_binding_expression, intake_function_name
from shared.config.settings import COMPLETIONS_QUEUE_NAME, load_config
from shared.leadership import elections, intake, sweeper
from shared.leadership.reconcile import run_reconcile
from shared.web import admin, api, status
from shared.wiring import get_app, validate_environment

validate_environment()  # a bad setting (e.g. LEASE_SECONDS=90) stops the app at start-up
app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)


@app.function_name("record_completion")
@app.queue_trigger(arg_name="msg", queue_name="%COMPLETIONS_QUEUE_NAME%",
                   connection="AzureWebJobsStorage")
def record_completion(msg: func.QueueMessage) -> None:
    """Record one step's completion, then try to lead and commit what is ready."""
    intake.handle_completion(get_app(), msg.get_body(), message_id=msg.id or "",
                               dequeue_count=msg.dequeue_count or 1)


# INTAKE_QUEUES = Q > 1: queue q (COMPLETIONS_QUEUE_NAME-q) triggers record_completion_q, which
# does what record_completion does (shared/config/names.py names them).
for _q in range(1, load_config(os.environ).intake_queues):
    app.function_name(intake_function_name(_q))(app.queue_trigger(
        arg_name="msg", queue_name=intake_binding_expression(COMPLETIONS_QUEUE_NAME.name, _q),
        connection="AzureWebJobsStorage")(
        intake.queue_handler(get_app, func.QueueMessage, intake_function_name(_q))))


@app.function_name("wake_up")
@app.queue_trigger(arg_name="msg", queue_name="%WAKEUP_QUEUE_NAME%",
                   connection="AzureWebJobsStorage")
def wake_up(msg: func.QueueMessage) -> None:
    """A lease alarm came due (its holder stopped renewing?): compete and commit what waits.
    Or a leader handed an outbox row off: send its outcome events."""
    elections.handle_wakeup(get_app(), msg.get_body())


@app.function_name("sweep")
@app.timer_trigger(arg_name="timer", schedule="0 * * * * *", run_on_startup=False)
def sweep(timer: func.TimerRequest) -> None:
    """Every minute: run the election so that nothing waits for the next message."""
    sweeper.sweep(get_app())


@app.function_name("reconcile")
@app.timer_trigger(arg_name="timer", schedule="0 */5 * * * *", run_on_startup=False)
def reconcile(timer: func.TimerRequest) -> None:
    """Every 5 minutes: check every shard's invariants (logged for the alert), then archive one
    batch of rows older than RETENTION_DAYS."""
    run_reconcile(get_app())


def _json(reply: api.Reply) -> func.HttpResponse:
    return func.HttpResponse(json.dumps(reply.body), status_code=reply.status,
                             mimetype="application/json")


@app.function_name("get_account")
@app.route(route="accounts/{accountId}", methods=["GET"])
def get_account(req: func.HttpRequest) -> func.HttpResponse:
    """The committed balance of one account."""
    return _json(api.account(get_app(), req.route_params["accountId"]))


@app.function_name("get_request")
@app.route(route="requests/{requestId}", methods=["GET"])
def get_request(req: func.HttpRequest) -> func.HttpResponse:
    """The status of one request: pending, committed, aborted, rejected or expired."""
    return _json(api.request(get_app(), req.route_params["requestId"]))


@app.function_name("get_leader")
@app.route(route="leader", methods=["GET"])
def get_leader(req: func.HttpRequest) -> func.HttpResponse:
    """Who leads, with which epoch, and how much work waits."""
    return _json(api.leader(get_app()))


@app.function_name("get_status_page")
@app.route(route="status", methods=["GET"])
def get_status_page(req: func.HttpRequest) -> func.HttpResponse:
    """The live status page: one HTML file that polls /api/metrics (needs no storage itself)."""
    return func.HttpResponse(status.page_html(), mimetype="text/html")


@app.function_name("get_metrics")
@app.route(route="metrics", methods=["GET"])
def get_metrics(req: func.HttpRequest) -> func.HttpResponse:
    """What the status page shows, as JSON; 503 with the reason when storage cannot answer."""
    return _json(status.metrics_reply(get_app))


@app.function_name("reshard")
@app.route(route="reshard", methods=["POST"], auth_level=func.AuthLevel.ADMIN)
def reshard(req: func.HttpRequest) -> func.HttpResponse:
    """Move the ledger to ``?to=K`` shards (the master key only); calling again resumes."""
    return _json(admin.reshard_reply(get_app(), req.params))
