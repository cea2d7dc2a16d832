"""The app's functions as the Functions host indexes them, for the simulator and the tests.

``FunctionApp.get_functions()`` may be called once per app object (a second call fails its
unique-name check), as the real worker does: ``indexed()`` calls it once and caches the result.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import azure.functions as func


@dataclass(frozen=True)
class HttpRoute:
    """One HTTP-triggered function: its route template compiled to a regex."""

    name: str
    template: str
    methods: tuple[str, ...]
    pattern: re.Pattern[str]
    handler: Callable[[func.HttpRequest], func.HttpResponse]
    auth_level: str


@dataclass(frozen=True)
class QueueTrigger:
    """One queue-triggered function: the binding expression of its queue, and its handler."""

    name: str
    queue_name_setting: str
    handler: Callable[[func.QueueMessage], None]


COMPLETIONS_FUNCTION = "record_completion"


@dataclass(frozen=True)
class IndexedApp:
    """The functions of ``function_app.app`` by trigger kind."""

    by_name: dict[str, Any]
    queues: tuple[QueueTrigger, ...]
    timer_handler: Callable[[func.TimerRequest], None]
    routes: tuple[HttpRoute, ...]

    @property
    def completions(self) -> QueueTrigger:
        """The trigger of the completions queue (intake queue 0)."""
        return next(q for q in self.queues if q.name == COMPLETIONS_FUNCTION)

    @property
    def intake(self) -> tuple[QueueTrigger, ...]:
        """The triggers of every intake queue (``INTAKE_QUEUES``), queue 0 first."""
        return tuple(q for q in self.queues if q.name == COMPLETIONS_FUNCTION
                     or q.name.startswith(f"{COMPLETIONS_FUNCTION}_"))

    @property
    def queue_handler(self) -> Callable[[func.QueueMessage], None]:
        """The completions queue's handler."""
        return self.completions.handler

    @property
    def queue_name_setting(self) -> str:
        """The completions queue's binding expression."""
        return self.completions.queue_name_setting


def _route_pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}]+\})", template.strip("/"))
    regex = "".join(f"(?P<{p[1:-1].split(':')[0]}>[^/]+)" if p.startswith("{") else re.escape(p)
                    for p in parts)
    return re.compile(f"^/api/{regex}/?$")


@functools.cache
def indexed() -> IndexedApp:
    """Index ``function_app.app`` once per process."""
    import function_app

    return index(function_app.app)


def index(app: func.FunctionApp) -> IndexedApp:
    """The functions of one ``FunctionApp`` (``get_functions()`` is called: once per app)."""
    functions: dict[str, Any] = {str(f.get_function_name()): f for f in app.get_functions()}
    triggers: dict[str, Any] = {name: fn.get_trigger() for name, fn in functions.items()}
    queues = tuple(QueueTrigger(name, t.queue_name, functions[name].get_user_function())
                   for name, t in triggers.items() if t.type == "queueTrigger")
    timer_fn = functions["sweep"]  # the election backstop (reconcile is another timer)
    routes = []
    for name, fn in functions.items():
        trigger = triggers[name]
        if trigger.type != "httpTrigger":
            continue
        methods = tuple(str(getattr(m, "value", m)) for m in (trigger.methods or ["GET"]))
        routes.append(HttpRoute(name, trigger.route, methods, _route_pattern(trigger.route),
                                fn.get_user_function(),
                                str(getattr(trigger.auth_level, "value", trigger.auth_level))))
    return IndexedApp(
        by_name=functions,
        queues=queues,
        timer_handler=timer_fn.get_user_function(),
        routes=tuple(routes),
    )


def resolve_setting(expression: str, env: dict[str, str], defaults: dict[str, str]) -> str:
    """Resolve every ``%SETTING%`` token of a binding expression as the host does (its
    ``ResolveWholeString``: ``%COMPLETIONS_QUEUE_NAME%-2`` gives ``completions-2``), with the
    app's defaults for settings the environment does not set."""
    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        resolved = env.get(name) or defaults.get(name)
        if not resolved:
            raise KeyError(f"app setting {name} is not set")
        return resolved

    return re.sub(r"%([^%]+)%", value, expression)
