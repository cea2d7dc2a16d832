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
class IndexedApp:
    """The functions of ``function_app.app`` by trigger kind."""

    by_name: dict[str, Any]
    queue_name_setting: str
    queue_handler: Callable[[func.QueueMessage], None]
    timer_handler: Callable[[func.TimerRequest], None]
    routes: tuple[HttpRoute, ...]


def _route_pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}]+\})", template.strip("/"))
    regex = "".join(f"(?P<{p[1:-1].split(':')[0]}>[^/]+)" if p.startswith("{") else re.escape(p)
                    for p in parts)
    return re.compile(f"^/api/{regex}/?$")


@functools.cache
def indexed() -> IndexedApp:
    """Index ``function_app.app`` once per process."""
    import function_app

    functions: dict[str, Any] = {str(f.get_function_name()): f
                                 for f in function_app.app.get_functions()}
    triggers: dict[str, Any] = {name: fn.get_trigger() for name, fn in functions.items()}
    queue_fn = next(functions[n] for n, t in triggers.items() if t.type == "queueTrigger")
    timer_fn = next(functions[n] for n, t in triggers.items() if t.type == "timerTrigger")
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
        queue_name_setting=queue_fn.get_trigger().queue_name,
        queue_handler=queue_fn.get_user_function(),
        timer_handler=timer_fn.get_user_function(),
        routes=tuple(routes),
    )


def resolve_setting(expression: str, env: dict[str, str], defaults: dict[str, str]) -> str:
    """Resolve a ``%SETTING%`` binding expression as the host does (with the app's defaults)."""
    match = re.fullmatch(r"%([^%]+)%", expression)
    if not match:
        return expression
    name = match.group(1)
    value = env.get(name) or defaults.get(name)
    if not value:
        raise KeyError(f"app setting {name} is not set")
    return value
